"""Workspace: the temporary bytes XLA needs per device to run one prefill and one decode step.

Compiled, never run. The model's params and KV cache go in as `jax.ShapeDtypeStruct`s carrying
the shardings the loader would give them, and `jax.jit(step).lower(...).compile()
.memory_analysis()` reports what one device needs besides its arguments:

    workspace = temp_size + output_size - alias_size      (the donated cache aliases its output)

The steps are the server's own (see StepSet; serve/dry_run.py passes the engine's), compiled
at the real shapes: prefill of one request, a chunk of `prefill_tokens` into a cache of
`num_slots` x `context_length`; decode of all `num_slots` slots at once.

On the CPU platform (the dry run, on simulated devices) two CPU-only effects are taken out,
because a GPU has neither; measured on Qwen3-235B-A22B-FP8, tp=4,ep=8, prefill 2048 tokens:
- bfloat16 compiles as float16 (same width). XLA's CPU backend has no bf16 dot or scatter and
  inserts float32 copies of bf16 operands, e.g. of the whole stacked KV cache in every layer.
- while-loop-invariant-code-motion is off. On CPU it hoists the per-layer FP8 dequantize out of
  the layer scan, materializing every layer's dequantized experts at once: 70 GB of temp for
  94 layers, 11 GB for 2 (with the pass off: 10.0 GB for 2, 4 and 94 layers alike).
With both, the workspace does not depend on depth (tests/test_memory_plan.py checks 2 vs 4
layers). Whether a GPU compiler hoists the dequantize too is what `workspace_by_depth` on a
GPU answers. On any other platform the steps compile exactly as they will run.

When this process has fewer devices than the mesh (planning 16 devices on a machine with 8),
the compile runs in a child process with enough simulated CPU devices.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from typing import Callable

from .mesh import MeshSpec, kv_replication, make_mesh, parse_mesh_spec, request_cpu_devices

MODEL_STEPS_PATH = "sharding.workspace:MODEL_STEPS"
CPU_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


@dataclasses.dataclass(frozen=True)
class StepSet:
    """The two jitted steps a server runs, as plain functions (compiled here, never run).

    prefill(graphdef, state, cache, tokens [1, T], positions [1, T], slot [1], logits_at [1], *extras [1])
    decode(graphdef, state, cache, tokens [B], positions [B], *extras [B])
    each -> (anything small, cache). `extra_dtypes` are per-row inputs (e.g. sampling params).
    """

    prefill: Callable
    decode: Callable
    extra_dtypes: tuple[str, ...] = ()
    name: str = "model forward"


def _model_prefill(graphdef, state, cache, tokens_1t, positions_1t, slot_1, logits_at_1):
    from flax import nnx
    logits, cache = nnx.merge(graphdef, state)(tokens_1t, positions_1t, cache, slot_1, logits_at_1, in_order=True)
    return logits, cache


def _model_decode(graphdef, state, cache, tokens_b, positions_b):
    from flax import nnx
    logits, cache = nnx.merge(graphdef, state)(tokens_b[:, None], positions_b[:, None], cache)
    return logits, cache


MODEL_STEPS = StepSet(_model_prefill, _model_decode)


def resolve_steps(path: str) -> StepSet:
    """'module:attr' -> StepSet (attr may be a StepSet or a function returning one)."""
    module, _, attr = path.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    steps = obj if isinstance(obj, StepSet) else obj()
    if not isinstance(steps, StepSet):
        raise TypeError(f"{path} gave {type(steps).__name__}, not a sharding.workspace.StepSet")
    return steps


@dataclasses.dataclass(frozen=True)
class Workspace:
    """Per-device workspace bytes of the two steps, and how they were measured."""

    prefill_bytes: int
    decode_bytes: int
    prefill_tokens: int
    decode_batch: int
    platform: str
    compiled_as: str

    @property
    def bytes(self) -> int:
        """What must stay free: the steps run one at a time, so the larger of the two."""
        return max(self.prefill_bytes, self.decode_bytes)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "bytes": self.bytes}


_CACHE: dict = {}


def step_workspace(cfg, mesh: MeshSpec | str, dtype, *, num_slots: int, context_length: int,
                   prefill_tokens: int, steps: str = MODEL_STEPS_PATH, devices=None,
                   prefill_slots: int | None = None) -> Workspace:
    """Compile both steps for `cfg` on `mesh` and read XLA's memory analysis (cached in-process).

    Decode runs `num_slots` rows; prefill writes one row of a cache of `prefill_slots` (default
    num_slots) rows. `devices`: where to compile (default: this process's devices). When there
    are fewer than the mesh needs (or `devices=[]`), a child process compiles on simulated CPU
    devices.
    """
    import jax

    spec = parse_mesh_spec(mesh)
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < spec.num_devices:  # too few here (or [] given): compile in a child process
        devices = None
    platform = devices[0].platform if devices else "cpu"
    where = (platform, tuple(d.id for d in devices[:spec.num_devices]) if devices else None)
    common = (cfg, spec, str(dtype), context_length, steps, where)
    jobs = {"prefill": (prefill_slots or num_slots, prefill_tokens), "decode": (num_slots, 1)}
    todo = {part: job for part, job in jobs.items() if (part, job, common) not in _CACHE}
    if todo:
        if devices is None:
            found = _in_child(cfg, spec, dtype, context_length, steps, todo)
        else:
            found = _compile(cfg, spec, dtype, context_length, steps, devices[:spec.num_devices], todo)
        for part, job in todo.items():
            _CACHE[(part, job, common)] = found[part]
    (pb, note), (db, _) = (_CACHE[(part, job, common)] for part, job in jobs.items())
    return Workspace(pb, db, prefill_tokens, num_slots, platform, note)


def _compile_settings(platform: str, dtype):
    """-> (dtype to compile with, compiler options, note) for a platform (see module docstring)."""
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype)
    if platform != "cpu":
        return dtype, None, f"{dtype.name} on {platform}, as it will run"
    note = "loop-invariant code motion off"
    if dtype == jnp.bfloat16:
        return jnp.dtype(jnp.float16), CPU_OPTIONS, "float16 standing in for bfloat16, " + note
    return dtype, CPU_OPTIONS, note


def _compile(cfg, spec: MeshSpec, dtype, context_length, steps_path, devices, jobs) -> dict:
    """jobs {'prefill': (cache slots, tokens), 'decode': (slots, 1)} -> {part: (bytes, note)}."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    from qwen3_jax.api import abstract_model, state_shardings
    from qwen3_jax.model import KVCache, cache_shapes

    from .context import ShardingContext

    steps = resolve_steps(steps_path)
    platform = devices[0].platform
    cdtype, options, note = _compile_settings(platform, dtype)
    kv_rep = kv_replication(spec, cfg)
    ctx = ShardingContext(spec, make_mesh(spec, devices)) if spec.num_devices > 1 else None
    graphdef, abstract = nnx.split(abstract_model(cfg, cdtype, kv_rep, ctx))
    if ctx is None:
        one = SingleDeviceSharding(devices[0])
        state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one), abstract)
        cache_sharding = lambda shape: one  # noqa: E731
        replicated = one
    else:
        state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                             abstract, state_shardings(abstract, ctx))
        cache_sharding = lambda shape: ctx.sharding(KVCache.AXES, shape)  # noqa: E731
        replicated = NamedSharding(ctx.mesh, PartitionSpec())

    def arg(shape, dt=np.int32):
        return jax.ShapeDtypeStruct(shape, np.dtype(dt), sharding=replicated)

    def analyse(fn, slots, *args) -> int:
        ks, vs = [], []
        for k_shape, v_shape in cache_shapes(cfg, slots, context_length, kv_rep):
            ks.append(jax.ShapeDtypeStruct(k_shape, cdtype, sharding=cache_sharding(k_shape)))
            vs.append(jax.ShapeDtypeStruct(v_shape, cdtype, sharding=cache_sharding(v_shape)))
        cache = KVCache(ks, vs)
        jitted = jax.jit(lambda st, c, *a: fn(graphdef, st, c, *a), donate_argnums=(1,),
                         out_shardings=(replicated, jax.tree.map(lambda a: a.sharding, cache)))
        stats = jitted.lower(state, cache, *args).compile(compiler_options=options).memory_analysis()
        if stats is None:
            raise RuntimeError(f"XLA on {platform} gives no memory analysis; plan on the CPU platform "
                               "(JAX_PLATFORMS=cpu) instead")
        return int(stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes)

    note = f"{steps.name}; {note}"
    out = {}
    if "prefill" in jobs:
        slots, t = jobs["prefill"]
        out["prefill"] = (analyse(steps.prefill, slots, arg((1, t)), arg((1, t)), arg((1,)), arg((1,)),
                                  *(arg((1,), d) for d in steps.extra_dtypes)), note)
    if "decode" in jobs:
        b, _ = jobs["decode"]
        out["decode"] = (analyse(steps.decode, b, arg((b,)), arg((b,)),
                                 *(arg((b,), d) for d in steps.extra_dtypes)), note)
    return out


# -- the child process: same compile, with as many simulated CPU devices as the mesh needs --------

def _in_child(cfg, spec: MeshSpec, dtype, context_length, steps, jobs) -> dict:
    from qwen3_jax.config import Qwen3MoeConfig

    if Qwen3MoeConfig.from_dict(cfg.to_hf_dict(), name=cfg.name) != cfg:
        raise ValueError(f"config {cfg.name!r} does not survive to_hf_dict/from_dict, so a child process would "
                         f"compile another model; plan on {spec.num_devices} local devices instead")
    request = {"config": cfg.to_hf_dict(), "name": cfg.name, "dp": spec.dp, "tp": spec.tp, "ep": spec.ep,
               "dtype": str(dtype), "context_length": context_length, "steps": steps, "jobs": jobs}
    env = dict(os.environ)
    request_cpu_devices(spec.num_devices, env, configure_jax=False)   # the child's environment
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-m", "sharding.workspace"], input=json.dumps(request),
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"workspace compile for mesh {spec} on {spec.num_devices} simulated CPU devices "
                           f"failed in a child process:\n{proc.stderr[-4000:]}")
    return {part: tuple(v) for part, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def _child_main() -> int:
    import jax

    from qwen3_jax.config import Qwen3MoeConfig
    from sharding import workspace  # not this __main__ copy: StepSets must be the package's class

    req = json.loads(sys.stdin.read())
    spec = MeshSpec(req["dp"], req["tp"], req["ep"])
    request_cpu_devices(spec.num_devices)
    cfg = Qwen3MoeConfig.from_dict(req["config"], name=req["name"])
    jobs = {part: tuple(job) for part, job in req["jobs"].items()}
    found = workspace._compile(cfg, spec, req["dtype"], req["context_length"], req["steps"],
                               jax.devices("cpu")[:spec.num_devices], jobs)
    print(json.dumps(found))
    return 0


def workspace_by_depth(cfg, mesh, dtype="bfloat16", layers=(2, 4), **kw) -> dict[int, Workspace]:
    """The same steps with `layers` decoder layers each (the config otherwise unchanged).

    Equal workspaces mean the compiler keeps per-layer work inside the layer scan; growth with
    depth means something (e.g. a dequantize) was hoisted out and every layer is materialized.
    On a GPU it checks the GPU compiler, e.g. workspace_by_depth(resolve_config("Qwen3-30B-A3B-FP8"),
    "", num_slots=8, context_length=8192, prefill_tokens=512).
    """
    out = {}
    for n in layers:
        small = dataclasses.replace(cfg, num_hidden_layers=n,
                                    mlp_only_layers=tuple(i for i in cfg.mlp_only_layers if i < n))
        out[n] = step_workspace(small, mesh, dtype, **kw)
    return out


if __name__ == "__main__":
    raise SystemExit(_child_main())
