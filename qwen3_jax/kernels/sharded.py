"""Kernels on a multi-device mesh: each device runs the kernel on its own shards.

XLA's automatic SPMD partitioner cannot split a pallas_call (it would gather the operands and
run the whole kernel on every device), so on a mesh the model wraps each kernel call in
shard_map with the PartitionSpecs its operands already have, derived from their logical axes:
the kernel sees local shapes (H/tp heads, E/ep experts, F/etp columns) and reads the stacked
weights in place as on one device. A contracted dim that is split (o_proj over heads) leaves
each device a partial sum, which `psum_over` names and a psum (in float32) completes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P


def _spec(ctx, axes, shape):
    return P() if axes is None else ctx.pspec(axes, shape)


def mesh_axes_of(ctx, axes: Sequence[str | None], shape, dims: Sequence[int]) -> tuple[str, ...]:
    """The mesh axes that split dims `dims` of an array with logical `axes` and `shape`."""
    spec = ctx.pspec(axes, shape)
    out: list[str] = []
    for d in dims:
        entry = spec[d] if d < len(spec) else None
        if entry is None:
            continue
        out.extend(entry if isinstance(entry, tuple) else (entry,))
    return tuple(out)


def per_device(fn: Callable, ctx, operands: Sequence, in_axes: Sequence, out_axes, out_shape,
               psum_over: tuple[str, ...] = ()):
    """fn(*local operands) on every device's shards -> one global array.

    operands[i] has logical axes in_axes[i] (None: replicated, e.g. a layer index); the result
    has logical axes `out_axes` and global shape `out_shape` (lists of them: fn returns a tuple,
    one global array each). `psum_over` (mesh axes): the local results are partial sums over
    those axes.
    """
    in_specs = tuple(_spec(ctx, a, jax.numpy.shape(x)) for x, a in zip(operands, in_axes))
    if isinstance(out_axes, list):   # several outputs: lists of axes and shapes
        out_spec = tuple(_spec(ctx, a, sh) for a, sh in zip(out_axes, out_shape))
    else:
        out_spec = _spec(ctx, out_axes, out_shape)

    def body(*local):
        y = fn(*local)
        return jax.lax.psum(y, psum_over) if psum_over else y

    return jax.shard_map(body, mesh=ctx.mesh, in_specs=in_specs, out_specs=out_spec,
                         check_vma=False)(*operands)
