"""Registers, spills and shared memory of the MoE's grouped matmuls as compiled for Hopper (sm_90a),
on any host, GPU or not: what a tile choice costs before device time is spent on it.

Each case is lowered by jax for CUDA exactly as the model calls it (kernels.moe_ffn's blocks path
at 30B-A3B shapes: the gate/up pair gathering x's rows, the down writing real rows only, tiles
from grouped_matmul.matmul_tiles plus the variant's overrides). The Triton IR that Pallas hands to
XLA is captured and compiled here by the `triton` package to PTX, then `ptxas -v` reports the
kernel's registers a thread and its spill bytes; `smem` is Triton's shared memory (all stages).
A separate process compiles, so jaxlib's and Triton's LLVM never share one.

A proxy, not the GPU's own build: XLA compiles the same IR with the Triton inside jaxlib, whose
version differs from the pip package's. First use (benchmarks/NOTES.md, twenty-fifth session):
the W8A8 gate/up at bm 128 spilled 236 bytes a thread, from loading x's scales through the
gathered row indices; with them gathered ahead (x_scales_ahead) it does not.

    pip install triton            # the compiler only (~1 GB); not a dependency of the project
    python benchmarks/kernel_registers.py [--triton-python VENV/bin/python]
    python benchmarks/kernel_registers.py --bm 128 --variants '[{}, {"x_scales_ahead": false}, {"bn": 64}]'
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

E, D, F, BLOCK = 128, 2048, 768, 128   # Qwen3-30B-A3B: experts, hidden, expert FFN; FP8 block
BLOCKS = 8                              # blocks in the lowered call (the tiles, not the count, set registers)


def capture_ttir(fn, args) -> str:
    """The Triton IR of the one pallas_call in fn(*args), lowered for CUDA (no GPU needed)."""
    import jax
    import jax._src.pallas.triton.pallas_call_registration as registration   # private: the hook point

    lower = registration.lowering.lower_jaxpr_to_triton_module
    seen = []

    def spy(*a, **k):
        result = lower(*a, **k)
        seen.append(result.module.operation.get_asm())
        return result
    registration.lowering.lower_jaxpr_to_triton_module = spy
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    if len(seen) != 1:
        raise RuntimeError(f"expected one Triton kernel in the call, lowered {len(seen)}")
    return seen[0]


def compile_report(path: str, num_warps: int, num_stages: int) -> dict:
    """Run in its own process (--compile): Triton IR file -> PTX for sm_90a -> ptxas -v."""
    import triton
    from triton.backends.compiler import GPUTarget

    k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx_path = path + ".ptx"
    with open(ptx_path, "w") as fh:
        fh.write(k.asm["ptx"])
    # the newest ptxas Triton ships: its plain one may predate the PTX version it writes
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next(p for p in (os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")) if os.path.exists(p))
    out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx_path, "-o", path + ".cubin"], capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(f"ptxas failed: {out.stderr[-500:]}")
    # "... 236 bytes spill stores, 236 bytes spill loads ... Used 255 registers ..."
    words = out.stderr.replace(",", " ").split()
    registers = max(int(words[i - 1]) for i, w in enumerate(words) if w == "registers" and words[i - 1].isdigit())
    spill = {kind: sum(int(words[i - 3]) for i in range(3, len(words))
                       if words[i] == kind and words[i - 1] == "spill" and words[i - 2] == "bytes")
             for kind in ("stores", "loads")}
    return dict(registers=registers, spill_stores=spill["stores"], spill_loads=spill["loads"],
                smem=k.metadata.shared, wgmma="wgmma" in k.asm["ptx"])


def cases(bm: int, variant: dict):
    """(name, fn, arg shapes, num_warps, num_stages) of the MoE's two matmuls at block height bm,
    W8A8 and bf16, as moe_ffn's blocks path calls them with these tile overrides."""
    import math

    import jax
    import jax.numpy as jnp

    from qwen3_jax.kernels.grouped_matmul import grouped_matmul, matmul_tiles

    S = jax.ShapeDtypeStruct
    r, n_tok = BLOCKS * bm, BLOCKS * bm // 2
    route = (S((BLOCKS,), jnp.int32), S((r + 1,), jnp.int32), S((BLOCKS,), jnp.int32))   # groups, rows, valid
    e4m3, bf16, f32 = jnp.float8_e4m3fn, jnp.bfloat16, jnp.float32
    for fp8 in (True, False):
        t1 = matmul_tiles(D, F, bm, fp8, "k", BLOCK, w_nk=fp8, **variant)
        t2 = matmul_tiles(F, D, bm, fp8, "n", BLOCK, w_nk=fp8, **variant)
        if fp8:
            t2 = dict(t2, bk=math.gcd(t2["bk"], t1["bn"], BLOCK))

            def gate_up(x, sx, g, rows, valid, w1, w2, s1, s2, t1=t1):
                return grouped_matmul(x, g, (w1, w2), (s1, s2), bm=bm, layout="k", block=BLOCK, w_nk=True, x_scales=sx,
                                      quantize_out=True, scale_run=BLOCK, rows=rows, block_valid=valid,
                                      interpret=False, **t1)

            def down(h, hs, g, rows, valid, w, s, t2=t2):
                return grouped_matmul(h, g, (w,), (s,), bm=bm, layout="n", block=BLOCK, w_nk=True, x_scales=hs,
                                      block_valid=valid, interpret=False, **t2)
            yield ("w8a8 gate/up", gate_up, (S((n_tok, D), e4m3), S((n_tok, D // BLOCK), f32), *route,
                                             S((E, F, D), e4m3), S((E, F, D), e4m3), S((E, D // BLOCK, F), f32),
                                             S((E, D // BLOCK, F), f32)), t1)
            yield ("w8a8 down", down, (S((r, F), e4m3), S((r, F // t1["bn"]), f32), *route, S((E, D, F), e4m3),
                                       S((E, F, D // BLOCK), f32)), t2)
        else:
            def gate_up_bf16(x, g, rows, valid, w1, w2, t1=t1):
                return grouped_matmul(x, g, (w1, w2), bm=bm, layout="k", rows=rows, block_valid=valid,
                                      interpret=False, **t1)

            def down_bf16(h, g, rows, valid, w, t2=t2):
                return grouped_matmul(h, g, (w,), bm=bm, layout="n", block_valid=valid, interpret=False, **t2)
            yield ("bf16 gate/up", gate_up_bf16, (S((n_tok, D), bf16), *route, S((E, D, F), bf16),
                                                  S((E, D, F), bf16)), t1)
            yield ("bf16 down", down_bf16, (S((r, F), bf16), *route, S((E, F, D), bf16)), t2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bm", default="128,64", help="block heights, comma-separated (an 8k prompt: 128; 1k: 64)")
    p.add_argument("--variants", default="[{}]",
                   help="a JSON list of tile overrides (grouped_matmul.matmul_tiles keys), each against the defaults")
    p.add_argument("--only", default="", help="cases whose name contains this, e.g. 'w8a8 gate'")
    p.add_argument("--triton-python", default=sys.executable,
                   help="the Python whose environment has `triton` (default: this one)")
    p.add_argument("--compile", nargs=3, metavar=("TTIR", "WARPS", "STAGES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compile:   # the child process
        print(json.dumps(compile_report(args.compile[0], int(args.compile[1]), int(args.compile[2]))))
        return
    print(f"{'case':14s} {'bm':>4s}  {'variant':44s} {'regs':>5s} {'spill st/ld':>12s} {'smem':>7s}  wgmma  tiles")
    with tempfile.TemporaryDirectory() as tmp:
        for bm in (int(b) for b in args.bm.split(",")):
            for variant in json.loads(args.variants):
                for name, fn, shapes, tiles in cases(bm, variant):
                    if args.only not in name:
                        continue
                    path = os.path.join(tmp, "kernel.ttir")
                    with open(path, "w") as fh:
                        fh.write(capture_ttir(fn, shapes))
                    out = subprocess.run([args.triton_python, os.path.abspath(__file__), "--compile", path,
                                          str(tiles["num_warps"]), str(tiles["num_stages"])],
                                         capture_output=True, text=True)
                    if out.returncode:
                        print(f"{name:14s} {bm:4d}  {json.dumps(variant):44s} FAILED {out.stderr.strip()[-300:]}")
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    shown = {k: v for k, v in tiles.items() if k not in ("convert",)}
                    print(f"{name:14s} {bm:4d}  {json.dumps(variant):44s} {r['registers']:5d} "
                          f"{r['spill_stores']:5d}/{r['spill_loads']:<6d} {r['smem']:7d}  {str(r['wgmma']):5s}  {shown}",
                          flush=True)


if __name__ == "__main__":
    main()
