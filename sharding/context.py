"""The sharding context a model carries: the resolved spec plus the jax Mesh built from it.

Hashable and static, so it can sit in a Flax graphdef; `None` means one device and every
constraint is a no-op.
"""

from __future__ import annotations

import dataclasses

import jax

from .mesh import MeshSpec
from .rules import named_sharding, partition_spec


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    spec: MeshSpec
    mesh: jax.sharding.Mesh

    def sharding(self, logical_axes, shape=None):
        return named_sharding(self.mesh, self.spec, logical_axes, shape)

    def pspec(self, logical_axes, shape=None):
        return partition_spec(self.spec, tuple(logical_axes), shape)

    def shard_shape(self, logical_axes, shape) -> tuple[int, ...]:
        """What one device holds of an array of `shape` laid out by `logical_axes`."""
        return self.sharding(logical_axes, shape).shard_shape(tuple(shape))


def constrain(x, logical_axes, ctx: ShardingContext | None):
    """with_sharding_constraint by logical names; dims the mesh does not divide stay replicated."""
    if ctx is None or ctx.spec.num_devices == 1:
        return x
    return jax.lax.with_sharding_constraint(x, ctx.sharding(logical_axes, x.shape))
