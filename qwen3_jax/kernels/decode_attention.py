"""Decode attention (one new token per sequence) reading the KV cache where it lies.

The plain-XLA decode step slices layer i's K and V out of the cache [L, slots, S, K, Q] (a copy
every layer), and XLA changes the layout of the whole cache for the attention dots: on an H100
that is 2 x 6.4 GB moved per call at batch 64, and at batch 256 the 24 GiB transposed copy does
not fit next to the weights (benchmarks/NOTES.md, run 2). Here each program reads one
(sequence, kv head, key split) tile stream straight from the cache, flash-decoding style:
  grid (B, K, NS); program (b, h, p): the G query heads of kv head h (padded to 16 rows for the
  MMA), keys s in split p in blocks of `bs`, online softmax in float32, partial (max, sum,
  weighted values) written per split. The NS splits of each (sequence, kv head) are merged
  (COMBINE):
  "kernel": in the same launch, by whichever of its NS programs finishes last. Each program
    stores its partials, then bumps a per-(b, h) counter atomically (acquire-release at GPU
    scope, after a CTA barrier, so its stores are visible first); the program that reads
    NS - 1 reads back the NS partials (G real rows only) and writes the [G, Q] output. The
    split-K "semaphore" fix-up of stream-K GEMMs, applied to flash-decoding. It saves the
    merge's 3 XLA kernels per layer (~4 us on an H200) for a ~2.5 us tail on the last program
    (fence, atomic, read-back): FP8 batch 1 -1.5%, batch 8 level (runs 39-40 in NOTES.md).
  "xla": a few XLA ops after the kernel (combine_splits). A separate one-kernel Pallas merge was
    measured slower (run 6 in benchmarks/NOTES.md), and so was the merge in o_proj's x load, in
    two forms (runs 16 and 24).
Only keys s < lengths[b] are read (blocks past the length are skipped). A length past the
cache reads nothing and gives zeros: that is a row at position S = the cache length, where the
cache-writing prologue drops its write, i.e. the engine's idle slots (serve/engine.py), which
before this read their whole cache row every step. The model's positions + 1 and that rule are
applied inside the kernel: each would be one more XLA kernel per layer in front of it.

decode_attention_rope (PROLOGUE "fused", the model's default where it covers the shapes) is
the same kernel with the step's prologue inside: q/k RMSNorm and RoPE from the q/k/v gemv's
split-K partials, and the new K/V written into the cache by the split-0 program, which counts
that key itself. One launch per layer instead of two (with qk_prologue's kernel): FP8 batch 1
-3.3%, bf16 -2.7% on an H200 (run 83), once each program requested its first key block before
the prologue's work (in series, run 81, it saved nothing).

Numerics as the reference where they are cheap to match: scores are float32 dot products
rounded to the compute dtype before scaling (as transformers in bf16 does), softmax in float32,
probabilities cast to the compute dtype for the value product; the softmax is normalized at the
end rather than before that cast, so agreement is to bf16 precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import interpret as _interpret
from . import KERNEL_DTYPES, pick_tile, qk_prologue

NEG = -1e30
TARGET_PROGRAMS = 264
# At most this many key splits: each split's program also sums q's partials (the fused prologue)
# and the last one merges every split's partials in serial loads, so past ~32 splits those costs
# outgrow the parallel keys. Measured (runs 131-132, H200, 30B-A3B-FP8, ms per step): batch 1
# at context 8192: 128 splits (the target alone) 5.435, 32 2.996, 16 3.401; at 32768: 128 6.314,
# 64 4.178, 32 4.586; batch 2 at 32768: 64 6.685, 32 5.999. Batch 8 at 8192 keeps its 16.
MAX_SPLITS = 32
# Where the key splits are merged (see the module doc), read at trace time; serve.bench
# --attention-combine times both.
COMBINE = "kernel"
COMBINES = ("kernel", "xla")
# Splits whose partials the last program reads back per load: [CH, G, Q] float32 stays <= 16 KiB
# (32 registers a thread at 4 warps) while the NS / CH loads are independent and in flight together.
_COMBINE_BYTES = 16 * 1024


def plan(batch: int, kv_heads: int, seq: int, bs_target: int = 64):
    """(bs, splits) for this shape, or None (seq not a multiple of 16: use XLA)."""
    bs = pick_tile(seq, bs_target)
    if bs is None:
        return None
    blocks = seq // bs
    splits = 1
    while batch * kv_heads * splits < TARGET_PROGRAMS and splits < MAX_SPLITS and blocks % (splits * 2) == 0:
        splits *= 2
    return bs, splits


@functools.partial(jax.jit, static_argnames=("scale", "bs", "splits", "group", "num_warps", "num_stages", "interpret",
                                             "length_offset", "combine", "window"))
def decode_attention(q_bhq, k_cache, v_cache, layer, slots_b, lengths_b, *, scale: float, bs: int, splits: int,
                     group: int | None = None, num_warps: int = 4, num_stages: int = 2, interpret=None,
                     length_offset: int = 0, combine: str = "kernel", counts=None, window: int | None = None):
    """q [B, H, Q]; k/v cache [L, N, S, K, Q]; layer int32; slots [B] (cache row of each
    sequence), or None: row b is slot b, with no index operand (an arange, even a numpy constant,
    would be an iota kernel every layer); lengths [B] (keys 0..lengths[b]+length_offset-1 attend;
    past S: none, the row is zeros) -> [B, H, Q] in q's dtype.

    With `group` = G, q is already padded per kv head: [B, K, 16, Q], rows 0..G-1 of kv head h
    the query heads h*G..h*G+G-1 (qk_prologue.qk_norm_rope's q16), so no pad runs here; the
    result is still [B, K*G, Q].
    combine: where the key splits merge, "kernel" or "xla" (module doc); "kernel" needs G a
    power of two (a Triton block of G rows) and falls back to "xla" otherwise. counts: the
    kernel merge's counters, zeros [B, K] int32 that are not used again (the cache-writing
    prologue's fourth output); None: made here (XLA then runs a zeros kernel or copy per call).
    window: the grid covers keys 0..window-1 only (a multiple of bs * splits, at most S; None:
    S); every live row's keys must lie below it (the engine's KV window), a row past S still
    reads nothing."""
    _, _, s, k, _ = k_cache.shape
    window = s if window is None else window
    if window > s or window % (bs * splits):
        raise ValueError(f"decode_attention window={window} must be at most the cache length {s} and a multiple "
                         f"of bs * splits = {bs * splits}; plan it with plan(batch, kv_heads, window)")
    if group is None:
        b, h, qd = q_bhq.shape
        g = h // k
    else:
        if q_bhq.ndim != 4 or q_bhq.shape[1:3] != (k, 16):
            raise ValueError(f"decode_attention with group={group} takes q padded to [B, K, 16, Q] with "
                             f"K={k}, got {q_bhq.shape}; pass q [B, H, Q] without group instead")
        b, _, _, qd = q_bhq.shape
        g, h = group, group * k
    if g > 16:
        raise ValueError(f"decode_attention handles up to 16 query heads per kv head, got {g}")
    if combine not in COMBINES:
        raise ValueError(f"decode_attention combine={combine!r}: use one of {COMBINES}")
    in_kernel = combine == "kernel" and g & (g - 1) == 0
    interpret = _interpret() if interpret is None else interpret
    cdt = q_bhq.dtype
    if group is None:
        q16 = jnp.pad(q_bhq.reshape(b, k, g, qd), ((0, 0), (0, 0), (0, 16 - g), (0, 0)))
    else:
        q16 = q_bhq
    chunk = window // splits
    steps = chunk // bs
    ch = max(1, min(splits, _COMBINE_BYTES // (4 * g * qd)))   # splits per read-back load

    def kernel(layer_ref, *refs):
        slots_ref, refs = (None, refs) if slots_b is None else (refs[0], refs[1:])
        len_ref, q_ref, k_ref, v_ref, *refs = refs
        if in_kernel:
            _, acc_ref, m_ref, l_ref, o_ref, count_ref = refs     # counts in (aliased), partials, out, counts
        else:
            acc_ref, m_ref, l_ref = refs
        bi, hi, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        li = layer_ref[0]
        slot = bi if slots_ref is None else slots_ref[bi]
        n = len_ref[bi] + length_offset
        n = jnp.where(n > s, 0, n)   # past the cache: an idle row, nothing to read
        q = q_ref[bi, hi, :, :]                                               # [16, Q]

        def load(s0):   # [bs, Q] each, both requested before the scores' dot
            return k_ref[li, slot, pl.ds(s0, bs), hi, :], v_ref[li, slot, pl.ds(s0, bs), hi, :]

        def scores(tiles):
            return jnp.dot(q, tiles[0].T, preferred_element_type=jnp.float32)   # [16, bs]

        m, l_sum, acc = _attend_keys(load, scores, n, pi * chunk, steps, bs, scale, cdt, _empty(qd))
        acc_ref[bi, hi, pi, :, :] = acc
        m_ref[bi, hi, pi, :] = m
        l_ref[bi, hi, pi, :] = l_sum
        if not in_kernel:
            return
        if not interpret:
            plt.debug_barrier()   # every thread's stores before the release below
        last = plt.atomic_add(count_ref, (bi, hi), jnp.int32(1)) == splits - 1
        pl.when(last)(lambda: _merge(acc_ref, m_ref, l_ref, o_ref, bi, hi, 0, g, splits, ch, cdt))

    partials = (jax.ShapeDtypeStruct((b, k, splits, 16, qd), jnp.float32),
                jax.ShapeDtypeStruct((b, k, splits, 16), jnp.float32),
                jax.ShapeDtypeStruct((b, k, splits, 16), jnp.float32))
    operands = ((jnp.reshape(layer, (1,)).astype(jnp.int32),)
                + (() if slots_b is None else (slots_b.astype(jnp.int32),))
                + (lengths_b.astype(jnp.int32), q16, k_cache, v_cache))
    extra = {}
    if in_kernel:
        if counts is None:
            counts = jnp.zeros((b, k), jnp.int32)
        if counts.shape != (b, k) or counts.dtype != jnp.int32:
            raise ValueError(f"decode_attention counts must be zeros [B, K] = [{b}, {k}] int32, got "
                             f"{counts.shape} {counts.dtype}")
        extra = dict(input_output_aliases={len(operands): 4})
        operands += (counts,)
        partials += (jax.ShapeDtypeStruct((b, h, qd), cdt), counts)
    outs = pl.pallas_call(
        kernel,
        out_shape=partials,
        grid=(b, k, splits),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="qwen3_decode_attention",
        **extra,
    )(*operands)
    if in_kernel:
        return outs[3]
    return combine_splits(*outs, g, cdt)


def _empty(qd: int):
    """The online softmax before any key: (running max, sum of exponentials [16], acc [16, Q])."""
    return (jnp.full((16,), NEG, jnp.float32), jnp.zeros((16,), jnp.float32), jnp.zeros((16, qd), jnp.float32))


def _softmax_step(carry, sc, value_product):
    """One online-softmax step over keys with scores sc [16, n] (float32, masked with NEG);
    value_product(p [16, n] float32) -> [16, Q] float32, the probabilities times the keys' values."""
    m, l_sum, acc = carry
    m_new = jnp.maximum(m, jnp.max(sc, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(sc - m_new[:, None])
    return m_new, l_sum * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + value_product(p)


def _attend_keys(load, scores, n, first, steps, bs, scale, cdt, carry, preloaded=None, limit=None):
    """In a kernel: a program's key loop, `steps` blocks of bs keys from position `first`, keys
    below n only (blocks past it are skipped). load(s0) -> the block's tiles, its values [bs, Q]
    last; scores(tiles) -> [R, bs] float32 q.k. preloaded: block 0's tiles, loaded by the caller
    before other work so that their latency overlaps it. limit: [R, 1], each row's own bound
    (keys below it; n is then their maximum), for causal chunks. Scores are rounded to cdt before
    scaling and the probabilities to cdt for the value product, as the reference does."""
    bound = n if limit is None else limit

    def visit(c, s0, tiles):
        sc = scores(tiles).astype(cdt).astype(jnp.float32) * scale
        pos = s0 + jax.lax.broadcasted_iota(jnp.int32, sc.shape, 1)
        sc = jnp.where(pos < bound, sc, NEG)
        return _softmax_step(c, sc, lambda p: jnp.dot(p.astype(cdt), tiles[-1], preferred_element_type=jnp.float32))

    def body(t, carry):
        s0 = pl.multiple_of(first + t * bs, bs)
        return jax.lax.cond(s0 < n, lambda c: visit(c, s0, load(s0)), lambda c: c, carry)

    start = 0
    if preloaded is not None:
        carry = jax.lax.cond(first < n, lambda c: visit(c, first, preloaded), lambda c: c, carry)
        start = 1
    return jax.lax.fori_loop(start, steps, body, carry)


def _merge(acc_ref, m_ref, l_ref, o_ref, bi, hi, r0, g, splits, ch, cdt):
    """The last program of (bi, hi): rows r0..r0+G-1 of the splits' partials -> o_ref rows
    hi*G..hi*G+G-1. Every load is issued before any arithmetic, so the read-back is one round
    trip to L2 (run 40: the tail cost the same as with two; the fence and the atomic dominate
    it). Plain loads: the acquiring atomic and the CTA barrier Triton puts after a scalar atomic
    (to share its result) order them after the other programs' stores. ch: splits per load."""
    chunks = [(pl.ds(c, ch), pl.ds(r0, g)) for c in range(0, splits, ch)]
    ms = [m_ref[bi, hi, *c] for c in chunks]                                             # [CH, G] each
    ls = [l_ref[bi, hi, *c] for c in chunks]
    accs = [acc_ref[bi, hi, *c, :] for c in chunks]                                      # [CH, G, Q] each
    top = functools.reduce(jnp.maximum, [jnp.max(m, axis=0, keepdims=True) for m in ms])  # [1, G]
    ws = [jnp.exp(m - top) for m in ms]
    den = sum(jnp.sum(w * l, axis=0, keepdims=True) for w, l in zip(ws, ls))
    num = sum(jnp.sum(a * w[:, :, None], axis=0) for w, a in zip(ws, accs))            # [G, Q]
    o_ref[bi, pl.ds(pl.multiple_of(hi * g, g), g), :] = _normalized(num, den.reshape(g, 1)).astype(cdt)


def merge_split_sums(acc, m, l_sum, axis: int):
    """Key splits' online-softmax partials merged with XLA ops: acc [..., NS, R, Q] (unnormalized
    weighted values), m (running max) and l_sum (sum of exponentials) [..., NS, R], float32, the
    splits on `axis` -> [..., R, Q] float32. Each split is weighted by exp(m - max over splits);
    normalized at the end (0 for a row that read no key)."""
    w = jnp.exp(m - jnp.max(m, axis=axis, keepdims=True))
    return _normalized(jnp.sum(acc * w[..., None], axis=axis), jnp.sum(l_sum * w, axis=axis)[..., None])


def combine_splits(acc_bkprq, m_bkpr, l_bkpr, group: int, dtype):
    """The decode kernel's key splits merged (merge_split_sums): acc [B, K, NS, 16, Q], m and l
    [B, K, NS, 16], all float32 -> [B, K*G, Q] in `dtype` (rows 0..G-1 of each kv head)."""
    b, k, _, _, qd = acc_bkprq.shape
    out = merge_split_sums(acc_bkprq, m_bkpr, l_bkpr, axis=2)
    return out[:, :, :group].reshape(b, k * group, qd).astype(dtype)


def _normalized(num, den):
    """num / den, and 0 where no key was read (den 0: a row past the cache), not 0 / 0."""
    return num / jnp.where(den > 0, den, 1.0)


def covered(q_bthq, k_all, group: int | None = None) -> bool:
    """decode_attention_cached handles this step: T == 1, cache dtype = q's, at most 16 query
    heads per kv head, a cache length with a 16-multiple tiling. Shard-independent: splitting
    heads over tp keeps the group size, and the tiling depends on the cache length only.
    With `group`, q is the padded q16 [B, K, 16, Q] (one token per row by construction)."""
    if group is not None:
        b, k, r, _ = q_bthq.shape
        return (r == 16 and k == k_all.shape[3] and k_all.dtype == q_bthq.dtype and 0 < group <= 16
                and plan(b, k, k_all.shape[2]) is not None)
    b, t, h, _ = q_bthq.shape
    return (t == 1 and k_all.dtype == q_bthq.dtype and h // k_all.shape[3] <= 16
            and plan(b, k_all.shape[3], k_all.shape[2]) is not None)


def grid_window(batch: int, kv_heads: int, cache_len: int, kv_window: int | None) -> int:
    """The keys a decode-attention grid covers: the engine's kv_window where it is below the
    cache length and plan() can tile it, else the whole cache."""
    if kv_window is None or kv_window >= cache_len or plan(batch, kv_heads, kv_window) is None:
        return cache_len
    return kv_window


def decode_attention_cached(q_bthq, k_all, v_all, layer, rows_b, positions_bt, scale: float,
                            group: int | None = None, counts=None, kv_window: int | None = None):
    """The model's entry: one new token per row (T == 1), rows_b the cache slot of each row or
    None (row b is slot b) -> attention output [B, 1, H, Q], or None when not covered (T > 1, dtypes differ, a cache length with no 16-multiple tiling).
    With `group` = G, q is qk_prologue's q16 [B, K, 16, Q] (no pad kernel) and H = K*G.
    counts: the prologue's zeros for the in-kernel merge (decode_attention).
    kv_window: every live row's position is below it (the engine's decode window): the grid is
    planned over those keys, not the whole cache. One request at position ~160 of a 8192-key
    cache otherwise ran 128 key splits of which 3 had keys, and the merge of all 128: 32 us a
    layer instead of ~6 (run 77, benchmarks/NOTES.md)."""
    if not covered(q_bthq, k_all, group):
        return None
    b = q_bthq.shape[0]
    window = grid_window(b, k_all.shape[3], k_all.shape[2], kv_window)
    bs, splits = plan(b, k_all.shape[3], window)
    q = q_bthq if group is not None else q_bthq[:, 0]
    # positions [B] go in as they are: the kernel adds the 1 (keys 0..position attend)
    out = decode_attention(q, k_all, v_all, jnp.asarray(layer, jnp.int32), rows_b, positions_bt[:, 0],
                           scale=float(scale), bs=bs, splits=splits, group=group, length_offset=1, combine=COMBINE,
                           counts=counts, window=window)
    return out[:, None]


# The decode step's prologue (q/k RMSNorm, RoPE, the new K/V written to the cache) in this
# kernel ("fused", decode_attention_rope), or as its own kernel in front of it ("separate",
# qk_prologue.qk_norm_rope_write_cache). Read at trace time; serve.bench --attention-prologue
# times both.
PROLOGUE = "fused"
PROLOGUES = ("fused", "separate")


def rope_covered(heads: int, kv_heads: int, head_dim: int, batch: int, cache_len: int) -> bool:
    """decode_attention_rope handles these shapes: qk_prologue's (G = H/K a power of two <= 16,
    Q/2 a power of two >= 16), at least 16 query heads (a program's q tile is 16 consecutive
    heads holding its G), and a cache length decode_attention can tile."""
    return (qk_prologue.covered(heads, kv_heads, head_dim) and heads >= 16
            and plan(batch, kv_heads, cache_len) is not None)


def decode_attention_rope(q_sbn, k_sbn, v_sbn, q_norm_lq, k_norm_lq, layer, cos_bq, sin_bq, eps: float,
                          k_all, v_all, rows_b, positions_b, counts, *, heads: int, scale: float,
                          kv_window: int | None = None, interpret=None, num_warps: int = 4, num_stages: int = 2):
    """Decode attention with its prologue in the same kernel: one launch per layer where
    qk_prologue.qk_norm_rope_write_cache + decode_attention took two (~3 us of a ~53 us FP8
    batch-1 layer on an H200 was the prologue's own launch: benchmarks/NOTES.md, run 77).

    q [Sq, B, H*Q], k and v [Sk, B, K*Q]: the projections' float32 split-K partial sums
    (kernels.linear_einsum(partials=True)), summed and rounded to the cache dtype here; q_norm,
    k_norm [L, Q] stacked weights read at `layer`; cos, sin [B, Q] at each row's position;
    k_all, v_all [L, slots, S, K, Q] the cache, updated in place (aliased) at [layer, rows[b],
    positions[b]] (rows None: row b is slot b); positions [B] int32, a row at position >= S is
    idle (no write, zeros out); counts [B, K] int32 zeros, the merge's counters, returned zeroed
    again (the last program of each (row, kv head) resets its own), so one zeros array serves
    every layer of a step. kv_window as decode_attention_cached's.
    -> (out [B, H, Q] in the cache dtype, k_all, v_all, counts), or None when not covered.

    Every program of (b, kv head h) normalizes and rotates the 16 query heads from
    min(h*G, H-16) (its G among them: no padding rows, no q16 array) from the partials; the
    program of split 0 also the new k and v, which it writes to the cache and counts as key
    position p itself, so the cache is read below p only (no program reads what another
    writes). Numerics as qk_prologue then decode_attention, except that the new key's
    probability is not rounded to the compute dtype before its value product."""
    qd = q_norm_lq.shape[-1]
    b, s_len = positions_b.shape[0], k_all.shape[2]
    if (q_sbn.ndim != 3 or k_sbn.ndim != 3 or v_sbn.shape[1:] != k_sbn.shape[1:] or qd <= 0
            or {q_sbn.dtype, k_sbn.dtype, v_sbn.dtype} != {jnp.dtype(jnp.float32)}):
        return None
    kv = k_sbn.shape[2] // qd
    if (q_sbn.shape[1:] != (b, heads * qd) or k_sbn.shape[1:] != (b, kv * qd) or k_all.ndim != 5
            or k_all.shape[3:] != (kv, qd) or v_all.shape != k_all.shape or k_all.dtype not in KERNEL_DTYPES
            or not rope_covered(heads, kv, qd, b, s_len) or q_norm_lq.shape != k_norm_lq.shape
            or cos_bq.shape != (b, qd) or sin_bq.shape != (b, qd) or counts.shape != (b, kv)
            or counts.dtype != jnp.int32 or (rows_b is not None and rows_b.shape != (b,))):
        return None
    window = grid_window(b, kv, s_len, kv_window)
    bs, splits = plan(b, kv, window)   # fewer splits: slower (run 82, the key blocks then in series)
    return _attention_rope(
        q_sbn.reshape(q_sbn.shape[0], b, heads, qd), k_sbn.reshape(k_sbn.shape[0], b, kv, qd),
        v_sbn.reshape(v_sbn.shape[0], b, kv, qd), q_norm_lq, k_norm_lq, jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
        cos_bq, sin_bq, k_all, v_all, None if rows_b is None else rows_b.astype(jnp.int32),
        positions_b.astype(jnp.int32), counts, scale=float(scale), eps=float(eps), bs=bs, splits=splits,
        window=window, num_warps=num_warps, num_stages=num_stages,
        interpret=_interpret() if interpret is None else bool(interpret))


@functools.partial(jax.jit, static_argnames=("scale", "eps", "bs", "splits", "window", "num_warps", "num_stages",
                                             "interpret"))
def _attention_rope(q_in, k_in, v_in, q_norm_lq, k_norm_lq, layer, cos_bq, sin_bq, k_cache, v_cache, rows_b,
                    positions_b, counts, *, scale, eps, bs, splits, window, num_warps, num_stages, interpret):
    """decode_attention_rope's kernel: q_in [Sq, B, H, Q], k_in / v_in [Sk, B, K, Q] partials,
    layer [1] int32; the rest as there."""
    _, b, h, qd = q_in.shape
    _, _, s, k, _ = k_cache.shape
    g = h // k
    cdt = k_cache.dtype
    lo, up, full = pl.ds(0, qd // 2), pl.ds(qd // 2, qd // 2), pl.ds(0, qd)   # RoPE's halves of Q, loaded apart
    chunk = window // splits
    steps = chunk // bs
    ch = max(1, min(splits, _COMBINE_BYTES // (4 * g * qd)))

    def kernel(layer_ref, *refs):
        rows_ref, refs = (None, refs) if rows_b is None else (refs[0], refs[1:])
        (pos_ref, q_ref, kp_ref, vp_ref, qw_ref, kw_ref, cos_ref, sin_ref, k_ref, v_ref, _,
         acc_ref, m_ref, l_ref, o_ref, kc_ref, vc_ref, count_ref) = refs
        bi, hi, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        li = layer_ref[0]
        slot = bi if rows_ref is None else rows_ref[bi]
        p = pos_ref[bi]
        live = (p >= 0) & (p < s)
        n = jnp.where(live, p, 0)   # cache keys 0..p-1; key p is this step's, from registers
        cs = (cos_ref[bi, lo], cos_ref[bi, up], sin_ref[bi, lo], sin_ref[bi, up])   # [Q/2] each

        # Block 0's keys and values first (those below n only): their HBM latency then overlaps
        # the prologue's work below instead of following it (run 82: in series, the fused kernel
        # cost what the two did).
        s_first = pl.multiple_of(pi * chunk, bs)

        def block(s0, below=None):   # (k halves [bs, Q/2], v [bs, Q]); with `below`, keys under it only
            def ld(ref, cols, width):
                tile = ref.at[li, slot, pl.ds(s0, bs), hi, cols]
                if below is None:
                    return tile[...]
                rows = s0 + jax.lax.broadcasted_iota(jnp.int32, (bs, width), 0)
                return plt.load(tile, mask=rows < below, other=0.0)
            return ld(k_ref, lo, qd // 2), ld(k_ref, up, qd // 2), ld(v_ref, full, qd)

        block0 = block(s_first, below=n)
        first = jnp.minimum(hi * g, h - 16)   # the 16 query heads this program multiplies
        heads16 = pl.ds(first, 16)
        # Only its own G of them are loaded (the others read 0: zero rows, as q16's padding)
        head = first + jax.lax.broadcasted_iota(jnp.int32, (16, qd // 2), 0)
        mine = (head >= hi * g) & (head < hi * g + g)
        q_lo, q_hi = qk_prologue.norm_rope_halves(
            qk_prologue.sum_partials(q_ref, cdt, bi, heads16, lo, mask=mine),
            qk_prologue.sum_partials(q_ref, cdt, bi, heads16, up, mask=mine),
            qw_ref[li, lo][None, :], qw_ref[li, up][None, :], *(c[None, :] for c in cs), cdt, eps)   # [16, Q/2]
        # The new key and value (loaded by every program, so their loads overlap q's; used by split 0)
        k_lo, k_hi = qk_prologue.norm_rope_halves(
            qk_prologue.sum_partials(kp_ref, cdt, bi, hi, lo), qk_prologue.sum_partials(kp_ref, cdt, bi, hi, up),
            kw_ref[li, lo], kw_ref[li, up], *cs, cdt, eps)                                        # [Q/2]
        v_new = qk_prologue.sum_partials(vp_ref, cdt, bi, hi, full)                              # [Q] float32
        own = live & (pi == 0)

        @pl.when(own)
        def _write():
            kc_ref[li, slot, p, hi, lo] = k_lo
            kc_ref[li, slot, p, hi, up] = k_hi
            vc_ref[li, slot, p, hi, :] = v_new.astype(cdt)

        # Key p alone as the online softmax's first step: max = its score, sum = 1, acc = its value.
        f32 = jnp.float32
        sc_new = (jnp.sum(q_lo.astype(f32) * k_lo.astype(f32)[None, :], axis=1)
                  + jnp.sum(q_hi.astype(f32) * k_hi.astype(f32)[None, :], axis=1))                 # [16]
        sc_new = sc_new.astype(cdt).astype(f32) * scale
        m0, l0, acc0 = _empty(qd)
        carry = (jnp.where(own, sc_new, m0), jnp.where(own, 1.0, l0), jnp.where(own, v_new[None, :], acc0))

        def scores(tiles):
            return (jnp.dot(q_lo, tiles[0].T, preferred_element_type=f32)
                    + jnp.dot(q_hi, tiles[1].T, preferred_element_type=f32))   # [16, bs]

        m, l_sum, acc = _attend_keys(block, scores, n, s_first, steps, bs, scale, cdt, carry, preloaded=block0)
        acc_ref[bi, hi, pi, :, :] = acc
        m_ref[bi, hi, pi, :] = m
        l_ref[bi, hi, pi, :] = l_sum
        if not interpret:
            plt.debug_barrier()   # every thread's stores before the release below
        last = plt.atomic_add(count_ref, (bi, hi), jnp.int32(1)) == splits - 1

        @pl.when(last)
        def _last():
            _merge(acc_ref, m_ref, l_ref, o_ref, bi, hi, hi * g - first, g, splits, ch, cdt)
            count_ref[bi, hi] = jnp.int32(0)   # zeros again for the next layer's launch

    operands = ((layer,) + (() if rows_b is None else (rows_b,))
                + (positions_b, q_in, k_in, v_in, q_norm_lq, k_norm_lq, cos_bq, sin_bq, k_cache, v_cache, counts))
    n_in = len(operands)
    out_shape = (jax.ShapeDtypeStruct((b, k, splits, 16, qd), jnp.float32),
                 jax.ShapeDtypeStruct((b, k, splits, 16), jnp.float32),
                 jax.ShapeDtypeStruct((b, k, splits, 16), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, qd), cdt),
                 jax.ShapeDtypeStruct(k_cache.shape, cdt), jax.ShapeDtypeStruct(v_cache.shape, cdt),
                 jax.ShapeDtypeStruct(counts.shape, jnp.int32))
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, k, splits),
        input_output_aliases={n_in - 3: 4, n_in - 2: 5, n_in - 1: 6},   # the caches and counters in place
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="qwen3_decode_attention_rope",
    )(*operands)
    return outs[3:]
