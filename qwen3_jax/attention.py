"""The plain-XLA grouped-query attention, computed in blocks of queries when the scores are large.

The math materializes float32 scores [B, K, G, T, S] (G = H / K query heads per kv head). For
Qwen3-30B-A3B (32 heads) and one 32k-token prompt that is 32 * 32k * 32k * 4 B = 137 GB: a
direct model call on such a prompt cannot run, and on a GPU XLA reserves this buffer even where
kernels/prefill_attention.py's lax.cond would pick cuDNN. So when the scores of all T queries
would exceed SCORE_BLOCK_BYTES on a device, `attention` loops over blocks of `query_block(...)`
queries and only one block's scores [B, K, G, Tq, S] is live at a time. Short prompts, server
chunks whose scores fit, and decode (T = 1) compile exactly as a single block.

Each query row goes through the same operations either way (the contractions and the softmax
run over Q and S, which blocks do not cut). The bits can still differ in the last place where
the backend picks a matmul's summation order or a fusion by operand shape (XLA's CPU backend
does): tests/test_attention.py bounds the difference by one rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Budget for one block's float32 scores on one device; the softmax around them holds about two
# more buffers of that size. Smaller blocks cost time: on an H200, attention alone for a
# 512-token chunk against a 40960-position cache (Qwen3-30B-A3B, 32 heads) took 3.10 ms in one
# block, 3.28 ms in 2 and 3.55 ms in 4 (2.5, 1.25, 0.6 GiB of scores), and a 2-layer step with
# that chunk 7.76 ms in one block against 8.66 ms in 2. 4 GiB keeps the server's default chunk
# (--chunked-prefill-size 512) at the model's longest context in one block on one device.
SCORE_BLOCK_BYTES = 4 << 30
# Fewest queries per block (and the granule of block sizes): smaller blocks would turn the
# matmuls into thin ones, and past this point the budget is exceeded rather than the block cut.
MIN_QUERY_BLOCK = 128


def query_block(t: int, s: int, heads: int, batch: int = 1, budget: int | None = None) -> int | None:
    """Queries per block for T queries against S keys, or None: one block (no tiling).

    `heads` and `batch` are the sizes one device holds. Tiles only when the float32 scores of
    all T queries exceed `budget` (default SCORE_BLOCK_BYTES, read at trace time) and
    T > MIN_QUERY_BLOCK. Then: as few blocks as the budget allows, all of one size, a multiple
    of MIN_QUERY_BLOCK (so the padding is under MIN_QUERY_BLOCK rows per block).
    """
    budget = SCORE_BLOCK_BYTES if budget is None else budget
    row_bytes = batch * heads * s * 4
    if t <= MIN_QUERY_BLOCK or t * row_bytes <= budget:
        return None
    most = max(MIN_QUERY_BLOCK, budget // row_bytes // MIN_QUERY_BLOCK * MIN_QUERY_BLOCK)
    blocks = -(-t // most)
    return _round_up(-(-t // blocks), MIN_QUERY_BLOCK)


def attention(q_bthq, k_bskq, v_bskq, mask_bts, scale: float, block: int | None = None):
    """Grouped-query attention, softmax in float32 as transformers does -> [B, T, H, Q] in q's dtype.

    q [B, T, H, Q], k and v [B, S, K, Q] (H a multiple of K), mask [B, T, S] bool (True: attend).
    `block` (see query_block): queries per block, or None for all T at once. T is padded up to
    a multiple of the block; padded rows are fully masked (a uniform softmax, finite) and sliced
    off.
    """
    b, t, h, qd = q_bthq.shape
    if block is None or block >= t:
        return _attention(q_bthq, k_bskq, v_bskq, mask_bts, scale)
    blocks = -(-t // block)
    pad = blocks * block - t
    q_bthq = jnp.pad(q_bthq, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask_bts = jnp.pad(mask_bts, ((0, 0), (0, pad), (0, 0)))

    def one_block(i, out_bthq):
        start = i * block
        q = jax.lax.dynamic_slice_in_dim(q_bthq, start, block, axis=1)
        mask = jax.lax.dynamic_slice_in_dim(mask_bts, start, block, axis=1)
        out = _attention(q, k_bskq, v_bskq, mask, scale)
        return jax.lax.dynamic_update_slice_in_dim(out_bthq, out, start, axis=1)

    # A loop, not blocks side by side: XLA would be free to run those at once, holding every
    # block's scores again.
    return jax.lax.fori_loop(0, blocks, one_block, jnp.zeros_like(q_bthq))[:, :t]


def _attention(q_bthq, k_bskq, v_bskq, mask_bts, scale):
    """The untiled math: scores [B, K, G, T, S] in float32, rounded to q's dtype once (as
    transformers' bf16 matmul output is) before the scale."""
    b, t, h, qd = q_bthq.shape
    kv = k_bskq.shape[2]
    q = q_bthq.reshape(b, t, kv, h // kv, qd)
    scores = jnp.einsum("btkgq,bskq->bkgts", q, k_bskq, preferred_element_type=jnp.float32)
    scores = scores.astype(q.dtype).astype(jnp.float32) * scale
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskq->btkgq", probs, v_bskq).reshape(b, t, h, qd)


def _round_up(n: int, granule: int) -> int:
    return -(-n // granule) * granule
