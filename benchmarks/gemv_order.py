"""Device time of the decode gemv shapes (30B-A3B, batch 1) with the weights stored [G, K, N]
or [G, N, K], and the MMA's operands in either order (kernels.gemv w_nk / swap). GPU only.

    python benchmarks/gemv_order.py [--kinds bf16,w8a16,w8a8]
"""

import argparse
import sys

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__file__)))

from qwen3_jax.kernels import tune          # noqa: E402
from serve.bench import measure_ceilings    # noqa: E402

VARIANTS = [{}, dict(swap=True), dict(w_nk=True), dict(w_nk=True, swap=True),
            dict(w_nk=True, swap=True, bk=128), dict(w_nk=True, swap=True, num_warps=8),
            dict(w_nk=True, swap=True, num_stages=3), dict(w_nk=True, bk=128),
            dict(w_nk=True, swap=True, target_programs=528)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="w8a16,bf16,w8a8")
    args = p.parse_args(argv)
    ceil = measure_ceilings(True, reps=20)
    print(f"copy {ceil['bandwidth'] / 1e12:.3f} TB/s", flush=True)
    tune.sweep_gemv_shapes(ceil["bandwidth"], kinds=tuple(args.kinds.split(",")), variants=VARIANTS,
                           log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
