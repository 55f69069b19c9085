"""Public API: `load(path, mesh=..., dtype=...)`, `random_model(config, ...)` and the Model they return."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sharding.context import ShardingContext
from sharding.mesh import MeshSpec, check_against_config, kv_replication, make_mesh, parse_mesh_spec

from .checkpoint import LayerReader, param_sources, source_key, validate_checkpoint
from .config import Qwen3MoeConfig, resolve_config
from .model import KVCache, Qwen3Moe, init_cache
from .progress import progress_bar
from .safetensors_io import SafetensorsCheckpoint

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32,
          "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def logical_axes(var) -> tuple:
    return tuple(var.get_metadata()["logical_axes"])


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(abstract_state, ctx: ShardingContext | None):
    """A State of NamedShardings (or None on one device) matching `abstract_state`."""
    if ctx is None:
        return None
    return jax.tree.map(lambda v: v.replace(ctx.sharding(logical_axes(v))), abstract_state, is_leaf=_is_var)


def build_context(cfg: Qwen3MoeConfig, mesh: str | MeshSpec | None, devices=None):
    """Validate a mesh spec against the config and build its jax Mesh. -> (spec, ctx or None, kv_rep)."""
    spec = parse_mesh_spec(mesh, cfg=cfg)
    check_against_config(spec, cfg)
    kv_rep = kv_replication(spec, cfg)
    if spec.num_devices == 1 and devices is None:
        return spec, None, kv_rep
    return spec, ShardingContext(spec, make_mesh(spec, devices, cfg=cfg)), kv_rep


def abstract_model(cfg: Qwen3MoeConfig, dtype, kv_rep: int, ctx):
    return nnx.eval_shape(lambda: Qwen3Moe(cfg, dtype=dtype, kv_rep=kv_rep, ctx=ctx, rngs=nnx.Rngs(0)))


@functools.partial(jax.jit, static_argnames=("graphdef", "kv_window"), donate_argnames=("cache",))
def _forward(graphdef, state, tokens, positions, cache, slots, logits_at, kv_window=None):
    model = nnx.merge(graphdef, state)
    return model(tokens, positions, cache, slots, logits_at, kv_window=kv_window)


class Model:
    """A loaded Qwen3-MoE: config, mesh, params (an nnx State of sharded arrays) and jitted calls."""

    def __init__(self, cfg: Qwen3MoeConfig, spec: MeshSpec, ctx: ShardingContext | None, kv_rep: int,
                 graphdef, state, dtype):
        self.config, self.mesh_spec, self.ctx, self.kv_rep = cfg, spec, ctx, kv_rep
        self.graphdef, self.state, self.dtype = graphdef, state, jnp.dtype(dtype)

    @property
    def module(self) -> Qwen3Moe:
        return nnx.merge(self.graphdef, self.state)

    def forward(self, tokens, positions=None, cache: KVCache | None = None, slots=None, logits_at=None):
        """Jitted model call; the cache (if any) is donated. -> (logits float32, cache)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return _forward(self.graphdef, self.state, tokens, jnp.asarray(positions, jnp.int32), cache,
                        None if slots is None else jnp.asarray(slots, jnp.int32),
                        None if logits_at is None else jnp.asarray(logits_at, jnp.int32))

    def logits(self, token_ids) -> np.ndarray:
        """token_ids int [B, T] -> logits float32 [B, T, V] (numpy)."""
        token_ids = np.asarray(token_ids)
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must be [batch, seq], got shape {token_ids.shape}")
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got "
                             f"{token_ids.min()}..{token_ids.max()}")
        out, _ = self.forward(token_ids)
        return np.asarray(out)

    def init_cache(self, num_slots: int, max_len: int, dtype=None) -> KVCache:
        return init_cache(self.config, num_slots, max_len, dtype or self.dtype, self.kv_rep, self.ctx)

    def generate_greedy(self, token_ids, max_new_tokens: int) -> np.ndarray:
        """Prefill then token-by-token decode through the KV cache. [B, T] -> new tokens [B, max_new_tokens]."""
        tokens = np.asarray(token_ids, np.int32)
        b, t = tokens.shape
        cache = self.init_cache(b, t + max_new_tokens)
        logits, cache = self.forward(tokens, cache=cache, logits_at=np.full((b,), t - 1))
        out = []
        nxt = np.asarray(jnp.argmax(logits[:, -1], axis=-1), np.int32)
        for step in range(max_new_tokens):
            out.append(nxt)
            if step == max_new_tokens - 1:
                break
            pos = np.full((b, 1), t + step, np.int32)
            logits, cache = self.forward(nxt[:, None], pos, cache)
            nxt = np.asarray(jnp.argmax(logits[:, -1], axis=-1), np.int32)
        return np.stack(out, axis=1)

    def param_bytes_per_device(self) -> dict[Any, int]:
        """Bytes of params actually resident on each device."""
        totals: dict[Any, int] = {}
        for leaf in jax.tree.leaves(self.state):
            for shard in leaf.addressable_shards:
                totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
        return totals


def random_model(cfg: Qwen3MoeConfig | str, *, mesh=None, dtype="bfloat16", seed: int = 0, devices=None) -> Model:
    """A model with random weights created directly on the devices, already sharded."""
    if isinstance(cfg, str):
        cfg = resolve_config(cfg)
    dtype = resolve_dtype(dtype)
    spec, ctx, kv_rep = build_context(cfg, mesh, devices)
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype, kv_rep, ctx))
    shardings = state_shardings(abstract, ctx)

    def make():
        return nnx.state(Qwen3Moe(cfg, dtype=dtype, kv_rep=kv_rep, ctx=ctx, rngs=nnx.Rngs(seed)))

    state = jax.jit(make, out_shardings=shardings)()
    return Model(cfg, spec, ctx, kv_rep, graphdef, state, dtype)


@functools.lru_cache(maxsize=None)
def _layer_setter(sharding):
    return jax.jit(lambda full, part, i: jax.lax.dynamic_update_index_in_dim(full, part, i, 0),
                   donate_argnums=0, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _zeros(shape, dtype, sharding):
    # Cached per (shape, dtype, sharding): same-shaped weights (gate/up, k/v, norms) share one compile.
    return _zeros_fn(tuple(shape), jnp.dtype(dtype), sharding)()


def _single_device_sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def load(path: str, *, mesh=None, dtype="bfloat16", devices=None, progress: bool = True,
         on_layer=None) -> Model:
    """Load a Hugging Face Qwen3-MoE safetensors checkpoint (bf16 or block-FP8) into sharded arrays.

    Each device's shard is copied straight from the memory-mapped file and placed on that device;
    no device holds an unsharded weight and host memory stays around one layer's tensor.
    `on_layer(done, total)` is called after each layer-sized piece (for progress and memory checks).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a checkpoint directory (config.json + *.safetensors)")
    from .orbax_io import is_orbax_checkpoint, load_orbax  # local: orbax_io uses this module too
    if is_orbax_checkpoint(path):  # written by python -m qwen3_jax.convert: restore into this mesh
        return load_orbax(path, mesh=mesh, dtype=dtype, devices=devices)
    cfg = Qwen3MoeConfig.from_json(path)
    dtype = resolve_dtype(dtype)
    spec, ctx, kv_rep = build_context(cfg, mesh, devices)
    ckpt = SafetensorsCheckpoint(path)
    validate_checkpoint(ckpt, cfg)
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype, kv_rep, ctx))
    kinds = [kind for kind, _, _ in cfg.layer_segments()]
    firsts = [first for _, first, _ in cfg.layer_segments()]
    sources = param_sources(cfg)
    reader = LayerReader(ckpt, cfg, kv_rep)

    leaves, treedef = jax.tree.flatten_with_path(abstract, is_leaf=_is_var)
    jobs = []
    for path_keys, var in leaves:
        path_names = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path_keys)
        key, is_scale = source_key(path_names, kinds)
        layers = None
        if path_names[0] == "segments":
            seg = path_names[1]
            layers = [firsts[seg] + j for j in range(var.shape[0])]
        jobs.append((var, sources[key], is_scale, layers))
    total = sum(len(layers) if layers else 1 for _, _, _, layers in jobs)

    bar = progress_bar(total, f"loading {os.path.basename(os.path.normpath(path))}", "tensor", progress)
    done = 0
    values = []
    for var, src, is_scale, layers in jobs:
        sharding = ctx.sharding(logical_axes(var)) if ctx else _single_device_sharding()
        target = var.dtype
        if layers is None:
            lazy = reader.view(src, None, is_scale, target)
            arr = _from_lazy(lazy, var.shape, target, sharding)
            done += 1
            bar.update(1)
        else:
            layer_sharding = (ctx.sharding(logical_axes(var)[1:]) if ctx else _single_device_sharding())
            arr = _zeros(var.shape, target, sharding)
            setter = _layer_setter(sharding)
            for j, layer in enumerate(layers):
                lazy = reader.view(src, layer, is_scale, target)
                part = _from_lazy(lazy, var.shape[1:], target, layer_sharding)
                arr = setter(arr, part, j)
                # Finish this layer and free its buffers before reading the next: otherwise
                # dispatch runs ahead and the host slices of many layers wait at once.
                arr.block_until_ready()
                part.delete()
                del part
                _release_host_arrays()
                done += 1
                bar.update(1)
                if on_layer:
                    on_layer(done, total)
        values.append(var.replace(arr))
    bar.close()
    state = jax.tree.unflatten(treedef, values)
    log.info("loaded %s (%s) under %s", path, cfg.name, spec.describe())
    return Model(cfg, spec, ctx, kv_rep, graphdef, state, dtype)


def _release_host_arrays():
    """Make jax drop, now, its references to host arrays it has finished copying from.

    jax defers those decrefs to a later dispatch, so without this a few layers' host slices can
    be alive at once. The hook is private; without it loading still works, just less tightly.
    """
    try:
        from jax._src.lib import _jax
    except ImportError:
        return
    collect = getattr(_jax, "collect_garbage", None)
    if collect is not None:
        collect()


def _from_lazy(lazy, shape, dtype, sharding):
    if tuple(lazy.shape) != tuple(shape):
        raise ValueError(f"internal: checkpoint view has shape {lazy.shape}, param wants {shape}")
    np_dtype = np.dtype(dtype)
    # One distinct slice at a time, put on every device that holds it, then dropped: host memory
    # holds one shard, not every device's shard at once (make_array_from_callback reads all
    # shards first, and re-reads a replicated slice once per device).
    index_map = sharding.addressable_devices_indices_map(tuple(shape))
    groups: dict[str, tuple] = {}
    for device, index in index_map.items():
        groups.setdefault(repr(index), (index, []))[1].append(device)
    placed = {}
    for index, devices in groups.values():
        host = np.asarray(lazy[index]).astype(np_dtype, copy=False)
        for device in devices:
            # may_alias=False: on CPU a device buffer may otherwise *be* this host array, kept
            # alive by the runtime after we drop it (on GPU it is a host-to-device copy anyway).
            placed[device] = jax.device_put(host, device, may_alias=False)
        del host
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, [placed[d] for d in index_map])
