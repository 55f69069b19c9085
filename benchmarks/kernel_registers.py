"""Registers, spills and shared memory of every Pallas Triton kernel in one model step, as compiled
for Hopper (sm_90a), on any host, GPU or not: what a tile choice costs before device time is spent.

The model (abstract weights: nothing is allocated) is lowered by jax for CUDA with the kernels on,
one decode step at each --batch and one prefill at each --tokens, exactly as serve.bench runs
them. The Triton IR each pallas_call hands to XLA is captured, compiled here by the `triton`
package to PTX for sm_90a, and `ptxas -v` reports registers a thread and spill bytes; smem is
Triton's shared memory over all stages; CTAs/SM how many of the kernel's CTAs fit an SM at once
by those two; wgmma says whether the MMAs are Hopper's warpgroup ones.
A separate process compiles, so jaxlib's and Triton's LLVM never share one. --variants patches
grouped_matmul.MATMUL_DEFAULTS (both block-height classes) for the lowering.

A proxy, not the GPU's own build: XLA compiles the same IR with the Triton inside jaxlib, whose
version differs from the pip package's. The capture hooks a private function of jax's Pallas
Triton lowering (tests/test_bench.py checks it still works); jaxlib 0.10.2's lowering hands XLA
the IR uncompiled, while newer jaxlibs compile it while lowering, which needs their CUDA plugin.
Findings: benchmarks/NOTES.md, twenty-fifth session.

    pip install triton            # the compiler only (~1 GB); not a dependency of the project
    python benchmarks/kernel_registers.py [--triton-python VENV/bin/python]
    python benchmarks/kernel_registers.py --batch '' --tokens 8192 --variants '[{}, {"bn": 64}]'
    python benchmarks/kernel_registers.py --batch '' --set moe_ffn.BLOCK_ROUTING=xla \
        --variants '[{}, {"x_scales_ahead": false}]'
"""

import argparse
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def captured_kernels():
    """Within: every Triton kernel Pallas lowers is appended to the yielded list as (name,
    num_warps, num_stages, Triton IR text)."""
    import jax._src.pallas.triton.pallas_call_registration as registration   # private: the hook point

    lower = registration.lowering.lower_jaxpr_to_triton_module
    seen = []

    def spy(*a, **k):
        result = lower(*a, **k)
        caller = inspect.currentframe().f_back.f_locals   # pallas_call_lowering: its launch parameters
        asm = result.module.operation.get_asm()
        seen.append((re.search(r"module @(\S+)", asm).group(1), caller["num_warps"], caller["num_stages"], asm))
        return result
    registration.lowering.lower_jaxpr_to_triton_module = spy
    try:
        yield seen
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower


def lower_steps(model_name: str, batches, tokens, context: int):
    """-> [(step label, [(name, warps, stages, ir)])]: the Pallas kernels of a decode step at each
    batch and a prefill of each length, lowered for CUDA with the kernels on."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qwen3_jax import kernels
    from qwen3_jax.api import abstract_model, build_context
    from qwen3_jax.model import init_cache
    from serve.bench import make_decode, make_prefill, resolve_bench_config

    cfg = resolve_bench_config(model_name, None)
    _, ctx, kv_rep = build_context(cfg, None, None)
    graphdef, state = nnx.split(abstract_model(cfg, jnp.bfloat16, kv_rep, ctx))
    S = jax.ShapeDtypeStruct

    def cache(slots, length):
        return jax.eval_shape(lambda: init_cache(cfg, slots, length, jnp.bfloat16, kv_rep, ctx))
    steps = [(f"decode batch {b}", make_decode(graphdef, 1), (state, S((b,), jnp.int32), S((b,), jnp.int32),
                                                              cache(b, context))) for b in batches]
    steps += [(f"prefill {t}", make_prefill(graphdef), (state, S((1, t), jnp.int32), cache(1, t))) for t in tokens]
    on_gpu, was = kernels.on_gpu, kernels._override
    kernels.on_gpu = lambda: True   # the GPU's choices (kernels on, not interpret mode), lowered here
    kernels.set_enabled(True)
    out = []
    try:
        for label, fn, args in steps:
            with captured_kernels() as seen:
                fn.trace(*args).lower(lowering_platforms=("cuda",))
            out.append((label, list(seen)))
    finally:
        kernels.on_gpu = on_gpu
        kernels.set_enabled(was)
        # jitted kernels traced here keep the Triton lowering in their caches (interpret mode is
        # decided while tracing); a later CPU call at the same shapes must trace again
        jax.clear_caches()
    return out


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


def ctas_per_sm(registers: int, smem: int, warps: int) -> int:
    """How many CTAs of this kernel an H100/H200 SM holds at once: 64K registers (allocated per
    warp in multiples of 8 a thread), 228 KB of shared memory (1 KB of it reserved per CTA), 2048
    threads, 32 CTAs."""
    by_regs = 65536 // (-(-registers // 8) * 8 * 32 * warps)
    return max(0, min(by_regs, 233472 // (smem + 1024), 2048 // (32 * warps), 32))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Qwen3-30B-A3B-FP8", help="a bench preset (serve.bench --model)")
    p.add_argument("--batch", default="1,64", help="decode batches, comma-separated ('' for none)")
    p.add_argument("--tokens", default="1024,8192", help="prefill lengths, comma-separated ('' for none)")
    p.add_argument("--context", type=int, default=1024, help="decode's KV cache length")
    p.add_argument("--variants", default="[{}]",
                   help="a JSON list of grouped_matmul.MATMUL_DEFAULTS overrides, e.g. '[{}, {\"bn\": 64}]'")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="a qwen3_jax.kernels setting for the lowering, e.g. moe_ffn.BLOCK_ROUTING=xla "
                        "(VALUE as JSON, else a string); repeatable")
    p.add_argument("--triton-python", default=sys.executable,
                   help="the Python whose environment has `triton` (default: this one)")
    p.add_argument("--compile", nargs=3, metavar=("TTIR", "WARPS", "STAGES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compile:   # the child process
        print(json.dumps(compile_report(args.compile[0], int(args.compile[1]), int(args.compile[2]))))
        return

    import importlib

    from qwen3_jax.kernels import grouped_matmul as gm

    for setting in args.set:
        target, value = setting.split("=", 1)
        module, name = target.rsplit(".", 1)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        setattr(importlib.import_module(f"qwen3_jax.kernels.{module}"), name, value)
    ints = lambda s: [int(v) for v in s.split(",") if v]   # noqa: E731
    print(f"{args.model}, kernels compiled for sm_90a; per kernel: warps/stages, registers a thread, "
          "spill bytes stored/loaded a thread, shared memory, CTAs an SM holds, Hopper MMAs")
    saved = {size: dict(cfg) for size, cfg in gm.MATMUL_DEFAULTS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in json.loads(args.variants):
            for size in gm.MATMUL_DEFAULTS:
                gm.MATMUL_DEFAULTS[size] = {**saved[size], **variant}
            try:
                steps = lower_steps(args.model, ints(args.batch), ints(args.tokens), args.context)
            finally:
                gm.MATMUL_DEFAULTS.update(saved)
            for label, seen in steps:
                print(f"{label}{' ' + json.dumps(variant) if variant else ''}: {len(seen)} kernels")
                for i, (name, warps, stages, ir) in enumerate(seen):
                    path = os.path.join(tmp, f"k{i}.ttir")
                    with open(path, "w") as fh:
                        fh.write(ir)
                    out = subprocess.run([args.triton_python, os.path.abspath(__file__), "--compile", path, str(warps),
                                          str(stages)], capture_output=True, text=True)
                    if out.returncode:
                        print(f"  {name:34s} FAILED {out.stderr.strip()[-300:]}")
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    print(f"  {name:34s} {warps}/{stages}  {r['registers']:3d} regs  spills {r['spill_stores']:4d}/"
                          f"{r['spill_loads']:<4d}  smem {r['smem']:6d}  "
                          f"{ctas_per_sm(r['registers'], r['smem'], warps):2d} CTAs/SM  "
                          f"{'wgmma' if r['wgmma'] else 'mma.sync'}", flush=True)


if __name__ == "__main__":
    main()
