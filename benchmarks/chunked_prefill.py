"""A prefill chunk that continues a prompt already in the KV cache, as the engine's chunked prefill
runs it: the chunk-attention kernel (kernels/prefill_attention.py) and the cuDNN split
(chunk_attention_split: variant "split", its cached keys read in place through a page table, or
"split-gather", gathered) against the XLA math they replaced, one process, one
cache row of --context positions filled with random K/V.

For each path, one compiled call [1, T] (positions are an input, so every start shares it), timed
at each start; the floor is the chunk's FLOPs (its tokens through the weights, plus attention
over start + T/2 keys on average) over the bf16 matmul rate measured in the same run.

    python benchmarks/chunked_prefill.py --model Qwen3-30B-A3B-FP8 --context 16384 --chunk 512 --starts 0,2048,8192,15360 --variants 64:128:4:2,split
    python benchmarks/chunked_prefill.py --model tiny --context 256 --chunk 32 --starts 0,64 --reps 1   # CPU: works
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def chunk_flops(model, inv: dict, tokens: int, start: int) -> float:
    """FLOPs of one chunk: its tokens through the active weights and the lm_head row, and causal
    attention over the cached start keys plus half of its own."""
    from serve.bench import prefill_flops

    cfg = model.config
    cached = 4 * tokens * start * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return prefill_flops(model, inv, tokens) + cached


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Qwen3-30B-A3B-FP8", help="a serve.bench preset (random weights)")
    p.add_argument("--context", type=int, default=16384, help="cache positions of the row")
    p.add_argument("--chunk", type=int, default=512, help="tokens per chunk (the engine's --chunked-prefill-size)")
    p.add_argument("--starts", default="0,2048,8192,15360", help="chunk start positions, comma-separated")
    p.add_argument("--reps", type=int, default=5, help="timed calls per figure (median)")
    p.add_argument("--layers", type=int, default=None, help="build only N layers")
    p.add_argument("--variants", default="64:128:4:2,split",
                   help="paths to time, comma-separated: kernel settings rows:keys:warps:stages[:programs] "
                        "(CHUNK_ROWS, CHUNK_KEYS, CHUNK_WARPS, CHUNK_STAGES, CHUNK_SPLIT_PROGRAMS: key splits "
                        "up to that many programs), 'split' (two cuDNN calls merged, the cached keys "
                        "read in place; the default kernel settings where cuDNN does not trace) or "
                        "'split-gather' (the cached keys gathered); the XLA math is always timed")
    p.add_argument("--in-order", default="promised",
                   help="'promised' (the engine's: Qwen3Moe(in_order=True), no check of the positions on the "
                        "device), 'checked' (a conditional picks the path or the XLA math every layer), or both "
                        "comma-separated: each path timed under each")
    args = p.parse_args(argv)
    orders = [o for o in args.in_order.split(",") if o]
    if not orders or set(orders) - {"promised", "checked"}:
        p.error(f"--in-order {args.in_order!r}: give promised, checked or both")
    starts = [int(s) for s in args.starts.split(",") if s]
    if any(s < 0 or s + args.chunk > args.context for s in starts):
        p.error(f"each start + --chunk ({args.chunk}) must lie within --context {args.context}")

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import qwen3_jax
    from qwen3_jax import kernels
    from qwen3_jax.kernels import prefill_attention
    from serve.bench import fill_cache, measure_ceilings, median_seconds, resolve_bench_config, weight_inventory

    defaults = {k: getattr(prefill_attention, k)
                for k in ("CHUNK_ROWS", "CHUNK_KEYS", "CHUNK_WARPS", "CHUNK_STAGES", "CHUNK_SPLIT_PROGRAMS",
                          "SPLIT_MIN_TOKENS", "SPLIT_PAGE")}
    ceilings = measure_ceilings(kernels.on_gpu())
    cfg = resolve_bench_config(args.model, args.layers)
    model = qwen3_jax.random_model(cfg, dtype="bfloat16")
    inv = weight_inventory(model)
    print(f"device {jax.devices()[0].device_kind}; {args.model}, {cfg.num_hidden_layers} layers, a {args.context}-position "
          f"cache row, {args.chunk}-token chunks; bf16 matmul {ceilings['matmul_flops'] / 1e12:.1f} TFLOP/s (this run)",
          flush=True)
    tokens = jax.random.randint(jax.random.key(0), (1, args.chunk), 0, cfg.vocab_size, jnp.int32)
    rows, at = jnp.zeros((1,), jnp.int32), jnp.full((1,), args.chunk - 1, jnp.int32)

    ms = {}
    knobs = ("CHUNK_ROWS", "CHUNK_KEYS", "CHUNK_WARPS", "CHUNK_STAGES", "CHUNK_SPLIT_PROGRAMS")
    paths = [v for v in args.variants.split(",") if v] + ["xla"]
    runs = [(path, order) for path in paths for order in orders]
    for path, order in runs:
        in_order = order == "promised"
        prefill_attention.CHUNK_KERNEL = path != "xla"   # read while tracing: a fresh function per path
        for knob, v in defaults.items():
            setattr(prefill_attention, knob, v)
        prefill_attention.SPLIT_MIN_TOKENS = 0 if path.startswith("split") else None
        prefill_attention.SPLIT_PAGE = None if path == "split-gather" else defaults["SPLIT_PAGE"]
        if path not in ("xla", "split", "split-gather"):
            for knob, v in zip(knobs, path.split(":")):
                setattr(prefill_attention, knob, int(v))

        def run(state, tok, pos, cache):
            logits, cache = nnx.merge(model.graphdef, state)(tok, pos, cache, rows, at, in_order=in_order)
            return jnp.argmax(logits[:, 0], axis=-1), cache

        holder = {"cache": fill_cache(model.init_cache(1, args.context), jax.random.key(1))}
        t0 = time.perf_counter()
        fn = jax.jit(run, donate_argnums=(3,)).lower(model.state, tokens, jnp.zeros((1, args.chunk), jnp.int32),
                                                     holder["cache"]).compile()
        print(f"  {path} ({order}): compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        for start in starts:
            pos = jnp.asarray(np.arange(start, start + args.chunk)[None], jnp.int32)

            def call():
                out, holder["cache"] = fn(model.state, tokens, pos, holder["cache"])
                return out

            ms[path, order, start] = 1e3 * median_seconds(call, args.reps)
        del holder
    prefill_attention.CHUNK_KERNEL = True
    for knob, v in defaults.items():
        setattr(prefill_attention, knob, v)
    print(f"{'kernel r:k:w:s':>14} {'positions':>9} {'start':>7} {'ms':>8} {'xla / it':>9} {'% of matmul':>12}")
    for path, order in runs:
        for start in starts:
            floor_ms = 1e3 * chunk_flops(model, inv, args.chunk, start) / ceilings["matmul_flops"]
            it = ms[path, order, start]
            print(f"{path:>14} {order:>9} {start:>7} {it:>8.2f} {ms['xla', order, start] / it:>8.2f}x "
                  f"{100 * floor_ms / it:>11.1f}%")
    return ms


if __name__ == "__main__":
    main()
