"""The prefill's bf16 copy of one layer's FP8 experts stored [out, in]: XLA's fused
dequantize + transpose against the transposing kernel (qwen3_jax/kernels/dequantize.py) per tile
and warp count. Device time per copy from the profiler, bytes (FP8 read + bf16 written) over it,
next to the copy ceiling measured in the same run. 30B-A3B shapes, gate ([E, F, D] -> [E, D, F],
scales layout "k") and down ([E, D, F] -> [E, F, D], layout "n"). GPU only.

    python benchmarks/dequantize_copy.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                                   # noqa: E402
import jax.numpy as jnp                      # noqa: E402

from qwen3_jax.fp8 import dequantize         # noqa: E402
from qwen3_jax.kernels import dequantize as dq   # noqa: E402
from qwen3_jax.kernels.tune import device_timeline   # noqa: E402
from serve.bench import measure_ceilings    # noqa: E402

LAYERS, E, D, F, BLOCK = 4, 128, 2048, 768, 128


def weights(n, k, layout):
    w = jax.random.normal(jax.random.key(n), (LAYERS * E, n, k), jnp.float32).astype(jnp.float8_e4m3fn)
    shape = (LAYERS * E, k // BLOCK, n) if layout == "k" else (LAYERS * E, k, n // BLOCK)
    return w, jnp.full(shape, 0.01, jnp.float32)


def xla(w, s, offset, layout):
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, offset, E, axis=0)   # noqa: E731
    return dequantize(jnp.swapaxes(sl(w), 1, 2), sl(s), 1 if layout == "k" else 2, BLOCK, jnp.bfloat16)


def timed(fn, w, s):
    """Device us per copy: one call per layer, as the model's prefill runs them."""
    step = jax.jit(lambda w, s: [fn(w, s, jnp.int32(i * E)) for i in range(LAYERS)])
    tl = device_timeline(lambda: step(w, s))
    return sum(t for _, t in tl["by_name"].values()) / 1e3 / LAYERS


def main():
    ceil = measure_ceilings(True)
    print(f"card {jax.devices()[0].device_kind}; copy ceiling {ceil['bandwidth'] / 1e12:.3f} TB/s")
    for name, n, k, layout in (("gate", F, D, "k"), ("down", D, F, "n")):
        w, s = weights(n, k, layout)
        nbytes = E * n * k * 3    # 1 byte read + 2 written per element
        variants = [("xla", lambda w, s, o: xla(w, s, o, layout))]
        for tile in (32, 64, 128):
            for warps in (4, 8):
                variants.append((f"kernel tile {tile} warps {warps}", lambda w, s, o, t=tile, nw=warps:
                                 dq.dequantize_transposed(w, s, o, groups=E, layout=layout, block=BLOCK, tile=t,
                                                          num_warps=nw)))
        for label, fn in variants:
            us = timed(fn, w, s)
            print(f"{name:5s} {label:26s} {us:8.1f} us  {nbytes / us / 1e6:6.3f} TB/s  "
                  f"{100 * nbytes / us / 1e6 / (ceil['bandwidth'] / 1e12):5.1f}% of copy")


if __name__ == "__main__":
    main()
