"""Logical axis names -> mesh axes: the one table that decides where every array lives.

Model code names the axes of each weight, cache and constrained activation (`("embed",
"heads", "head_dim")`); this table, built from a MeshSpec, turns names into PartitionSpecs.
Notation as in the scaling book: q_proj W[D, H_tensor, Q].
"""

from __future__ import annotations

from jax.sharding import NamedSharding, PartitionSpec as P

from .mesh import MeshSpec

# Logical axis -> which view of the mesh it is split over (None: replicated).
LOGICAL_TO_VIEW: dict[str, str | None] = {
    "layers": None,         # L: scanned stack
    "vocab": "tensor",      # V: embedding rows and lm_head columns
    "embed": None,          # D: model dim, replicated
    "heads": "tensor",      # H: query heads
    "kv_heads": "tensor",   # K: kv heads (replicated copies when tp > K)
    "head_dim": None,       # Q
    "mlp": "tensor",        # I: dense MLP intermediate
    "experts": "expert",    # E
    "expert_mlp": "expert_tensor",  # F: expert intermediate
    "router": None,         # E on the router's output: every device routes every token
    "embed_blocks": None,   # D/128: FP8 scale blocks along the model dim
    "batch": "data",        # B: attention batch / cache slots
    "seq": None,            # T
    "cache_seq": None,      # S
}


def mesh_axes(mesh: MeshSpec, logical: str | None) -> tuple[str, ...] | None:
    if logical is None:
        return None
    if logical not in LOGICAL_TO_VIEW:
        raise KeyError(f"logical axis {logical!r} has no rule; known: {sorted(LOGICAL_TO_VIEW)}")
    view = LOGICAL_TO_VIEW[logical]
    return None if view is None else mesh.axes[view]


def partition_spec(mesh: MeshSpec, logical_axes: tuple[str | None, ...], shape=None) -> P:
    """PartitionSpec for an array whose dims carry `logical_axes`.

    With `shape`, a dim whose size the mesh axes do not divide stays replicated (used only for
    activations such as a batch of 1 under dp=2; weights are checked divisible up front).
    Refuses two logical axes on one mesh axis.
    """
    spec, used = [], set()
    for i, name in enumerate(logical_axes):
        axes = mesh_axes(mesh, name)
        if axes:
            axes = tuple(a for a in axes if mesh.shape[_index(a)] > 1)
        if axes and shape is not None and shape[i] % _size(mesh, axes):
            axes = ()
        if axes:
            clash = used.intersection(axes)
            if clash:
                raise ValueError(f"logical axes {logical_axes} put two dims on mesh axis {sorted(clash)}")
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def named_sharding(jax_mesh, mesh: MeshSpec, logical_axes, shape=None) -> NamedSharding:
    return NamedSharding(jax_mesh, partition_spec(mesh, tuple(logical_axes), shape))


def _index(axis: str) -> int:
    from .mesh import MESH_AXES
    return MESH_AXES.index(axis)


def _size(mesh: MeshSpec, axes) -> int:
    n = 1
    for a in axes:
        n *= mesh.shape[_index(a)]
    return n


def view_size(mesh: MeshSpec, view: str) -> int:
    return _size(mesh, mesh.axes[view])
