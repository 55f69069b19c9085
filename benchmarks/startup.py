"""Start-up time: Hugging Face safetensors vs our Orbax checkpoint, same model, same mesh.

    python benchmarks/startup.py                                  # Qwen3-30B-A3B shapes, 48 layers
    python benchmarks/startup.py --layers 12 --mesh tp=1          # shorter model (disk: ~2 x 16 GB)
    python benchmarks/startup.py --preset tiny --layers 2         # seconds, on a CPU

1. Writes a checkpoint of the preset's shapes with random weights as safetensors (one file per
   layer, with model.safetensors.index.json, like a Hub download; FP8 presets write e4m3 weights
   + float32 scale_inv), streamed so host memory stays small.
2. Converts it with python -m qwen3_jax.convert (timed).
3. Times start-up from each format in a fresh process: import, devices up, every param on the
   devices and ready (block_until_ready). Before each "cold" run the checkpoint's pages are
   dropped from the OS page cache (posix_fadvise DONTNEED, plus /proc/sys/vm/drop_caches when
   writable), so the disk read is part of the number; "warm" runs read from the page cache.

Prints a table (and --json writes the rows). Weights are random: the numbers are I/O and
placement, identical for real weights of the same shapes (Orbax arrays are stored uncompressed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

POOL_ELEMENTS = 1 << 25  # 32M random values reused cyclically: cheap to write, incompressible enough
TINY = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
            num_experts=16, num_experts_per_tok=4)


def bench_config(preset: str, layers: int | None, fp8: bool):
    from qwen3_jax.config import Fp8Config, load_preset

    if preset == "tiny":
        cfg = dataclasses.replace(load_preset("Qwen3-30B-A3B"), name="tiny", **TINY)
    else:
        cfg = load_preset(preset)
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    if fp8 and cfg.fp8 is None:
        cfg = dataclasses.replace(cfg, fp8=Fp8Config())
    return cfg


def tensor_plan(cfg) -> list[tuple[str, str, tuple]]:
    """[(HF name, safetensors dtype, shape)] for every tensor the config implies."""
    from qwen3_jax.checkpoint import expected_tensors, param_sources

    sources = param_sources(cfg)
    fp8_kinds = {k: s.quantizable and cfg.fp8 is not None for k, s in sources.items()}
    quantized = {n for key, s in sources.items() if fp8_kinds[key]
                 for layer in range(cfg.num_hidden_layers) for n in s.names(layer)}
    plan = []
    for name, shape in expected_tensors(cfg, fp8_kinds).items():
        dtype = "F32" if name.endswith("_scale_inv") else "F8_E4M3" if name in quantized else "BF16"
        plan.append((name, dtype, tuple(shape)))
    return plan


def _random_pools(elements: int, seed: int = 0):
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.standard_normal(elements, dtype=np.float32)
    return {"BF16": (0.02 * base).astype(ml_dtypes.bfloat16).view(np.uint8),
            "F8_E4M3": np.clip(base * 64, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8),
            "F32": np.abs(0.02 * base / 448 + 1e-6).astype(np.float32).view(np.uint8)}


ITEMSIZE = {"BF16": 2, "F8_E4M3": 1, "F32": 4}


def write_streamed(path: str, tensors: list[tuple[str, str, tuple]], pools, offset: int) -> tuple[int, int]:
    """One safetensors file written tensor by tensor from the random pools. -> (bytes, pool offset)."""
    import numpy as np

    header, pos = {}, 0
    for name, dtype, shape in tensors:
        n = int(np.prod(shape)) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in tensors:
            pool = pools[dtype]
            left = int(np.prod(shape)) * ITEMSIZE[dtype]
            while left:
                start = (offset * ITEMSIZE[dtype]) % len(pool)
                chunk = pool[start: start + min(left, len(pool) - start)]
                f.write(chunk.tobytes())
                left -= len(chunk)
                offset += len(chunk) // ITEMSIZE[dtype] + 7919  # a prime stride: no two tensors alike
    return 8 + len(raw) + pos, offset


def write_hf_checkpoint(cfg, out: str) -> int:
    """Random-weight HF checkpoint of cfg's shapes, one safetensors file per layer. -> bytes."""
    import numpy as np

    os.makedirs(out, exist_ok=True)
    plan = tensor_plan(cfg)
    groups: dict[str, list] = {}
    for name, dtype, shape in plan:
        key = name.split(".")[2] if name.startswith("model.layers.") else "other"
        groups.setdefault(key, []).append((name, dtype, shape))
    largest = max(int(np.prod(shape)) for _, _, shape in plan)
    pools, offset, total, weight_map = _random_pools(min(POOL_ELEMENTS, largest + 1)), 0, 0, {}
    order = sorted(groups, key=lambda k: (k == "other", int(k) if k.isdigit() else 0))
    for i, key in enumerate(order):
        fname = f"model-{i + 1:05d}-of-{len(order):05d}.safetensors"
        nbytes, offset = write_streamed(os.path.join(out, fname), groups[key], pools, offset)
        total += nbytes
        weight_map.update({name: fname for name, _, _ in groups[key]})
        print(f"\r  writing safetensors {i + 1}/{len(order)} ({total / 1e9:.1f} GB)", end="", file=sys.stderr,
              flush=True)
    print(file=sys.stderr)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, f)
    return total


def estimate_bytes(cfg) -> int:
    import numpy as np
    return sum(int(np.prod(shape)) * ITEMSIZE[dtype] for _, dtype, shape in tensor_plan(cfg))


def dir_files(path: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


def drop_page_cache(path: str) -> str:
    """Evict a checkpoint's files from the page cache. -> how ('drop_caches', 'fadvise')."""
    os.sync()
    how = "fadvise"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        how = "drop_caches"
    except OSError:
        pass
    for p in dir_files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return how


def child(fmt: str, path: str, mesh: str | None, dtype: str) -> None:
    """One start-up, in a fresh process: prints a JSON line with the phases."""
    t0 = time.perf_counter()
    from sharding.mesh import parse_mesh_spec, request_cpu_devices

    from qwen3_jax.convert import pick_devices
    n = parse_mesh_spec(mesh).num_devices
    request_cpu_devices(n)
    import jax

    import qwen3_jax
    t_import = time.perf_counter()
    devices = pick_devices(n)
    t_devices = time.perf_counter()
    model = qwen3_jax.load(path, mesh=mesh, dtype=dtype, devices=devices, progress=False)
    jax.block_until_ready(jax.tree.leaves(model.state))
    t_ready = time.perf_counter()
    per_device = max(model.param_bytes_per_device().values())
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps({"format": fmt, "import_s": t_import - t0, "devices_s": t_devices - t_import,
                      "load_s": t_ready - t_devices, "total_s": t_ready - t0, "device": str(devices[0].platform),
                      "param_gb_per_device": per_device / 1e9, "max_rss_gb": rss_gb}))


def run_child(fmt: str, path: str, mesh, dtype: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", fmt, path, "--dtype", dtype]
    if mesh:
        cmd += ["--mesh", mesh]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"start-up from {fmt} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_s"] = wall
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="Qwen3-30B-A3B", help="a preset name or 'tiny'")
    p.add_argument("--layers", type=int, default=None, help="shorten the model to this many layers")
    p.add_argument("--fp8", action="store_true", help="block-FP8 weights (as the -FP8 presets)")
    p.add_argument("--mesh", default=None, help="mesh for conversion and start-up, e.g. tp=2")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dir", default=None, help="work directory (default: ./startup_bench under the cwd)")
    p.add_argument("--repeats", type=int, default=2, help="cold+warm start-ups per format")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--_child", nargs=2, metavar=("FORMAT", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        child(args._child[0], args._child[1], args.mesh, args.dtype)
        return 0

    cfg = bench_config(args.preset, args.layers, args.fp8)
    work = os.path.abspath(args.dir or "startup_bench")
    hf_dir, orbax_dir = os.path.join(work, "hf"), os.path.join(work, "orbax")
    need = estimate_bytes(cfg)
    free = shutil.disk_usage(os.path.dirname(work) if not os.path.exists(work) else work).free
    if 2.1 * need > free:
        per_layer = need / max(cfg.num_hidden_layers, 1)
        fit = max(1, int((free / 2.1 - (need - per_layer * cfg.num_hidden_layers)) // per_layer))
        print(f"need ~{2.1 * need / 1e9:.0f} GB (safetensors + Orbax) but {free / 1e9:.0f} GB are free at {work}; "
              f"use --layers {fit} or another --dir", file=sys.stderr)
        return 2
    shutil.rmtree(work, ignore_errors=True)
    print(f"{cfg.name}{' FP8' if cfg.fp8 else ''}: {cfg.num_hidden_layers} layers, {need / 1e9:.2f} GB of "
          f"weights, mesh {args.mesh or 'one device'}", flush=True)

    t0 = time.perf_counter()
    hf_bytes = write_hf_checkpoint(cfg, hf_dir)
    write_s = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "qwen3_jax.convert", "--model", hf_dir, "--out", orbax_dir, "--dtype", args.dtype]
    if args.mesh:
        cmd += ["--mesh", args.mesh]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    convert_s = time.perf_counter() - t0
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    orbax_bytes = sum(os.path.getsize(f) for f in dir_files(os.path.join(orbax_dir, "params")))
    print(f"wrote safetensors in {write_s:.1f}s ({hf_bytes / 1e9:.2f} GB, {len(dir_files(hf_dir))} files); "
          f"converted to Orbax in {convert_s:.1f}s ({orbax_bytes / 1e9:.2f} GB)", flush=True)

    rows = []
    sizes = {"safetensors": hf_bytes, "orbax": orbax_bytes}
    dirs = {"safetensors": hf_dir, "orbax": orbax_dir}
    for r in range(args.repeats):
        for cache in ("cold", "warm"):
            for fmt in ("safetensors", "orbax"):
                how = drop_page_cache(dirs[fmt]) if cache == "cold" else "page cache"
                row = run_child(fmt, dirs[fmt], args.mesh, args.dtype)
                row.update(run=r + 1, cache=cache, how=how, gb=sizes[fmt] / 1e9,
                           gb_s=sizes[fmt] / 1e9 / row["load_s"])
                rows.append(row)
                print(f"  {fmt:11s} run {r + 1} {cache}: load {row['load_s']:.2f}s", file=sys.stderr, flush=True)

    print(f"\nstart-up, {cfg.name}{' FP8' if cfg.fp8 else ''} x {cfg.num_hidden_layers} layers, mesh "
          f"{args.mesh or 'one device'}, {rows[0]['device']}")
    head = (f"{'format':11s} {'run':>3s} {'cache':5s} {'GB':>7s} {'import s':>8s} {'devices s':>9s} {'load s':>7s} "
            f"{'GB/s':>6s} {'process s':>9s} {'GB/dev':>7s} {'max RSS GB':>10s}")
    print(head)
    print("-" * len(head))
    for row in rows:
        print(f"{row['format']:11s} {row['run']:>3d} {row['cache']:5s} {row['gb']:7.2f} {row['import_s']:8.2f} "
              f"{row['devices_s']:9.2f} {row['load_s']:7.2f} {row['gb_s']:6.2f} {row['process_s']:9.2f} "
              f"{row['param_gb_per_device']:7.2f} {row['max_rss_gb']:10.2f}")
    best = {(f, c): min(r["load_s"] for r in rows if r["format"] == f and r["cache"] == c)
            for f in sizes for c in ("cold", "warm")}
    for c in ("cold", "warm"):
        print(f"best {c}: safetensors {best[('safetensors', c)]:.2f}s, orbax {best[('orbax', c)]:.2f}s "
              f"({best[('safetensors', c)] / best[('orbax', c)]:.2f}x)")
    print(f"cache drop: {rows[0]['how']}; convert took {convert_s:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg.name, "layers": cfg.num_hidden_layers, "mesh": args.mesh,
                       "convert_s": convert_s, "rows": rows}, f, indent=1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
