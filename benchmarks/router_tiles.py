"""The router gemv's tiles at batch 1 (GPU only; run 72 in NOTES.md).

At FP8 batch 1 the router gemv (bf16 [2048, 128] per layer, 512 KiB: 0.14 us of bytes) takes
~3.4 us per layer (run 70's profile): 16 programs (one 128-wide column tile, K split 16 ways),
each streaming 32 KiB in 2 K steps. Narrower column tiles give more, shorter programs; the
partials the top-k kernel sums stay [split, N, 128]. First each tiling alone (l2_warm's case,
layer i's weight each call, device time per gemv), then the best against the default in the
model's FP8 batch-1 step, A/B/A in this process (serve.bench, profile of one step).

    python benchmarks/router_tiles.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.l2_warm import case           # noqa: E402
from qwen3_jax.kernels import router          # noqa: E402
from serve import bench                       # noqa: E402
from serve.bench import measure_ceilings      # noqa: E402

TILINGS = [dict(), dict(bn=64), dict(bn=32), dict(bn=16), dict(bn=64, max_split=32, bk=64),
           dict(bn=32, max_split=8), dict(bn=128, bk=128, max_split=16), dict(bn=64, num_warps=4),
           dict(bn=32, num_warps=4)]


def main():
    bw = measure_ceilings(True, reps=20)["bandwidth"]
    print(f"copy {bw / 1e12:.3f} TB/s", flush=True)
    timed = []
    for t in TILINGS:
        cfg = {**router.ROUTER_GEMV, **t}
        us = case(f"router {t or 'default'}", 2048, 128, 1, "k", False, False, bw, **cfg)
        timed.append((us["cold"], cfg))
    best = min(timed, key=lambda c: c[0])[1]
    default = dict(router.ROUTER_GEMV)
    print(f"best {best} against the default {default}", flush=True)
    if best == default:
        return
    for cfg in (default, best, default):
        router.ROUTER_GEMV = cfg
        print(f"== model with router tiles {cfg}", flush=True)
        bench.main(["--model", "Qwen3-30B-A3B-FP8", "--batch", "1", "--prefill=", "--context", "1024", "--steps", "8",
                    "--reps", "5", "--single-step=", "--profile-batch", "1"])


if __name__ == "__main__":
    main()
