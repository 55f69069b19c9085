"""What a gemv multiplies when x is not yet a plain [M, K] array: a producer's unfinished
output, which each gemv program finishes for the K slice it loads.

Why: decode at batch 1 is bound by the number of kernels, not by bytes (an H200 runs ~19
kernels per layer, ~7 of them XLA glue of 1-1.6 us between Pallas kernels: benchmarks/NOTES.md,
run 14). Each source below removes XLA kernels without adding a launch:
  RmsNormX: the residual stream [M, K] with model.RMSNorm applied (stacked weight [L, K] at a
    traced layer). Each program reads its row whole once for the statistic (K * 2 bytes, from
    L2). Removes the norm's reduce and multiply kernels in front of q/k/v, the router and the
    MoE gate/up.
  SwigluX: the MoE gate/up gemv's float32 split-K partials [S, M, F]: silu(sum g) * sum u,
    rounded to the activation dtype. Removes the fusion between the two MoE gemvs.
  PlainX: x as it is.
Where they pay: a source that reduces over split partials does so in every K step, in series
with the step, and that costs more than the XLA kernel it saves (SwigluX with S > 1). So did
decode attention's split combine, in either form measured (a per-step reduction over the splits,
run 16; the splits as the MMA's x rows, run 24 in benchmarks/NOTES.md): it stays an XLA fusion.
kernels.X_LOADS says which the model uses, with the measurements.

Every source has the logical `shape` and `dtype` of the x it stands for, `reshape` to gemv's
[M, K] view (the only reshape the projections need), and `materialize()`: that x computed with
XLA ops, the reference the kernels are tested against and the fallback where no kernel applies.
In a kernel: `operands()` go in after gemv's groups; `prepare(refs, row)` runs once per program;
`load(refs, state, row, k0, bk)` -> float32 [bk], values of `dtype` (rounded where the
reference rounds).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_STATIC = dict(metadata=dict(static=True))


class _Source:
    """Shared by the sources: shape bookkeeping (subclasses define shape, dtype, k_dim, and
    _natural_shape() for a shape field left None)."""

    def __post_init__(self):
        if self.shape is None:
            object.__setattr__(self, "shape", self._natural_shape())

    def reshape(self, *shape):
        """The same x under another shape of as many elements; a 2-D view must be [M, K], K the
        axis the source finishes (the view gemv reads)."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else tuple(shape)
        if math.prod(shape) != math.prod(self.shape) or (len(shape) == 2 and shape[1] != self.k_dim):
            raise ValueError(f"{type(self).__name__} of shape {self.shape} (K={self.k_dim}) cannot be viewed "
                             f"as {shape}")
        return dataclasses.replace(self, shape=shape)

    def covered(self, bk: int) -> bool:
        """The kernel can load this source in K tiles of bk."""
        return True

    def prepare(self, refs, row):
        return None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PlainX(_Source):
    x: jax.Array

    @property
    def shape(self):
        return tuple(self.x.shape)

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def k_dim(self) -> int:
        return self.x.shape[-1]

    def reshape(self, *shape):
        return PlainX(self.x.reshape(*shape))

    def operands(self):
        return (self.x.reshape(-1, self.k_dim),)

    def materialize(self):
        return self.x

    def load(self, refs, state, row, k0, bk):
        return refs[0][row, pl.ds(k0, bk)].astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RmsNormX(_Source):
    """model.RMSNorm(x) with weight[layer]: normalize in float32, round to x's dtype, times the
    weight, rounded. x [..., K]; weight [L, K] (the stacked param); layer a traced int32."""

    x: jax.Array
    weight: jax.Array
    layer: jax.Array
    eps: float = dataclasses.field(default=1e-6, **_STATIC)
    shape: tuple = dataclasses.field(default=None, **_STATIC)

    def _natural_shape(self):
        return tuple(self.x.shape)

    @property
    def dtype(self):
        return jnp.result_type(self.weight.dtype, self.x.dtype)

    @property
    def k_dim(self) -> int:
        return self.x.shape[-1]

    def covered(self, bk: int) -> bool:
        """The row is loaded whole for its statistic: K a power of two (a Triton block)."""
        return self.k_dim & (self.k_dim - 1) == 0

    def operands(self):
        return (self.x.reshape(-1, self.k_dim), self.weight, jnp.reshape(jnp.asarray(self.layer, jnp.int32), (1,)))

    def materialize(self):
        xf = self.x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.weight[self.layer] * xf.astype(self.x.dtype)).reshape(self.shape)

    def prepare(self, refs, row):
        x_ref = refs[0]
        xr = x_ref[row, pl.ds(0, self.k_dim)].astype(jnp.float32)
        return jax.lax.rsqrt(jnp.sum(xr * xr) * (1.0 / self.k_dim) + self.eps)

    def load(self, refs, inv, row, k0, bk):
        x_ref, w_ref, layer_ref = refs
        xn = (x_ref[row, pl.ds(k0, bk)].astype(jnp.float32) * inv).astype(self.x.dtype).astype(jnp.float32)
        w = w_ref[layer_ref[0], pl.ds(k0, bk)].astype(jnp.float32)
        return (w * xn).astype(self.dtype).astype(jnp.float32)   # exact product of two bf16, rounded


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SwigluX(_Source):
    """silu(sum_s gate[s]) * sum_s up[s], rounded to `dtype`: gate, up [S, M, F] float32."""

    gate: jax.Array
    up: jax.Array
    dtype: object = dataclasses.field(default=jnp.bfloat16, **_STATIC)
    shape: tuple = dataclasses.field(default=None, **_STATIC)

    def _natural_shape(self):
        return tuple(self.gate.shape[1:])

    @property
    def k_dim(self) -> int:
        return self.gate.shape[2]

    def operands(self):
        return (self.gate, self.up)

    def materialize(self):
        y = jax.nn.silu(jnp.sum(self.gate, axis=0)) * jnp.sum(self.up, axis=0)
        return y.astype(self.dtype).reshape(self.shape)

    def load(self, refs, state, row, k0, bk):
        g_ref, u_ref = refs
        g = jnp.sum(g_ref[:, row, pl.ds(k0, bk)], axis=0)
        u = jnp.sum(u_ref[:, row, pl.ds(k0, bk)], axis=0)
        return (g * jax.nn.sigmoid(g) * u).astype(self.dtype).astype(jnp.float32)


def as_source(x):
    """An array -> PlainX; a source as it is."""
    return x if isinstance(x, _Source) else PlainX(x)


def materialize(x):
    """A source -> its x in XLA ops; an array as it is."""
    return x.materialize() if isinstance(x, _Source) else x

