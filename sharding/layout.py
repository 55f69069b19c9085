"""Per-device layout of a model's weights: which weight, which mesh axes, bytes on each device.

Computed from shapes, dtypes and logical axis names alone (the rules table), so it works on an
abstract state before anything is allocated as well as on a loaded model. In a notebook:

    from sharding.layout import layout_table
    print(layout_table(model))          # a loaded qwen3_jax.Model
    print(layout_table(abstract_state, "tp=4,ep=8"))   # or any (abstract) state + a mesh spec

    rows = layout_rows(model)           # LayoutRow dataclasses; pandas.DataFrame(map(asdict, rows))

Every device holds the same bytes for every weight (splits are even, checked up front by
sharding.mesh), so "bytes per device" is one number per row; the totals row is what each device
holds for the whole model.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .mesh import MESH_AXES, MeshSpec, parse_mesh_spec
from .rules import partition_spec


@dataclasses.dataclass(frozen=True)
class LayoutRow:
    """One weight: W[...] with `shape` split into `shard_shape` on each of the mesh's devices."""

    name: str
    logical_axes: tuple[str | None, ...]
    pspec: tuple                 # per dim: None, a mesh axis, or a tuple of mesh axes
    shape: tuple[int, ...]
    shard_shape: tuple[int, ...]
    dtype: str
    bytes_per_device: int
    total_bytes: int             # the unsharded weight
    copies: int                  # devices holding each byte (1: fully split, N: replicated)


def layout_rows(model_or_state, mesh: MeshSpec | str | None = None) -> list[LayoutRow]:
    """One LayoutRow per weight, in state order.

    `model_or_state` is a Model (its `.state` and `.mesh_spec` are used), an nnx State (real or
    abstract) whose leaves carry `logical_axes` metadata, or a list of
    (name, shape, dtype, logical_axes) tuples; `mesh` is needed for the last two.
    """
    if mesh is None:
        mesh = getattr(model_or_state, "mesh_spec", None)
    spec = parse_mesh_spec(mesh) if not isinstance(mesh, MeshSpec) else mesh
    rows = []
    for name, shape, dtype, axes in _weights(model_or_state):
        pspec = tuple(partition_spec(spec, tuple(axes)))
        pspec = pspec + (None,) * (len(shape) - len(pspec))
        shard = tuple(dim // _ways(spec, entry) for dim, entry in zip(shape, pspec))
        itemsize = np.dtype(dtype).itemsize
        rows.append(LayoutRow(name=name, logical_axes=tuple(axes), pspec=pspec, shape=tuple(shape),
                              shard_shape=shard, dtype=str(np.dtype(dtype)),
                              bytes_per_device=math.prod(shard) * itemsize,
                              total_bytes=math.prod(shape) * itemsize,
                              copies=spec.num_devices // math.prod(_ways(spec, e) for e in pspec)))
    return rows


def layout_totals(rows: list[LayoutRow]) -> tuple[int, int]:
    """(bytes each device holds, bytes of the unsharded model)."""
    return sum(r.bytes_per_device for r in rows), sum(r.total_bytes for r in rows)


def format_layout(rows: list[LayoutRow], mesh: MeshSpec | str | None = None) -> str:
    """A fixed-width text table of `rows` with a totals row (and the mesh line when given)."""
    header = ("weight", "logical axes", "mesh axes", "shape", "per device", "dtype", "unsharded",
              "bytes/device", "copies")
    body = [(r.name, _axes_text(r.logical_axes), _pspec_text(r.pspec), _shape_text(r.shape),
             _shape_text(r.shard_shape), r.dtype, human_bytes(r.total_bytes), human_bytes(r.bytes_per_device),
             str(r.copies)) for r in rows]
    per_device, total = layout_totals(rows)
    totals = (f"total ({len(rows)} weights)", "", "", "", "", "", human_bytes(total), human_bytes(per_device), "")
    widths = [max(len(line[i]) for line in [header, *body, totals]) for i in range(len(header))]
    numeric = {6, 7, 8}

    def fmt(line):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(line, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = []
    if mesh is not None:
        lines.append((parse_mesh_spec(mesh) if not isinstance(mesh, MeshSpec) else mesh).describe())
    lines += [fmt(header), rule, *map(fmt, body), rule, fmt(totals)]
    return "\n".join(lines)


def layout_table(model_or_state, mesh: MeshSpec | str | None = None) -> str:
    """`format_layout(layout_rows(...))` with the mesh line on top: print it in a notebook."""
    if mesh is None:
        mesh = getattr(model_or_state, "mesh_spec", None)
    return format_layout(layout_rows(model_or_state, mesh), mesh)


def human_bytes(n: int) -> str:
    """Bytes in GiB, MiB or KiB (binary units: device memory is sold and set in them), B below."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


# -- helpers ---------------------------------------------------------------------------------

def _weights(obj):
    """Yield (name, shape, dtype, logical_axes) from a Model, an nnx State or a list of tuples."""
    if isinstance(obj, (list, tuple)):
        yield from obj
        return
    import jax

    state = getattr(obj, "state", obj)

    def is_var(x):
        return hasattr(x, "get_metadata")

    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)[0]:
        if not is_var(var):
            continue
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            raise ValueError(f"weight {_path_name(path)} has no logical_axes metadata; every param "
                             "must name its axes for the rules table to place it")
        yield _path_name(path), tuple(var.shape), var.dtype, tuple(axes)


def _path_name(path) -> str:
    parts = []
    for k in path:
        part = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        parts.append(str(part))
    return ".".join(parts)


def _ways(spec: MeshSpec, entry) -> int:
    if entry is None:
        return 1
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(spec.shape[MESH_AXES.index(a)] for a in axes)


def _axes_text(axes) -> str:
    return "(" + ", ".join("-" if a is None else a for a in axes) + ")"


def _pspec_text(pspec) -> str:
    def one(entry):
        if entry is None:
            return "-"
        return entry if isinstance(entry, str) else "*".join(entry)
    return "P(" + ", ".join(one(e) for e in pspec) + ")"


def _shape_text(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
