"""Grouped GEMV: each output row r is x[rows[r]] @ W[groups[r]], bf16 or block-FP8 weights.

The decode-time workhorse: at batch 1 the MoE FFN is 8 rows (one per routed expert), each
reading only its own expert. Two ways to do the arithmetic (static `mode`):
  "fma": CUDA-core FMA into a float32 [bk, bn] accumulator (one reduction at the end);
  "dot": tensor cores on a 16-row tile whose row 0 is x and rows 1..15 are zero (the MMA's
    minimum height; the wasted FLOPs are free in a memory-bound kernel, and Triton pipelines
    the loads that feed a dot).
FP8 weights are converted in registers, never materialized. Block scales: layout "k" scales
the product of each K block per column; layout "n" folds the per-row scale into x (in float32
for "fma"; for "dot", x * scale is rounded to x's dtype before the MMA).

Shapes (G groups, K in, N out, R output rows, S = split_k):
  x [M, K] (any float), rows [R] int32 in [0, M), groups [R] int32 in [-1, G) (-1: row is zeros,
  no weight read), weights: 1 or 2 arrays [G, K, N] of one dtype (2 = gate and up, sharing x),
  scales: None or one float32 array per weight:
    layout "k": [G, ceil(K/block), N]  (K in blocks, N per element; gate/up, q/k/v)
    layout "n": [G, K, ceil(N/block)]  (K per element, N in blocks; down, o_proj)
  -> one float32 [S, R, N] per weight: partial sums over S slices of K (sum them).

Numerics: float32 products of the exactly converted weight (FP8 -> f32, times its f32 scale)
and float32 activations, float32 accumulation.

convert="bits" turns e4m3 into float32 with integer ops and one select (fp8_bits_to_f32)
instead of the hardware conversion, whose throughput (16/clock/SM) is close to what a
full-bandwidth FP8 stream needs. Exact for every finite e4m3 value, subnormals included.
convert="f16" (mode "dot" only) converts e4m3 to float16, exactly, and runs the MMA in float16
with x rounded to float16 (11 significant bits, more than bf16's 8; range +-65504).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import interpret as _interpret


def fp8_bits_to_f32(w8):
    """float8_e4m3fn -> float32, exactly, by moving bits: e4m3's 4 exponent + 3 mantissa bits
    go under float32's exponent with the bias difference (127 - 7) added, which is right for
    normal values; a subnormal (exponent 0, value m * 2**-9) then reads (1 + m/8) * 2**-7, so
    it is mapped back with 2 * v - 2**-6. The sign bit is OR-ed in last. NaN is not kept."""
    u = jax.lax.bitcast_convert_type(w8, jnp.uint8).astype(jnp.uint32)
    mag = jax.lax.bitcast_convert_type(((u & 0x7F) << 20) + (120 << 23), jnp.float32)
    mag = jnp.where((u & 0x78) == 0, 2.0 * mag - 2.0 ** -6, mag)
    bits = jax.lax.bitcast_convert_type(mag, jnp.uint32) | ((u & 0x80) << 24)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


@functools.partial(jax.jit, static_argnames=("layout", "block", "bn", "bk", "split_k", "num_warps",
                                             "num_stages", "acc2d", "convert", "mode", "interpret"))
def gemv(x_mk, rows_r, groups_r, weights, scales=None, *, layout="k", block=128, bn=64, bk=128,
         split_k=1, num_warps=4, num_stages=3, acc2d=True, convert="cast", mode="fma", interpret=None):
    weights = tuple(weights)
    scales = tuple(scales) if scales is not None else ()
    g_count, k_dim, n_dim = weights[0].shape
    fp8 = len(scales) > 0
    _check(k_dim, n_dim, bn, bk, split_k, fp8, layout, block)
    steps = k_dim // (bk * split_k)
    nw = len(weights)
    bits = fp8 and convert == "bits" and mode == "fma"
    cdt = x_mk.dtype if x_mk.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    if mode == "dot":
        if fp8 and convert == "f16":
            cdt = jnp.float16
        return _gemv_dot(x_mk, rows_r, groups_r, weights, scales, layout, block, bn, bk, split_k,
                         num_warps, num_stages, cdt, interpret)

    def kernel(rows_ref, groups_ref, x_ref, *refs):
        w_refs, s_refs, o_refs = refs[:nw], refs[nw:nw + len(scales)], refs[nw + len(scales):]
        r, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        g = groups_ref[r]
        row = rows_ref[r]
        n0 = pl.multiple_of(j * bn, bn)

        @pl.when(g >= 0)
        def _compute():
            def body(t, accs):
                k0 = pl.multiple_of((s * steps + t) * bk, bk)
                xk = x_ref[row, pl.ds(k0, bk)].astype(jnp.float32)
                out = []
                for i, (w_ref, acc) in enumerate(zip(w_refs, accs)):
                    w = w_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)]
                    w = fp8_bits_to_f32(w) if bits else w.astype(jnp.float32)
                    xs = xk
                    if fp8 and layout == "k":
                        w = w * s_refs[i][g, k0 // block, pl.ds(n0, bn)][None, :]
                    elif fp8:
                        xs = xk * s_refs[i][g, pl.ds(k0, bk), n0 // block]
                    prod = w * xs[:, None]
                    out.append(acc + prod if acc2d else acc + jnp.sum(prod, axis=0))
                return tuple(out)

            shape = (bk, bn) if acc2d else (bn,)
            accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros(shape, jnp.float32) for _ in w_refs))
            for o_ref, acc in zip(o_refs, accs):
                o_ref[s, r, pl.ds(n0, bn)] = jnp.sum(acc, axis=0) if acc2d else acc

        @pl.when(g < 0)
        def _zeros():
            _write_zeros(o_refs, s, r, n0, bn)

    return _launch(kernel, "qwen3_gemv", x_mk, rows_r, groups_r, weights, scales, bn, split_k, num_warps,
                   num_stages, interpret)


def _gemv_dot(x_mk, rows_r, groups_r, weights, scales, layout, block, bn, bk, split_k, num_warps,
              num_stages, cdt, interpret):
    """mode="dot": the same contract as gemv, tensor cores on a zero-padded 16-row tile."""
    g_count, k_dim, n_dim = weights[0].shape
    fp8 = len(scales) > 0
    steps = k_dim // (bk * split_k)
    nw, ns = len(weights), len(scales)
    # f16 MMA (convert="f16": e4m3 -> f16 is one packed instruction per two values): layout "n"
    # folds a per-element scale (~1e-4) into x, which would sit in f16's subnormal range; a
    # power-of-two pre-scale keeps it normal and is divided out of the float32 product exactly.
    pre = 1024.0 if fp8 and cdt == jnp.float16 and x_mk.dtype != jnp.float16 else 1.0

    def kernel(rows_ref, groups_ref, x_ref, *refs):
        w_refs, s_refs, o_refs = refs[:nw], refs[nw:nw + ns], refs[nw + ns:]
        r, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        g = groups_ref[r]
        row = rows_ref[r]
        n0 = pl.multiple_of(j * bn, bn)
        first = jax.lax.broadcasted_iota(jnp.int32, (16, bk), 0) == 0

        @pl.when(g >= 0)
        def _compute():
            def body(t, accs):
                k0 = pl.multiple_of((s * steps + t) * bk, bk)
                xk = x_ref[row, pl.ds(k0, bk)].astype(jnp.float32)
                out = []
                for i, (w_ref, acc) in enumerate(zip(w_refs, accs)):
                    w = w_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)].astype(cdt)
                    xs = xk
                    if fp8 and layout == "n":
                        xs = xk * (s_refs[i][g, pl.ds(k0, bk), n0 // block] * pre)
                    x16 = jnp.where(first, jnp.broadcast_to(xs[None, :], (16, bk)), 0.0).astype(cdt)
                    part = jnp.dot(x16, w, preferred_element_type=jnp.float32)
                    if fp8 and layout == "k":
                        part = part * s_refs[i][g, k0 // block, pl.ds(n0, bn)][None, :]
                    elif fp8:
                        part = part * (1.0 / pre)
                    out.append(acc + part)
                return tuple(out)

            accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((16, bn), jnp.float32) for _ in w_refs))
            for o_ref, acc in zip(o_refs, accs):
                o_ref[s, r, pl.ds(n0, bn)] = jnp.sum(acc, axis=0)   # rows 1..15 are exact zeros

        @pl.when(g < 0)
        def _zeros():
            _write_zeros(o_refs, s, r, n0, bn)

    return _launch(kernel, "qwen3_gemv_dot", x_mk, rows_r, groups_r, weights, scales, bn, split_k, num_warps,
                   num_stages, interpret)


def _write_zeros(o_refs, s, r, n0, bn):
    """A row routed nowhere (group < 0) still owns its output tile: write zeros."""
    for o_ref in o_refs:
        o_ref[s, r, pl.ds(n0, bn)] = jnp.zeros((bn,), jnp.float32)


def _launch(kernel, name, x_mk, rows_r, groups_r, weights, scales, bn, split_k, num_warps, num_stages,
            interpret):
    """Grid (rows, N / bn, split_k); outputs [split_k, rows, N] float32 per weight."""
    r_count, n_dim = rows_r.shape[0], weights[0].shape[2]
    out_shape = tuple(jax.ShapeDtypeStruct((split_k, r_count, n_dim), jnp.float32) for _ in weights)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(r_count, n_dim // bn, split_k),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=_interpret() if interpret is None else interpret,
        name=name + "_fp8" if scales else name,
    )(rows_r.astype(jnp.int32), groups_r.astype(jnp.int32), x_mk, *weights, *scales)


def _check(k_dim, n_dim, bn, bk, split_k, fp8, layout, block):
    if n_dim % bn or k_dim % (bk * split_k):
        raise ValueError(f"gemv tiles bn={bn}, bk={bk}, split_k={split_k} do not divide K={k_dim}, "
                         f"N={n_dim}; pick tiles with kernels.pick_tile")
    if fp8 and layout == "k" and block % bk:
        raise ValueError(f"FP8 layout 'k' needs bk={bk} to divide the scale block {block}")
    if fp8 and layout == "n" and block % bn:
        raise ValueError(f"FP8 layout 'n' needs bn={bn} to divide the scale block {block}")
    if layout not in ("k", "n"):
        raise ValueError(f"layout must be 'k' or 'n', got {layout!r}")


# Defaults by weight kind, overridable in-process (serve.bench --sweep installs the fastest
# measured; benchmarks/NOTES.md has the numbers). target_programs: split K until rows x column
# tiles x splits reaches it, so small batches still put every SM to work.
# Measured on an H100 (run 2, one MoE layer of 30B-A3B at batch 1): bf16 "dot", bn=128, 8 warps
# 63 us (other variants 66-86 us); FP8 "fma", bk=64, bn=128 58-62 us (the "bits" conversion 73 us).
# Run 8 (2026-11-28, benchmarks/NOTES.md): bf16 "dot" with bk=64 60.2 us (default 65.8 us); FP8
# "dot" with convert="f16" 57.3 us, the fastest FP8 variant, and the whole FP8 decode step at
# batch 1 went 4.95 -> 4.39 ms with it.
GEMV_DEFAULTS = {
    "bf16": dict(bn=128, bk=64, num_warps=8, num_stages=3, acc2d=True, convert="cast", mode="dot",
                 target_programs=264, max_split=8),
    "fp8": dict(bn=128, bk=64, num_warps=4, num_stages=3, acc2d=True, convert="f16", mode="dot",
                target_programs=264, max_split=8),
}


def gemv_tiles(k_dim: int, n_dim: int, rows: int, fp8: bool, layout: str, block: int, **override):
    """gemv keyword arguments for this shape: defaults (GEMV_DEFAULTS + override) shrunk until
    they divide the shape, then K split for enough programs. None if nothing divides."""
    from . import pick_tile
    cfg = {**GEMV_DEFAULTS["fp8" if fp8 else "bf16"], **override}
    bn, bk = cfg["bn"], cfg["bk"]
    bn_t = pick_tile(n_dim, min(bn, block) if fp8 and layout == "n" else bn)
    bk_t = pick_tile(k_dim, min(bk, block) if fp8 and layout == "k" else bk)
    if bn_t is None or bk_t is None:
        return None
    split = 1
    while (rows * (n_dim // bn_t) * split < cfg["target_programs"] and split * 2 <= cfg["max_split"]
           and k_dim % (bk_t * split * 2) == 0):
        split *= 2
    return dict(bn=bn_t, bk=bk_t, split_k=split, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                acc2d=cfg["acc2d"], convert=cfg["convert"], mode=cfg["mode"])
