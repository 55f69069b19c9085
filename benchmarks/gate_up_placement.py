"""Does the MoE gate/up gemv's speed depend on where its two weights lie? (GPU only; run 86 in
benchmarks/NOTES.md)

Run 84-85 (H200) found FP8 batch-1 decode 10-13% slower in some processes than in others, and
nearly all of it in one kernel: the MoE gate/up gemv (548 -> 746-828 us per step), with or
without the norm in its x load, while the MoE down gemv (also routed, one weight) kept its
time. The gate/up gemv reads two arrays at the same tile offsets in every program, so one
suspect is their distance in memory: if up - gate maps both streams onto the same DRAM
channels, the two halve each other's bandwidth. Here the gate and up weights (8 layers' worth
of 30B-A3B FP8 experts, stored [G, N, K]) are allocated with a spacer of `gap` MiB between them,
and the gemv (batch 1: 8 routed experts, the model's tiles) is timed per layer, cold (layer i's
weights, read from HBM), from the profiler.

    python benchmarks/gate_up_placement.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                                   # noqa: E402
import jax.numpy as jnp                      # noqa: E402

from qwen3_jax.kernels.gemv import gemv, gemv_tiles   # noqa: E402
from qwen3_jax.kernels.tune import device_timeline   # noqa: E402
from serve.bench import measure_ceilings    # noqa: E402

# 8 layers: 1.6 GB per weight. 16 (3.2 GB) crashed (run 86): Pallas Triton indexes a 1-byte
# array of 2-4 GiB with int32 offsets (kernels.index_overflows).
LAYERS, EXPERTS, ROWS, K_DIM, N_DIM = 8, 128, 8, 2048, 768
GAPS_MIB = (0, 1, 2, 3, 4, 8, 16, 32, 64, 96, 128, 256)


def weight(key):
    """[L*E, N, K] e4m3 (the checkpoint's [out, in]) and its [L*E, K/128, N] float32 scales."""
    w = jax.random.normal(key, (LAYERS * EXPERTS, N_DIM, K_DIM), jnp.float32).astype(jnp.float8_e4m3fn)
    return w, jnp.full((LAYERS * EXPERTS, K_DIM // 128, N_DIM), 0.02, jnp.float32)


def time_gemv(gate, up, x, t, bandwidth):
    """Device us per gate/up gemv, layer i's 8 experts for i = 0..L-1 (each read from HBM)."""
    experts = jax.random.permutation(jax.random.key(1), EXPERTS)[:ROWS].astype(jnp.int32)

    @jax.jit
    def run(x, ws, ss):
        def body(i, acc):
            xi = (x.astype(jnp.float32) + 0.0 * acc).astype(x.dtype)   # keeps the calls in order
            outs = gemv(xi, ROWS, i * EXPERTS + experts, ws, ss, row_div=1, layout="k", block=128, **t)
            return acc + sum(o[0, 0, 0] for o in outs)
        return jax.lax.fori_loop(0, LAYERS, body, jnp.float32(0))

    ws, ss = (gate[0], up[0]), (gate[1], up[1])
    tl = device_timeline(lambda: run(x, ws, ss))
    ns = sum(ns for n, (_, ns) in tl["by_name"].items() if n.startswith("qwen3_gemv")) / LAYERS
    floor_us = 2 * ROWS * N_DIM * K_DIM / bandwidth * 1e6
    return ns / 1e3, floor_us


def main():
    bw = measure_ceilings(True, reps=20)["bandwidth"]
    print(f"device {jax.devices()[0].device_kind}; copy {bw / 1e12:.3f} TB/s", flush=True)
    x = jax.random.normal(jax.random.key(2), (ROWS, K_DIM), jnp.bfloat16)
    t = gemv_tiles(K_DIM, N_DIM, ROWS, True, "k", 128, w_nk=True, bk=128)
    print(f"tiles {t}", flush=True)
    for gap in GAPS_MIB:
        gate = weight(jax.random.key(3))
        spacer = jnp.zeros((max(gap, 1) << 20,), jnp.uint8) if gap else None
        up = weight(jax.random.key(4))
        jax.block_until_ready((gate, up, spacer))
        dist = (up[0].unsafe_buffer_pointer() - gate[0].unsafe_buffer_pointer()) / 2 ** 20
        us, floor = time_gemv(gate, up, x, t, bw)
        print(f"  gap {gap:4d} MiB: up - gate = {dist:10.3f} MiB, gate/up gemv {us:6.2f} us "
              f"(floor {floor:5.2f})", flush=True)
        del gate, up, spacer


if __name__ == "__main__":
    main()
