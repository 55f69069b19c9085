"""Kernel sweeps at 30B-A3B shapes (GPU only):
  gemv: device time of every decode gemv shape (batch 1) with the weights stored [G, K, N] or
    [G, N, K] (kernels.gemv w_nk; runs 22 and 32 in NOTES.md), per tile variant;
  prefill: an FP8 MoE layer of an 8k-token (or --tokens) prompt per grouped-matmul variant (MMA
    dtype, tiles, the MMA's left operand; runs 27 and 47), the experts stored [E, in, out] or
    with --nk [E, out, in].

    python benchmarks/gemv_sweeps.py gemv,prefill [--kinds bf16,w8a16,w8a8] [--variants JSON]
    python benchmarks/gemv_sweeps.py prefill --nk --tokens 1024,8192 --prefill-variants '[{}, {"w_lhs": true}]'
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen3_jax.kernels import tune          # noqa: E402
from serve.bench import measure_ceilings    # noqa: E402

# w_nk=True starts from gemv.GEMV_NK_DEFAULTS (the tiles the model runs for that order)
ORDER_VARIANTS = [{}, dict(w_nk=True), dict(w_nk=True, num_warps=8), dict(w_nk=True, bk=256, num_warps=8),
                  dict(w_nk=True, target_programs=528)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", help="comma-separated: gemv, prefill")
    p.add_argument("--kinds", default="w8a16,bf16,w8a8", help="gemv: comma-separated bf16, w8a16, w8a8")
    p.add_argument("--variants", default=None,
                   help='gemv: a JSON list of tile overrides, e.g. \'[{}, {"w_nk": true, "bk": 128}]\' '
                        "(default: ORDER_VARIANTS)")
    p.add_argument("--shapes", default=None,
                   help="gemv: comma-separated shape names (qkv, o_proj, moe_gate_up, moe_down, moe_down_joint); "
                        "default: the first four")
    p.add_argument("--tokens", default="8192", help="prefill: prompt lengths, comma-separated")
    p.add_argument("--nk", action="store_true", help="prefill: FP8 experts stored [E, out, in], as the model holds them")
    p.add_argument("--prefill-variants", default=None,
                   help='prefill: a JSON list of "large" grouped-matmul overrides, e.g. \'[{}, {"w_lhs": true}]\' '
                        "(default: tune.PREFILL_FP8_VARIANTS)")
    args = p.parse_args(argv)
    log = lambda m: print(m, flush=True)   # noqa: E731
    ceil = measure_ceilings(True, reps=20)
    log(f"copy {ceil['bandwidth'] / 1e12:.3f} TB/s, matmul {ceil['matmul_flops'] / 1e12:.1f} TFLOP/s")
    for what in args.what.split(","):
        if what == "gemv":
            variants = json.loads(args.variants) if args.variants else ORDER_VARIANTS
            shape_names = args.shapes.split(",") if args.shapes else None
            tune.sweep_gemv_shapes(ceil["bandwidth"], kinds=tuple(args.kinds.split(",")), variants=variants,
                                   shape_names=shape_names, log=log)
        elif what == "prefill":
            variants = json.loads(args.prefill_variants) if args.prefill_variants else None
            for tokens in (int(t) for t in args.tokens.split(",")):
                log(f"prefill {tokens} tokens{' (nk)' if args.nk else ''}")
                tune.sweep_prefill_matmul(ceil["matmul_flops"], tokens=tokens, variants=variants, nk=args.nk, log=log)
        else:
            raise SystemExit(f"unknown sweep {what!r}; use gemv or prefill")


if __name__ == "__main__":
    main()
