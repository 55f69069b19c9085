"""Prefill attention: cuDNN's fused (flash) attention for a prompt from position 0, and a Pallas
kernel for a chunk that continues a prompt already in the KV cache.

The plain-XLA attention (../attention.py) materializes float32 scores [B, K, G, T, S]: 8.6 GB
per layer for one 8k prompt, ~80% of an 8k prefill's time on an H100 (run 2,
benchmarks/NOTES.md); past attention.SCORE_BLOCK_BYTES per device it does so one block of
queries at a time, which also bounds what XLA reserves for the fallback branch below. cuDNN's fused kernel never writes
them. Its causal mask is aligned at the top left (query t sees keys s <= t), which is the
model's mask (s <= positions[b, t]) exactly when positions[b, t] == t for every row; otherwise
(a chunk continuing a cached prompt, left padding) the plain-XLA attention runs instead,
chosen at run time by lax.cond, so results never depend on the guess.

chunk_attention_cached: the engine's chunked prefill writes each chunk's K/V into the cache, then
attends from the chunk's T queries to every cached key up to each query's position. The XLA math
there scored all T queries against the whole cache row (float32 [K, G, T, S]: 1 GiB a layer for a
512-token chunk of a 16k context) and masked most of it: an 8.5k-token prompt took 1.17 s to
prefill in 512-token chunks where one 8k pass takes ~0.2 s (run 113, benchmarks/NOTES.md). The
kernel reads the cache where it lies, flash-attention style:
  grid (B, K, T*G / ROWS); program (b, h, i): ROWS query rows of kv head h (token-major: row r is
  token i*ROWS/G + r // G, query head h*G + r % G, so one key block serves all G heads), keys from
  0 up to its last token's position in blocks of `bs` (blocks past it are skipped), online softmax
  in float32 (decode_attention's loop, with a causal limit per row).
It needs each row's positions to be start, start+1, ... (padding: positions past the cache, at
the end), as the engine writes them; anything else runs the XLA math, chosen by lax.cond (unless
the caller promises that order: `in_order`).

chunk_attention_split: the same chunk, on a GPU, as two cuDNN flash-attention calls whose outputs
are merged by their log-sum-exps (FlashAttention-2's split-K rule): the chunk's queries over the
cached keys 0..start-1 (no mask; cuDNN's padding mask at kv length `start`; the cache read in
place as pages through a page table), and over the chunk's own K/V with the causal mask (cuDNN's
causal mask is top-left aligned, which is right only when queries and keys start at the same
position: so the cached part cannot take it). The chunk kernel runs at ~28% of the bf16 matmul
rate (Pallas Triton's mma.sync tiles, run 115); a 2048-token chunk at start 14336 through the
split at 54% of it for the whole forward (run 148). The kernel stays for chunks below
SPLIT_MIN_TOKENS, its keys split over up to CHUNK_SPLIT_PROGRAMS programs (a small chunk has few
query tiles to spread the cached keys over), and where cuDNN does not trace.

Numerics: cuDNN keeps the scores in float32 through the softmax; the reference (as
transformers in bf16) rounds them to bf16 first. Agreement is to bf16 precision.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import interpret as _interpret
from . import on_gpu, pick_tile
from .decode_attention import NEG, _attend_keys, _normalized, merge_split_sums
from ..attention import attention, query_block

log = logging.getLogger(__name__)
_split_refusals: set[str] = set()   # why the split did not trace on a GPU, each said once

# Query rows (tokens x the G heads of one kv head) per program and keys per block of the chunk
# kernel; CHUNK_KERNEL False sends chunks to the XLA math (read at trace time;
# benchmarks/chunked_prefill.py times both).
CHUNK_ROWS = 64
CHUNK_KEYS = 128
CHUNK_WARPS = 4
CHUNK_STAGES = 2
CHUNK_KERNEL = True
# Key splits for a chunk with few programs: the kernel's grid gets a fourth axis of key ranges,
# enough of them that the grid holds about this many programs (powers of two, at most one key
# block each), their partial softmax sums merged after it as decode attention's splits are. A
# 16-token chunk has T*G/CHUNK_ROWS = 2 programs a kv head, 8 in all, each reading every cached
# key. None: one split (read at trace time). Run 153 (H200, 30B FP8, one chunk at a 16k context):
# 16 tokens at start 15360 33.61 ms unsplit -> 11.98 at 512 programs (XLA 14.83, cuDNN split
# 22.70); 16-64 tokens fastest this way at every start, 128 tokens at 8192+.
CHUNK_SPLIT_PROGRAMS: int | None = 512
# Continuing chunks of at least this many tokens (the static bucket) take chunk_attention_split
# where cuDNN traces; shorter ones the kernel (read at trace time; None: never). Run 148 (H200,
# 30B FP8, one chunk, benchmarks/chunked_prefill.py), split against the kernel: 128 tokens at
# start 512 / 2048 / 8192 / 15360 +0.7% / -7% / -20% / -29%; 512 tokens -1% / -7% / -19% / -27%;
# 2048 tokens at 512 / 2048 / 6144 / 14336 -7% / -16% / -27% / -38%; 16 and 32 tokens (run 149)
# level at 512, -10 to -35% beyond. Served (run 147, 2048 chunk): 4000 / 8000 / 15000-token
# prompts' first token -8% / -17% / -27%. Below 256 the kernel with key splits
# (CHUNK_SPLIT_PROGRAMS) is faster (run 153: 64 tokens at 15360 16.60 against 24.60 ms; run 154,
# 128 tokens at 512 / 2048 / 8192 / 15360 14.44 / 16.71 / 17.44 / 20.45 against 14.56 / 15.99 /
# 20.83 / 25.18); from 256 the split is level or ahead (256 tokens 16.71 / 16.60 / 22.36 / 27.20
# against 19.91 / 17.39 / 22.46 / 28.25).
SPLIT_MIN_TOKENS: int | None = 256
# Keys per page of the split's cached-key call reading the cache in place (cuDNN paged attention;
# its page offsets are not 32-bit: run 152 read a row starting past 2**32 elements of a 10.7 GB K
# cache right). None: that call reads a gathered copy of the row's first `window` positions
# instead, which cost 0.9-1.3 ms a 48-layer forward at a 16k context (run 148: the whole row, K
# and V, every layer).
SPLIT_PAGE: int | None = 64


def causal_prefill_attention(q_bthq, k_bskq, v_bskq, positions_bt, scale: float, fallback, from_zero: bool = False):
    """-> attention output [B, T, H, Q] (before o_proj). `fallback()` computes the same with
    the plain-XLA math; it runs whenever the positions are not 0..T-1 in every row. from_zero:
    the caller guarantees each row's tokens are at 0.. with any padding after them (whose
    outputs are not used), so cuDNN runs with no check on the device (a conditional, whose
    predicate XLA:GPU copies to the host every layer)."""
    t = q_bthq.shape[1]
    try:   # cuDNN refuses some shapes/versions at trace time: then this call is the XLA math
        jax.eval_shape(lambda: _fused(q_bthq, k_bskq, v_bskq, scale))
    except (NotImplementedError, RuntimeError, ValueError):
        return fallback()
    if from_zero:
        return _fused(q_bthq, k_bskq, v_bskq, scale)
    from_zero = jnp.all(positions_bt == jnp.arange(t, dtype=positions_bt.dtype)[None, :])
    return jax.lax.cond(from_zero, lambda _: _fused(q_bthq, k_bskq, v_bskq, scale),
                        lambda _: fallback().astype(q_bthq.dtype), None)


def _fused(q, k, v, scale):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        implementation="cudnn").astype(q.dtype)


def chunk_covered(q_bthq, k_all) -> bool:
    """chunk_attention_cached handles these shapes: T > 1 queries, cache dtype = q's, G = H/K a
    power of two that divides the rows of a program, T*G a multiple of them, a key tiling of the
    cache length. Shard-independent, as decode_attention.covered."""
    b, t, h, qd = q_bthq.shape
    k, s = k_all.shape[3], k_all.shape[2]
    g = h // k
    return (CHUNK_KERNEL and t > 1 and k_all.dtype == q_bthq.dtype and h % k == 0 and g & (g - 1) == 0
            and g <= CHUNK_ROWS and (t * g) % CHUNK_ROWS == 0 and qd % 16 == 0
            and pick_tile(s, CHUNK_KEYS) is not None)


def chunk_attention_cached(q_bthq, k_all, v_all, layer, rows_b, positions_bt, scale: float,
                           kv_window: int | None = None, own=None, in_order: bool = False):
    """A prompt chunk's attention over the cache rows it continues, its own K/V already written:
    q [B, T, H, Q] (normed, roped); k/v cache [L, N, S, K, Q]; layer int32; rows [B] (cache slot
    of each row) or None (row b is slot b); positions [B, T] -> [B, T, H, Q] in q's dtype. Query t
    attends to keys 0..positions[b, t]; a position past the cache (padding) gives zeros.
    kv_window: every position lies below it (keys past it are not visited). own: the chunk's
    (k, v) [B, T, K, Q]; given, a chunk of SPLIT_MIN_TOKENS or more runs chunk_attention_split
    where cuDNN traces (a GPU), the kernel otherwise. in_order (static): the caller promises each
    row's positions are start, start+1, ... with any padding after them at positions >= S (as the
    engine writes its chunks), so nothing checks them on the device: the check's conditional
    cost ~16-20 us a layer on XLA:GPU (run 154: 6% of a 32-token chunk, 1-2% of 2048 tokens)."""
    b, t, h, qd = q_bthq.shape
    s, k = k_all.shape[2], k_all.shape[3]
    g = h // k
    rows_b = jnp.arange(b, dtype=jnp.int32) if rows_b is None else rows_b.astype(jnp.int32)
    positions_bt = positions_bt.astype(jnp.int32)
    starts = positions_bt[:, 0]
    valid = jnp.sum(positions_bt < s, axis=1, dtype=jnp.int32)
    window = s if kv_window is None or kv_window >= s else kv_window
    bs = pick_tile(window, CHUNK_KEYS) or pick_tile(s, CHUNK_KEYS)
    window = -(-window // bs) * bs

    split = (own is not None and SPLIT_MIN_TOKENS is not None and t >= SPLIT_MIN_TOKENS
             and _split_traces(q_bthq, own, k_all, window))

    def split_path(_):
        return chunk_attention_split(q_bthq, *own, k_all, v_all, layer, rows_b, starts, valid, scale, window)

    def kernel_path(_):
        q = q_bthq.reshape(b, t, k, g, qd).transpose(0, 2, 1, 3, 4).reshape(b, k, t * g, qd)
        out = chunk_attention(q, k_all, v_all, jnp.asarray(layer, jnp.int32), rows_b, starts, valid, scale=float(scale),
                              group=g, rows=CHUNK_ROWS, bs=bs, steps=window // bs, num_warps=CHUNK_WARPS,
                              num_stages=CHUNK_STAGES,
                              splits=key_splits(b * k * (t * g // CHUNK_ROWS), window // bs, CHUNK_SPLIT_PROGRAMS))
        return out.reshape(b, k, t, g, qd).transpose(0, 2, 1, 3, 4).reshape(b, t, h, qd)

    def xla_path(_):
        keys, values = k_all[layer][rows_b], v_all[layer][rows_b]               # [B, S, K, Q]
        mask = jnp.arange(s)[None, None, :] <= positions_bt[:, :, None]
        out = attention(q_bthq, keys.astype(q_bthq.dtype), values.astype(q_bthq.dtype), mask, scale,
                        query_block(t, s, h, b))
        return jnp.where((positions_bt < s)[:, :, None, None], out, 0).astype(q_bthq.dtype)

    path = split_path if split else kernel_path
    if in_order:
        return path(None)
    ts = jnp.arange(t, dtype=jnp.int32)[None, :]
    ordered = jnp.all(jnp.where(ts < valid[:, None], positions_bt == starts[:, None] + ts, positions_bt >= s))
    return jax.lax.cond(ordered, path, xla_path, None)


def _cudnn_partial(q_bthq, k_bskq, v_bskq, scale: float, kv_len_b=None):
    """One cuDNN flash-attention call with its log-sum-exps: kv_len None, the causal mask (query t
    sees keys s <= t); else no mask past cuDNN's padding mask (query t sees keys s < kv_len[b]).
    -> (out [B, T, H, Q] in q's dtype, lse [B, T, H] float32, over the scaled scores)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention   # lse: no public API

    b, t = q_bthq.shape[:2]
    if kv_len_b is None:
        mask, q_len = cudnn_attention.MaskType.CAUSAL, None
    else:
        mask, q_len = cudnn_attention.MaskType.PADDING, jnp.full((b,), t, jnp.int32)
        kv_len_b = kv_len_b.astype(jnp.int32)
    out, lse = cudnn_attention.dot_product_attention(q_bthq, k_bskq, v_bskq, q_seqlen=q_len, kv_seqlen=kv_len_b,
                                                     scale=scale, mask_type=mask, qkv_layout="BTNH",
                                                     return_residual=True)
    return out, jnp.swapaxes(lse, 1, 2)    # lse [B, H, T] -> [B, T, H]


def _cudnn_paged_partial(q_bthq, k_all, v_all, layer, rows_b, scale: float, kv_len_b, page: int):
    """_cudnn_partial's padded call reading the cache in place: k/v cache [L, N, S, K, Q] seen as
    blocks [L*N*S/page, page, K, Q] (a reshape, no copy) read through page_table."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    n_layers, n_slots, s, kh, qd = k_all.shape
    b, t = q_bthq.shape[:2]
    table = page_table(k_all.shape, layer, rows_b, page)
    blocks = (n_layers * n_slots * s // page, page, kh, qd)
    out, lse = cudnn_attention.paged_attention(
        q_bthq, k_all.reshape(blocks), v_all.reshape(blocks), jnp.full((b,), t, jnp.int32),
        kv_len_b.astype(jnp.int32), table, table, scale=scale, mask_type=cudnn_attention.MaskType.PADDING,
        qkv_layout="BTNH", return_residual=True)
    return out, jnp.swapaxes(lse, 1, 2)


def page_table(cache_shape, layer, rows_b, page: int):
    """The cache [L, N, S, K, Q] as blocks [L*N*S/page, page, K, Q]: row b's page table [B, 1,
    L*N*S/(B*page), 1] int32, its first S/page entries the blocks of slot rows[b] at `layer` in
    order, the rest repeating the last (cuDNN wants B x entries = all blocks; kv_len keeps them unread)."""
    n_layers, n_slots, s = cache_shape[:3]
    per_row = n_layers * n_slots * s // page // rows_b.shape[0]
    first = (layer * n_slots + rows_b.astype(jnp.int32)) * (s // page)                  # [B]
    own = jnp.minimum(jnp.arange(per_row, dtype=jnp.int32), s // page - 1)
    return (first[:, None] + own[None, :])[:, None, :, None]


def _split_traces(q_bthq, own, k_all, window: int) -> bool:
    """Whether chunk_attention_split traces here (a GPU, a cuDNN and jax version that take its
    calls); decided once per shape at trace time. The GPU backend is checked first: where jax's
    CUDA plugin is installed but the CPU runs (JAX_PLATFORMS=cpu) cuDNN's calls trace and then
    fail to lower (run 150)."""
    if not on_gpu():
        return False
    b = q_bthq.shape[0]
    i32 = jax.ShapeDtypeStruct((b,), jnp.int32)
    try:
        jax.eval_shape(lambda q, k, v, c, r, st, va: chunk_attention_split(q, k, v, c, c, jnp.int32(0), r, st, va, 1.0,
                                                                         window),
                       q_bthq, *own, k_all, i32, i32, i32)
    except (NotImplementedError, RuntimeError, ValueError, TypeError, AttributeError, ImportError) as err:
        why = f"{type(err).__name__}: {err}"
        if why not in _split_refusals:   # a GPU without it runs prefill chunks ~1.2-1.6x slower (runs 146-149)
            _split_refusals.add(why)
            log.warning("prefill chunks over the cache take the Pallas chunk kernel, not the cuDNN split (%s)", why)
        return False
    return True


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Two attentions of the same queries over disjoint key sets -> the attention over their union
    [B, T, H, Q] float32: each output weighted by its share of the softmax mass, exp(lse - max).
    out [B, T, H, Q]; lse [B, T, H] (-inf: no keys, that output unused)."""
    top = jnp.maximum(lse_a, lse_b)
    w_a, w_b = jnp.exp(lse_a - top)[..., None], jnp.exp(lse_b - top)[..., None]
    return (w_a * out_a.astype(jnp.float32) + w_b * out_b.astype(jnp.float32)) / (w_a + w_b)


def chunk_attention_split(q_bthq, k_bskq, v_bskq, k_all, v_all, layer, rows_b, starts_b, valid_b, scale: float,
                          window: int, partial=None):
    """chunk_attention_cached's kernel path as two flash-attention calls merged by their
    log-sum-exps: q [B, T, H, Q] over the cached keys 0..starts[b]-1 of slot rows[b] at layer
    `layer` (read in place through page_table where SPLIT_PAGE divides the cache length S, else
    its first `window` positions gathered [B, window, K, Q]), and over its own k/v [B, T, K, Q]
    causally. valid [B]: tokens past it are padding (zeros out). `partial`: _cudnn_partial or a
    function of its contract (the CPU tests pass a plain-XLA one; the cached keys gathered then).
    -> [B, T, H, Q] in q's dtype."""
    b, t = q_bthq.shape[:2]
    kv_len = jnp.minimum(starts_b, window)   # padding rows start at s
    n_layers, n_slots, s = k_all.shape[:3]
    paged = partial is None and SPLIT_PAGE and s % SPLIT_PAGE == 0 and (n_layers * n_slots * s // SPLIT_PAGE) % b == 0
    if paged:
        out_c, lse_c = _cudnn_paged_partial(q_bthq, k_all, v_all, layer, rows_b, scale, kv_len, SPLIT_PAGE)
    else:
        cached_k, cached_v = k_all[layer][rows_b, :window], v_all[layer][rows_b, :window]   # [B, W, K, Q]
        out_c, lse_c = (partial or _cudnn_partial)(q_bthq, cached_k, cached_v, scale, kv_len)
    out_o, lse_o = (partial or _cudnn_partial)(q_bthq, k_bskq.astype(q_bthq.dtype), v_bskq.astype(q_bthq.dtype), scale)
    has_cached = (starts_b > 0)[:, None, None]                      # a first chunk: no cached keys
    lse_c = jnp.where(has_cached, lse_c, -jnp.inf)
    out_c = jnp.where(has_cached[..., None], out_c, 0)              # cuDNN's rows over no keys: not read
    out = merge_partials(out_c, lse_c, out_o, lse_o)
    real = jnp.arange(t, dtype=jnp.int32)[None, :] < valid_b[:, None]
    return jnp.where(real[:, :, None, None], out, 0).astype(q_bthq.dtype)


def key_splits(programs: int, steps: int, target: int | None) -> int:
    """Key ranges for a chunk kernel grid of `programs` programs over `steps` key blocks: the power
    of two that brings the grid nearest `target` programs from below, at most `steps`; 1 without
    a target or when the grid already holds that many."""
    if target is None or programs >= target:
        return 1
    splits = 1
    while splits * 2 * programs <= target and splits * 2 <= steps:
        splits *= 2
    return splits


@functools.partial(jax.jit, static_argnames=("scale", "group", "rows", "bs", "steps", "num_warps", "num_stages",
                                             "splits", "interpret"))
def chunk_attention(q_bkrq, k_cache, v_cache, layer, slots_b, starts_b, valid_b, *, scale: float, group: int,
                    rows: int, bs: int, steps: int, num_warps: int = 4, num_stages: int = 2, splits: int = 1,
                    interpret=None):
    """q [B, K, T*G, Q] (row t*G + j: token t, query head h*G + j of kv head h); k/v cache
    [L, N, S, K, Q]; layer int32; slots [B]; starts [B] (token 0's position); valid [B] (tokens
    0..valid-1 are at starts + t, the rest padding) -> [B, K, T*G, Q] in q's dtype, padding rows
    zero. Keys in `steps` blocks of bs from 0 (blocks past a program's last position skipped).
    splits > 1: key range s of each program's keys (ceil(steps / splits) blocks) on grid axis 3,
    their float32 partials [B, K, splits, T*G(, Q)] merged after it (merge_split_sums)."""
    b, k, tg, qd = q_bkrq.shape
    bq = rows // group
    cdt = q_bkrq.dtype
    span = -(-steps // splits)
    interpret = _interpret() if interpret is None else interpret

    def kernel(layer_ref, slots_ref, starts_ref, valid_ref, q_ref, k_ref, v_ref, *out_refs):
        bi, hi, ri = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        li, slot, start, valid = layer_ref[0], slots_ref[bi], starts_ref[bi], valid_ref[bi]
        t0 = ri * bq
        tok = t0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group
        limit = jnp.where(tok < valid, start + tok + 1, 0)                    # [rows, 1]: keys below it
        n = jnp.where(t0 < valid, start + jnp.minimum(t0 + bq, valid), 0)     # the program's last key + 1
        r0 = pl.multiple_of(ri * rows, rows)
        q = q_ref[bi, hi, pl.ds(r0, rows), :]                                   # [rows, Q]

        def load(s0):   # [bs, Q] each
            return k_ref[li, slot, pl.ds(s0, bs), hi, :], v_ref[li, slot, pl.ds(s0, bs), hi, :]

        def scores(tiles):
            return jnp.dot(q, tiles[0].T, preferred_element_type=jnp.float32)   # [rows, bs]

        empty = (jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
                 jnp.zeros((rows, qd), jnp.float32))
        if splits == 1:
            (o_ref,) = out_refs
            _, l_sum, acc = _attend_keys(load, scores, n, 0, steps, bs, scale, cdt, empty, limit=limit)
            # A padding row saw only masked keys (a uniform softmax over them): zeros instead.
            o_ref[bi, hi, pl.ds(r0, rows), :] = jnp.where(limit > 0, _normalized(acc, l_sum[:, None]),
                                                          0.0).astype(cdt)
            return
        acc_ref, m_ref, l_ref = out_refs
        si = pl.program_id(3)
        m, l_sum, acc = _attend_keys(load, scores, n, si * span * bs, span, bs, scale, cdt, empty, limit=limit)
        acc_ref[bi, hi, si, pl.ds(r0, rows), :] = acc
        m_ref[bi, hi, si, pl.ds(r0, rows)] = m
        l_ref[bi, hi, si, pl.ds(r0, rows)] = l_sum

    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((b, k, tg, qd), cdt) if splits == 1 else
                 (jax.ShapeDtypeStruct((b, k, splits, tg, qd), f32), jax.ShapeDtypeStruct((b, k, splits, tg), f32),
                  jax.ShapeDtypeStruct((b, k, splits, tg), f32)))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(b, k, tg // rows) + ((splits,) if splits > 1 else ()),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="qwen3_chunk_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), slots_b.astype(jnp.int32), starts_b.astype(jnp.int32),
      valid_b.astype(jnp.int32), q_bkrq, k_cache, v_cache)
    if splits == 1:
        return out
    # A key range a row saw none of has m = NEG (weight ~0 beside a real one); a padding row
    # (every range NEG) is zeroed as on one split.
    merged = merge_split_sums(*out, axis=2)
    real = (jnp.arange(tg, dtype=jnp.int32) // group)[None, :] < valid_b.astype(jnp.int32)[:, None]   # [B, T*G]
    return jnp.where(real[:, None, :, None], merged, 0.0).astype(cdt)
