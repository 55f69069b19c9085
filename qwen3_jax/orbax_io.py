"""Orbax checkpoints of our in-memory params: save once, restore straight into any mesh.

A converted checkpoint directory holds

    config.json, generation_config.json, tokenizer files   copied from the source checkpoint
    params/                                                an Orbax PyTree checkpoint of Model.state
    qwen3_jax_orbax.json                                   our metadata (written last: marks completion)

`params` stores every leaf exactly as the model holds it (stacked [L, ...], our einsum layout,
compute dtype or FP8 + float32 scales), keyed by its nnx path ("segments/0/block/attn/q_proj/w").
The one exception is KV-head replication: a mesh with tp > num_key_value_heads holds each KV
head kv_rep times (k_proj W[D, K*kv_rep, Q]); we always store the unreplicated form (kv_rep=1)
and repeat on restore, so a checkpoint saved at tp=2 restores at tp=4,ep=8 and vice versa.

Restore builds the target mesh's abstract state (api.abstract_model + the sharding rules) and
asks Orbax for exactly those shardings, so each device reads only its own slice from disk.
Before reading, the metadata is checked against config.json (shapes, FP8 layout) and the file
manifest against the directory (a missing or cut file), each with an error naming the problem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import Qwen3MoeConfig
from .safetensors_io import CheckpointError

log = logging.getLogger(__name__)

# 2: FP8 expert and attention weights stored [out, in] (fp8.NK_ORDER, model.Weight nk); bf16 params
# are as in version 1, which is still read.
FORMAT_VERSION = 2
META_FILE = "qwen3_jax_orbax.json"
PARAMS_DIR = "params"
KV_AXIS = "kv_heads"
# Host memory in flight while saving / restoring (Orbax's own throttles), in GB: saving from
# accelerators copies at most this much to the host at once; restore is allowed more for throughput.
SAVE_CONCURRENT_GB = 8
RESTORE_CONCURRENT_GB = 32
# Source-checkpoint files that are weights (never copied next to the Orbax params).
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth",
                    ".gguf", ".msgpack", ".h5")


# -- names and metadata ------------------------------------------------------------------------

def is_orbax_checkpoint(path: str) -> bool:
    """True for a directory written by `save_orbax` (or one whose conversion did not finish)."""
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, META_FILE))
                                    or os.path.isdir(os.path.join(path, PARAMS_DIR)))


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def _leaf_name(path_keys) -> str:
    return "/".join(_key_name(k) for k in path_keys)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _axes(var) -> tuple:
    return tuple(var.get_metadata()["logical_axes"])


def _value(var):
    return var.get_value() if hasattr(var, "get_value") else var.value


def _nest(flat: dict[str, object]) -> dict:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}: Orbax's own names become 'a.b.c'."""
    out: dict = {}
    for name, x in flat.items():
        node = out
        *parents, last = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = x
    return out


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        out.update(_flatten(v, name) if isinstance(v, dict) else {name: v})
    return out


def config_fields(cfg: Qwen3MoeConfig) -> dict:
    """The config as plain JSON values (tuples as lists), without the directory-derived name."""
    d = json.loads(json.dumps(dataclasses.asdict(cfg), default=list))
    d.pop("name", None)
    return d


def config_hash(cfg: Qwen3MoeConfig) -> str:
    return hashlib.sha256(json.dumps(config_fields(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _kv_axis(var) -> int | None:
    axes = _axes(var)
    return axes.index(KV_AXIS) if KV_AXIS in axes else None


def _saved_shape(var, kv_rep: int) -> tuple[int, ...]:
    """The stored (unreplicated) shape of a leaf the model holds at `kv_rep`."""
    shape = list(var.shape)
    ax = _kv_axis(var)
    if ax is not None:
        shape[ax] //= kv_rep
    return tuple(shape)


def _file_manifest(root: str) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, os.path.dirname(root))] = os.path.getsize(full)
    return dict(sorted(out.items()))


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(f"Orbax checkpoints need orbax-checkpoint ({e}); pip install orbax-checkpoint") from e
    return ocp


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs every save/restore step at INFO through absl; keep those for --log-level debug."""
    absl_log = logging.getLogger("absl")
    old = absl_log.level
    if not log.isEnabledFor(logging.DEBUG):
        absl_log.setLevel(max(old, logging.WARNING))
    try:
        yield
    finally:
        absl_log.setLevel(old)


def _checkpointer(ocp, *, compress: bool = False, save_gb: int = SAVE_CONCURRENT_GB,
                  restore_gb: int = RESTORE_CONCURRENT_GB):
    """A synchronous PyTree checkpointer, passing only the options this Orbax version has."""
    params = inspect.signature(ocp.PyTreeCheckpointHandler.__init__).parameters
    kw = {}
    if "use_compression" in params:
        # Weights barely compress (~10% for bf16) and zstd costs start-up time on every load.
        kw["use_compression"] = compress
    if "save_device_host_concurrent_gb" in params:
        kw["save_device_host_concurrent_gb"] = save_gb
    if "save_concurrent_gb" in params:
        kw["save_concurrent_gb"] = save_gb
    elif "concurrent_gb" in params:
        kw["concurrent_gb"] = save_gb
    if "restore_concurrent_gb" in params:
        kw["restore_concurrent_gb"] = restore_gb
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**kw))


# -- save ------------------------------------------------------------------------------------

def saved_arrays(model) -> dict[str, jax.Array]:
    """Model.state leaves by name, KV-head copies removed (kv_rep=1), still sharded on the mesh."""
    leaves, _ = jax.tree.flatten_with_path(model.state, is_leaf=_is_var)
    out = {}
    for path_keys, var in leaves:
        arr = _value(var)
        ax = _kv_axis(var)
        if ax is not None and model.kv_rep > 1:
            shape = _saved_shape(var, model.kv_rep)
            sharding = model.ctx.sharding(_axes(var), shape) if model.ctx else None
            # Copies of head h sit at h*kv_rep .. h*kv_rep+kv_rep-1 (checkpoint.LazyView): keep the first.
            take = jax.jit(lambda x, a=ax, r=model.kv_rep: jax.lax.slice_in_dim(x, 0, x.shape[a], r, axis=a),
                           out_shardings=sharding)
            arr = take(arr)
        out[_leaf_name(path_keys)] = arr
    return out


def save_orbax(model, out_dir: str, *, source_dir: str | None = None, compress: bool = False,
               overwrite: bool = False, save_gb: int = SAVE_CONCURRENT_GB) -> dict:
    """Write `model`'s params as an Orbax checkpoint in `out_dir` (+ config/tokenizer from `source_dir`).

    Orbax writes each device's shard (replicated shards once) with at most `save_gb` GB copied
    to the host at a time. Returns the metadata written to qwen3_jax_orbax.json.
    """
    ocp = _orbax()
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; choose a new --out or pass --force")
        if not is_orbax_checkpoint(out_dir):
            raise FileExistsError(f"{out_dir} is not an Orbax checkpoint of ours; refusing to overwrite it")
        shutil.rmtree(out_dir)
    primary = jax.process_index() == 0  # several processes: each saves its shards, one writes the files
    os.makedirs(out_dir, exist_ok=True)
    if primary and source_dir is not None:
        _copy_aux_files(source_dir, out_dir)
    if primary and not os.path.exists(os.path.join(out_dir, "config.json")):
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(model.config.to_hf_dict(), f, indent=2)

    arrays = saved_arrays(model)
    params_dir = os.path.join(out_dir, PARAMS_DIR)
    t0 = time.perf_counter()
    with _quiet_orbax():
        _checkpointer(ocp, compress=compress, save_gb=save_gb).save(params_dir,
                                                                    args=ocp.args.PyTreeSave(_nest(arrays)))
    save_s = time.perf_counter() - t0

    meta = {
        "format_version": FORMAT_VERSION,
        "kv_rep": 1,
        "dtype": str(model.dtype),
        "fp8": model.config.fp8 is not None,
        "config_hash": config_hash(model.config),
        "config": config_fields(model.config),
        "saved_from_mesh": str(model.mesh_spec),
        "orbax_version": getattr(ocp, "__version__", "unknown"),
        "params": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in arrays.items()},
        "files": _file_manifest(params_dir),
    }
    if primary:
        with open(os.path.join(out_dir, META_FILE + ".tmp"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(os.path.join(out_dir, META_FILE + ".tmp"), os.path.join(out_dir, META_FILE))
    log.info("saved %d params (%.2f GB) to %s in %.1fs", len(arrays),
             sum(meta["files"].values()) / 1e9, params_dir, save_s)
    return meta


def _copy_aux_files(source_dir: str, out_dir: str) -> None:
    """config.json, generation_config.json, tokenizer and chat-template files: everything but weights."""
    for name in sorted(os.listdir(source_dir)):
        src = os.path.join(source_dir, name)
        if os.path.isfile(src) and not name.endswith(_WEIGHT_SUFFIXES) and name != META_FILE:
            shutil.copy2(src, os.path.join(out_dir, name))


# -- restore ---------------------------------------------------------------------------------

def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{path} has an Orbax {PARAMS_DIR}/ directory but no {META_FILE}: the conversion did "
                              "not finish (or the file was not copied); run python -m qwen3_jax.convert again")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is unreadable ({e}); the checkpoint copy is damaged, copy it again") from e
    version = meta.get("format_version")
    if version != FORMAT_VERSION and not (version == 1 and not meta.get("fp8")):   # v2 changed FP8 weights only
        raise CheckpointError(f"{path} is Orbax checkpoint format version {version}; this qwen3_jax reads version "
                              f"{FORMAT_VERSION}; convert the Hugging Face checkpoint again")
    if meta.get("kv_rep") != 1:
        raise CheckpointError(f"{path}: {META_FILE} says KV heads were stored {meta.get('kv_rep')} times; this "
                              "qwen3_jax stores and reads them once (kv_rep=1); convert again")
    return meta


def check_files(path: str, meta: dict) -> None:
    """Every file Orbax wrote is present at its written size (catches a cut or partial copy)."""
    problems = []
    for rel, size in meta["files"].items():
        full = os.path.join(path, rel)
        if not os.path.exists(full):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(full) != size:
            problems.append(f"{rel} has {os.path.getsize(full)} bytes, {size} were written")
    if problems:
        raise CheckpointError(f"Orbax checkpoint {path} is incomplete: {problems[0]}"
                              + (f" (and {len(problems) - 1} more file problems)" if len(problems) > 1 else "")
                              + "; copy the checkpoint again or re-run python -m qwen3_jax.convert")


def check_config(path: str, cfg: Qwen3MoeConfig, meta: dict, expected: dict[str, tuple]) -> None:
    """config.json must imply exactly the params that were saved (names and shapes)."""
    saved = {n: tuple(p["shape"]) for n, p in meta["params"].items()}
    changed = {k: (v, meta["config"].get(k)) for k, v in config_fields(cfg).items()
               if meta["config"].get(k) != v}
    edits = ", ".join(f"{k}={new} (converted with {old})" for k, (new, old) in sorted(changed.items()))
    hint = (f"config.json differs from the one converted with: {edits}" if changed
            else "config.json matches the conversion but the params do not")
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        what = (f"config.json implies param {missing[0]} that the checkpoint lacks" if missing
                else f"the checkpoint holds param {extra[0]} that config.json does not imply")
        n = len(missing) + len(extra) - 1
        raise CheckpointError(f"Orbax checkpoint {path} does not fit its config.json: {what}"
                              + (f" (and {n} more)" if n else "") + f"; {hint}. Use the config.json the "
                              "checkpoint was converted with, or convert again")
    for name, shape in expected.items():
        if saved[name] != shape:
            raise CheckpointError(f"Orbax checkpoint {path} does not fit its config.json: param {name} was saved "
                                  f"with shape {list(saved[name])}, config.json implies {list(shape)}; {hint}. Use "
                                  "the config.json the checkpoint was converted with, or convert again")
    if changed:
        log.warning("%s: %s (param shapes unchanged, loading anyway)", path, hint)


def load_orbax(path: str, *, mesh=None, dtype="bfloat16", devices=None,
               restore_gb: int = RESTORE_CONCURRENT_GB):
    """Restore a converted checkpoint straight into the shardings of `mesh` -> api.Model.

    Any mesh valid for the config works, whatever mesh the checkpoint was saved under. Leaves
    stored in another float dtype than `dtype` are cast on restore (FP8 weights and their float32
    scales are kept as stored).
    """
    from .api import Model, abstract_model, build_context, resolve_dtype

    ocp = _orbax()
    path = os.path.abspath(path)
    meta = read_meta(path)
    cfg = Qwen3MoeConfig.from_json(path)
    dtype = resolve_dtype(dtype)
    spec, ctx, kv_rep = build_context(cfg, mesh, devices)
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype, kv_rep, ctx))
    leaves, treedef = jax.tree.flatten_with_path(abstract, is_leaf=_is_var)
    names = [_leaf_name(p) for p, _ in leaves]
    check_config(path, cfg, meta, {n: _saved_shape(v, kv_rep) for n, (_, v) in zip(names, leaves)})
    check_files(path, meta)
    if str(dtype) != meta["dtype"] and np.dtype(dtype).itemsize > np.dtype(meta["dtype"]).itemsize:
        log.warning("%s was converted in %s; loading in %s gives %s values in a wider type", path,
                    meta["dtype"], dtype, meta["dtype"])

    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # ctx is None: one default device
    targets, restore_args, final = {}, {}, {}
    for name, (_, var) in zip(names, leaves):
        full = ctx.sharding(_axes(var)) if ctx else one_device
        shape = tuple(meta["params"][name]["shape"])
        # A stored KV leaf that the mesh splits fewer ways than its heads stays replicated until repeated.
        sharding = ctx.sharding(_axes(var), shape) if (ctx and shape != tuple(var.shape)) else full
        targets[name] = jax.ShapeDtypeStruct(shape, var.dtype, sharding=sharding)
        restore_args[name] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape, dtype=var.dtype)
        final[name] = full

    t0 = time.perf_counter()
    try:
        with _quiet_orbax():
            restored = _checkpointer(ocp, restore_gb=restore_gb).restore(
                os.path.join(path, PARAMS_DIR),
                args=ocp.args.PyTreeRestore(item=_nest(targets), restore_args=_nest(restore_args)))
    except (ValueError, OSError, RuntimeError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"Orbax could not read {os.path.join(path, PARAMS_DIR)} ({type(e).__name__}: "
                              f"{str(e)[:500]}); the checkpoint is damaged or from another Orbax layout: "
                              "re-run python -m qwen3_jax.convert") from e
    flat = _flatten(restored)

    values = []
    for name, (_, var) in zip(names, leaves):
        arr = flat[name]
        ax = _kv_axis(var)
        if ax is not None and kv_rep != 1:
            arr = _replicate_heads(arr, ax, kv_rep, final[name])
        values.append(var.replace(arr))
    state = jax.tree.unflatten(treedef, values)
    jax.block_until_ready(jax.tree.leaves(state))
    log.info("restored %s (%s) under %s in %.1fs", path, cfg.name, spec.describe(), time.perf_counter() - t0)
    return Model(cfg, spec, ctx, kv_rep, graphdef, state, dtype)


def _replicate_heads(arr, axis: int, kv_rep: int, sharding):
    """Stored KV heads [.., K, ..] -> each head kv_rep times [.., K*kv_rep, ..] (as checkpoint.LazyView), in `sharding`."""
    return jax.jit(lambda x: jnp.repeat(x, kv_rep, axis=axis), out_shardings=sharding)(arr)
