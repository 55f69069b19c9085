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

residual_norm_quantize is the same kernel at the MoE's input on the fused decode path, where
XLA still summed o_proj's split-K partials into the residual (one kernel, its output read back
by this one): it takes the partials and the old residual, writes the new residual for the
layer's last add, and quantizes its RMSNorm. RESIDUAL says whether the model uses it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import interpret as _interpret
from .gemv import E4M3_MAX, quantize_rows
from .gemv_inputs import ResidualX, RmsNormX, as_source, materialize

X_QUANTIZES = ("xla", "kernel")
X_QUANTIZE = "kernel"
# "kernel": the model sums o_proj's partials into the residual in residual_norm_quantize where
# the MoE quantizes its x (W8A8 grouped matmuls; needs X_QUANTIZE "kernel"); "xla": XLA sums.
# Run 141 (H200, 30B FP8 at 1k, one process): level at batch 16-256 (64: 12.178 xla against
# 12.199 kernel; every batch within 0.2%). One program a row reads that row's 8 float32 partials
# (64 KiB at batch 64) with 4 warps, where XLA's fusion spreads them over the whole card: the
# launch saved is spent there. So XLA's stays the default.
RESIDUALS = ("xla", "kernel")
RESIDUAL = "xla"


def quantize_x(x_mk, group: int, rows: int | None = None):
    """x [M, K] (an array or a gemv_inputs source) -> (e4m3 [R, K], float32 scales [R, K // group]),
    R = rows (>= M; rows past M are zeros with scale 1, what a matmul's row padding needs) or M.
    By X_QUANTIZE: this module's kernel where it covers the shapes, else quantize_rows in XLA."""
    src = as_source(x_mk)
    m, k_dim = src.shape
    r = m if rows is None else rows
    if r < m:
        raise ValueError(f"quantize_x: rows={rows} is below x's {m} rows")
    if isinstance(src, RmsNormX) and src.prequantized is not None and src.group == group:
        return _pad_rows(*src.prequantized, r)
    if X_QUANTIZE == "kernel" and covered(src, group):
        return quantize_rows_kernel(src, group, r)
    return _pad_rows(*quantize_rows(materialize(src), group), r)


def _pad_rows(xq, sx, rows: int):
    """Quantized rows padded to `rows` as the kernel pads them: zeros with scale 1."""
    pad = rows - xq.shape[0]
    if pad == 0:
        return xq, sx
    return jnp.pad(xq, ((0, pad), (0, 0))), jnp.pad(sx, ((0, pad), (0, 0)), constant_values=1.0)


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


def _store_quantized(v, row, live, n_groups: int, group: int, q_ref, s_ref):
    """A row's values (float32 [K]) -> e4m3 values and float32 scales per group at `row`
    (zeros with scale 1 where not live: a padding row). The row whole as [groups, group]: one
    reduction and one store each for all groups (run 133: a static loop over the groups, each
    with its own reduce and scalar scale store, took 9-13 us a call at batch 64 and lost 0.8 ms
    a step to XLA's three kernels)."""
    v = v.reshape(n_groups, group)
    amax = jnp.max(jnp.abs(v), axis=1)
    scale = jnp.where(live & (amax > 0), amax / E4M3_MAX, 1.0)
    q = jnp.where(live, v / scale[:, None], 0.0)
    q_ref[row, :] = q.reshape(n_groups * group).astype(jnp.float8_e4m3fn)
    s_ref[row, :] = scale


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
        _store_quantized(src.load(x_refs, state, x_row, 0, k_dim), row, live, n_groups, group, q_ref, s_ref)

    return pl.pallas_call(
        kernel, grid=(rows,),
        out_shape=(jax.ShapeDtypeStruct((rows, k_dim), jnp.float8_e4m3fn),
                   jax.ShapeDtypeStruct((rows, n_groups), jnp.float32)),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name="qwen3_quantize_x",
    )(*operands)


def residual_norm_quantize(res: ResidualX, weight, layer, eps: float, group: int, *, interpret=None):
    """The post-attention half of a decode layer's glue in one kernel, one program per row:
    h = res (x + the sum of o_proj's partials, [M, K] in x's dtype), then RMSNorm(h) with
    weight[layer] quantized in groups of `group`. -> (h, e4m3 [M, K], float32 scales
    [M, K / group]); each exactly as res.materialize(), RmsNormX and quantize_rows give them
    (on a GPU up to Triton's float32 rounding: see the module doc). None where not covered."""
    m, k_dim = res.x.reshape(-1, res.k_dim).shape
    s = res.partials.shape[0]
    norm = RmsNormX(res.x.reshape(m, k_dim), weight, jnp.asarray(layer, jnp.int32), eps)
    if not (covered(norm, group) and _pow2(s) and res.partials.shape[1:] == (m, k_dim)):
        return None
    return _residual_quantize(norm, res.partials, group=group,
                              interpret=_interpret() if interpret is None else bool(interpret))


@functools.partial(jax.jit, static_argnames=("group", "interpret"))
def _residual_quantize(norm: RmsNormX, partials, *, group: int, interpret: bool):
    m, k_dim = norm.x.shape
    n_groups, dt = k_dim // group, norm.x.dtype

    def kernel(x_ref, p_ref, w_ref, layer_ref, h_ref, q_ref, s_ref):
        row = pl.program_id(0)
        y = jnp.sum(p_ref[:, row, :], axis=0).astype(dt).astype(jnp.float32)
        h = (x_ref[row, :].astype(jnp.float32) + y).astype(dt)
        h_ref[row, :] = h
        hf = h.astype(jnp.float32)
        v = norm.apply(hf, norm.statistic(hf), w_ref[layer_ref[0], :].astype(jnp.float32))
        _store_quantized(v, row, True, n_groups, group, q_ref, s_ref)

    return pl.pallas_call(
        kernel, grid=(m,),
        out_shape=(jax.ShapeDtypeStruct((m, k_dim), dt),
                   jax.ShapeDtypeStruct((m, k_dim), jnp.float8_e4m3fn),
                   jax.ShapeDtypeStruct((m, n_groups), jnp.float32)),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name="qwen3_residual_quantize_x",
    )(norm.x, partials, norm.weight, norm.layer.reshape(1))
