"""The built-in model `python -m serve` runs with no --model: a tiny Qwen3-MoE, no download.

Everything is deterministic: a byte-level BPE tokenizer whose merges are learned here from a
fixed paragraph (our own learner, so the result cannot depend on a library's tie-breaking),
Qwen3's special tokens and a chat template that behaves like Qwen3's, and weights drawn from a
seeded numpy generator. It is materialized once as a real Hugging Face checkpoint directory
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json)
under the user's cache dir and then loaded through `qwen3_jax.load` like any other checkpoint,
so the built-in path exercises the same loader, tokenizer and template code as a real model.
The weights are random: the text it writes is fluent only in bytes.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from .chat_template import QWEN3_STYLE_TEMPLATE

BUILDER_VERSION = "1"
SEED = 1234
NUM_MERGES = 256

# Qwen3's tokens, in Qwen3's order, appended after the BPE vocabulary.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ADDED_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Qwen2/Qwen3's pre-tokenizer split: contractions, letter runs with one leading non-letter,
# single digits, punctuation runs, newlines, whitespace.
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CONFIG = dict(
    vocab_size=576,  # BPE 512 + 9 added tokens, padded to a multiple of 64 as Qwen pads its vocab
    hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
    norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=4096, rope_theta=1_000_000.0,
    tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
)

# The text the merges are learned from (written for this project).
CORPUS = """\
The server reads a checkpoint, splits every weight over the devices of a mesh, and answers
requests as they arrive. A request is a prompt and a few numbers: how many tokens to write, how
warm the sampling should be, where to stop. The engine keeps a fixed number of slots; each slot
holds one request and its key-value cache. New requests join between decode steps, finished
requests leave, and the batch keeps moving. Experts are spread over the devices so that every
token finds the two experts it was routed to without waiting for the others.
Hello! How are you today? I am fine, thank you. What would you like to know about the weather,
the mountains, the rivers and the sea? Tell me a story about a small robot that learned to paint.
Once upon a time there was a little model that wanted to write poems. It read every book in the
library, counted the words, and then it started to write: the sun is warm, the water is cold,
the night is long and the stars are bright.
def generate(prompt, max_tokens=16, temperature=0.0):
    tokens = tokenizer.encode(prompt)
    for step in range(max_tokens):
        logits = model(tokens)
        tokens.append(int(logits.argmax()))
    return tokenizer.decode(tokens)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2025. Questions and answers, user and assistant,
system messages and tool calls: {"name": "get_weather", "arguments": {"city": "Paris"}}.
"""


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table byte-level BPE (and tokenizers' ByteLevel) uses.

    Printable Latin-1 bytes map to themselves; the other 68 bytes are shifted to 256+.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on pre-tokenized, byte-mapped words. Ties go to the lexicographically smallest pair."""
    counts = collections.Counter(words)
    splits = {w: list(w) for w in counts}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for w, n in counts.items():
            parts = splits[w]
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        for w in counts:
            parts, out, i = splits[w], [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    return merges


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tokenizer():
    """A `tokenizers.Tokenizer`: byte-level BPE (256 bytes + NUM_MERGES merges) + Qwen3's tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    pre = _pre_tokenizer()
    words = [piece for piece, _ in pre.pre_tokenize_str(CORPUS)]
    merges = learn_merges(words, NUM_MERGES)
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tok


def _weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 weights. Std 1/sqrt(fan_in) keeps activations O(1) through the layers and
    logits spread out (std ~1), so greedy choices are not near-ties that rounding could flip."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    d, h, k, q = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    e, f, v = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["vocab_size"]

    def lin(out_dim, in_dim):
        return rng.standard_normal((out_dim, in_dim), np.float32) / np.sqrt(in_dim)

    def norm(dim):
        return 1.0 + 0.1 * rng.standard_normal(dim, np.float32)

    t = {"model.embed_tokens.weight": rng.standard_normal((v, d), np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(d)
        t[p + "post_attention_layernorm.weight"] = norm(d)
        t[p + "self_attn.q_proj.weight"] = lin(h * q, d)
        t[p + "self_attn.k_proj.weight"] = lin(k * q, d)
        t[p + "self_attn.v_proj.weight"] = lin(k * q, d)
        t[p + "self_attn.o_proj.weight"] = lin(d, h * q)
        t[p + "self_attn.q_norm.weight"] = norm(q)
        t[p + "self_attn.k_norm.weight"] = norm(q)
        t[p + "mlp.gate.weight"] = lin(e, d)
        for x in range(e):
            t[p + f"mlp.experts.{x}.gate_proj.weight"] = lin(f, d)
            t[p + f"mlp.experts.{x}.up_proj.weight"] = lin(f, d)
            t[p + f"mlp.experts.{x}.down_proj.weight"] = lin(d, f)
    t["model.norm.weight"] = norm(d)
    t["lm_head.weight"] = lin(v, d)
    # Stored in bfloat16 like published Qwen3 checkpoints.
    return {name: a.astype(ml_dtypes.bfloat16) for name, a in t.items()}


def _files(tok) -> dict[str, dict]:
    """config.json, tokenizer_config.json and generation_config.json contents."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + ADDED_TOKENS}
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
              "use_sliding_window": False, "attention_bias": False, "torch_dtype": "bfloat16",
              "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], **CONFIG}
    added = {str(i): {"content": t, "special": t in SPECIAL_TOKENS, "normalized": False, "lstrip": False,
                      "rstrip": False, "single_word": False} for t, i in ids.items()}
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "errors": "replace", "split_special_tokens": False, "clean_up_tokenization_spaces": False,
        "model_max_length": CONFIG["max_position_embeddings"], "added_tokens_decoder": added,
        "chat_template": QWEN3_STYLE_TEMPLATE}
    generation_config = {"bos_token_id": ids["<|endoftext|>"],
                         "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                         "pad_token_id": ids["<|endoftext|>"], "do_sample": True,
                         "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    return {"config.json": config, "tokenizer_config.json": tokenizer_config,
            "generation_config.json": generation_config}


def fingerprint() -> str:
    h = hashlib.sha256(json.dumps([BUILDER_VERSION, SEED, NUM_MERGES, CONFIG, CORPUS, SPECIAL_TOKENS,
                                   ADDED_TOKENS, QWEN3_STYLE_TEMPLATE], sort_keys=True).encode())
    return h.hexdigest()[:12]


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qwen3-jax")


def write_builtin_checkpoint(directory: str) -> str:
    """Write the built-in checkpoint into `directory` (created). -> directory."""
    from qwen3_jax.safetensors_io import write_safetensors

    os.makedirs(directory, exist_ok=True)
    tok = build_tokenizer()
    tok.save(os.path.join(directory, "tokenizer.json"))
    for name, content in _files(tok).items():
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f, indent=2)
    write_safetensors(os.path.join(directory, "model.safetensors"), _weights(CONFIG, SEED),
                      metadata={"format": "pt"})
    return directory


def builtin_checkpoint(root: str | None = None) -> str:
    """Path of the built-in checkpoint, writing it on first use (atomically: tmp dir + rename)."""
    root = root or cache_root()
    path = os.path.join(root, f"builtin-{fingerprint()}")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".builtin-", dir=root)
    try:
        write_builtin_checkpoint(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
