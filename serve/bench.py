"""python -m serve.bench: decode and prefill speed of a Qwen3-MoE with random weights, every
figure next to its floor measured in the same run.

    python -m serve.bench --model Qwen3-30B-A3B[-FP8] --mesh tp=1 --batch 1,8,32,64,256 \\
        --context 1024 --prefill 1024,8192 [--layers N] [--out results.json] [--markdown]

Weights are random, created directly on the devices (qwen3_jax.random_model); `-FP8` presets
give Qwen's block-FP8 weights. `--model tiny[-FP8]` is a small built-in config (CPU, CI).

Ceilings (measured first, same process): a device copy `a * 2` (bytes read + written per
second) and a bf16 matmul (FLOP/s). Floors:
  decode step = bytes the step must read / copy bandwidth: attention, norms and router weights,
    the experts the batch touches (expected distinct experts of E for B tokens of top-k under
    uniform routing: E * (1 - (1 - k/E)^B) per layer), lm_head, B embedding rows, and the KV
    cache of `context` positions per sequence;
  prefill = max(FLOPs / matmul rate, all weight bytes / bandwidth), FLOPs = 2 x active params
    per token x T + causal attention 2 x T^2 x H x Q per layer + lm_head for the last token.
Decode: the KV positions are filled with random values, then `--steps` greedy decode steps run
inside one jitted call (a lax.scan over steps; per-step time = call time / steps), warm-up
excluded, median of `--reps` calls. `--single-step` batches are also timed one jitted call per
step, as a server without multi-step decode would run them. Prefill: one prompt of T tokens
into an empty cache, logits for the last token (= time to first token at batch 1).
`--layers N` builds N of the model's layers: per-layer costs scale, lm_head and embedding do
not; the output says so. `--hf-peer` times transformers' Qwen3MoeForCausalLM with the same
per-layer shapes in a child process (before JAX takes the GPU) and prints the ratio.
`--sweep` first times the kernels at one layer's shapes (qwen3_jax/kernels/tune.py) and
installs the fastest tiles for the rest of the run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, rms_norm_eps=1e-6,
            max_position_embeddings=4096, rope_theta=1_000_000.0, tie_word_embeddings=False,
            model_type="qwen3_moe")
FP8_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


# -- arguments and config ----------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m serve.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen3-30B-A3B",
                   help="preset name, checkpoint dir (config only), or tiny[-FP8]; several, comma-separated, "
                        "run one after the other in this process (one ceiling measurement, one sweep)")
    p.add_argument("--mesh", default="tp=1")
    p.add_argument("--batch", default="1,8,32,64,256", help="decode batch sizes")
    p.add_argument("--context", type=int, default=1024, help="KV positions each decode step attends to")
    p.add_argument("--prefill", default="1024,8192", help="prompt lengths (empty: none)")
    p.add_argument("--layers", type=int, default=None, help="build only N layers (per-layer costs scale)")
    p.add_argument("--steps", type=int, default=16, help="decode steps per jitted call")
    p.add_argument("--reps", type=int, default=5, help="timed calls per figure (median)")
    p.add_argument("--single-step", default="1", help="batches also timed one jitted call per step")
    p.add_argument("--idle-slots", type=int, default=0,
                   help="decode: this many more cache rows parked at position S (the context) ride along in "
                        "every step, as the engine's idle slots do; tok/s and the floor count the live rows")
    p.add_argument("--kernels", choices=["auto", "on", "off", "both"], default="auto",
                   help="Pallas kernels (auto: on for GPU); both: with, then without (the XLA baseline)")
    p.add_argument("--fp8-gemm", default="",
                   help="FP8 models: GEMV numerics to time, comma-separated (w8a8, w8a16); default: the library's")
    p.add_argument("--decode-unroll", default="",
                   help="layers per scan iteration of the decode step to time, comma-separated (default: the library's)")
    p.add_argument("--x-loads", default="",
                   help="decode: producer outputs finished in gemv x loads, variants comma-separated, each "
                        "'+'-joined from norm, swiglu, or 'none' (default: the library's)")
    p.add_argument("--prologue-programs", default="",
                   help="decode prologue: programs its grid aims for, comma-separated (default: the library's)")
    p.add_argument("--attention-combine", default="",
                   help="decode attention: where its key splits merge, comma-separated: kernel (the last "
                        "program of each row and kv head), xla (fusions after it) (default: the library's)")
    p.add_argument("--attention-prologue", default="",
                   help="decode attention: where q/k norm + RoPE and the cache write run, comma-separated: fused "
                        "(in the attention kernel), separate (a kernel of their own before it) (default: the library's)")
    p.add_argument("--fp8-matmul", default="",
                   help="FP8 models: the grouped matmul's MMA dtype (prefill, large batches) to time, "
                        "comma-separated: cast (x's dtype), f16, e4m3 (W8A8: x quantized per token and 128-group) "
                        "(default: the library's)")
    p.add_argument("--fp8-dot-acc", default="",
                   help="FP8 models: how the tensor cores accumulate an e4m3 x e4m3 dot (W8A8 kernels) to time, "
                        "comma-separated: mma (the whole dot, promoted per K step), f32 (Triton's default: every "
                        "32-deep MMA added into float32) (default: the library's)")
    p.add_argument("--matmul-large", default="",
                   help="prefill-sized grouped matmul tiles (grouped_matmul.MATMUL_DEFAULTS['large']) to time: "
                        "a JSON list of overrides, each over the library's, e.g. '[{}, {\"num_stages\": 4}]' "
                        "({} = the library's; an fp8_nk override replaces that whole dict)")
    p.add_argument("--fp8-matmul-lhs", default="",
                   help="FP8 models stored [out, in]: the prefill grouped matmul's left MMA operand to time, "
                        "comma-separated: x (the activations), w (the weight tile) (default: the library's)")
    p.add_argument("--fp8-dequantize-rows", default="",
                   help="FP8 models: rows per projection weight from which XLA dequantizes it to bf16 for "
                        "the matmul (prefill), comma-separated; 0 = never (default: the library's)")
    p.add_argument("--fp8-dequantize-moe-rows", default="",
                   help="FP8 models: assignments per expert from which an MoE layer's experts are "
                        "dequantized to one bf16 copy (long prefills), comma-separated; 0 = never "
                        "(default: the library's)")
    p.add_argument("--moe-routing", default="",
                   help="MoE blocks path (decode batches of 9+ tokens, prefill chunks): how the row blocks "
                        "are built, comma-separated: kernel-scan (the routing kernels at every size, real "
                        "rows written only), kernel (the routing kernels up to 4096 assignments, XLA above), "
                        "xla (argsort and scatters); the gate/up kernel gathers x's rows in each (default: the "
                        "library's)")
    p.add_argument("--moe-down-rows", default="",
                   help="MoE blocks path: the dtype of the down's rows the combine reads back, comma-separated: "
                        "x (the activations' dtype, bf16 for bf16/FP8 models), f32 (default: the library's)")
    p.add_argument("--moe-block-slack", default="",
                   help="MoE blocks path, from a mean of moe_blocks.SLACK_MIN_MEAN rows an expert (prefill "
                        "chunks): the row block's height over that mean (moe_blocks.BLOCK_ROWS_SLACK; rounded "
                        "up to a power of two, 16..128), comma-separated: A/B (default: the library's)")
    p.add_argument("--router-logits", default="",
                   help="router logits of 9-256 tokens, comma-separated: matmul (one split-K grouped matmul), "
                        "gemv (per-row programs, up to 64 tokens; XLA routing above) (default: the library's)")
    p.add_argument("--attention-programs", default="",
                   help="decode attention: key splits grow until batch x kv heads x splits reaches this many "
                        "programs (decode_attention.TARGET_PROGRAMS), comma-separated: A/B")
    p.add_argument("--attention-max-splits", default="",
                   help="decode attention: at most this many key splits (decode_attention.MAX_SPLITS), "
                        "comma-separated: A/B")
    p.add_argument("--x-quantize", default="",
                   help="W8A8 activation quantize in front of the FP8 grouped matmuls, comma-separated: xla "
                        "(three XLA kernels), kernel (one Pallas kernel, the norm in its loads) (default: the "
                        "library's, kernels.x_quantize.X_QUANTIZE)")
    p.add_argument("--fresh-prefill", default="",
                   help="prefill: a prompt's first chunk attends over its own K/V (on: cuDNN's fused causal "
                        "kernel) or reads them back from the cache (off: the chunk-attention kernel), "
                        "comma-separated (default: the library's, model.FRESH_PREFILL)")
    p.add_argument("--gemv-tokens", default="",
                   help="decode batches up to N tokens run the GEMV kernels (per-row programs) for the attention "
                        "projections, the router logits and the MoE experts; larger ones the grouped matmuls "
                        "(tensor-core row blocks), comma-separated N, or N/P for projections up to P rows on "
                        "the GEMV and the rest up to N: A/B (default: the library's)")
    p.add_argument("--projection-matmul", default="",
                   help="FP8 attention projections of 3-511 rows (one group of the grouped matmul): 'narrow' "
                        "(tiles narrowed for parallelism), 'split' (split-K programs), 'split-qkv' (split, q/k/v "
                        "in one launch) and/or 'narrow-qkv' (narrowed, then split; q/k/v in one launch; the "
                        "default), comma-separated: A/B")
    p.add_argument("--fp8-copy", default="",
                   help="FP8 models stored [out, in]: who writes the prefill's transposed bf16 copy of the "
                        "experts, comma-separated: kernel, xla (default: the library's)")
    p.add_argument("--fp8-order", default="",
                   help="FP8 models: the storage order of the expert and attention weights to time, "
                        "comma-separated: nk (the checkpoint's [out, in]), kn (the einsum order [in, out]); "
                        "one model built per order (default: the library's)")
    p.add_argument("--baseline-batch", default=None, help="with --kernels both: batches timed without kernels")
    p.add_argument("--baseline-prefill", default=None, help="with --kernels both: prompts timed without kernels")
    p.add_argument("--sweep", action="store_true", help="time kernel tiles first and install the fastest")
    p.add_argument("--sweep-gemv", action="store_true",
                   help="time the decode step's gemv shapes (qkv, o_proj, MoE) per tile variant and FP8 kind; "
                        "installs nothing")
    p.add_argument("--dump-hlo", metavar="DIR", default=None,
                   help="write each compiled decode step's and prefill's optimized HLO here, a folder per "
                        "variant (the profile's fusion names, e.g. loop_add_fusion, are defined there)")
    p.add_argument("--hf-peer", action="store_true", help="time transformers on the same shapes (child process)")
    p.add_argument("--hf-layers", type=int, default=2)
    p.add_argument("--hf-batch", default="1,64")
    p.add_argument("--memory-check", action="store_true", help="planned (sharding.memory) vs measured device memory")
    p.add_argument("--profile-batch", default="", help="decode batches to profile (kernels on): time per kernel")
    p.add_argument("--profile-prefill", default="", help="prompt lengths to profile (kernels on): time per kernel")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("--markdown", action="store_true", help="print BENCHMARKS.md rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-peer-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.idle_slots < 0:
        p.error(f"--idle-slots {args.idle_slots}: give a count of 0 or more")
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def resolve_bench_config(model: str, layers: int | None):
    from qwen3_jax.config import Qwen3MoeConfig, resolve_config

    if model.lower() in ("tiny", "tiny-fp8"):
        d = dict(TINY)
        if model.lower() == "tiny-fp8":
            d["quantization_config"] = FP8_QUANT
        cfg = Qwen3MoeConfig.from_dict(d, name=model)
    else:
        cfg = resolve_config(model)
    if layers is not None:
        if not 0 < layers <= cfg.num_hidden_layers:
            raise SystemExit(f"--layers {layers} must be in 1..{cfg.num_hidden_layers} for {cfg.name}")
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers,
                                  mlp_only_layers=tuple(i for i in cfg.mlp_only_layers if i < layers))
    return cfg


# -- ceilings ----------------------------------------------------------------------------------

def call_seconds(fn, reps: int, warmup: int = 1) -> list[float]:
    """Wall time of each of `reps` calls of fn (to completion on the device), after `warmup`."""
    import jax
    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return ts


def median_seconds(fn, reps: int, warmup: int = 1) -> float:
    return statistics.median(call_seconds(fn, reps, warmup))


def best_seconds(fn, reps: int, warmup: int = 1) -> float:
    """The fastest of `reps` calls: a ceiling is what the card can do, and slower calls (clock
    ramps, host hiccups) say nothing about that."""
    return min(call_seconds(fn, reps, warmup))


def measure_ceilings(on_gpu: bool, reps: int = 20) -> dict:
    """Copy bandwidth (bytes read + written / s) and bf16 matmul FLOP/s on device 0, each the
    best of `reps` calls. The median of 20 varied from 2.69 to 3.62 TB/s between processes on one
    H200 (runs 39-42 in benchmarks/NOTES.md), which moved every "% of floor" with it."""
    import jax
    import jax.numpy as jnp

    n = (2 << 30) // 4 if on_gpu else (16 << 20) // 4
    a = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    double = jax.jit(lambda x: x * 2)
    t_copy = best_seconds(lambda: double(a), reps)
    m = 8192 if on_gpu else 512
    x = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    y = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    t_mm = best_seconds(lambda: mm(x, y), reps)
    return {"copy_bytes": 2 * n * 4, "copy_s": t_copy, "bandwidth": 2 * n * 4 / t_copy,
            "matmul_n": m, "matmul_s": t_mm, "matmul_flops": 2 * m ** 3 / t_mm}


# -- what a step must read / compute ------------------------------------------------------------

def expected_touched_fraction(batch: int, num_experts: int, top_k: int) -> float:
    """Expected fraction of a layer's experts that `batch` tokens touch, each routed to a
    uniformly random set of top_k distinct experts: 1 - (1 - k/E)^B."""
    return 1.0 - (1.0 - top_k / num_experts) ** batch


def weight_inventory(model) -> dict:
    """Bytes and parameter counts of the model's params by role (global, summed over shards)."""
    import jax
    from flax import nnx

    inv = {k: 0 for k in ("experts_bytes", "experts_params", "dense_bytes", "dense_params", "embed_bytes",
                          "lm_head_bytes", "lm_head_params")}
    leaves, _ = jax.tree_util.tree_flatten_with_path(model.state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    for path, var in leaves:
        names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        arr = var[...] if hasattr(var, "__getitem__") else var.value
        axes = tuple(var.get_metadata().get("logical_axes", ()))
        nbytes, count = arr.size * arr.dtype.itemsize, arr.size
        is_scale = names[-1] == "scale"
        if "experts" in axes:
            inv["experts_bytes"] += nbytes
            inv["experts_params"] += 0 if is_scale else count
        elif names[0] == "embed":
            inv["embed_bytes"] += nbytes
        elif names[0] == "lm_head":
            inv["lm_head_bytes"] += nbytes
            inv["lm_head_params"] += count
        else:
            inv["dense_bytes"] += nbytes
            inv["dense_params"] += 0 if is_scale else count
    cfg = model.config
    if cfg.tie_word_embeddings:
        inv["lm_head_bytes"] = inv["embed_bytes"]
        inv["lm_head_params"] = cfg.vocab_size * cfg.hidden_size
    return inv


def kv_bytes_per_position(model) -> int:
    """KV cache bytes of one sequence position over all layers."""
    cfg = model.config
    k_heads = cfg.num_key_value_heads * model.kv_rep
    return cfg.num_hidden_layers * 2 * k_heads * cfg.head_dim * model.dtype.itemsize


def decode_floor_bytes(model, inv: dict, batch: int, context: int) -> dict:
    cfg = model.config
    frac = expected_touched_fraction(batch, cfg.num_experts, cfg.num_experts_per_tok)
    parts = {
        "dense": inv["dense_bytes"],
        "experts": inv["experts_bytes"] * frac,
        "lm_head": inv["lm_head_bytes"],
        "embed_rows": batch * inv["embed_bytes"] / cfg.vocab_size,
        "kv": batch * context * kv_bytes_per_position(model),
    }
    parts["total"] = sum(parts.values())
    parts["touched_experts_per_layer"] = frac * cfg.num_experts
    return parts


def prefill_flops(model, inv: dict, tokens: int) -> float:
    cfg = model.config
    active = inv["dense_params"] + inv["experts_params"] * cfg.num_experts_per_tok / cfg.num_experts
    attn = 2 * tokens ** 2 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return 2 * active * tokens + attn + 2 * inv["lm_head_params"]


# -- jitted steps --------------------------------------------------------------------------------

def make_decode(graphdef, steps: int):
    """jit: (state, tokens [B], positions [B], cache) -> (last tokens [B], cache); `steps`
    greedy steps in one call (lax.scan), the cache donated."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def run(state, tok, pos, cache):
        model = nnx.merge(graphdef, state)

        def step(carry, _):
            tok, pos, cache = carry
            logits, cache = model(tok[:, None], pos[:, None], cache)
            return (jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), pos + 1, cache), None

        (tok, _, cache), _ = jax.lax.scan(step, (tok, pos, cache), None, length=steps)
        return tok, cache

    return jax.jit(run, donate_argnums=(3,))


def make_prefill(graphdef):
    """jit: (state, tokens [B, T], cache) -> (first generated token [B], cache)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def run(state, tokens, cache):
        model = nnx.merge(graphdef, state)
        b, t = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        logits, cache = model(tokens, pos, cache, None, jnp.full((b,), t - 1, jnp.int32), fresh=True)
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

    return jax.jit(run, donate_argnums=(2,))


def fill_cache(cache, key):
    """Random K/V in every position (timing on zeros can flatter a kernel)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def fill(c, k):
        leaves, tree = jax.tree.flatten(c)
        keys = jax.random.split(k, len(leaves))
        return jax.tree.unflatten(tree, [jax.random.normal(kk, x.shape, jnp.float32).astype(x.dtype)
                                         for kk, x in zip(keys, leaves)])
    return fill(cache, key)


def is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# -- measurements --------------------------------------------------------------------------------

def bench_decode(model, inv, batch: int, context: int, steps: int, reps: int, single: bool,
                 ceilings: dict, log, profile: bool = False, dump_hlo: str | None = None, idle: int = 0) -> dict:
    """`batch` live rows, plus `idle` rows at position `context` (past the cache, as the engine
    parks a free slot: writes dropped, decode attention reads nothing) in the same step."""
    import jax
    import jax.numpy as jnp

    cfg = model.config
    floor = decode_floor_bytes(model, inv, batch, context)
    res = {"batch": batch, "context": context, "floor_bytes": floor["total"],
           "floor_ms": 1e3 * floor["total"] / ceilings["bandwidth"], "floor_parts": floor}
    if idle:
        res["idle_slots"] = idle
    need = floor["kv"] * (batch + idle) / batch
    free = _free_device_bytes()
    if free is not None and need > free:
        res["error"] = f"does not fit: KV cache {need / 2**30:.1f} GiB > {free / 2**30:.1f} GiB free"
        log(f"  decode B={batch}: {res['error']}")
        return res
    cache = model.init_cache(batch + idle, context)
    cache = fill_cache(cache, jax.random.key(batch))
    res["rows"] = cache.k[0].shape[1]   # rows each step runs: live + idle
    tok = jax.random.randint(jax.random.key(1), (batch + idle,), 0, cfg.vocab_size, jnp.int32)
    pos0 = jnp.full((batch,), max(context - steps, 0), jnp.int32)  # steps attend to <= context positions
    pos0 = jnp.concatenate([pos0, jnp.full((idle,), context, jnp.int32)])   # idle rows: past the cache
    fn = make_decode(model.graphdef, steps)
    t0 = time.perf_counter()
    compiled = fn.lower(model.state, tok, pos0, cache).compile()
    res["compile_s"] = time.perf_counter() - t0
    if dump_hlo:
        write_hlo(dump_hlo, f"decode_{{kind}}_b{batch}", cfg, compiled)
    holder = {"cache": cache}

    def call():
        out, holder["cache"] = compiled(model.state, tok, pos0, holder["cache"])
        return out

    t = median_seconds(call, reps)
    res["step_ms"] = 1e3 * t / steps
    res["tok_s"] = batch * steps / t
    res["pct_floor"] = 100 * res["floor_ms"] / res["step_ms"]
    if profile:
        res["profile"] = profile_call(call, steps, log)
    if single:
        one = make_decode(model.graphdef, 1).lower(model.state, tok, pos0, holder["cache"]).compile()

        def steps_one_by_one():
            out = tok
            for i in range(steps):
                out, holder["cache"] = one(model.state, out, pos0 + i, holder["cache"])
            return out

        t1 = median_seconds(steps_one_by_one, reps)
        res["single_step_ms"] = 1e3 * t1 / steps
    return res


IDLE_WARN_FRACTION = 0.03   # runs 62-73: busy within 0-1% of the span, or ~7% short in the slow process


def profile_call(call, steps: int, log, top: int = 30, unit: str = "step") -> dict:
    """Trace one call; per kernel name: total device time per decode step (a call runs `steps`;
    a prefill is one `unit`) on the first GPU. Printed and returned."""
    from qwen3_jax.kernels.tune import device_timeline

    tl = device_timeline(call)
    if tl is None:
        return {"error": "no profile written"}
    by_name, lines, first, last = tl["by_name"], tl["lines"], tl["first_ns"], tl["last_ns"]
    busy = sum(d for _, d in by_name.values())
    out = {"lines": sorted(lines), "kernels_per_step": sum(n for n, _ in by_name.values()) / steps,
           "busy_us_per_step": busy / 1e3 / steps,
           "span_us_per_step": (last - first) / 1e3 / steps if first is not None else None,
           "top": sorted(((name, n / steps, d / 1e3 / steps) for name, (n, d) in by_name.items()),
                         key=lambda r: -r[2])[:top]}
    log(f"  profile: {out['kernels_per_step']:.0f} kernels/{unit}, busy {out['busy_us_per_step']:.0f} us/{unit} "
        f"of a {out['span_us_per_step'] or 0:.0f} us span (lines: {', '.join(out['lines'])})")
    # Busy short of the span: the GPU waited for launches. At batch 1 the host's launches barely
    # keep ahead of ~4.6 us kernels, and one process ran 200 us per step idle where another ran
    # none (benchmarks/NOTES.md, runs 71-73), so such a process's figures are the host's, not the
    # kernels'.
    span = out["span_us_per_step"]
    out["idle_us_per_step"] = max(0.0, span - out["busy_us_per_step"]) if span else None
    if span and out["idle_us_per_step"] > IDLE_WARN_FRACTION * span:
        log(f"  WARNING: the GPU sat idle {out['idle_us_per_step']:.0f} us per {unit} ("
            f"{100 * out['idle_us_per_step'] / span:.0f}% of the span): the host did not keep it fed, so this "
            f"process's times read slower than its kernels; time again in a fresh process")
    for name, n, us in out["top"]:
        log(f"    {us:9.1f} us/{unit}  x{n:6.1f}  {name[:110]}")
    return out


def write_hlo(directory: str, name: str, cfg, compiled):
    """A compiled step's optimized HLO -> directory/name.hlo.txt, {kind} in name filled with the
    weights' kind (bf16, or fp8_ and the FP8 GEMM form)."""
    from qwen3_jax import kernels

    os.makedirs(directory, exist_ok=True)
    kind = f"fp8_{kernels.fp8_gemm().split()[0]}" if cfg.fp8 else "bf16"
    with open(os.path.join(directory, name.format(kind=kind) + ".hlo.txt"), "w") as f:
        f.write(compiled.as_text())


def bench_prefill(model, inv, tokens: int, reps: int, ceilings: dict, log, profile: bool = False,
                  dump_hlo: str | None = None) -> dict:
    import jax
    import jax.numpy as jnp

    flops = prefill_flops(model, inv, tokens)
    total_bytes = sum(inv[k] for k in ("dense_bytes", "experts_bytes", "lm_head_bytes"))
    floor_s = max(flops / ceilings["matmul_flops"], total_bytes / ceilings["bandwidth"])
    res = {"tokens": tokens, "flops": flops, "floor_ms": 1e3 * floor_s}
    prompt = jax.random.randint(jax.random.key(tokens), (1, tokens), 0, model.config.vocab_size, jnp.int32)
    cache = model.init_cache(1, tokens)
    fn = make_prefill(model.graphdef)
    t0 = time.perf_counter()
    compiled = fn.lower(model.state, prompt, cache).compile()
    res["compile_s"] = time.perf_counter() - t0
    if dump_hlo:
        write_hlo(dump_hlo, f"prefill_{{kind}}_{tokens}", model.config, compiled)
    holder = {"cache": cache}

    def call():
        out, holder["cache"] = compiled(model.state, prompt, holder["cache"])
        return out

    t = median_seconds(call, reps)
    res.update(ms=1e3 * t, tok_s=tokens / t, tflops=flops / t / 1e12,
               pct_matmul=100 * flops / t / ceilings["matmul_flops"], pct_floor=100 * floor_s / t)
    if profile:
        res["profile"] = profile_call(call, 1, log, unit="prefill")
    return res


def _free_device_bytes():
    import jax
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        return None
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def memory_check(model, cfg, mesh: str, context: int, batch: int, log) -> dict:
    """Planned (sharding.memory.plan_memory) vs measured bytes on device 0."""
    import jax

    out = {}
    try:
        from sharding.memory import measure_device_memory, plan_memory
    except ImportError as err:
        return {"error": f"sharding.memory not available: {err}"}
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit") or 80 * 2**30
    try:
        plan = plan_memory(cfg, mesh, device_memory_bytes=limit, context_length=context, workspace=False,
                           dtype=str(model.dtype))
    except Exception as err:  # the planner is another issue's work: report, don't fail the bench
        return {"error": f"plan_memory failed: {type(err).__name__}: {err}"}
    measured = measure_device_memory()[0]
    out.update(planned_weight_bytes=plan.weight_bytes, planned_kv_bytes_per_token=plan.kv_bytes_per_token,
               measured_after_load=measured, bytes_limit=limit)
    cache = model.init_cache(batch, context)
    jax.block_until_ready(cache)
    after_cache = measure_device_memory()[0]
    out["kv_batch"] = batch
    out["planned_kv_bytes"] = plan.kv_bytes_per_token * batch * context
    out["measured_kv_bytes"] = (after_cache["bytes_in_use"] or 0) - (measured["bytes_in_use"] or 0)
    del cache
    return out


# -- the transformers peer (child process: it must own the GPU before JAX does) ------------------

def hf_peer_child(args) -> dict:
    import torch
    from transformers import Qwen3MoeConfig as HFConfig
    from transformers import Qwen3MoeForCausalLM

    cfg = resolve_bench_config(args.model, None)
    d = cfg.to_hf_dict()
    d.pop("quantization_config", None)
    d["num_hidden_layers"] = args.hf_layers
    d["mlp_only_layers"] = []
    hf_cfg = HFConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = Qwen3MoeForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    out = {"layers": args.hf_layers, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": __import__("transformers").__version__, "decode": []}
    ctx = args.context
    for b in ints(args.hf_batch):
        ids = torch.randint(0, cfg.vocab_size, (b, ctx), device=dev)
        with torch.no_grad():
            o = model(ids, use_cache=True, logits_to_keep=1)   # not [B, T, V] logits for the prompt
            past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
            times = []
            for i in range(args.steps + 2):
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                o = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
                if dev == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        out["decode"].append({"batch": b, "step_ms": 1e3 * step, "ms_per_layer": 1e3 * step / args.hf_layers})
    return out


def run_hf_peer(argv_args, model: str, log) -> dict:
    cmd = [sys.executable, "-m", "serve.bench", "--hf-peer-child", "--model", model,
           "--hf-layers", str(argv_args.hf_layers), "--hf-batch", argv_args.hf_batch,
           "--context", str(argv_args.context), "--steps", str(min(argv_args.steps, 8))]
    log(f"hf peer: {' '.join(cmd[1:])}")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": "transformers peer timed out"}
    if p.returncode != 0:
        return {"error": f"transformers peer failed: {p.stderr[-2000:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- reporting -----------------------------------------------------------------------------------

def environment(args) -> dict:
    import jax
    dev = jax.devices()[0]
    commit = os.environ.get("QWEN3_BENCH_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
        except OSError:
            commit = None
    return {"card": getattr(dev, "device_kind", str(dev)), "platform": dev.platform, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "commit": commit or "unknown",
            "host": platform.node(), "command": "python -m serve.bench " + " ".join(sys.argv[1:]),
            "clocks": gpu_clocks() if dev.platform == "gpu" else None}


_CLOCK_QUERY = "clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,pstate"


def gpu_clocks(query=None) -> str | None:
    """GPU 0's clocks and power as one line ("SM 1905 of 1980 MHz, memory 3201 MHz, 365 W of 700 W,
    47 C, P0"), or None without nvidia-smi. Machines of one kind differ (benchmarks/NOTES.md, runs
    84-92: on some the FP8 gate/up gemv is ~40% slower), so every log says what it ran on.
    `query`: a callable returning nvidia-smi's CSV line (tests)."""
    if query is None:
        def query():
            out = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={_CLOCK_QUERY}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20)
            return out.stdout if out.returncode == 0 else ""
    try:
        fields = [f.strip() for f in query().strip().splitlines()[0].split(",")]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    if len(fields) != 7:
        return None
    sm, sm_max, mem, watts, limit, temp, pstate = fields

    def whole(v):   # "364.94" -> "365"; "[N/A]" as it is
        try:
            return f"{float(v):.0f}"
        except ValueError:
            return v
    return f"SM {sm} of {sm_max} MHz, memory {mem} MHz, {whole(watts)} W of {whole(limit)} W, {temp} C, {pstate}"


def decode_table(rows, markdown: bool) -> str:
    head = ["kernels", "batch", "ms/step", "tok/s", "floor ms", "% of floor", "1-call/step ms", "compile s"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r.get("kernels", ""), str(r["batch"]), r["error"], "", f"{r['floor_ms']:.3f}", "", "", ""])
            continue
        batch = f"{r['batch']}+{r['idle_slots']} idle" if r.get("idle_slots") else str(r["batch"])
        body.append([r.get("kernels", ""), batch, f"{r['step_ms']:.3f}", f"{r['tok_s']:.1f}",
                     f"{r['floor_ms']:.3f}", f"{r['pct_floor']:.1f}%",
                     f"{r['single_step_ms']:.3f}" if "single_step_ms" in r else "", f"{r['compile_s']:.1f}"])
    return _table(head, body, markdown)


def prefill_table(rows, markdown: bool) -> str:
    head = ["kernels", "prompt", "ms (TTFT)", "tok/s", "TFLOP/s", "% of matmul", "floor ms", "% of floor", "compile s"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r.get("kernels", ""), str(r["tokens"]), r["error"], "", "", "", f"{r['floor_ms']:.2f}", "", ""])
            continue
        body.append([r.get("kernels", ""), str(r["tokens"]), f"{r['ms']:.2f}", f"{r['tok_s']:.0f}",
                     f"{r['tflops']:.1f}", f"{r['pct_matmul']:.1f}%", f"{r['floor_ms']:.2f}",
                     f"{r['pct_floor']:.1f}%", f"{r['compile_s']:.1f}"])
    return _table(head, body, markdown)


def _table(head, body, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join("{:>%d}" % w for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in body])


def summary_text(res: dict, markdown: bool) -> str:
    env, c, cfg = res["env"], res["ceilings"], res["config"]
    lines = [
        f"card: {env['card']} | jax {env['jax']} | {env['date']} | commit {env['commit']}"
        + (f" | {env['clocks']}" if env.get("clocks") else ""),
        f"command: {env['command']}",
        f"model: {cfg['name']} ({cfg['weights']}), {cfg['layers']} of {cfg['full_layers']} layers"
        + ("" if cfg["layers"] == cfg["full_layers"] else
           " (per-layer costs scale with layers; lm_head and embedding do not)")
        + f", mesh {cfg['mesh']}, context {res['context']}",
        f"ceilings (this run, best call of each): copy {c['bandwidth'] / 1e12:.3f} TB/s (read+write of "
        f"{c['copy_bytes'] / 2**30:.1f} GiB), bf16 matmul {c['matmul_flops'] / 1e12:.1f} TFLOP/s ({c['matmul_n']}^3)",
        f"startup: create {res['create_s']:.1f} s + first decode compile {res.get('first_compile_s', 0):.1f} s",
    ]
    sep = "\n\n" if markdown else "\n"
    out = "\n".join(("- " + x) if markdown else x for x in lines)
    out += sep + "decode (multi-step: one jitted call runs --steps steps)" + sep + decode_table(res["decode"], markdown)
    if res["prefill"]:
        out += sep + "prefill (batch 1, empty cache, logits for the last token)" + sep + prefill_table(res["prefill"], markdown)
    if res.get("hf_peer"):
        out += sep + hf_text(res) 
    if res.get("memory"):
        out += sep + memory_text(res["memory"])
    return out


def hf_text(res: dict) -> str:
    hf = res["hf_peer"]
    if "error" in hf:
        return f"transformers peer: {hf['error']}"
    layers = res["config"]["layers"]
    lines = [f"transformers peer ({hf['transformers']}, torch {hf['torch']}, {hf['layers']} layers, same per-layer shapes):"]
    ours = {r["batch"]: r for r in res["decode"] if "step_ms" in r and r.get("kernels") in ("on", "auto", None)}
    for h in hf["decode"]:
        b = h["batch"]
        hf_tok_s = b / (h["ms_per_layer"] * layers / 1e3)
        line = f"  batch {b}: {h['ms_per_layer']:.3f} ms/layer/step -> {hf_tok_s:.1f} tok/s at {layers} layers"
        if b in ours:
            line += f"; ours {ours[b]['tok_s']:.1f} tok/s = {ours[b]['tok_s'] / hf_tok_s:.1f}x"
        lines.append(line)
    return "\n".join(lines)


def memory_text(mem: dict) -> str:
    if "error" in mem:
        return f"memory plan vs measured: {mem['error']}"
    g = 2 ** 30
    after = mem["measured_after_load"]
    return "\n".join([
        "memory plan vs measured (device 0):",
        f"  weights planned {mem['planned_weight_bytes'] / g:.2f} GiB; in use after load "
        f"{(after['bytes_in_use'] or 0) / g:.2f} GiB, live arrays {after['live_array_bytes'] / g:.2f} GiB, "
        f"peak {(after['peak_bytes_in_use'] or 0) / g:.2f} GiB",
        f"  KV cache batch {mem['kv_batch']} planned {mem['planned_kv_bytes'] / g:.3f} GiB, measured "
        f"{mem['measured_kv_bytes'] / g:.3f} GiB",
        f"  peak over the whole run {(mem.get('peak_end') or 0) / g:.2f} GiB of {mem['bytes_limit'] / g:.2f} GiB",
    ])


# -- main ----------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Run the benchmark; returns the results of the last model (all of them go to --out)."""
    args = parse_args(argv)
    if args.hf_peer_child:
        print(json.dumps(hf_peer_child(args)))
        return {}
    log = lambda s: print(s, flush=True)  # noqa: E731
    models = [m for m in args.model.split(",") if m]
    for name in models:   # a mistyped A/B value fails here, not after the ceilings and a model build
        try:
            _decode_knobs(args, resolve_bench_config(name, args.layers))
        except ValueError as err:
            raise SystemExit(f"serve.bench: {err}") from None
    hf = None
    if args.hf_peer:   # before JAX allocates the GPU
        hf = run_hf_peer(args, models[0], log)
    # As the server (serve/cli.py): the process owns the card. JAX's default 75% left a 57 GiB
    # bf16 model 2.5 GiB, too little for batch 64's 6 GiB KV cache (run 13).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

    import jax

    on_gpu = jax.default_backend() == "gpu"
    log(f"devices: {jax.devices()}")
    ceilings = measure_ceilings(on_gpu, reps=args.reps * 4)
    log(f"ceilings: copy {ceilings['bandwidth'] / 1e12:.3f} TB/s, matmul {ceilings['matmul_flops'] / 1e12:.1f} TFLOP/s")
    sweep = None
    if args.sweep:
        sweep = run_sweep(args, resolve_bench_config(models[0], args.layers), ceilings, log)
    if args.sweep_gemv:
        from qwen3_jax.kernels import tune
        c = resolve_bench_config(models[0], args.layers)
        log("gemv shape sweep (batch 1, device time per layer from the profiler):")
        rows = tune.sweep_gemv_shapes(ceilings["bandwidth"], d=c.hidden_size, heads=c.num_attention_heads,
                                      kv=c.num_key_value_heads, hd=c.head_dim, f=c.moe_intermediate_size,
                                      k=c.num_experts_per_tok, log=log)
        sweep = {**(sweep or {}), "gemv_shapes": rows}
    results = []
    orders = [o for o in args.fp8_order.split(",") if o]
    if any(o not in ("nk", "kn") for o in orders):
        raise ValueError(f"--fp8-order {args.fp8_order}: use nk, kn or both")
    from qwen3_jax import fp8 as fp8_format
    default_order = fp8_format.NK_ORDER
    runs = [(name, order) for name in models
            for order in (orders if orders and resolve_bench_config(name, args.layers).fp8 else [None])]
    for name, order in runs:
        fp8_format.NK_ORDER = default_order if order is None else order == "nk"
        try:   # read when the model is built
            res = bench_model(args, name, ceilings, log, tag=f" order {order}" if order else "")
        finally:
            fp8_format.NK_ORDER = default_order
        res["hf_peer"] = hf
        res["sweep"] = sweep
        text = summary_text(res, args.markdown)
        print("\n" + text, flush=True)
        results.append(res)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results if len(results) > 1 else res, f, indent=1, default=str)
    return results[-1]


def run_sweep(args, cfg, ceilings, log) -> dict:
    from qwen3_jax.kernels import tune

    log("kernel sweep (one MoE layer of the model's shapes):")
    rows, best = tune.sweep_moe(ceilings["bandwidth"], e=cfg.num_experts, d=cfg.hidden_size,
                                f=cfg.moe_intermediate_size, k=cfg.num_experts_per_tok,
                                matmul_rate=ceilings["matmul_flops"], log=log, batches=tuple(ints(args.batch)),
                                prefill_tokens=max(ints(args.prefill), default=0))
    lin = tune.sweep_fp8_linear(ceilings["bandwidth"], d=cfg.hidden_size, h=cfg.num_attention_heads,
                                q=cfg.head_dim, log=log)
    return {"moe": rows, "fp8_linear": lin, "installed": {"/".join(k): v for k, v in best.items()}}


def bench_model(args, name: str, ceilings: dict, log, tag: str = "") -> dict:
    """One model's figures; `tag` ends every row's kernels label (e.g. the FP8 storage order)."""
    import jax

    from qwen3_jax import kernels, random_model

    cfg = resolve_bench_config(name, args.layers)
    full_layers = resolve_bench_config(name, None).num_hidden_layers
    res = {"env": environment(args), "context": args.context, "decode": [], "prefill": [], "ceilings": ceilings}
    t0 = time.perf_counter()
    model = random_model(cfg, mesh=args.mesh, dtype="bfloat16", seed=args.seed)
    jax.block_until_ready(model.state)
    res["create_s"] = time.perf_counter() - t0
    inv = weight_inventory(model)
    res["config"] = {"name": cfg.name, "weights": "FP8 block 128" if cfg.fp8 else "bf16", "layers": cfg.num_hidden_layers,
                     "full_layers": full_layers, "mesh": args.mesh, "inventory": inv}
    log(f"model {cfg.name}: {cfg.num_hidden_layers} layers, created in {res['create_s']:.1f} s, "
        f"{sum(inv[k] for k in ('dense_bytes', 'experts_bytes', 'embed_bytes', 'lm_head_bytes')) / 2**30:.2f} GiB")
    if args.memory_check:
        res["memory"] = memory_check(model, cfg, args.mesh, args.context, max(ints(args.batch)[:1] or [1]), log)

    modes = {"both": ["on", "off"], "auto": ["auto"], "on": ["on"], "off": ["off"]}[args.kernels]
    single = set(ints(args.single_step))
    c = ceilings

    knobs = _decode_knobs(args, cfg)
    defaults = [get() for _, _, get, _, _ in knobs]
    variants = [(m, vs) for m in modes for vs in itertools.product(
        *[[None] if m == "off" and kernels_only else values for _, values, _, _, kernels_only in knobs])]
    for mode, values in variants:
        kernels.set_enabled({"on": True, "off": False, "auto": None}[mode])
        label = (mode if mode != "auto" else ("on" if kernels.enabled() else "off")) + tag
        for (prefix, _, _, put, _), value, default in zip(knobs, values, defaults):
            put(default if value is None else value)
            if value is not None:
                label += f" {prefix}{value}"
        baseline = args.kernels == "both" and mode == "off"
        # each variant's HLO in its own folder, named after its label ("on moe-routing xla" -> on_moe-routing_xla)
        hlo_dir = os.path.join(args.dump_hlo, re.sub(r"[^\w.-]+", "_", label)) if args.dump_hlo else None
        batches = ints(args.baseline_batch) if baseline and args.baseline_batch is not None else ints(args.batch)
        prompts = ints(args.baseline_prefill) if baseline and args.baseline_prefill is not None else ints(args.prefill)
        for b in batches:
            try:
                r = bench_decode(model, inv, b, args.context, args.steps, args.reps, b in single, c, log,
                                 profile=label.startswith("on") and b in set(ints(args.profile_batch)),
                                 dump_hlo=hlo_dir, idle=args.idle_slots)
            except Exception as err:   # one failed figure (OOM, a kernel Triton rejects) must not lose the rest
                r = {"batch": b, "error": _short(err),
                     "floor_ms": 1e3 * decode_floor_bytes(model, inv, b, args.context)["total"] / c["bandwidth"]}
            r["kernels"] = label
            res["decode"].append(r)
            if "first_compile_s" not in res and "compile_s" in r:
                res["first_compile_s"] = r["compile_s"]
            log(decode_table([r], False).splitlines()[-1])
        for t in prompts:
            try:
                r = bench_prefill(model, inv, t, max(2, args.reps // 2), c, log,
                                  profile=label.startswith("on") and t in set(ints(args.profile_prefill)),
                                  dump_hlo=hlo_dir)
            except Exception as err:
                r = {"tokens": t, "error": _short(err), "floor_ms": float("nan")}
            r["kernels"] = label
            res["prefill"].append(r)
            log(prefill_table([r], False).splitlines()[-1])
    kernels.set_enabled(None)
    for (_, _, _, put, _), default in zip(knobs, defaults):
        put(default)
    if res.get("memory") and "error" not in res["memory"]:
        res["memory"]["peak_end"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    del model
    return res


def _decode_knobs(args, cfg):
    """The library settings the bench times side by side, one row per combination:
    [(label prefix, values from the command line (None: the library's), read, write, whether only
    the kernels path has it)]."""
    from qwen3_jax import kernels
    from qwen3_jax import model as model_mod
    from qwen3_jax.kernels import decode_attention, dequantize, fp8_dot, grouped_matmul, linear, qk_prologue
    from qwen3_jax.kernels import moe_blocks, moe_ffn, router, x_quantize

    def listed(text, parse=str):
        return [parse(v) for v in text.split(",") if v] or [None]

    def module_value(mod, name):
        return (lambda: getattr(mod, name)), (lambda v: setattr(mod, name, v))

    def put_gemm(kind):   # the library's setting may be a raw convert mode, not a kind: leave it
        if kind in kernels.FP8_GEMM:
            kernels.set_fp8_gemm(kind)

    def put_fp8_matmul(convert):   # both block sizes' MMA dtype
        for cfg in grouped_matmul.MATMUL_DEFAULTS.values():
            cfg["convert"] = convert

    def put_fp8_lhs(side):   # prefill-sized blocks, FP8 stored [out, in]
        grouped_matmul.MATMUL_DEFAULTS["large"]["fp8_nk"]["w_lhs"] = side == "w"

    large = copy.deepcopy(grouped_matmul.MATMUL_DEFAULTS["large"])

    def put_large(override):   # over the library's tiles; the read-back snapshot restores them
        grouped_matmul.MATMUL_DEFAULTS["large"] = {**copy.deepcopy(large), **override}

    def matmul_large(text):
        """--matmul-large's overrides ([None]: the library's), each a dict of known keys."""
        if not text:
            return [None]
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--matmul-large {text}: not JSON ({err}); give a list, e.g. '[{{}}, {{\"bn\": 64}}]'")
        if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
            raise ValueError(f"--matmul-large {text}: give a JSON list of objects, e.g. '[{{}}, {{\"bn\": 64}}]'")
        unknown = sorted({k for v in values for k in v} - set(large))
        if unknown:
            raise ValueError(f"--matmul-large: unknown key {', '.join(unknown)}; use {', '.join(sorted(large))}")
        return [_Tiles(v) for v in values]

    def gemv_tokens():   # the three small-batch limits together
        return dict(linear.GEMV_MAX_ROWS), dict(moe_ffn.GEMV_MAX_ASSIGNMENTS), router.LOGITS_MATMUL_MIN_ROWS

    def put_gemv_tokens(v):   # "N" or "N/P" from the command line, or gemv_tokens()' snapshot back
        if isinstance(v, tuple):
            linear.GEMV_MAX_ROWS, moe_ffn.GEMV_MAX_ASSIGNMENTS, router.LOGITS_MATMUL_MIN_ROWS = v
            return
        n, _, rows = v.partition("/")
        linear.GEMV_MAX_ROWS = {kind: int(rows or n) for kind in linear.GEMV_MAX_ROWS}
        router.LOGITS_MATMUL_MIN_ROWS = int(n) + 1
        moe_ffn.GEMV_MAX_ASSIGNMENTS = {kind: int(n) * cfg.num_experts_per_tok for kind in moe_ffn.GEMV_MAX_ASSIGNMENTS}

    def positive(flag, example):
        """A parser of one positive number for `flag`'s comma-separated values."""
        def parse(text):
            try:
                value = float(text)
            except ValueError:
                value = 0.0
            if not value > 0:
                raise ValueError(f"{flag} {text}: give positive numbers, e.g. {example}")
            return value
        return parse

    def choices(flag, text, allowed):
        """listed(text), every value one of `allowed`, else a ValueError naming the flag."""
        values = listed(text)
        unknown = [v for v in values if v is not None and v not in allowed]
        if unknown:
            raise ValueError(f"{flag} {','.join(unknown)}: unknown; use {', '.join(allowed[:-1])} or {allowed[-1]}")
        return values

    gemm = choices("--fp8-gemm", args.fp8_gemm, sorted(kernels.FP8_GEMM))
    merge = choices("--attention-combine", args.attention_combine, decode_attention.COMBINES)
    prologue = choices("--attention-prologue", args.attention_prologue, decode_attention.PROLOGUES)
    fp8_copy = choices("--fp8-copy", args.fp8_copy, dequantize.COPIES)
    fp8_matmul = choices("--fp8-matmul", args.fp8_matmul, ("cast", "f16", "e4m3"))
    fp8_lhs = choices("--fp8-matmul-lhs", args.fp8_matmul_lhs, ("x", "w"))
    dot_acc = choices("--fp8-dot-acc", args.fp8_dot_acc, fp8_dot.ACCUMULATE_CHOICES)
    presets = linear.PROJECTION_MATMUL_PRESETS
    projection = choices("--projection-matmul", args.projection_matmul, sorted(presets))
    moe_routing = choices("--moe-routing", args.moe_routing, moe_ffn.BLOCK_ROUTINGS)
    down_rows = choices("--moe-down-rows", args.moe_down_rows, moe_ffn.DOWN_ROWS_CHOICES)
    router_logits = choices("--router-logits", args.router_logits, router.LOGITS_CHOICES)
    x_quant = choices("--x-quantize", args.x_quantize, x_quantize.X_QUANTIZES)
    fresh = choices("--fresh-prefill", args.fresh_prefill, ("on", "off"))
    block_slack = listed(args.moe_block_slack, positive("--moe-block-slack", "2,1"))
    gemv_limits = listed(args.gemv_tokens)
    if any(v is not None and not re.fullmatch(r"\d+(/\d+)?", v) for v in gemv_limits):
        raise ValueError(f"--gemv-tokens {args.gemv_tokens}: give token counts N or N/P (projection rows), e.g. 16,4/1")

    return [
        ("", gemm if cfg.fp8 else [None], kernels.fp8_gemm, put_gemm, True),
        ("unroll ", listed(args.decode_unroll, int), *module_value(model_mod, "DECODE_UNROLL"), False),
        ("x ", listed(args.x_loads), lambda: "+".join(sorted(kernels.X_LOADS)) or "none",
         lambda v: kernels.set_x_loads([n for n in v.split("+") if n and n != "none"]), False),
        ("prologue ", listed(args.prologue_programs, int), *module_value(qk_prologue, "TARGET_PROGRAMS"), False),
        ("merge ", merge, *module_value(decode_attention, "COMBINE"), True),
        ("attention-programs ", listed(args.attention_programs, int),
         *module_value(decode_attention, "TARGET_PROGRAMS"), True),
        ("attention-splits ", listed(args.attention_max_splits, int), *module_value(decode_attention, "MAX_SPLITS"), True),
        ("attention-prologue ", prologue, *module_value(decode_attention, "PROLOGUE"), True),
        # before the knobs that edit MATMUL_DEFAULTS["large"] in place: it replaces the dict
        ("matmul-large ", matmul_large(args.matmul_large),
         lambda: copy.deepcopy(grouped_matmul.MATMUL_DEFAULTS["large"]), put_large, True),
        ("fp8-matmul ", fp8_matmul if cfg.fp8 else [None],
         lambda: grouped_matmul.MATMUL_DEFAULTS["large"]["convert"], put_fp8_matmul, True),
        ("fp8-lhs ", fp8_lhs if cfg.fp8 else [None],
         lambda: "w" if grouped_matmul.MATMUL_DEFAULTS["large"]["fp8_nk"].get("w_lhs") else "x", put_fp8_lhs, True),
        ("fp8-dequantize ", listed(args.fp8_dequantize_rows, int) if cfg.fp8 else [None],
         *module_value(kernels, "FP8_DEQUANTIZE_MIN_ROWS"), True),
        ("fp8-dequantize-moe ", listed(args.fp8_dequantize_moe_rows, int) if cfg.fp8 else [None],
         *module_value(kernels, "FP8_DEQUANTIZE_MOE_MIN_ROWS"), True),
        ("fp8-copy ", fp8_copy if cfg.fp8 else [None], *module_value(dequantize, "COPY"), True),
        ("fp8-dot-acc ", dot_acc if cfg.fp8 else [None], *module_value(fp8_dot, "ACCUMULATE"), True),
        ("moe-routing ", moe_routing, *module_value(moe_ffn, "BLOCK_ROUTING"), True),
        ("moe-down-rows ", down_rows, *module_value(moe_ffn, "DOWN_ROWS"), True),
        ("moe-block-slack ", block_slack, *module_value(moe_blocks, "BLOCK_ROWS_SLACK"), True),
        ("router ", router_logits, *module_value(router, "LOGITS"), True),
        ("gemv-tokens ", gemv_limits, gemv_tokens, put_gemv_tokens, True),
        ("x-quantize ", x_quant if cfg.fp8 else [None], *module_value(x_quantize, "X_QUANTIZE"), True),
        ("fresh-prefill ", fresh, lambda: "on" if model_mod.FRESH_PREFILL else "off",
         lambda v: setattr(model_mod, "FRESH_PREFILL", v == "on"), True),
        ("projection ", projection,
         lambda: next((k for k, v in presets.items() if v == linear.PROJECTION_MATMUL), "custom"),
         lambda v: setattr(linear, "PROJECTION_MATMUL", dict(presets[v])), True),
    ]


class _Tiles(dict):
    """A --matmul-large override; its row label is compact JSON."""

    def __str__(self) -> str:
        return json.dumps(self, separators=(",", ":"))


def _short(err: Exception) -> str:
    if is_oom(err):
        return "out of device memory"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}" if str(err) else type(err).__name__


if __name__ == "__main__":
    main()
