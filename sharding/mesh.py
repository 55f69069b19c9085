"""Mesh specs: `--mesh tp=4,ep=8` to one device mesh that attention and MoE layers both use.

Semantics (as in SGLang and vLLM): the spec names N = dp x tp devices. Attention sees them as
data(dp) x tensor(tp); MoE layers see the same N devices as expert(ep) x expert_tensor(N/ep).
`tp=4,ep=8` is 8 devices, not 32: experts re-use the attention devices.

Both views are row-major over one device list, so one three-axis mesh serves both:

    ep >= dp:  (outer, middle, inner) = (dp, ep/dp, N/ep)
               data = outer; tensor = middle x inner; expert = outer x middle; expert_tensor = inner
    ep <  dp:  (outer, middle, inner) = (ep, dp/ep, tp)
               data = outer x middle; tensor = inner; expert = outer; expert_tensor = middle x inner
"""

from __future__ import annotations

import dataclasses
import re

MESH_AXES = ("outer", "middle", "inner")


class MeshSpecError(ValueError):
    """An invalid --mesh spec, raised before any device memory is touched."""


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """A resolved mesh: sizes of the attention and MoE views over the same N devices."""

    dp: int
    tp: int
    ep: int

    @property
    def num_devices(self) -> int:
        return self.dp * self.tp

    @property
    def etp(self) -> int:
        """Expert-tensor size: how many ways each expert's intermediate dim is split."""
        return self.num_devices // self.ep

    @property
    def shape(self) -> tuple[int, int, int]:
        n = self.num_devices
        if self.ep >= self.dp:
            return (self.dp, self.ep // self.dp, n // self.ep)
        return (self.ep, self.dp // self.ep, self.tp)

    @property
    def axes(self) -> dict[str, tuple[str, ...]]:
        """Mesh axes of each view: 'data', 'tensor', 'expert', 'expert_tensor'."""
        if self.ep >= self.dp:
            return {"data": ("outer",), "tensor": ("middle", "inner"),
                    "expert": ("outer", "middle"), "expert_tensor": ("inner",)}
        return {"data": ("outer", "middle"), "tensor": ("inner",),
                "expert": ("outer",), "expert_tensor": ("middle", "inner")}

    def describe(self) -> str:
        return (f"mesh: {self.num_devices} device{'s' if self.num_devices > 1 else ''} | attention "
                f"data={self.dp} x tensor={self.tp} | moe expert={self.ep} x tensor={self.etp}")

    def __str__(self) -> str:
        parts = []
        if self.dp != 1 and not (self.ep > self.tp and self.dp == self.ep // self.tp):
            parts.append(f"dp={self.dp}")
        parts.append(f"tp={self.tp}")
        if self.ep != 1:
            parts.append(f"ep={self.ep}")
        return ",".join(parts)


_TERM = re.compile(r"^(dp|tp|ep)=(\d+)$")


def parse_mesh_spec(spec: str | MeshSpec | None, num_devices: int | None = None) -> MeshSpec:
    """'tp=4,ep=8' -> MeshSpec(dp=2, tp=4, ep=8). None or '' is one device.

    `num_devices`, when given, is how many devices the user wants the spec to span (for
    `tp=2` on 8 devices that means dp=4); otherwise the spec's own product is used.
    """
    if isinstance(spec, MeshSpec):
        return spec
    sizes: dict[str, int] = {}
    for term in (spec or "").replace(" ", "").split(","):
        if not term:
            continue
        m = _TERM.match(term)
        if not m:
            raise MeshSpecError(f"cannot parse mesh term {term!r} in {spec!r}; write terms like "
                                "'tp=4', 'ep=8', 'dp=2' separated by commas, e.g. --mesh tp=4,ep=8")
        key, value = m.group(1), int(m.group(2))
        if key in sizes:
            raise MeshSpecError(f"{key} given twice in mesh spec {spec!r}")
        if value < 1:
            raise MeshSpecError(f"{key}={value} in {spec!r} must be >= 1")
        sizes[key] = value
    tp, ep = sizes.get("tp", 1), sizes.get("ep", 1)
    if "dp" in sizes:
        dp = sizes["dp"]
    elif num_devices is not None:
        if num_devices % tp:
            raise MeshSpecError(f"{num_devices} devices cannot be split into tensor groups of tp={tp}; "
                                f"use a tp that divides {num_devices}")
        dp = num_devices // tp
    else:
        dp = ep // tp if ep > tp else 1
    n = dp * tp
    if ep > tp and "dp" not in sizes and ep % tp:
        raise MeshSpecError(f"ep={ep} is not a multiple of tp={tp}: with dp omitted the mesh has "
                            f"ep/tp data-parallel groups; use ep={tp * max(1, ep // tp)} or give dp")
    if n % ep:
        raise MeshSpecError(f"ep={ep} does not divide the {n} devices of {spec!r} (dp={dp} x tp={tp}); "
                            f"experts are spread over all devices, so use ep in {_divisors(n)}")
    if ep % dp and dp % ep:
        raise MeshSpecError(f"dp={dp} and ep={ep} must divide one another so attention's data groups "
                            f"nest inside expert groups; try dp={ep if ep <= n and n % ep == 0 and ep % tp == 0 else 1}")
    return MeshSpec(dp=dp, tp=tp, ep=ep)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_against_config(mesh: MeshSpec, cfg) -> None:
    """Refuse a mesh the model's sizes cannot be split over; every message names a way out."""
    tp, ep, etp = mesh.tp, mesh.ep, mesh.etp
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads % tp:
        ok = [d for d in _divisors(heads) if d <= mesh.num_devices]
        raise MeshSpecError(f"num_attention_heads={heads} is not divisible by tp={tp}; use tp in {ok}")
    if tp <= kv and kv % tp:
        raise MeshSpecError(f"num_key_value_heads={kv} is not divisible by tp={tp}; use a tp that divides "
                            f"{kv} or a multiple of it")
    if tp > kv and tp % kv:
        raise MeshSpecError(f"tp={tp} exceeds num_key_value_heads={kv} but is not a multiple of it, so KV "
                            f"heads cannot be replicated evenly; use tp in {[kv * i for i in (1, 2, 4, 8)]}")
    moe = any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    if moe and cfg.num_experts % ep:
        raise MeshSpecError(f"num_experts={cfg.num_experts} is not divisible by ep={ep}; use ep in "
                            f"{[d for d in _divisors(cfg.num_experts) if d <= mesh.num_devices]}")
    if moe and cfg.moe_intermediate_size % etp:
        raise MeshSpecError(
            f"moe_intermediate_size={cfg.moe_intermediate_size} is not divisible by its split {etp} "
            f"(= {mesh.num_devices} devices / ep={ep}); raise ep so each expert is split fewer ways, "
            f"e.g. ep={mesh.num_devices}")
    dense = any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    if dense and cfg.intermediate_size % tp:
        raise MeshSpecError(f"intermediate_size={cfg.intermediate_size} (dense MLP layers) is not divisible "
                            f"by tp={tp}; use a tp that divides it")


def kv_replication(mesh: MeshSpec, cfg) -> int:
    """How many copies of each KV head the mesh needs so every tensor rank holds one (tp > kv heads)."""
    kv = cfg.num_key_value_heads
    return mesh.tp // kv if mesh.tp > kv else 1


def make_mesh(mesh: MeshSpec, devices=None):
    """The jax Mesh (Auto axis types) over the first N devices; too few devices is an error."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = list(jax.devices() if devices is None else devices)
    n = mesh.num_devices
    if len(devices) < n:
        raise MeshSpecError(f"mesh {mesh} needs {n} devices but only {len(devices)} are visible "
                            f"({devices[0].platform}); use a smaller spec or more devices")
    grid = np.array(devices[:n], dtype=object).reshape(mesh.shape)
    try:
        from jax.sharding import AxisType
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    except (ImportError, TypeError):
        return Mesh(grid, MESH_AXES)
