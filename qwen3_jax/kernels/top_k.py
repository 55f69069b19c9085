"""The sampler's top-k over the vocabulary: float32 logits [B, V] -> the k best (values, ids) per
row, exactly as jax.lax.top_k, in two Pallas launches.

Why: XLA:GPU lowers a top_k with k = 64 over 152k columns to a sort: 38 us a row at B = 16 on
an H200, and still 9-12 us a row sorting 2048-column chunks first (run 105 in
benchmarks/NOTES.md), where reading the row costs ~0.3 us. At 256 requests that was 2.2 ms of a
~24 ms step. Here selection replaces sorting:
  1. grid (B, chunks): a program holds one `chunk` of a row in registers and takes its best k
     by k rounds of (max, lowest index attaining it, mask it out) -> keys and ids [B, chunks, k];
  2. grid (B,): a program holds a row's chunks x k candidates and takes the best k of those the
     same way -> values [B, k], ids [B, k].
Ties go to the lower id, as lax.top_k's: within a chunk by the arg-max's lower index, and in
stage 2 the candidates lie in chunk order with lower ids first among equals, so the lower
position is the lower id.

Values are compared as int32 keys: the float's bits with the magnitude bits of negatives
flipped, XLA's total order (-NaN < -inf < finite < inf < NaN, and -0.0 < 0.0, as lax.top_k
orders them), so the values come back bit for bit. int32 min, below every key a float gives
but one negative NaN's, marks a taken entry or a column past V.

Coverage (else None and the caller keeps its XLA form): x float32 [B, V], 1 <= k <= MAX_K,
k <= V.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import interpret as _interpret

MAX_K = 128
CHUNK = 2048          # columns per stage-1 program (a power of two)
TAKEN = jnp.iinfo(jnp.int32).min


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def covered(shape, dtype, k: int) -> bool:
    return (len(shape) == 2 and jnp.dtype(dtype) == jnp.float32 and 1 <= k <= MAX_K and k <= shape[1])


def total_order_key(x):
    """float32 -> int32 in XLA's total order of floats (what lax.top_k and sort compare). Its own
    inverse on the int32 bits, so _value(key) gives the float back. Plain jnp: also used in XLA
    (serve.sampling's pruned top-k)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _value(key):
    return jax.lax.bitcast_convert_type(key ^ ((key >> 31) & 0x7FFFFFFF), jnp.float32)


def _select(keys, ids, k: int, kp: int):
    """k rounds over keys [N] int32 (ids [N] int32, or None: the position is the id) ->
    (best keys [kp], their ids [kp]); entries past k are TAKEN / 0."""
    pos = jax.lax.broadcasted_iota(jnp.int32, keys.shape, 0)
    out_col = jax.lax.broadcasted_iota(jnp.int32, (kp,), 0)

    def round_(r, carry):
        keys, best, best_ids = carry
        m = jnp.max(keys)
        i = jnp.argmax(keys).astype(jnp.int32)        # ties: the lower position
        got = i if ids is None else jnp.sum(jnp.where(pos == i, ids, 0))
        best = jnp.where(out_col == r, m, best)
        best_ids = jnp.where(out_col == r, got, best_ids)
        return jnp.where(pos == i, TAKEN, keys), best, best_ids

    init = (keys, jnp.full((kp,), TAKEN, jnp.int32), jnp.zeros((kp,), jnp.int32))
    _, best, best_ids = jax.lax.fori_loop(0, k, round_, init)
    return best, best_ids


def top_k(x_bv, k: int, *, chunk: int = CHUNK, interpret=None):
    """jax.lax.top_k(x, k) for float32 x [B, V] -> (values [B, k] float32, ids [B, k] int32), or
    None when not covered (see the module docstring)."""
    if not covered(x_bv.shape, x_bv.dtype, k):
        return None
    chunk = min(_pow2(chunk), _pow2(x_bv.shape[1]))
    return _top_k(x_bv, k=k, chunk=max(chunk, _pow2(k)),
                  interpret=_interpret() if interpret is None else interpret)


def _warps(n: int) -> int:
    """One warp per 256 elements held (8 a thread), 1 to 8."""
    return max(1, min(8, n // 256))


@functools.partial(jax.jit, static_argnames=("k", "chunk", "interpret"))
def _top_k(x_bv, *, k: int, chunk: int, interpret: bool):
    b, v = x_bv.shape
    n = pl.cdiv(v, chunk)
    kp = _pow2(k)

    def stage1(x_ref, key_ref, id_ref):
        bi, ci = pl.program_id(0), pl.program_id(1)
        col = ci * chunk + jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
        x = plt.load(x_ref.at[bi, pl.ds(ci * chunk, chunk)], mask=col < v, other=0.0)
        keys = jnp.where(col < v, total_order_key(x), TAKEN)
        best, best_ids = _select(keys, None, k, kp)
        key_ref[bi, ci, :] = best
        id_ref[bi, ci, :] = best_ids + ci * chunk

    part = jax.ShapeDtypeStruct((b, n, kp), jnp.int32)
    keys, ids = pl.pallas_call(
        stage1, out_shape=(part, part), grid=(b, n),
        compiler_params=plt.CompilerParams(num_warps=_warps(chunk), num_stages=1),
        interpret=interpret, name="qwen3_top_k_chunks",
    )(x_bv)

    m = n * kp            # candidates a row; the k per chunk sit at kp-spaced offsets
    mp = _pow2(m)

    def stage2(key_ref, id_ref, val_ref, out_id_ref):
        bi = pl.program_id(0)
        at = jax.lax.broadcasted_iota(jnp.int32, (mp,), 0)
        cand = plt.load(key_ref.at[bi, pl.ds(0, mp)], mask=at < m, other=TAKEN)
        cand_ids = plt.load(id_ref.at[bi, pl.ds(0, mp)], mask=at < m, other=0)
        best, best_ids = _select(cand, cand_ids, k, kp)
        keep = jax.lax.broadcasted_iota(jnp.int32, (kp,), 0) < k
        plt.store(val_ref.at[bi, pl.ds(0, kp)], _value(best), mask=keep)
        plt.store(out_id_ref.at[bi, pl.ds(0, kp)], best_ids, mask=keep)

    return pl.pallas_call(
        stage2, out_shape=(jax.ShapeDtypeStruct((b, k), jnp.float32), jax.ShapeDtypeStruct((b, k), jnp.int32)),
        grid=(b,),
        compiler_params=plt.CompilerParams(num_warps=_warps(mp), num_stages=1),
        interpret=interpret, name="qwen3_top_k_merge",
    )(keys.reshape(b, m), ids.reshape(b, m))
