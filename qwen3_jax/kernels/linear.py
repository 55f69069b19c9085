"""FP8 weight-only projections with the block dequantize fused: x @ dequantize(W8, scale).

XLA computes dequantize-then-dot by writing the whole bf16 weight first (2x slower than bf16 on
an H100); here the FP8 bytes are read once. Few rows (decode) go to gemv, many rows (prefill)
to grouped_matmul with a single group. Weights are read in place from the stacked [L, ...]
params at layer `layer` (a traced index), like the MoE kernels.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from .gemv import gemv, gemv_tiles
from .grouped_matmul import grouped_matmul, matmul_tiles

GEMV_MAX_ROWS = 16


def _parse(eq: str):
    ins, out = eq.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    contracted = [c for c in ws if c in xs and c not in out]
    return xs, ws, out, contracted


def fp8_einsum(eq: str, x, w8, scale, block_axis: int, block: int, layer=None):
    """einsum(eq, x, dequantize(w8[layer], scale[layer])) -> x's dtype, or None when the
    equation or shapes are not of the supported form (the caller then uses XLA).

    Supported: the weight's contracted letters lead its subscript and end x's (q/k/v:
    'btd,dhq->bthq'; o_proj: 'bthq,hqd->btd'); the block axis (per-layer weight axis) is the
    contracted axis (layout 'k', one contracted dim) or the last axis (layout 'n').
    w8 / scale are [L, ...] when `layer` is given, else per-layer.
    """
    xs, ws, out, contracted = _parse(eq)
    nc = len(contracted)
    if ws[:nc] != "".join(contracted) or xs[-nc:] != "".join(contracted) or out != xs[:-nc] + ws[nc:]:
        return None
    stacked = layer is not None
    wshape = w8.shape[1:] if stacked else w8.shape
    k_dim, n_dim = math.prod(wshape[:nc]), math.prod(wshape[nc:])
    if nc == 1 and block_axis == 0:
        layout = "k"
    elif block_axis == len(wshape) - 1 and block_axis >= nc:
        layout = "n"
    else:
        return None
    lead = x.shape[:-nc]
    m = math.prod(lead)
    x2 = x.reshape(m, k_dim)
    w3 = w8.reshape(-1, k_dim, n_dim)
    s3 = scale.reshape(w3.shape[0], -1, n_dim) if layout == "k" else scale.reshape(w3.shape[0], k_dim, -1)
    group = jnp.asarray(layer if stacked else 0, jnp.int32)
    y = fp8_linear(x2, w3, s3, layout, block, group)
    if y is None:
        return None
    return y.reshape(*lead, *wshape[nc:]).astype(x.dtype)


def fp8_linear(x_mk, w8_gkn, scale, layout: str, block: int, group):
    """x [M, K] @ dequantize(w8[group]) -> [M, N] float32, or None if no tiling divides."""
    m, k_dim = x_mk.shape
    n_dim = w8_gkn.shape[2]
    fp8 = True
    if m <= GEMV_MAX_ROWS:
        t = gemv_tiles(k_dim, n_dim, m, fp8, layout, block)
        if t is None:
            return None
        rows = jnp.arange(m, dtype=jnp.int32)
        (y,) = gemv(x_mk, rows, jnp.full((m,), group, jnp.int32), (w8_gkn,), (scale,),
                    layout=layout, block=block, **t)
        return jnp.sum(y, axis=0)
    bm = 16
    while bm < 128 and bm < m:
        bm *= 2
    t = matmul_tiles(k_dim, n_dim, bm, fp8, layout, block)
    if t is None:
        return None
    nb = -(-m // bm)
    xp = jnp.pad(x_mk, ((0, nb * bm - m), (0, 0)))
    y = grouped_matmul(xp, jnp.full((nb,), group, jnp.int32), (w8_gkn,), (scale,), bm=bm,
                       layout=layout, block=block, **t)
    return y[:m]
