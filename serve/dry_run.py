"""`python -m serve --dry-run`: print the memory plan and exit, without touching an accelerator.

    python -m serve --model Qwen3-235B-A22B-FP8 --mesh tp=4,ep=8 --device-memory 48GiB --dry-run
    python -m serve --model /ckpt/dir --mesh tp=8 --device-memory 80GB --dry-run --json
    python -m serve --model Qwen3-235B-A22B-FP8 --num-devices 8 --device-memory 48GiB --dry-run --sweep

`--model` is a checkpoint directory (only its config.json is read) or a preset name. The plan
(sharding/memory.py) compiles the engine's own prefill and decode steps for XLA's memory
analysis, on simulated CPU devices: JAX is forced onto the CPU platform before it initializes.
Exit status: 0 when it fits (with --sweep: when some mesh fits), 1 when not, 2 on bad arguments.

Also runs on its own: `python -m serve.dry_run --model ... --mesh ... --device-memory ...`.
"""

from __future__ import annotations

import argparse
import json
import sys

ENGINE_STEPS = "serve.dry_run:engine_steps"
SAMPLING_DTYPES = ("float32", "float32", "int32", "int32", "int32")  # temperature, top_p, top_k, seed, step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --dry-run, --json, --sweep, --device-memory, --num-devices (and skip any already there)."""
    have = {s for a in parser._actions for s in a.option_strings}
    g = parser.add_argument_group("memory plan (--dry-run)")

    def add(flag, **kw):
        if flag not in have:
            g.add_argument(flag, **kw)

    add("--dry-run", action="store_true",
        help="print what each device will hold (weights, workspace, KV cache) and exit: 0 fits, 1 does not")
    add("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    add("--sweep", action="store_true", help="with --dry-run: plan every valid mesh on the device count")
    add("--device-memory", metavar="SIZE", default=None,
        help="with --dry-run: memory per device, e.g. 80GB, 48GiB or bytes (required: no device is asked)")
    add("--num-devices", metavar="N", type=int, default=None,
        help="devices to spread the mesh over (default: what --mesh implies, dp x tp)")


def engine_steps():
    """The engine's jitted prefill-chunk and decode steps (sampling included), for the planner.

    Decode is planned at its largest KV window, the whole context: the most one step reads.
    """
    from sharding.workspace import StepSet

    from .engine import _decode_forward, _prefill_prompt_forward
    from .sampling import sample

    # The engine runs a forward, then a sampler as its own call; planned here as one program with
    # the full-vocabulary sampler (the most it can hold at once). The planner's tokens stand in
    # for the slots' last ids. Prefill is planned as its largest form, the one that also scores
    # the prompt (prompt logprobs: blocks of logits rows past the plain forward's one row).
    def prefill(graphdef, state, cache, tokens, positions, slot, logits_at, *sampling):
        logits, cache, scored = _prefill_prompt_forward(graphdef, None, state, cache, tokens, positions, slot,
                                                        logits_at, tokens)
        return (sample(logits, *sampling, mode="full"), scored), cache

    def decode(graphdef, state, cache, tokens_b, positions_b, *sampling):
        logits, cache = _decode_forward(graphdef, cache.k[0].shape[2], state, cache, tokens_b, positions_b)
        return sample(logits, *sampling, mode="full"), cache

    return StepSet(prefill, decode, SAMPLING_DTYPES, "serve engine steps")


def parse_memory(text: str) -> int:
    """'48GiB', '80GB', '1.5TB', '51539607552' -> bytes."""
    from qwen3_jax.quantize import parse_size

    try:
        n = parse_size(str(text))
    except ValueError:
        n = 0
    if n <= 0:
        raise ValueError(f"--device-memory {text!r} is not a size; write e.g. 80GB, 48GiB or a byte count")
    return n


def force_cpu(num_devices: int) -> list:
    """Make JAX use `num_devices` simulated CPU devices (before it initializes) -> the CPU devices.

    If JAX is already initialized (a notebook, a test), nothing is changed: the CPU devices there
    are used when there are enough, else the planner compiles in a child process.
    """
    import os

    import jax

    from sharding.mesh import request_cpu_devices

    if not _jax_initialized():
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")
        request_cpu_devices(num_devices)
    devices = jax.devices("cpu")
    return devices if len(devices) >= num_devices else []


def _jax_initialized() -> bool:
    from jax._src import xla_bridge  # no public API says whether backends exist yet

    try:
        return xla_bridge.backends_are_initialized()
    except AttributeError:
        return bool(getattr(xla_bridge, "_backends", None))


def run(args) -> int:
    """Plan and print; -> exit status (0 fits, 1 does not, 2 bad arguments)."""
    from qwen3_jax.config import ConfigError, resolve_config
    from sharding.mesh import MeshSpecError, check_against_config, parse_mesh_spec

    try:
        if getattr(args, "model", None):
            cfg = resolve_config(args.model)
        else:
            from .builtin import builtin_checkpoint
            cfg = resolve_config(builtin_checkpoint())
        if not getattr(args, "device_memory", None):
            raise ValueError("--dry-run needs --device-memory (e.g. 80GB for an 80 GB card, 48GiB): the plan "
                             "never asks a device")
        limit = parse_memory(args.device_memory)
        spec = parse_mesh_spec(getattr(args, "mesh", "") or "", getattr(args, "num_devices", None), cfg=cfg)
        check_against_config(spec, cfg)
    except (ConfigError, MeshSpecError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = spec.num_devices
    devices = force_cpu(min(max(2 * n, 16), 64))  # room for the larger meshes suggestions try

    from sharding.memory import AUTO_CHUNK_BASE, DEFAULT_MEM_FRACTION_STATIC, format_sweep, plan_memory_chunked, sweep

    kw = dict(device_memory_bytes=limit, mem_fraction_static=getattr(args, "mem_fraction_static", DEFAULT_MEM_FRACTION_STATIC),
              context_length=getattr(args, "context_length", None),
              max_running_requests=getattr(args, "max_running_requests", None),
              dtype=getattr(args, "dtype", "bfloat16"), steps=ENGINE_STEPS, devices=devices)
    chunk = getattr(args, "chunked_prefill_size", None) or "auto"
    try:
        if getattr(args, "sweep", False):
            plans = sweep(cfg, n, chunked_prefill_size=AUTO_CHUNK_BASE if chunk == "auto" else chunk, **kw)
            if getattr(args, "json", False):
                print(json.dumps([p.to_json() for p in plans], indent=2))
            else:
                print(format_sweep(plans))
            return 0 if any(p.fits for p in plans) else 1
        plan = plan_memory_chunked(cfg, spec, chunk, **kw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print(plan.format())
    return 0 if plan.fits else 1


def main(argv=None) -> int:
    from .cli import build_parser

    parser = build_parser()
    parser.prog = "python -m serve.dry_run"
    args = parser.parse_args(argv)
    args.dry_run = True
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
