"""The decode step's attention prologue in one kernel: q/k RMSNorm over head_dim, RoPE, and q
padded per kv head to the 16 rows the decode-attention kernel multiplies.

Why: at batch 1 the step is bound by the number of small kernels, not by bytes (an H100 runs
~27 XLA kernels of 1-3 us per layer: benchmarks/NOTES.md, run 4). Between the q/k/v
projections and decode attention XLA runs ~6 of them (two norm reductions, their scaling, the
two RoPE concatenates, the pad of q to 16 rows); here it is one launch, and the stacked [L, Q]
norm weights are read in place at the traced layer index (no per-layer slice).

  grid (B, K, P); program (b, h, p): query heads h*G + p*G/P .. of sequence b (G/P of them),
  and for p = 0 also kv head h (k normed and rotated, v, the padding rows of q16).
  rotate_half(x) = concat(-x[Q/2:], x[:Q/2]) is done on the two halves loaded separately
  (Triton has no concatenate), so out_lo = n_lo*cos_lo - n_hi*sin_lo, out_hi = n_hi*cos_hi +
  n_lo*sin_hi, with the RMS taken over both halves.

qk_norm_rope_partials takes q and k as the projections' float32 split-K partial sums
(kernels.linear_einsum(partials=True)) and sums them here, rounding the sum to the activation
dtype as linear_einsum would: XLA's two reduce kernels between the projections and this one go.

Numerics as model.RMSNorm + model.apply_rope in the activation dtype (bf16): normalize in
float32, round to the activation dtype, multiply by the weight and round, then each RoPE
product and their sum rounded, i.e. every op of the reference rounds where its result is
bf16. Agreement is to bf16 precision (XLA may keep excess precision between fused ops).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import interpret as _interpret

ROWS = 16   # the decode-attention kernel's query tile: G query heads padded to 16 rows
# Programs the grid aims for. The grid is (B, K, P): P programs share the G query heads of a kv
# head (program 0 also does k, v and the padding rows). With P = 1 a batch-1 step of 30B-A3B ran
# 4 programs, each summing 8 split-K partials of 8 heads from L2, ~4 us per layer (H200 profile,
# benchmarks/NOTES.md run 19).
TARGET_PROGRAMS = 264


def _parts(b: int, k: int, g: int) -> int:
    """Programs per (row, kv head): a power of two dividing G, up to TARGET_PROGRAMS in all."""
    parts = 1
    while parts * 2 <= g and b * k * parts * 2 <= TARGET_PROGRAMS:
        parts *= 2
    return parts


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def covered(heads: int, kv_heads: int, head_dim: int) -> bool:
    """qk_norm_rope handles these shapes: G = H/K a power of two <= 16 and head_dim/2 a power
    of two >= 16 (Triton blocks are powers of two; the halves are RoPE's rotation)."""
    if kv_heads <= 0 or heads % kv_heads:
        return False
    g = heads // kv_heads
    return _pow2(g) and g <= ROWS and head_dim % 2 == 0 and _pow2(head_dim // 2) and head_dim // 2 >= 16


def qk_norm_rope(q_bhq, k_bkq, q_norm_lq, k_norm_lq, layer, cos_bq, sin_bq, eps: float, *, interpret=None,
                 num_warps: int = 2):
    """q [B, H, Q], k [B, K, Q] (projections of one new token per row); q_norm / k_norm [L, Q]
    stacked norm weights, read at `layer` (int, may be traced); cos, sin [B, Q] (model.rope_tables
    at the row's position) -> (q16 [B, K, 16, Q] in q's dtype, k_rot [B, K, Q] in k's dtype).

    Row r < G of q16[b, h] is query head h*G + r normed and rotated; rows G..15 are zero.
    None when the shapes are not covered (see `covered`): the caller keeps the XLA path."""
    b, h, qd = q_bhq.shape
    kb, k, kq = k_bkq.shape
    if (kb, kq) != (b, qd) or not covered(h, k, qd):
        return None
    if q_norm_lq.ndim != 2 or q_norm_lq.shape[1] != qd or k_norm_lq.shape != q_norm_lq.shape:
        return None
    if cos_bq.shape != (b, qd) or sin_bq.shape != (b, qd):
        return None
    return _launch(q_bhq, k_bkq, q_norm_lq, k_norm_lq, layer, cos_bq, sin_bq, eps, None, interpret, num_warps)


def qk_norm_rope_partials(q_sbn, k_sbn, q_norm_lq, k_norm_lq, layer, cos_bq, sin_bq, eps: float, *, heads: int,
                          dtype, interpret=None, num_warps: int = 2):
    """qk_norm_rope on the projections before their split-K reduction: q [S, B, H*Q] and
    k [S, B, K*Q] float32 partial sums (linear_einsum(..., partials=True); S may differ between
    them), `heads` = H, `dtype` the activation dtype. Each row's sum over S is rounded to
    `dtype` first (what linear_einsum returns), so the result equals qk_norm_rope on the summed
    projections up to float32 summation order. -> (q16 [B, K, 16, Q], k_rot [B, K, Q]) in
    `dtype`, or None when not covered."""
    heads4 = _partials_by_head(q_sbn, k_sbn, q_norm_lq, k_norm_lq, cos_bq, sin_bq, heads)
    if heads4 is None:
        return None
    return _launch(*heads4, q_norm_lq, k_norm_lq, layer, cos_bq, sin_bq, eps, dtype, interpret, num_warps)


def _partials_by_head(q_sbn, k_sbn, q_norm_lq, k_norm_lq, cos_bq, sin_bq, heads: int):
    """q [S, B, H*Q], k [S', B, K*Q] float32 partials -> (q [S, B, H, Q], k [S', B, K, Q]) (free
    reshapes), or None when the prologue does not cover them."""
    qd = q_norm_lq.shape[-1]
    if q_sbn.ndim != 3 or k_sbn.ndim != 3 or q_sbn.shape[1] != k_sbn.shape[1] or qd <= 0:
        return None
    if q_sbn.dtype != jnp.float32 or k_sbn.dtype != jnp.float32:
        return None
    if q_sbn.shape[2] != heads * qd or k_sbn.shape[2] % qd:
        return None
    s_q, b, _ = q_sbn.shape
    kv = k_sbn.shape[2] // qd
    if not covered(heads, kv, qd) or q_norm_lq.ndim != 2 or k_norm_lq.shape != q_norm_lq.shape:
        return None
    if cos_bq.shape != (b, qd) or sin_bq.shape != (b, qd):
        return None
    return q_sbn.reshape(s_q, b, heads, qd), k_sbn.reshape(k_sbn.shape[0], b, kv, qd)


def qk_norm_rope_write_cache(q_sbn, k_sbn, v_sbn, q_norm_lq, k_norm_lq, layer, cos_bq, sin_bq, eps: float,
                             k_all, v_all, rows_b, positions_b, *, heads: int, dtype, interpret=None,
                             num_warps: int = 2):
    """qk_norm_rope_partials that also writes the new K/V into the cache: v [S, B, K*Q] float32
    partial sums like k; k_all, v_all [L, slots, S_max, K, Q] updated in place (aliased) at
    [layer, rows[b], positions[b]] (rows None: row b is slot b; a position outside the cache is
    dropped, as the XLA scatter's mode="drop"). -> (q16 [B, K, 16, Q], k_all, v_all, counts [B, K]
    int32 zeros: decode attention's merge counters, written here so that no zeros kernel runs
    per layer), or None when not covered. Saves XLA's v reduction and the two cache-write kernel
    pairs per layer."""
    qd = q_norm_lq.shape[-1]
    if (v_sbn.ndim != 3 or v_sbn.dtype != jnp.float32 or k_all.ndim != 5 or v_all.shape != k_all.shape
            or k_all.dtype != jnp.dtype(dtype) or v_sbn.shape[1:] != k_sbn.shape[1:]):
        return None
    kv = k_sbn.shape[2] // qd if qd else 0
    if k_all.shape[3:] != (kv, qd) or positions_b.shape != (k_sbn.shape[1],):
        return None
    if rows_b is not None and rows_b.shape != positions_b.shape:
        return None
    heads4 = _partials_by_head(q_sbn, k_sbn, q_norm_lq, k_norm_lq, cos_bq, sin_bq, heads)
    if heads4 is None:
        return None
    q4, k4 = heads4
    v4 = v_sbn.reshape(v_sbn.shape[0], *k4.shape[1:])
    return _launch(q4, k4, q_norm_lq, k_norm_lq, layer, cos_bq, sin_bq, eps, dtype, interpret, num_warps,
                   cache=(v4, k_all, v_all, rows_b, positions_b))


def _launch(q_in, k_in, q_norm_lq, k_norm_lq, layer, cos_bq, sin_bq, eps, dtype, interpret, num_warps, cache=None):
    """_qk_norm_rope with the static settings resolved here: the grid's parts from the shapes and
    TARGET_PROGRAMS (read per call, so a changed target compiles anew), interpret mode off a GPU."""
    b, h, _ = q_in.shape[-3:]
    k = k_in.shape[-2]
    return _qk_norm_rope(q_in, k_in, q_norm_lq, k_norm_lq, jnp.asarray(layer, jnp.int32), cos_bq, sin_bq, cache,
                         eps=float(eps), dtype=None if dtype is None else jnp.dtype(dtype),
                         interpret=_interpret() if interpret is None else bool(interpret), num_warps=num_warps,
                         parts=_parts(b, k, h // k))


def unpad_q16(q16_bkrq, heads: int):
    """q16 [B, K, 16, Q] -> q [B, H, Q] (for a caller whose attention then stays with XLA)."""
    b, k, _, qd = q16_bkrq.shape
    return q16_bkrq[:, :, :heads // k].reshape(b, heads, qd)


def sum_partials(ref, dt, *idx, mask=None):
    """In a kernel: ref[:, *idx] summed over the leading split axis S (float32 split-K partials,
    in order s = 0..S-1; S is small, so unrolled), rounded to dt (what linear_einsum returns),
    as float32. mask: elements where it is False are not loaded and read 0."""
    def part(si):
        if mask is None:
            return ref[(si, *idx)]
        return plt.load(ref.at[(jnp.int32(si), *idx)], mask=mask, other=0.0)

    acc = part(0)
    for si in range(1, ref.shape[0]):
        acc = acc + part(si)
    return acc.astype(dt).astype(jnp.float32)


def norm_rope_halves(x_lo, x_hi, w_lo, w_hi, c_lo, c_hi, s_lo, s_hi, dt, eps: float):
    """In a kernel: RMSNorm over head_dim then RoPE, on the two halves of Q loaded apart (Triton
    has no concatenate). x halves [..., Q/2] float32, w the norm weight's halves, c/s the
    cos/sin halves -> rotated halves in dt, each op rounded to dt as model.RMSNorm +
    model.apply_rope round."""
    f32 = jnp.float32
    qd = 2 * x_lo.shape[-1]
    ss = jnp.sum(x_lo * x_lo, axis=-1, keepdims=True) + jnp.sum(x_hi * x_hi, axis=-1, keepdims=True)
    r = jax.lax.rsqrt(ss / qd + eps)

    def scaled(x, w):   # RMSNorm: float32 normalize, round, times the weight, round
        return (w.astype(f32) * (x * r).astype(dt).astype(f32)).astype(dt).astype(f32)

    def rd(x):
        return x.astype(dt).astype(f32)

    n_lo, n_hi = scaled(x_lo, w_lo), scaled(x_hi, w_hi)
    c_lo, c_hi, s_lo, s_hi = (v.astype(f32) for v in (c_lo, c_hi, s_lo, s_hi))
    out_lo = rd(n_lo * c_lo) + rd(-n_hi * s_lo)
    out_hi = rd(n_hi * c_hi) + rd(n_lo * s_hi)
    return out_lo.astype(dt), out_hi.astype(dt)


@functools.partial(jax.jit, static_argnames=("eps", "dtype", "interpret", "num_warps", "parts"))
def _qk_norm_rope(q_in, k_in, q_norm_lq, k_norm_lq, layer, cos_bq, sin_bq, cache=None, *, eps, dtype, interpret,
                  num_warps, parts=1):
    """q_in [B, H, Q] and k_in [B, K, Q] (dtype None: their own dtypes), or float32 partial sums
    q_in [Sq, B, H, Q] and k_in [Sk, B, K, Q] summed here and rounded to `dtype`. cache: None, or
    (v partials [Sv, B, K, Q], k_all, v_all, rows [B] or None, positions [B]) to write K/V into
    the cache (aliased) instead of returning k_rot, and zeros [B, K] int32 (see
    qk_norm_rope_write_cache). parts: programs per (row, kv head), dividing G."""
    summed = dtype is not None
    write = cache is not None
    b, h, qd = q_in.shape[-3:]
    k = k_in.shape[-2]
    g = h // k
    gp = g // parts   # query heads per program
    half = qd // 2
    qdt, kdt = (dtype, dtype) if summed else (q_in.dtype, k_in.dtype)
    lo, up = pl.ds(0, half), pl.ds(half, half)   # the two halves of Q
    f32 = jnp.float32

    def load(ref, dt, *idx):
        return sum_partials(ref, dt, *idx) if summed else ref[idx].astype(f32)

    norm_rope = functools.partial(norm_rope_halves, eps=eps)

    def kernel(*refs):
        if write:
            (layer_ref, q_ref, k_ref, qw_ref, kw_ref, cos_ref, sin_ref, v_ref, *rows_ref, pos_ref, _, _,
             q16_ref, kc_ref, vc_ref, count_ref) = refs
        else:
            layer_ref, q_ref, k_ref, qw_ref, kw_ref, cos_ref, sin_ref, q16_ref, krot_ref = refs
        bi, kh, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        li = layer_ref[0]
        c_lo, c_hi = cos_ref[bi, lo], cos_ref[bi, up]                       # [Q/2]
        s_lo, s_hi = sin_ref[bi, lo], sin_ref[bi, up]

        rows = pl.ds(kh * g + pi * gp, gp)                                  # this program's query heads
        q_lo, q_hi = norm_rope(load(q_ref, qdt, bi, rows, lo), load(q_ref, qdt, bi, rows, up),   # [G/P, Q/2]
                               qw_ref[li, lo][None, :], qw_ref[li, up][None, :],
                               c_lo[None, :], c_hi[None, :], s_lo[None, :], s_hi[None, :], qdt)
        q16_ref[bi, kh, pl.ds(pi * gp, gp), lo] = q_lo
        q16_ref[bi, kh, pl.ds(pi * gp, gp), up] = q_hi

        @pl.when(pi == 0)
        def _first():   # the padding rows, k and v: once per (row, kv head)
            # Zero rows G..15 in power-of-two runs G, 2G, .., 8 (Triton stores power-of-two
            # blocks; disjoint from the query rows, so no two stores touch one element).
            r0 = g
            while r0 < ROWS:
                q16_ref[bi, kh, pl.ds(r0, r0), :] = jnp.zeros((r0, qd), qdt)
                r0 *= 2

            k_lo, k_hi = norm_rope(load(k_ref, kdt, bi, kh, lo), load(k_ref, kdt, bi, kh, up),     # [Q/2]
                                   kw_ref[li, lo], kw_ref[li, up], c_lo, c_hi, s_lo, s_hi, kdt)
            if not write:
                krot_ref[bi, kh, lo] = k_lo
                krot_ref[bi, kh, up] = k_hi
                return
            count_ref[bi, kh] = jnp.int32(0)
            slot = rows_ref[0][bi] if rows_ref else bi
            p = pos_ref[bi]

            @pl.when((p >= 0) & (p < kc_ref.shape[2]))
            def _store():
                kc_ref[li, slot, p, kh, lo] = k_lo
                kc_ref[li, slot, p, kh, up] = k_hi
                vc_ref[li, slot, p, kh, :] = load(v_ref, kdt, bi, kh, pl.ds(0, qd)).astype(kdt)

    operands = (jnp.reshape(layer, (1,)), q_in, k_in, q_norm_lq, k_norm_lq, cos_bq, sin_bq)
    q16 = jax.ShapeDtypeStruct((b, k, ROWS, qd), qdt)
    if not write:
        out_shape, aliases = (q16, jax.ShapeDtypeStruct((b, k, qd), kdt)), {}
    else:
        v_in, k_all, v_all, rows, pos = cache
        extra = (v_in,) + (() if rows is None else (rows.astype(jnp.int32),)) + (pos.astype(jnp.int32), k_all, v_all)
        operands += extra
        n = len(operands)
        out_shape = (q16, jax.ShapeDtypeStruct(k_all.shape, k_all.dtype), jax.ShapeDtypeStruct(v_all.shape, v_all.dtype),
                     jax.ShapeDtypeStruct((b, k), jnp.int32))
        aliases = {n - 2: 1, n - 1: 2}   # the caches are updated in place
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, k, parts), input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="qwen3_qk_norm_rope_kv" if write else "qwen3_qk_norm_rope",
    )(*operands)
