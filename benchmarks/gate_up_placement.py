"""Why is the MoE gate/up gemv slow on some machines? (GPU only; runs 84-86 in benchmarks/NOTES.md)

Runs 84-85 (H200) found FP8 batch-1 decode 10-13% slower on some machines than on others, nearly
all of it in one kernel: the MoE gate/up gemv (548 -> 746-828 us per step), with or without the
norm in its x load, while the MoE down gemv (also routed, one weight) kept its time. Each machine
lent is a fresh one, so a session cannot choose; this script says which kind it got and times
the suspects, each on 8 layers' worth of 30B-A3B FP8 experts stored [G, N, K], batch 1 (8
routed experts), the model's tiles, per layer cold (layer i's weights, read from HBM), from the
profiler:
  default: the clocks and power (nvidia-smi), then the gate/up pair (with the model's 4 warps,
    and with 8), gate alone (one weight of the same layout: do two weights in one kernel
    matter?) and the down gemv (the kernel that kept its time), each as us and TB/s of weight
    bytes. The kernels that slowed in run 84 (gate/up, q/k/v) are the FP8 gemvs of 4 warps; those
    that did not (down, o_proj) run 8: a lower SM clock would hit the former harder;
  --gaps: the gate/up pair with a spacer of 0-256 MiB allocated between gate and up (run 86:
    15.5-15.9 us at every gap, so their distance is not it).

    python benchmarks/gate_up_placement.py [--gaps]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                                   # noqa: E402
import jax.numpy as jnp                      # noqa: E402

from qwen3_jax.kernels.gemv import gemv, gemv_tiles   # noqa: E402
from qwen3_jax.kernels.tune import device_timeline   # noqa: E402
from serve.bench import gpu_clocks, measure_ceilings    # noqa: E402

# 8 layers: 1.6 GB per weight. 16 (3.2 GB) crashed (run 86): Pallas Triton indexes a 1-byte
# array of 2-4 GiB with int32 offsets (kernels.index_overflows).
LAYERS, EXPERTS, ROWS, K_DIM, N_DIM = 8, 128, 8, 2048, 768
GAPS_MIB = (0, 1, 2, 3, 4, 8, 16, 32, 64, 96, 128, 256)


def weight(key):
    """[L*E, N, K] e4m3 (the checkpoint's [out, in]) and its [L*E, K/128, N] float32 scales."""
    w = jax.random.normal(key, (LAYERS * EXPERTS, N_DIM, K_DIM), jnp.float32).astype(jnp.float8_e4m3fn)
    return w, jnp.full((LAYERS * EXPERTS, K_DIM // 128, N_DIM), 0.02, jnp.float32)


def time_gemv(x, ws, ss, t, layout):
    """Device us per gemv of `ws` (weights sharing x and tiles), layer i's 8 experts for
    i = 0..L-1 (each read from HBM)."""
    experts = jax.random.permutation(jax.random.key(1), EXPERTS)[:ROWS].astype(jnp.int32)

    @jax.jit
    def run(x, ws, ss):
        def body(i, acc):
            xi = (x.astype(jnp.float32) + 0.0 * acc).astype(x.dtype)   # keeps the calls in order
            outs = gemv(xi, ROWS, i * EXPERTS + experts, ws, ss, row_div=1, layout=layout, block=128, **t)
            return acc + sum(o[0, 0, 0] for o in outs)
        return jax.lax.fori_loop(0, LAYERS, body, jnp.float32(0))

    tl = device_timeline(lambda: run(x, tuple(ws), tuple(ss)))
    return sum(ns for n, (_, ns) in tl["by_name"].items() if n.startswith("qwen3_gemv")) / LAYERS / 1e3


def diagnose(bw):
    print(gpu_clocks() or "clocks: no nvidia-smi", flush=True)
    x = jax.random.normal(jax.random.key(2), (ROWS, K_DIM), jnp.bfloat16)
    gate, up = weight(jax.random.key(3)), weight(jax.random.key(4))
    t = gemv_tiles(K_DIM, N_DIM, ROWS, True, "k", 128, w_nk=True, bk=128)
    one = ROWS * N_DIM * K_DIM   # bytes of one weight a gemv reads
    for name, ws, ss, nbytes, warps in (("gate/up pair", (gate[0], up[0]), (gate[1], up[1]), 2 * one, t["num_warps"]),
                                        ("  8 warps", (gate[0], up[0]), (gate[1], up[1]), 2 * one, 8),
                                        ("gate alone", (gate[0],), (gate[1],), one, t["num_warps"])):
        us = time_gemv(x, ws, ss, dict(t, num_warps=warps), "k")
        print(f"  {name:13s} {us:6.2f} us, {nbytes / us / 1e6:5.2f} TB/s (floor {nbytes / bw * 1e6:5.2f} us)", flush=True)
    del gate, up
    down = jax.random.normal(jax.random.key(5), (LAYERS * EXPERTS, K_DIM, N_DIM), jnp.float32).astype(jnp.float8_e4m3fn)
    down_s = jnp.full((LAYERS * EXPERTS, N_DIM, K_DIM // 128), 0.02, jnp.float32)   # layout "n": [G, K, N/128]
    h = jax.random.normal(jax.random.key(6), (ROWS, N_DIM), jnp.bfloat16)
    us = time_gemv(h, (down,), (down_s,), gemv_tiles(N_DIM, K_DIM, ROWS, True, "n", 128, w_nk=True), "n")
    print(f"  {'down':13s} {us:6.2f} us, {one / us / 1e6:5.2f} TB/s (floor {one / bw * 1e6:5.2f} us)", flush=True)


def sweep_gaps(bw):
    x = jax.random.normal(jax.random.key(2), (ROWS, K_DIM), jnp.bfloat16)
    t = gemv_tiles(K_DIM, N_DIM, ROWS, True, "k", 128, w_nk=True, bk=128)
    print(f"tiles {t}", flush=True)
    for gap in GAPS_MIB:
        gate = weight(jax.random.key(3))
        spacer = jnp.zeros((max(gap, 1) << 20,), jnp.uint8) if gap else None
        up = weight(jax.random.key(4))
        jax.block_until_ready((gate, up, spacer))
        dist = (up[0].unsafe_buffer_pointer() - gate[0].unsafe_buffer_pointer()) / 2 ** 20
        us = time_gemv(x, (gate[0], up[0]), (gate[1], up[1]), t, "k")
        print(f"  gap {gap:4d} MiB: up - gate = {dist:10.3f} MiB, gate/up gemv {us:6.2f} us "
              f"(floor {2 * ROWS * N_DIM * K_DIM / bw * 1e6:5.2f})", flush=True)
        del gate, up, spacer


def main():
    bw = measure_ceilings(True, reps=20)["bandwidth"]
    print(f"device {jax.devices()[0].device_kind}; copy {bw / 1e12:.3f} TB/s", flush=True)
    (sweep_gaps if "--gaps" in sys.argv[1:] else diagnose)(bw)


if __name__ == "__main__":
    main()
