"""Device-time sweeps of the decode gemv kernels at 30B-A3B shapes (GPU only):
  order: every decode gemv shape at batch 1 with the weights stored [G, K, N] or [G, N, K] and
    the MMA's operands in either order (kernels.gemv w_nk / swap; run 22 in NOTES.md);
  moe-fused: the MoE FFN as two gemvs against the fused kernel (kernels/moe_gemv.py) per tile
    variant, batches 1, 4, 8 (run 23).

    python benchmarks/gemv_sweeps.py order,moe-fused [--kinds bf16,w8a16,w8a8]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen3_jax.kernels import tune          # noqa: E402
from serve.bench import measure_ceilings    # noqa: E402

ORDER_VARIANTS = [{}, dict(swap=True), dict(w_nk=True), dict(w_nk=True, swap=True),
                  dict(w_nk=True, swap=True, bk=128), dict(w_nk=True, swap=True, num_warps=8),
                  dict(w_nk=True, swap=True, num_stages=3), dict(w_nk=True, bk=128),
                  dict(w_nk=True, swap=True, target_programs=528)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", help="comma-separated: order, moe-fused")
    p.add_argument("--kinds", default="w8a16,bf16,w8a8", help="order: bf16, w8a16, w8a8; moe-fused: bf16, fp8")
    args = p.parse_args(argv)
    log = lambda m: print(m, flush=True)   # noqa: E731
    ceil = measure_ceilings(True, reps=20)
    log(f"copy {ceil['bandwidth'] / 1e12:.3f} TB/s")
    kinds = tuple(args.kinds.split(","))
    for what in args.what.split(","):
        if what == "order":
            tune.sweep_gemv_shapes(ceil["bandwidth"], kinds=kinds, variants=ORDER_VARIANTS, log=log)
        elif what == "moe-fused":
            tune.sweep_moe_fused(ceil["bandwidth"], kinds=tuple(dict.fromkeys("fp8" if k != "bf16" else k for k in kinds)), log=log)
        else:
            raise SystemExit(f"unknown sweep {what!r}; use order or moe-fused")


if __name__ == "__main__":
    main()
