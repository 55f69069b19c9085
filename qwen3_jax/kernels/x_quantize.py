"""W8A8's activation quantize in one kernel: x [M, K] -> (e4m3 [M, K], float32 scales [M, K / g]).

Why: in XLA, gemv.quantize_rows in front of a W8A8 grouped matmul is three kernels at a decode
batch (the groups' amax reduce, the scale's select, the divide-and-convert), and a norm in front
of it a fourth. Run 127's batch-64 HLO has such a chain at three places a layer, ~12 us of its
~21 us of XLA kernels (benchmarks/NOTES.md, "What is next (as of the nineteenth session)"): the
attention output before o_proj, the post-attention RMSNorm before the MoE's gate/up, the input
RMSNorm before q/k/v. Here one program per row loads it whole as [groups, group]; a
gemv_inputs source (RmsNormX) is finished in the loads, and rows past M (the matmul's row
padding) come out as zeros with scale 1, so XLA's pad goes too.

Numbers: quantize_rows' float32 ops on the same values (interpret mode: bit for bit; on a GPU
Triton's float32 divide may differ from XLA's in the last bit, which can move a value across an
e4m3 rounding boundary: one e4m3 step at most).

X_QUANTIZE: "kernel" or "xla" (quantize_rows); read at trace time. Run 136 (H200, 30B FP8 at
1k): the kernel took batch 8 from 6.455 to 6.299 ms and batch 64 from 12.577 to 12.190 ms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import interpret as _interpret
from .gemv import E4M3_MAX, quantize_rows
from .gemv_inputs import as_source, materialize

X_QUANTIZES = ("xla", "kernel")
X_QUANTIZE = "kernel"


def quantize_x(x_mk, group: int, rows: int | None = None):
    """x [M, K] (an array or a gemv_inputs source) -> (e4m3 [R, K], float32 scales [R, K // group]),
    R = rows (>= M; rows past M are zeros with scale 1, what a matmul's row padding needs) or M.
    By X_QUANTIZE: this module's kernel where it covers the shapes, else quantize_rows in XLA."""
    src = as_source(x_mk)
    m, k_dim = src.shape
    r = m if rows is None else rows
    if r < m:
        raise ValueError(f"quantize_x: rows={rows} is below x's {m} rows")
    if X_QUANTIZE == "kernel" and covered(src, group):
        return quantize_rows_kernel(src, group, r)
    xq, sx = quantize_rows(materialize(src), group)
    if r > m:
        xq, sx = jnp.pad(xq, ((0, r - m), (0, 0))), jnp.pad(sx, ((0, r - m), (0, 0)), constant_values=1.0)
    return xq, sx


def covered(src, group: int) -> bool:
    """The kernel handles this source and group: 2-D, K a power of two (the row is one Triton
    block) in power-of-two groups of at least 16, and a source it can load whole."""
    if len(src.shape) != 2:
        return False
    k_dim = src.shape[1]
    return group >= 16 and _pow2(group) and _pow2(k_dim) and k_dim >= group and src.covered(k_dim)


def _pow2(n: int) -> bool:
    return n & (n - 1) == 0


def quantize_rows_kernel(x_mk, group: int, rows: int | None = None, *, interpret=None):
    """The kernel itself (see quantize_x, which picks it): one program per output row."""
    src = as_source(x_mk)
    m, k_dim = src.shape
    r = m if rows is None else rows
    if not covered(src, group) or r < m:
        raise ValueError(f"quantize_rows_kernel: x {src.shape} in groups of {group} (rows {r}) is not covered; "
                         "use quantize_x, which falls back to XLA")
    return _quantize(src, group=group, rows=r, interpret=_interpret() if interpret is None else bool(interpret))


@functools.partial(jax.jit, static_argnames=("group", "rows", "interpret"))
def _quantize(src, *, group: int, rows: int, interpret: bool):
    m, k_dim = src.shape
    operands = src.operands()
    n_ops, n_groups = len(operands), k_dim // group

    def kernel(*refs):
        x_refs, (q_ref, s_ref) = refs[:n_ops], refs[n_ops:]
        row = pl.program_id(0)
        live = row < m
        x_row = jnp.minimum(row, m - 1)        # a padding row reads a real one and writes zeros
        state = src.prepare(x_refs, x_row)
        # The row whole as [groups, group]: one reduction and one store each for all groups (run
        # 133: a static loop over the groups, each with its own reduce and scalar scale store,
        # took 9-13 us a call at batch 64 and lost 0.8 ms a step to XLA's three kernels).
        v = src.load(x_refs, state, x_row, 0, k_dim).reshape(n_groups, group)
        amax = jnp.max(jnp.abs(v), axis=1)
        scale = jnp.where(live & (amax > 0), amax / E4M3_MAX, 1.0)
        q = jnp.where(live, v / scale[:, None], 0.0)
        q_ref[row, :] = q.reshape(k_dim).astype(jnp.float8_e4m3fn)
        s_ref[row, :] = scale

    return pl.pallas_call(
        kernel, grid=(rows,),
        out_shape=(jax.ShapeDtypeStruct((rows, k_dim), jnp.float8_e4m3fn),
                   jax.ShapeDtypeStruct((rows, n_groups), jnp.float32)),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name="qwen3_quantize_x",
    )(*operands)
