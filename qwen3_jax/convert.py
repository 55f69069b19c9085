"""Convert a Hugging Face Qwen3-MoE checkpoint to an Orbax checkpoint of our in-memory params.

    python -m qwen3_jax.convert --model HF_DIR --out CKPT_DIR [--mesh tp=2] [--dtype bfloat16]

The HF checkpoint is loaded with qwen3_jax.load under --mesh (each device reads only its slice)
and the sharded arrays are saved by Orbax shard by shard, so host memory holds at most one
Orbax transfer window on top of what the devices hold. Without accelerators enough the mesh is
built from CPU devices (as many as it needs). The result loads with qwen3_jax.load(CKPT_DIR,
mesh=...) under any mesh, and `python -m serve --model CKPT_DIR` serves it.
"""

from __future__ import annotations

import argparse
import sys
import time


def pick_devices(n: int):
    """The first n default devices, or n CPU devices when the default backend has fewer."""
    import jax
    devices = jax.devices()
    if len(devices) >= n:
        return devices[:n]
    cpus = jax.devices("cpu")
    if len(cpus) < n:
        raise RuntimeError(f"the mesh needs {n} devices; {len(devices)} {devices[0].platform} and {len(cpus)} CPU "
                           "devices are visible; use a smaller --mesh")
    print(f"convert: {len(devices)} {devices[0].platform} device(s) < {n}: converting on {n} CPU devices",
          file=sys.stderr)
    return cpus[:n]


def convert(model_dir: str, out_dir: str, *, mesh: str | None = None, dtype: str = "bfloat16",
            compress: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """HF_DIR -> CKPT_DIR. Returns the metadata written, plus load_s / save_s timings."""
    from sharding.mesh import parse_mesh_spec

    from .api import load
    from .orbax_io import is_orbax_checkpoint, save_orbax

    if is_orbax_checkpoint(model_dir):
        raise ValueError(f"{model_dir} is already an Orbax checkpoint; convert reads a Hugging Face checkpoint "
                         "(config.json + *.safetensors)")
    spec = parse_mesh_spec(mesh)
    devices = pick_devices(spec.num_devices)
    t0 = time.perf_counter()
    model = load(model_dir, mesh=spec, dtype=dtype, devices=devices, progress=progress)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    meta = save_orbax(model, out_dir, source_dir=model_dir, compress=compress, overwrite=overwrite)
    return {**meta, "load_s": load_s, "save_s": time.perf_counter() - t0, "mesh": spec.describe()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen3_jax.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="directory to write the Orbax checkpoint to (new or empty)")
    p.add_argument("--mesh", default=None, help="mesh to load under while converting, e.g. tp=2 (default: "
                   "one device); the checkpoint restores under any mesh")
    p.add_argument("--dtype", default="bfloat16", help="dtype of unquantized params (FP8 weights stay FP8)")
    p.add_argument("--compress", action="store_true", help="zstd-compress the arrays (smaller, slower to load)")
    p.add_argument("--force", action="store_true", help="replace an existing Orbax checkpoint at --out")
    args = p.parse_args(argv)

    from sharding.mesh import parse_mesh_spec, request_cpu_devices
    request_cpu_devices(parse_mesh_spec(args.mesh).num_devices)   # before JAX starts its backends
    info = convert(args.model, args.out, mesh=args.mesh, dtype=args.dtype, compress=args.compress,
                   overwrite=args.force)
    size = sum(info["files"].values())
    print(f"{info['mesh']}\nloaded {args.model} in {info['load_s']:.1f}s, saved {len(info['params'])} params "
          f"({size / 1e9:.3f} GB, {info['dtype']}{', FP8' if info['fp8'] else ''}) to {args.out} in "
          f"{info['save_s']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
