"""The attention projections of a decode batch past the gemv's rows (17-511 rows: one group of
the W8A8 grouped matmul, kernels/linear.py) under tile variants: their width narrowed for
parallelism (the default) against split-K programs (grouped_matmul's k_splits) (run 108 in
NOTES.md).

Random FP8 weights of a preset's shapes (serve.bench's configs, `--layers` of them), the
model's own Weight objects and call (kernels.linear_einsum reading layer i in place). Per rows
M, projection (q, k, v, o) and variant (linear.PROJECTION_MATMUL): device time per layer (the
profiler's kernel time over a loop of every layer, partials summed as the model's consumer
would: o's by an XLA reduce, q/k/v's inside the attention kernel, so not here), against the
weight's bytes at the copy bandwidth measured in the same run, and the relative difference to
the default variant's result.

    python benchmarks/projection_matmul.py                                 # GPU
    python benchmarks/projection_matmul.py --model tiny-fp8 --rows 24 --layers 2   # CPU: works
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                                   # noqa: E402
import jax.numpy as jnp                      # noqa: E402
import numpy as np                           # noqa: E402

from qwen3_jax import kernels                # noqa: E402
from qwen3_jax.kernels import linear as linear_mod   # noqa: E402
from qwen3_jax.kernels.tune import device_timeline   # noqa: E402
from serve.bench import ints, measure_ceilings, resolve_bench_config   # noqa: E402

VARIANTS = [{}, dict(num_stages=5), dict(narrow=False, k_splits=2), dict(narrow=False, k_splits=4),
            dict(narrow=False, k_splits=8), dict(narrow=False, k_splits=16), dict(narrow=False, bn=64, k_splits=4),
            dict(narrow=False, k_splits="auto")]


def projections(model):
    """[(name, einsum, stacked Weight)] of the first segment's attention."""
    attn = model.module.segments[0].block.attn
    return [("q", "btd,dhq->bthq", attn.q_proj), ("k", "btd,dkq->btkq", attn.k_proj),
            ("v", "btd,dkq->btkq", attn.v_proj), ("o", "bthq,hqd->btd", attn.o_proj)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Qwen3-30B-A3B-FP8", help="a serve.bench preset with FP8 weights")
    ap.add_argument("--rows", type=ints, default=[32, 64, 256], help="decode rows M, comma-separated")
    ap.add_argument("--layers", type=int, default=8, help="layers built and looped over")
    args = ap.parse_args(argv)

    import qwen3_jax

    cfg = resolve_bench_config(args.model, args.layers)
    model = qwen3_jax.random_model(cfg, dtype="bfloat16")
    ceil = measure_ceilings(jax.default_backend() == "gpu", reps=10)
    print(f"devices: {jax.devices()}; {args.model}, {args.layers} layers; copy {ceil['bandwidth'] / 1e12:.3f} TB/s")
    print(f"{'M':>4} {'proj':<4} {'variant':<36} {'us/layer':>9} {'% floor':>8} {'rel diff':>9}")
    layers = args.layers
    kernels.FP8_DEQUANTIZE_MIN_ROWS = max(kernels.FP8_DEQUANTIZE_MIN_ROWS, max(args.rows) + 1)
    totals = {}
    for m in args.rows:
        for name, eq, w in projections(model):
            x_shape = (1, m, *w.einsum_shape[1:1 + (2 if name == "o" else 1)])
            x = jax.random.normal(jax.random.key(m), x_shape, jnp.bfloat16)
            nbytes = (w.w[...].nbytes + w.scale[...].nbytes) // layers
            ref = None
            for v in VARIANTS:
                linear_mod.PROJECTION_MATMUL = dict(v)

                def one(x, wa, sa, i, eq=eq, w=w):
                    y = kernels.linear_einsum(eq, x, wa, sa, w.block_axis, w.fp8_block, layer=i, partials=True,
                                              w_nk=w.nk, scale_run=w.fp8_scale_run)
                    return y if y is None or name != "o" else jnp.sum(y, axis=0, keepdims=True)

                if one(x, w.w[...], w.scale[...], jnp.int32(0)) is None:
                    print(f"{m:>4} {name:<4} {str(v):<36} not covered", flush=True)
                    continue

                @jax.jit
                def loop(x, wa, sa, one=one):
                    def body(i, acc):
                        y = one((x.astype(jnp.float32) + acc * 0).astype(x.dtype), wa, sa, i)
                        return acc + y[0, 0, 0]
                    return jax.lax.fori_loop(0, layers, body, jnp.float32(0))

                got = np.asarray(jax.jit(one)(x, w.w[...], w.scale[...], jnp.int32(1)).sum(0), np.float64)
                ref = got if ref is None else ref
                diff = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                tl = device_timeline(lambda: loop(x, w.w[...], w.scale[...]))
                us = 0.0 if tl is None else sum(
                    d for n, (_, d) in tl["by_name"].items()
                    if n.startswith(("qwen3_grouped", "input_reduce", "loop_", "reduce", "fusion", "input_fusion"))
                ) / 1e3 / layers
                if us == 0:
                    print(f"{m:>4} {name:<4} {str(v):<36} (no GPU kernels traced)  rel diff {diff:.1e}", flush=True)
                    continue
                floor = 1e6 * nbytes / ceil["bandwidth"]
                totals[m, str(v)] = totals.get((m, str(v)), 0.0) + us
                print(f"{m:>4} {name:<4} {str(v):<36} {us:>9.2f} {100 * floor / us:>7.1f}% {diff:>9.1e}", flush=True)
    linear_mod.PROJECTION_MATMUL = {}
    if totals:
        print("per layer, q + k + v + o:")
        for (m, v), us in totals.items():
            print(f"{m:>4} {v:<36} {us:>9.2f} us")


if __name__ == "__main__":
    main()
