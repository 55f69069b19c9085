"""A/B of the small decode kernels' variants in one process: runs `python -m serve.bench` (same
arguments) once per setting of the decode-attention split combine and the MoE gemv epilogue.

    python benchmarks/ab_epilogues.py --model Qwen3-30B-A3B --batch 1 --prefill= --kernels on ...
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root

from qwen3_jax.kernels import decode_attention, moe_ffn  # noqa: E402

SETTINGS = [("pallas", "pallas"), ("xla", "pallas"), ("pallas", "xla"), ("xla", "xla")]

if __name__ == "__main__":
    args = sys.argv[1:]
    for combine, epilogue in SETTINGS:
        decode_attention.COMBINE, moe_ffn.EPILOGUE = combine, epilogue
        print(f"== attention combine {combine}, MoE epilogue {epilogue}", flush=True)
        sys.argv = ["serve.bench", *args]
        try:
            runpy.run_module("serve.bench", run_name="__main__")
        except SystemExit as e:
            if e.code:
                raise
