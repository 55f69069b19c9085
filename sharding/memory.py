"""The memory plan: what every device will hold, known before anything is allocated.

    plan = plan_memory(cfg, "tp=4,ep=8", device_memory_bytes=48 * 2**30)
    print(plan.format()); plan.fits; plan.to_json(); plan.suggestions()

Per device:
- weights by component, from the real model's abstract params (`nnx.eval_shape` of Qwen3Moe
  via qwen3_jax.api.abstract_model) and the shardings the loader gives them (state_shardings,
  the rules table): bytes = prod(NamedSharding.shard_shape) x itemsize, summed per component.
  No second formula: whatever the model declares is what is counted.
- workspace of the compiled prefill and decode steps, from XLA's memory analysis (workspace.py).
- the KV cache: one token of one slot costs each device of its data group the shard of
  cache_shapes(...) under the cache's sharding; what is left of
  device_memory x mem_fraction_static after weights and workspace holds that many tokens per
  data group, so `kv_cache_tokens` = tokens per group x dp and a request needs context_length
  tokens in one group.

This is the one module of sharding/ that reads the model (through qwen3_jax.api's public
abstract_model and state_shardings, never module internals), because what it counts is what
the model declares.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from .layout import human_bytes
from .mesh import MESH_AXES, MeshSpec, check_against_config, kv_replication, parse_mesh_spec, valid_specs
from .workspace import MODEL_STEPS_PATH, Workspace, step_workspace

COMPONENTS = ("attention", "experts", "dense_mlp", "router", "embeddings", "lm_head", "norms", "fp8_scales",
              "other")
DEFAULT_MAX_RUNNING_REQUESTS = 64  # as serve's default cap on slots (serve/capacity.py)
# Share of each device's memory for weights + workspace + KV cache (the server's
# --mem-fraction-static default; the rest is left to XLA and the runtime).
DEFAULT_MEM_FRACTION_STATIC = 0.85
NODE_SIZE = 8
_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


# -- weights -----------------------------------------------------------------------------------

def _abstract_ctx(spec: MeshSpec):
    """A ShardingContext over an AbstractMesh: real shardings without devices."""
    from jax.sharding import AbstractMesh

    from .context import ShardingContext

    return ShardingContext(spec, AbstractMesh(spec.shape, MESH_AXES))


def component_of(path: tuple[str, ...], segment_kinds: list[str]) -> str:
    """Which component a param belongs to, by its path in the model's state."""
    if path[-1] == "scale":
        return "fp8_scales"
    head = path[0]
    if head == "embed":
        return "embeddings"
    if head == "lm_head":
        return "lm_head"
    if head == "final_norm" or any(p.endswith("norm") for p in path):
        return "norms"
    if head == "segments":
        if "attn" in path:
            return "attention"
        if "mlp" in path:
            if "router" in path:
                return "router"
            return "experts" if segment_kinds[int(path[1])] == "moe" else "dense_mlp"
    return "other"


def _param_shards(cfg, mesh: MeshSpec, dtype: str):
    """(component, nnx path names, one device's shard shape, dtype) per param, from the model's
    abstract params and their shardings (nothing allocated)."""
    import jax
    from flax import nnx

    from qwen3_jax.api import abstract_model, resolve_dtype, state_shardings

    ctx = _abstract_ctx(mesh)
    abstract = nnx.state(abstract_model(cfg, resolve_dtype(dtype), kv_replication(mesh, cfg), ctx))
    shardings = state_shardings(abstract, ctx)
    kinds = [kind for kind, _, _ in cfg.layer_segments()]
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(shardings)):
        names = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        names = names[:-1] if names[-1] == "value" else names
        yield component_of(names, kinds), names, sharding.shard_shape(tuple(leaf.shape)), leaf.dtype


@functools.lru_cache(maxsize=256)
def weights_per_device(cfg, mesh: MeshSpec, dtype: str = "bfloat16") -> dict[str, int]:
    """{component: bytes each device holds}, from the model's abstract params and their shardings."""
    import jax.numpy as jnp

    out = dict.fromkeys(COMPONENTS, 0)
    for component, _, shard, dt in _param_shards(cfg, mesh, dtype):
        out[component] += math.prod(shard) * jnp.dtype(dt).itemsize
    return out


def kernel_notes(cfg, mesh: MeshSpec, dtype: str = "bfloat16") -> tuple[str, ...]:
    """What the plan should say about the GPU kernels before anything is allocated: FP8 weights
    whose per-device shard lies in Pallas Triton's int32-offset gap run their layers on the XLA
    path where this jax's lowering could not be given wider offsets (qwen3_jax.kernels.
    index_overflows); with them (index_width.widened, the usual case) there is nothing to say."""
    from qwen3_jax.kernels import index_width

    if index_width.widened():
        return ()
    return tuple(f"kernels: {', '.join(sorted({n for n, _ in found}))} ({component}) hold "
                 f"{human_bytes(max(b for _, b in found))} of FP8 each per device, inside Pallas Triton's int32-offset "
                 f"gap (2-4 GiB of one-byte elements), and this jax's lowering could not be widened: on a GPU those "
                 f"layers run on the XLA path, slower; a mesh that puts them under 2 GiB or over 4 GiB per device "
                 f"(another ep or tp) keeps them on the kernels"
                 for component, found in _index_gap_shards(cfg, mesh, dtype).items())


@functools.lru_cache(maxsize=256)
def _index_gap_shards(cfg, mesh: MeshSpec, dtype: str) -> dict:
    """{component: [(weight name, elements per device)]} of the shards in the int32-offset gap."""
    from qwen3_jax.kernels import index_width

    gaps = {}
    for component, names, shard, dt in _param_shards(cfg, mesh, dtype):
        if index_width.in_gap(shard, dt):
            gaps.setdefault(component, []).append((names[-2] if len(names) > 1 else names[-1], math.prod(shard)))
    return gaps


@functools.lru_cache(maxsize=256)
def kv_bytes_per_token(cfg, mesh: MeshSpec, dtype: str = "bfloat16") -> int:
    """Bytes one cached token of one slot costs each device of the data group holding the slot."""
    import jax.numpy as jnp

    from qwen3_jax.api import resolve_dtype
    from qwen3_jax.model import KVCache, cache_shapes

    ctx = _abstract_ctx(mesh)
    itemsize = jnp.dtype(resolve_dtype(dtype)).itemsize
    total = 0
    # dp slots of one token: each data group holds one slot, so a device's shard is one token.
    for shapes in cache_shapes(cfg, mesh.dp, 1, kv_replication(mesh, cfg)):
        for shape in shapes:
            total += math.prod(ctx.shard_shape(KVCache.AXES, shape)) * itemsize
    return total


def sampler_bytes_per_slot(cfg, mesh: MeshSpec) -> int:
    """Bytes one request slot's sampler state costs each device: the counts of its generated
    tokens [V] int32 (presence / frequency penalties), split over the vocab like the logits."""
    ctx = _abstract_ctx(mesh)
    return math.prod(ctx.shard_shape((None, "vocab"), (1, cfg.vocab_size))) * 4


def slots_that_fit(free_bytes: int, context_length: int, kv_bytes_per_token: int, sampler_bytes_per_slot: int,
                   dp: int, cap: int) -> int:
    """Request slots (mesh-wide, a multiple of dp, at most cap) whose KV cache and sampler state
    fit in `free_bytes` per device. A data group's slot costs its devices context x KV bytes per
    token; every slot's sampler state costs every device (it is split over the vocab, not dp)."""
    per_group = max(free_bytes, 0) // (context_length * kv_bytes_per_token + dp * sampler_bytes_per_slot)
    return min(dp * per_group, cap - cap % dp)


# -- the plan ----------------------------------------------------------------------------------

@dataclasses.dataclass
class MemoryPlan:
    """One device's memory under a mesh. Bytes are per device; tokens and requests are mesh-wide."""

    config: object
    mesh: MeshSpec
    dtype: str
    limit_bytes: int
    mem_fraction_static: float
    context_length: int
    max_running_requests: int | None
    chunked_prefill_size: int
    weights: dict[str, int]
    kv_bytes_per_token: int
    workspace: Workspace | None
    options: dict = dataclasses.field(default_factory=dict, repr=False)  # to re-plan suggestions
    notes: list = dataclasses.field(default_factory=list)   # kernel_notes: said with the plan
    sampler_bytes_per_slot: int = 0
    chunk_choice: str | None = None   # why this chunked_prefill_size, when the planner chose it

    # -- numbers ---------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.config.name

    @property
    def num_devices(self) -> int:
        return self.mesh.num_devices

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def budget_bytes(self) -> int:
        """device memory x mem_fraction_static: weights + workspace + KV cache must fit in it."""
        return int(self.limit_bytes * self.mem_fraction_static)

    @property
    def workspace_bytes(self) -> int:
        return self.workspace.bytes if self.workspace else 0

    @property
    def slot_cap(self) -> int:
        """The most request slots the server makes (max_running_requests, default 64, at least dp)."""
        return max(self.max_running_requests or DEFAULT_MAX_RUNNING_REQUESTS, self.mesh.dp)

    @property
    def sampler_slots(self) -> int:
        """The slots whose sampler state (penalty counts) the plan holds: as many as fit with their
        KV cache, at most slot_cap."""
        free = self.budget_bytes - self.weight_bytes - self.workspace_bytes
        return slots_that_fit(free, self.context_length, self.kv_bytes_per_token, self.sampler_bytes_per_slot,
                              self.mesh.dp, self.slot_cap)

    @property
    def sampler_bytes(self) -> int:
        return self.sampler_bytes_per_slot * self.sampler_slots

    @property
    def kv_tokens_per_group(self) -> int:
        free = self.budget_bytes - self.weight_bytes - self.workspace_bytes - self.sampler_bytes
        return max(free, 0) // self.kv_bytes_per_token

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens the whole mesh can cache (each data group holds its own slots)."""
        return self.kv_tokens_per_group * self.mesh.dp

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_tokens_per_group * self.kv_bytes_per_token

    @property
    def max_concurrent_requests(self) -> int:
        """Requests of context_length that fit at once (each lives in one data group), at most
        max_running_requests (default 64, as the server), a multiple of dp."""
        dp = self.mesh.dp
        n = dp * (self.kv_tokens_per_group // self.context_length)
        # the KV cache's leftover tokens may hold one more slot per group, but not its sampler state
        return min(n, self.sampler_slots)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.workspace_bytes + self.sampler_bytes + self.kv_cache_bytes

    @property
    def fits(self) -> bool:
        return self.kv_tokens_per_group >= self.context_length

    def largest_component(self) -> tuple[str, int]:
        return max(self.weights.items(), key=lambda kv: kv[1])

    def problem(self) -> str | None:
        """Why it does not fit, with the numbers; None when it fits."""
        if self.fits:
            return None
        budget = (f"the {human_bytes(self.budget_bytes)} budget "
                  f"({human_bytes(self.limit_bytes)} x {self.mem_fraction_static})")
        name, size = self.largest_component()
        if self.weight_bytes > self.budget_bytes:
            return (f"the weights alone are {human_bytes(self.weight_bytes)} per device, over {budget}; "
                    f"the largest part is {name}: {human_bytes(size)}")
        if self.weight_bytes + self.workspace_bytes + self.sampler_bytes > self.budget_bytes:
            return (f"weights {human_bytes(self.weight_bytes)} + workspace {human_bytes(self.workspace_bytes)} "
                    f"+ sampler {human_bytes(self.sampler_bytes)} per device exceed {budget}")
        need = self.context_length * self.kv_bytes_per_token
        return (f"after weights ({human_bytes(self.weight_bytes)}) and workspace "
                f"({human_bytes(self.workspace_bytes)}) the KV cache gets {human_bytes(self.kv_cache_bytes)} per device, {self.kv_tokens_per_group} tokens; one "
                f"request of context {self.context_length} needs {human_bytes(need)}")

    # -- re-planning a change ----------------------------------------------------------------
    def replan(self, cfg=None, mesh=None, **changes) -> "MemoryPlan":
        opts = {**self.options, **changes}
        return plan_memory(cfg or self.config, mesh or self.mesh, **opts)

    @functools.cached_property
    def _suggestions(self) -> list[tuple[str, "MemoryPlan"]]:
        return [] if self.fits else _find_suggestions(self)

    def suggestions(self) -> list[str]:
        """The smallest changes that make it fit, each checked by planning it. Empty when it fits."""
        return [text for text, _ in self._suggestions]

    def devices_needed(self) -> int | None:
        """The fewest devices (among those tried) on which this model fits, or None."""
        for text, plan in self._suggestions:
            if plan.num_devices != self.num_devices and plan.config is self.config:
                return plan.num_devices
        return self.num_devices if self.fits else None

    # -- output ------------------------------------------------------------------------------
    def summary(self) -> str:
        return (f"{human_bytes(self.weight_bytes)} weights per device, {self.kv_cache_tokens:,} KV tokens "
                f"({_count(self.max_concurrent_requests, 'request')} at context {self.context_length})")

    def format(self) -> str:
        w = self.workspace
        lines = [f"memory plan: {self.model_name} ({'FP8' if self.config.fp8 else self.dtype} weights, "
                 f"{self.dtype} compute)",
                 self.mesh.describe(),
                 f"per device: limit {human_bytes(self.limit_bytes)}, x mem_fraction_static {self.mem_fraction_static} "
                 f"= {human_bytes(self.budget_bytes)} for weights + workspace + sampler + KV cache",
                 f"  weights     {human_bytes(self.weight_bytes):>12}"]
        for name in COMPONENTS:
            if self.weights.get(name):
                lines.append(f"    {name:<12}{human_bytes(self.weights[name]):>10}")
        if w is None:
            lines.append("  workspace   (not compiled)")
        else:
            lines.append(f"  workspace   {human_bytes(w.bytes):>12}   prefill {w.prefill_tokens} tokens: "
                         f"{human_bytes(w.prefill_bytes)}, decode {_count(w.decode_batch, 'request')}: "
                         f"{human_bytes(w.decode_bytes)}")
            lines.append(f"              (XLA memory analysis on {w.platform}: {w.compiled_as})")
        if self.sampler_bytes:
            lines.append(f"  sampler     {human_bytes(self.sampler_bytes):>12}   penalty counts, "
                         f"{self.sampler_slots} slots x {human_bytes(self.sampler_bytes_per_slot)}")
        lines.append(f"  kv cache    {human_bytes(self.kv_cache_bytes):>12}   {self.kv_tokens_per_group:,} "
                     f"tokens per data group x {self.mesh.dp} = {self.kv_cache_tokens:,} tokens "
                     f"({self.kv_bytes_per_token:,} bytes per token per device)")
        lines.append(f"  total       {human_bytes(self.total_bytes):>12}   of {human_bytes(self.limit_bytes)}")
        if self.chunk_choice:
            lines.append(f"chunked prefill: {self.chunked_prefill_size} tokens ({self.chunk_choice})")
        lines += [f"note: {n}" for n in self.notes]
        if self.fits:
            lines.append(f"verdict: fits; {_count(self.max_concurrent_requests, 'concurrent request')} at context "
                         f"{self.context_length}")
        else:
            lines.append(f"verdict: does NOT fit: {self.problem()}")
            sugg = self.suggestions()
            if sugg:
                lines.append("changes that fit (each planned):")
                lines += [f"  - {s}" for s in sugg]
            else:
                lines.append("no change tried fits (FP8 weights, more devices, shorter context)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        w = self.workspace
        return {
            "model": self.model_name, "fp8": self.config.fp8 is not None, "dtype": self.dtype,
            "mesh": str(self.mesh), "num_devices": self.num_devices, "dp": self.mesh.dp, "tp": self.mesh.tp,
            "ep": self.mesh.ep, "fits": self.fits,
            "per_device": {
                "limit_bytes": self.limit_bytes, "mem_fraction_static": self.mem_fraction_static,
                "budget_bytes": self.budget_bytes,
                "weights_bytes": {k: v for k, v in self.weights.items() if v},
                "weight_bytes": self.weight_bytes,
                "workspace": w.to_json() if w else None, "workspace_bytes": self.workspace_bytes,
                "sampler_bytes": self.sampler_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
                "total_bytes": self.total_bytes,
            },
            "kv_cache_tokens": self.kv_cache_tokens, "kv_tokens_per_data_group": self.kv_tokens_per_group,
            "context_length": self.context_length, "max_concurrent_requests": self.max_concurrent_requests,
            "chunked_prefill_size": self.chunked_prefill_size, "chunk_choice": self.chunk_choice,
            "problem": self.problem(),
            "suggestions": [] if self.fits else self.suggestions(),
            "notes": list(self.notes),
        }


def plan_memory(cfg, mesh_spec, *, device_memory_bytes: int, mem_fraction_static: float = DEFAULT_MEM_FRACTION_STATIC,
                context_length: int | None = None, max_running_requests: int | None = None,
                chunked_prefill_size: int = 512, dtype: str = "bfloat16", num_devices: int | None = None,
                workspace: bool = True, steps: str = MODEL_STEPS_PATH, devices=None) -> MemoryPlan:
    """Plan one device's memory for `cfg` under `mesh_spec` (e.g. 'tp=4,ep=8' or a MeshSpec).

    Nothing is allocated. `num_devices` spreads the spec over that many devices (dp fills the
    rest). The decode workspace is compiled for the slots the server will run: as many requests
    of context_length as the KV cache holds, at most max_running_requests (default 64).
    `steps` names the step functions to compile (see workspace.StepSet); `devices` where.
    """
    spec = parse_mesh_spec(mesh_spec, num_devices)
    check_against_config(spec, cfg)
    dtype = str(dtype)
    context_length = int(context_length or cfg.max_position_embeddings)
    if context_length > cfg.max_position_embeddings:
        raise ValueError(f"context_length={context_length} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}; use --context-length {cfg.max_position_embeddings} or less")
    if context_length < 1 or not 0 < mem_fraction_static <= 1:
        raise ValueError(f"context_length={context_length} must be >= 1 and mem_fraction_static="
                         f"{mem_fraction_static} in (0, 1]")
    options = dict(device_memory_bytes=device_memory_bytes, mem_fraction_static=mem_fraction_static,
                   context_length=context_length, max_running_requests=max_running_requests,
                   chunked_prefill_size=chunked_prefill_size, dtype=dtype, workspace=workspace, steps=steps,
                   devices=devices)
    plan = MemoryPlan(cfg, spec, dtype, int(device_memory_bytes), mem_fraction_static, context_length,
                      max_running_requests, chunked_prefill_size, dict(weights_per_device(cfg, spec, dtype)),
                      kv_bytes_per_token(cfg, spec, dtype), None, options, list(kernel_notes(cfg, spec, dtype)),
                      sampler_bytes_per_slot(cfg, spec))
    if workspace:
        # The decode step runs every slot, and the slots are what the KV cache holds after the
        # workspace: start from what it holds without workspace (an upper bound), then compile
        # decode again at the slots that are left. Prefill writes one row and is compiled once,
        # against the larger cache.
        first = max(plan.max_concurrent_requests, spec.dp)
        kw = dict(context_length=context_length, prefill_tokens=min(chunked_prefill_size, context_length),
                  steps=steps, devices=devices, prefill_slots=first)
        plan.workspace = step_workspace(cfg, spec, dtype, num_slots=first, **kw)
        left = max(plan.max_concurrent_requests, spec.dp)
        if left < first:
            plan.workspace = step_workspace(cfg, spec, dtype, num_slots=left, **kw)
    return plan


# --chunked-prefill-size auto: the largest of AUTO_CHUNK_SIZES whose plan keeps at least
# (1 - AUTO_CHUNK_KV_COST) of the KV tokens that AUTO_CHUNK_BASE's plan has, else the base.
# A larger chunk prefills long prompts faster but pauses running requests' decode longer and
# needs more workspace. Measured on an H200 (30B-A3B-FP8, 16 requests decoding, four 8k
# prompts; benchmarks/NOTES.md run 121), against 512: 2048-token chunks gave the prompts'
# first tokens in 0.60x the time and 1.54x the tokens/s when the prompts came at once, with
# the decoders' p99 inter-token latency 109 ms against 46 (1024: 0.75x, 1.28x, 69 ms).
AUTO_CHUNK_BASE = 512
AUTO_CHUNK_SIZES = (2048, 1024)
AUTO_CHUNK_KV_COST = 0.10


def plan_memory_chunked(cfg, mesh_spec, chunked_prefill_size: int | str = "auto", **kw) -> MemoryPlan:
    """plan_memory for a chunked prefill size, or "auto" (the server's default): the size chosen
    as AUTO_CHUNK_SIZES above says, the plan's chunk_choice saying why (2-3 sizes planned, each a
    workspace compile)."""
    if chunked_prefill_size != "auto":
        return plan_memory(cfg, mesh_spec, chunked_prefill_size=chunked_prefill_size, **kw)
    base = plan_memory(cfg, mesh_spec, chunked_prefill_size=AUTO_CHUNK_BASE, **kw)
    larger = [size for size in AUTO_CHUNK_SIZES if size < base.context_length]   # a chunk past the context is the context
    if not base.fits or not larger:
        base.chunk_choice = "auto" if not base.fits else f"auto: the context ({base.context_length}) needs no larger chunk"
        return base
    floor = (1 - AUTO_CHUNK_KV_COST) * base.kv_cache_tokens
    for size in larger:
        plan = base.replan(chunked_prefill_size=size)
        if plan.fits and plan.kv_cache_tokens >= floor:
            cost = 1 - plan.kv_cache_tokens / base.kv_cache_tokens
            plan.chunk_choice = (f"auto: its workspace costs {cost:.1%} of the KV cache of {AUTO_CHUNK_BASE}-token "
                                 f"chunks, within {AUTO_CHUNK_KV_COST:.0%}; --chunked-prefill-size N sets it")
            return plan
    base.chunk_choice = (f"auto: {' or '.join(map(str, larger))}-token chunks would cost over "
                         f"{AUTO_CHUNK_KV_COST:.0%} of the KV cache; --chunked-prefill-size N sets it")
    return base


def sweep(cfg, num_devices: int, **kw) -> list[MemoryPlan]:
    """Plan every mesh the model allows on exactly `num_devices` devices (sharding.mesh.valid_specs)."""
    kw.pop("num_devices", None)
    return [plan_memory(cfg, spec, **kw) for spec in valid_specs(cfg, num_devices)]


def format_sweep(plans: list[MemoryPlan]) -> str:
    """A table: one row per mesh, best KV capacity first among those that fit."""
    header = ("mesh", "dp", "tp", "ep", "weights", "workspace", "kv tokens", "requests", "fits")
    rows = [(str(p.mesh), str(p.mesh.dp), str(p.mesh.tp), str(p.mesh.ep), human_bytes(p.weight_bytes),
             human_bytes(p.workspace_bytes), f"{p.kv_cache_tokens:,}", str(p.max_concurrent_requests),
             "yes" if p.fits else "no")
            for p in sorted(plans, key=lambda p: (not p.fits, -p.kv_cache_tokens))]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    first = plans[0] if plans else None
    title = (f"{first.model_name} on {first.num_devices} devices of {human_bytes(first.limit_bytes)}, context "
             f"{first.context_length}, mem_fraction_static {first.mem_fraction_static}" if first else "no valid mesh")
    return "\n".join([title, fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


# -- suggestions -------------------------------------------------------------------------------

def _fp8_variant(cfg):
    """(label, config) of the block-FP8 checkpoint of the same model, or None if already FP8."""
    if cfg.fp8 is not None:
        return None
    from qwen3_jax.config import Fp8Config, preset_names

    name = f"{cfg.name}-FP8"
    label = f"the FP8 checkpoint {name}" if name in preset_names() else "an FP8 (block 128x128) checkpoint"
    return label, dataclasses.replace(cfg, fp8=Fp8Config(), name=name)


def _device_counts(n: int, node: int) -> list[int]:
    limit = max(8 * n, 4 * node)
    counts = {n * k for k in range(2, 9)} | {2 ** j for j in range(1, 11)} | {node * k for k in range(1, 9)}
    return sorted(c for c in counts if n < c <= limit)


def _devices_text(count: int, node: int) -> str:
    if count > node and count % node == 0:
        k = count // node
        return f"{count} devices ({_WORDS.get(k, k)} nodes of {node})"
    return f"{count} devices"


def _mesh_for(plan: MemoryPlan, count: int) -> MeshSpec | None:
    """The mesh on `count` devices closest to the plan's: same tp, ep scaled; else the smallest weights."""
    cfg, spec = plan.config, plan.mesh
    scale = count // spec.num_devices if count % spec.num_devices == 0 else 0
    candidates = valid_specs(cfg, count)
    if not candidates:
        return None
    if scale:
        for want in (MeshSpec(spec.dp * scale, spec.tp, spec.ep * scale if spec.ep > 1 else 1),
                     MeshSpec(count // spec.tp, spec.tp, count) if count % spec.tp == 0 else None):
            if want in candidates:
                return want
    return min(candidates, key=lambda s: (sum(weights_per_device(cfg, s, plan.dtype).values()), -s.ep))


def _find_suggestions(plan: MemoryPlan) -> list[tuple[str, MemoryPlan]]:
    out = []
    fp8 = _fp8_variant(plan.config)
    if fp8:
        label, cfg8 = fp8
        p = plan.replan(cfg=cfg8)
        if p.fits:
            out.append((f"use {label}: {p.summary()} on the same mesh", p))
    compiles = 0
    for count in _device_counts(plan.num_devices, NODE_SIZE):
        spec = _mesh_for(plan, count)
        if spec is None:
            continue
        # Cheap screen first (weights and KV only; this plan's workspace as a stand-in, which more
        # devices rarely raise), then the full plan for at most three candidates.
        quick = plan.replan(mesh=spec, workspace=False)
        free = quick.budget_bytes - quick.weight_bytes - plan.workspace_bytes
        if free // quick.kv_bytes_per_token < plan.context_length or compiles == 3:
            continue
        compiles += 1
        p = plan.replan(mesh=spec)
        if p.fits:
            out.append((f"{_devices_text(count, NODE_SIZE)} instead of {plan.num_devices}, --mesh {spec}: "
                        f"{p.summary()}", p))
            break
    if plan.weight_bytes + plan.workspace_bytes < plan.budget_bytes:
        tokens = plan.kv_tokens_per_group
        shorter = (tokens // 1024) * 1024 or tokens
        if 0 < shorter < plan.context_length:
            p = plan.replan(context_length=shorter)
            if p.fits:
                out.append((f"--context-length {shorter} (from {plan.context_length}): {p.summary()}", p))
    if plan.workspace and plan.weight_bytes < plan.budget_bytes:
        w = plan.workspace
        if w.prefill_bytes >= w.decode_bytes and plan.chunked_prefill_size > 128:
            size = plan.chunked_prefill_size // 2
            while size >= 128:
                p = plan.replan(chunked_prefill_size=size)
                if p.fits:
                    out.append((f"--chunked-prefill-size {size} (prefill workspace "
                                f"{human_bytes(p.workspace.prefill_bytes)}): {p.summary()}", p))
                    break
                size //= 2
    if plan.mem_fraction_static < 0.95 and plan.weight_bytes + plan.workspace_bytes < 0.95 * plan.limit_bytes:
        p = plan.replan(mem_fraction_static=0.95)
        if p.fits:
            out.append((f"--mem-fraction-static 0.95: {p.summary()}", p))
    return out


# -- measured, next to the plan (for a real device) --------------------------------------------

def live_bytes_per_device(exclude=()) -> dict:
    """{device: bytes of live jax arrays on it}, skipping arrays whose id() is in `exclude`.

    Each device buffer counts once, however many arrays view it (a global array and the
    single-device arrays it was assembled from share buffers).
    """
    import jax

    out: dict = {}
    seen = set()
    for arr in jax.live_arrays():
        if id(arr) in exclude or arr.is_deleted():
            continue
        for shard in arr.addressable_shards:
            key = (shard.device, shard.data.unsafe_buffer_pointer())
            if key not in seen:
                seen.add(key)
                out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


class LoadMemoryProbe:
    """An `on_layer(done, total)` callback for qwen3_jax.load: the most bytes any device held
    during the load, from live arrays (every platform) and memory_stats (where it exists)."""

    def __init__(self):
        import jax

        self.baseline = {id(a) for a in jax.live_arrays()}  # arrays that existed before the load
        self.peak_live: dict = {}
        self.samples = 0

    def __call__(self, done: int = 0, total: int = 0):
        for dev, n in live_bytes_per_device(self.baseline).items():
            self.peak_live[dev] = max(self.peak_live.get(dev, 0), n)
        self.samples += 1

    @property
    def max_live_bytes(self) -> int:
        return max(self.peak_live.values(), default=0)


def measure_device_memory(devices=None) -> list[dict]:
    """Per device: bytes_in_use, peak_bytes_in_use, bytes_limit (memory_stats; None where the
    platform has none) and live_array_bytes (always)."""
    import jax

    devices = list(devices or jax.devices())
    live = live_bytes_per_device()
    out = []
    for d in devices:
        try:
            stats = d.memory_stats() or {}
        except Exception:  # platforms without memory stats raise rather than return None
            stats = {}
        out.append({"device": str(d), "bytes_in_use": stats.get("bytes_in_use"),
                    "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "bytes_limit": stats.get("bytes_limit"),
                    "live_array_bytes": live.get(d, 0)})
    return out


def compare_with_plan(plan: MemoryPlan, measured: list[dict]) -> str:
    """Planned vs measured per device, e.g. after loading: weights planned vs bytes in use."""
    lines = [f"planned weights per device {human_bytes(plan.weight_bytes)} ({plan.weight_bytes:,} bytes)"]
    for m in measured:
        live = m["live_array_bytes"]
        parts = [f"live arrays {human_bytes(live)} ({live / plan.weight_bytes - 1:+.2%})"]
        if m.get("bytes_in_use") is not None:
            parts.append(f"in use {human_bytes(m['bytes_in_use'])} ({m['bytes_in_use'] / plan.weight_bytes - 1:+.2%})")
        if m.get("peak_bytes_in_use") is not None:
            parts.append(f"peak {human_bytes(m['peak_bytes_in_use'])}")
        lines.append(f"  {m['device']}: " + ", ".join(parts))
    return "\n".join(lines)


def measure_model_memory(model: str, mesh=None, dtype: str = "bfloat16", random_weights: bool = False) -> dict:
    """On the devices at hand: plan, then build the model and measure. -> a JSON-able dict.

    `model` is a checkpoint directory (loaded with qwen3_jax.load, sampled after every layer) or,
    with `random_weights`, a preset name or directory (qwen3_jax.random_model). Per device:
    planned weight bytes; bytes_in_use / peak_bytes_in_use from memory_stats (GPU) before and
    after; live array bytes after and the most seen during a load.
    """
    import jax

    from qwen3_jax import api
    from qwen3_jax.config import resolve_config

    cfg = resolve_config(model)
    spec = parse_mesh_spec(mesh, cfg=cfg)
    plan = plan_memory(cfg, spec, device_memory_bytes=1, workspace=False, dtype=dtype)
    devices = jax.devices()[:spec.num_devices]
    before = measure_device_memory(devices)
    probe = LoadMemoryProbe()
    if random_weights:
        built = api.random_model(cfg, mesh=spec if spec.num_devices > 1 else None, dtype=dtype)
    else:
        built = api.load(model, mesh=spec if spec.num_devices > 1 else None, dtype=dtype, on_layer=probe)
    jax.block_until_ready(jax.tree.leaves(built.state))
    after = measure_device_memory(devices)
    return {"model": cfg.name, "mesh": str(spec), "dtype": dtype, "random_weights": random_weights,
            "planned_weight_bytes": plan.weight_bytes, "planned_weights": plan.weights,
            "held_param_bytes": {str(d): n for d, n in built.param_bytes_per_device().items()},
            "before": before, "after": after,
            "max_live_bytes_during_load": {str(d): n for d, n in probe.peak_live.items()},
            "report": compare_with_plan(plan, after)}


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m sharding.memory",
                                description="Measure a model's device memory next to its plan (on a real device).")
    p.add_argument("--model", required=True, help="checkpoint directory, or a preset name with --random")
    p.add_argument("--mesh", default="", help="mesh spec, e.g. tp=4,ep=8 (default: one device)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--random", action="store_true", help="random weights (qwen3_jax.random_model) instead of loading")
    a = p.parse_args()
    result = measure_model_memory(a.model, a.mesh, a.dtype, a.random)
    print(result.pop("report"))
    print(json.dumps(result, indent=2, default=str))
