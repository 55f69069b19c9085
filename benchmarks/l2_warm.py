"""Is a batch-1 gemv faster when its weight is already in L2? (GPU only; run 33 in NOTES.md)

Per decode gemv shape of 30B-A3B (FP8 o_proj, FP8 MoE gate/up, bf16 o_proj), device time per
gemv kernel from the profiler, 16 calls each:
  cold:    layer i's weight, i = 0..15 (each read from HBM, as the model runs);
  hot:     layer 0's weight every time (L2-resident after the first call).
If "hot" were much faster than "cold", a latency-bound kernel earlier in the step (decode
attention, routing) could read the next gemv's weight into L2 on its idle SMs. Run 33 (H200):
only 18-25% faster, while the same gemv on weights stored [G, N, K] is 15% faster cold.

    python benchmarks/l2_warm.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                                   # noqa: E402
import jax.numpy as jnp                      # noqa: E402

from qwen3_jax.kernels.gemv import gemv, gemv_tiles   # noqa: E402
from qwen3_jax.kernels.tune import device_timeline   # noqa: E402
from serve.bench import measure_ceilings    # noqa: E402

LAYERS = 16


def case(name, k_dim, n_dim, rows, layout, fp8, pair, bandwidth, w_nk=False, **tiles):
    keys = jax.random.split(jax.random.key(0), 3)
    stride = 16 if rows > 1 else 1
    g_count = LAYERS * stride
    nw = 2 if pair else 1
    if fp8:
        ws = [jax.random.normal(kk, (g_count, k_dim, n_dim), jnp.float32).astype(jnp.float8_e4m3fn)
              for kk in keys[:nw]]
        ss = [jnp.full((g_count, k_dim // 128, n_dim) if layout == "k" else (g_count, k_dim, n_dim // 128), 0.02,
                       jnp.float32) for _ in ws]
    else:
        ws = [(0.02 * jax.random.normal(kk, (g_count, k_dim, n_dim), jnp.float32)).astype(jnp.bfloat16)
              for kk in keys[:nw]]
        ss = None
    x = jax.random.normal(keys[2], (rows, k_dim), jnp.bfloat16)
    t = gemv_tiles(k_dim, n_dim, rows, fp8, layout, 128, w_nk=w_nk, **tiles)
    if w_nk:
        ws = [jnp.swapaxes(w, 1, 2) for w in ws]
    nbytes = sum(w.nbytes for w in ws) // g_count * rows

    def step(x, i, mode):
        layer = 0 if mode == "hot" else i   # x depends on the loop carry, so the call is not hoisted
        groups = layer * stride + jnp.arange(rows, dtype=jnp.int32)
        outs = gemv(x, rows, groups, ws, ss, row_div=1, layout=layout, block=128, **t)
        return sum(o[0, 0, 0] for o in outs)

    us = {}
    for mode in ("cold", "hot"):
        @jax.jit
        def run(x, ws_, ss_, mode=mode):
            def body(i, acc):
                xi = (x.astype(jnp.float32) + 0.0 * acc).astype(x.dtype)   # keeps calls in order, not hoisted
                return acc + step(xi, i, mode)
            return jax.lax.fori_loop(0, LAYERS, body, jnp.float32(0))
        tl = device_timeline(lambda: run(x, ws, ss))
        g_ns = sum(ns for n, (_, ns) in tl["by_name"].items() if n.startswith("qwen3_gemv")) / LAYERS
        print(f"  {name + (' nk' if w_nk else ''):19s} {mode:8s} gemv {g_ns / 1e3:6.2f} us (floor "
              f"{nbytes / bandwidth * 1e6:5.2f})", flush=True)
        us[mode] = g_ns / 1e3
    return us


def main():
    ceil = measure_ceilings(True, reps=20)
    bw = ceil["bandwidth"]
    print(f"copy {bw / 1e12:.3f} TB/s", flush=True)
    case("fp8 o_proj", 4096, 2048, 1, "n", True, False, bw)
    case("fp8 o_proj", 4096, 2048, 1, "n", True, False, bw, w_nk=True, bk=256, num_warps=8)
    case("bf16 o_proj", 4096, 2048, 1, "n", False, False, bw)
    case("fp8 moe_gate_up", 2048, 768, 8, "k", True, True, bw)
    case("fp8 moe_gate_up", 2048, 768, 8, "k", True, True, bw, w_nk=True, bk=128)
    case("bf16 moe_gate_up", 2048, 768, 8, "k", False, True, bw)
    case("fp8 moe_down", 768, 2048, 8, "n", True, False, bw)
    case("bf16 moe_down", 768, 2048, 8, "n", False, False, bw)


if __name__ == "__main__":
    main()
