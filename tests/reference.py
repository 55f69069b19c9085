"""Tiny Hugging Face reference checkpoints, written with transformers' own save_pretrained."""

from __future__ import annotations

import os

import numpy as np

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, rms_norm_eps=1e-6,
            max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)


def make_hf_checkpoint(directory: str, seed: int = 0, init_std: float = 0.08, **overrides) -> str:
    """Save a random transformers Qwen3MoeForCausalLM (float32) of the TINY config + overrides.

    A larger init std than the default 0.02 keeps logits spread out, so greedy ties are rare
    and the test compares real structure rather than near-uniform noise.
    """
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, init_std)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return directory


def hf_model(directory: str, dtype="float32"):
    import torch
    from transformers import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype),
                                                attn_implementation="eager")
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, tokens: np.ndarray, n: int) -> np.ndarray:
    import torch

    # An explicit all-ones mask: without it generate() treats every pad_token_id in the prompt as
    # padding. No EOS (instead of min_new_tokens, which bans the EOS token): exactly n argmax steps.
    ids = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[:, tokens.shape[1]:].numpy()


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(b).max())


def prefill_then_decode(m, tokens, cache_len):
    """A function for jax.jit(fn)(m.state, tokens): prefill `tokens` [B, T] into a fresh cache of
    `cache_len` positions, then one decode step -> (prefill logits [B, T, V], step logits [B, 1, V])."""
    import jax.numpy as jnp
    from flax import nnx

    b, t = tokens.shape

    def run(st, tok):
        model = nnx.merge(m.graphdef, st)
        logits, cache = model(tok, None, m.init_cache(b, cache_len))
        step, _ = model(tok[:, -1:], jnp.full((b, 1), t, jnp.int32), cache)
        return logits, step
    return run


def with_distinct_norms(m, seed: int = 0):
    """`m` (a qwen3_jax.Model) with every RMSNorm weight drawn from U(0.5, 1.5) per element and
    layer: random_model sets them all to ones, so a kernel reading the wrong layer's norm
    would go unnoticed. Returns a new Model sharing m's other params."""
    import zlib

    import jax
    import jax.numpy as jnp

    key = jax.random.key(seed)

    def redraw(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        if not any("norm" in n for n in names):
            return leaf
        k = jax.random.fold_in(key, zlib.crc32("/".join(names).encode()) % (2 ** 31))
        new = jax.random.uniform(k, leaf.shape, jnp.float32, 0.5, 1.5).astype(leaf.dtype)
        return jax.device_put(new, leaf.sharding)

    out = object.__new__(type(m))
    out.__dict__.update(m.__dict__)
    out.state = jax.tree_util.tree_map_with_path(redraw, m.state)
    return out


def penalized_greedy(model, prompt: list[int], n: int, presence: float, frequency: float,
                     repetition: float = 1.0, on_prompt: bool = True) -> list[int]:
    """Greedy decoding under the penalties, on the host: each step's full-context logits
    (qwen3_jax Model.logits, no cache), first with transformers' repetition penalty on every
    token of the prompt (on_prompt False: not the prompt's) and the output so far, then less
    OpenAI's presence / frequency penalties of the tokens generated so far. -> the n generated ids."""
    ids: list[int] = []
    for _ in range(n):
        logits = np.asarray(model.logits(np.array([prompt + ids]))[0, -1], np.float64)
        seen = np.zeros(logits.shape[0], bool)
        seen[(prompt if on_prompt else []) + ids] = True
        logits = np.where(seen, np.where(logits > 0, logits / repetition, logits * repetition), logits)
        counts = np.bincount(np.array(ids, np.int64), minlength=logits.shape[0])
        ids.append(int(np.argmax(logits - frequency * counts - presence * (counts > 0))))
    return ids
