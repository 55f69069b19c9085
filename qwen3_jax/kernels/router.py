"""MoE routing at decode in two kernels: router logits read in place, then softmax + top-k fused.

Why: at batch 1 the plain-XLA `moe.route` is ~8 small kernels per layer on an H100 (convert of
the router slice to float32, the dot, softmax, top-k lowered to a sort at 3.2 us, renormalize,
and index prep), each 1-3 us on a GPU that runs them back to back (benchmarks/NOTES.md, run 4
profile): only fewer kernels help. Here:
  1. logits: the grouped GEMV (gemv.py) with every row's group = `layer`, so W[layer] is read
     where it lies in the stacked [L, D, E] router param (a per-layer slice handed to a custom
     call would be copied every layer) -> float32 partials [S, N, E] over S split-K slices.
     From LOGITS_MATMUL_MIN_ROWS rows (LOGITS = "matmul"), one split-K grouped matmul
     (grouped_matmul.py, every block reading group `layer`) instead: the GEMV gives each row its
     own programs, which read W[layer] once per row (run 112's batch-64 profile: 7.2 us a layer
     for 64 rows, against 3.4 us for one), where the matmul's tensor-core tiles read it once per
     block of up to 64 rows;
  2. `topk_from_partials` (below): grid over blocks of `bm` token rows; each program sums the S
     partials, softmax in float32, k rounds of (max, lowest expert index attaining it, mask it
     out), renormalize -> weights [N, k] float32, experts [N, k] int32; with `with_groups` also
     groups [N*k] int32 = expert + layer * E, each assignment's expert in the stacked [L*E, ...]
     expert params, which the MoE gemv path reads as is (moe_ffn.py): on one device every expert
     is local, so the XLA index kernels between routing and the expert GEMVs go.

Numerics as `moe.route`: bf16 (or f16) x and W give exact products in float32, accumulated in
float32 (the order differs from XLA's dot, so logits agree to float32 rounding, not bitwise);
softmax exp(l - max) / sum in float32; top-k over the probabilities with ties going to the lower
expert index (as jax.lax.top_k); weights / their sum when norm_topk_prob.

The top-k kernel takes ROW_BLOCK rows a program, fewer when that leaves under TOPK_PROGRAMS
programs: its k rounds of max/argmax are a chain, so 64 rows in 4 programs of 16 took 6.3 us a
layer (run 112) and in 64 programs of one 2.5-2.8 us (run 119).

Coverage (else None and the caller keeps `moe.route`): N <= route_max_rows(), x and W of one
dtype in bf16/f16, E a power of two in [16, 512] (Triton block dims are powers of two; 16 is
gemv's smallest column tile), top_k <= E, and gemv tiles that divide D and E.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import KERNEL_DTYPES
from . import interpret as _interpret
from .gemv import gemv, gemv_tiles
from .gemv_inputs import materialize
from .grouped_matmul import grouped_matmul

# Row limit. The GEMV gives each token row its own programs, so N rows read the router weight N
# times (30B: 512 KiB a layer; from L2 after the first row): 32 MiB of L2 reads at N = 64, ~128 MiB
# at 256, where one XLA/cuBLAS dot reads it once and the ~8 routing kernels cost ~10-15 us. 64
# covers the decode batches where launch count dominates (batch 1-64) without betting on L2
# bandwidth beyond that. On an H100 the batch-64 step did not move (run 7: 29.81 ms, run 4 with
# XLA routing: 29.88 ms); the crossover itself is not measured.
ROUTE_MAX_ROWS = 64
MAX_EXPERTS = 512
ROW_BLOCK = 16          # token rows per top-k program (16 x 128 float32 = 8 KiB in registers)

# The logits' kernel from this many rows: "matmul" (a split-K grouped matmul reading the router
# once per block of MATMUL_ROWS rows, up to MATMUL_MAX_ROWS rows: the decode batches) or "gemv"
# (the GEMV for every N, up to ROUTE_MAX_ROWS). Measured in benchmarks/NOTES.md, run 119; the
# limit follows the MoE's (moe_ffn.GEMV_MAX_ASSIGNMENTS, 8 tokens: runs 128-129), so a batch
# that takes the blocks path routes through the matmul.
LOGITS_CHOICES = ("matmul", "gemv")
LOGITS = "matmul"
LOGITS_MATMUL_MIN_ROWS = 9
MATMUL_ROWS = 64
MATMUL_MAX_ROWS = 256
TOPK_PROGRAMS = 64      # the top-k's row block shrinks (to 1) until it has this many programs

# gemv tiles for the router (over gemv.GEMV_DEFAULTS["bf16"]): at N = 1 the default split of 8
# gives 8 programs reading 64 KiB each; 16 splits of one 128-deep K block each halve the bytes a
# program streams (more partials: 16 x E float32 per row, read once by the top-k kernel).
ROUTER_GEMV = dict(max_split=16)


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _by_matmul(n: int) -> bool:
    return LOGITS == "matmul" and n >= LOGITS_MATMUL_MIN_ROWS


def route_max_rows() -> int:
    return MATMUL_MAX_ROWS if LOGITS == "matmul" else ROUTE_MAX_ROWS


def covered(n: int, d: int, e: int, top_k: int, x_dtype, w_dtype) -> bool:
    """True when route_in_place handles these shapes and dtypes (see the module docstring)."""
    tiles = _matmul_tiles(d, e) if _by_matmul(n) else gemv_tiles(d, e, n, False, "k", 128, **ROUTER_GEMV)
    return (0 < n <= route_max_rows() and jnp.dtype(x_dtype) == jnp.dtype(w_dtype)
            and jnp.dtype(x_dtype) in KERNEL_DTYPES and 16 <= e <= MAX_EXPERTS and e == _pow2(e)
            and 0 < top_k <= e and tiles is not None)


def _matmul_tiles(d: int, e: int) -> dict | None:
    """grouped_matmul tiles for the logits: all E columns in one tile up to 128, K split in
    128-deep slices (16 programs a block of rows at D = 2048), each its own float32 partial."""
    from . import pick_tile
    bn, bk = pick_tile(e, 128), pick_tile(d, 128)
    if bn is None or bk is None:
        return None
    return dict(bn=bn, bk=bk, k_splits=d // bk, num_warps=4, num_stages=2)


def _logits_by_matmul(x_nd, router_lde, layer_1, interpret):
    """float32 logit partials [S, R, E] of x [N, D] (rows padded to R, a multiple of the block)."""
    n, d = x_nd.shape
    bm = min(MATMUL_ROWS, max(16, _pow2(n)))
    r = -(-n // bm) * bm
    x = materialize(x_nd)
    if r != n:
        x = jnp.pad(x, ((0, r - n), (0, 0)))
    tiles = _matmul_tiles(d, router_lde.shape[2])
    out = grouped_matmul(x, layer_1, (router_lde,), bm=bm, layout="k", interpret=interpret, **tiles)
    return out if tiles["k_splits"] > 1 else out[None]   # one split: [R, E] (a reshape, no copy)


def route_in_place(x_nd, router_lde, layer, top_k: int, norm_topk_prob: bool, *, with_groups: bool = False,
                   interpret=None):
    """`moe.route(x, router_lde[layer], ...)` without slicing the layer out.

    x [N, D] bf16/f16; router_lde [L, D, E] (the stacked param, same dtype); layer int32 scalar
    (traced) -> (weights [N, k] float32, experts [N, k] int32), or None when not covered.
    with_groups: (weights, experts, groups [N*k] int32 = experts + layer * E), written by the same
    top-k kernel (moe_ffn's `groups` for experts stacked [L*E, ...], all on this device).
    """
    n, d = x_nd.shape
    e = router_lde.shape[2]
    if not covered(n, d, e, top_k, x_nd.dtype, router_lde.dtype):
        return None
    layer = jnp.asarray(layer, jnp.int32)
    # One group for every row (a reshape of the scalar is a bitcast, not a broadcast kernel) and
    # rows by row_div (no index array, which would be an iota kernel).
    layer_1 = layer.reshape(1)
    if _by_matmul(n):
        partials = _logits_by_matmul(x_nd, router_lde, layer_1, interpret)
    else:
        tiles = gemv_tiles(d, e, n, False, "k", 128, **ROUTER_GEMV)
        (partials,) = gemv(x_nd, n, layer_1, (router_lde,), None, row_div=1, layout="k", interpret=interpret,
                           **tiles)
    out = topk_from_partials(partials, layer_1 if with_groups else None, top_k=top_k,
                             norm_topk_prob=norm_topk_prob, rows=n, interpret=interpret)
    if with_groups:
        w, ex, g = out
        return w, ex, g.reshape(n * top_k)     # row-major [N, k] -> [N*k]: a bitcast, no kernel
    return out


def _num_warps(bm: int, e: int) -> int:
    """One warp per 512 elements of the [bm, E] block (>= 16 per thread), 1 to 4: at N = 1 a
    single warp keeps every reduction within shuffles (no shared-memory round trips)."""
    return max(1, min(4, bm * e // 512))


def topk_row_block(n: int) -> int:
    """Rows per top-k program for N rows: ROW_BLOCK, halved (to 1) while that leaves fewer than
    TOPK_PROGRAMS programs."""
    bm = min(_pow2(ROW_BLOCK), _pow2(n))
    while bm > 1 and -(-n // bm) < TOPK_PROGRAMS:
        bm //= 2
    return bm


@functools.partial(jax.jit, static_argnames=("top_k", "norm_topk_prob", "row_block", "rows", "interpret"))
def topk_from_partials(partials_sne, layer_1=None, *, top_k: int, norm_topk_prob: bool,
                       row_block: int | None = None, rows: int | None = None, interpret=None):
    """float32 logit partials [S, N', E] (E a power of two) -> softmax top-k of the first N =
    `rows` (default N') rows: (weights [N, k] float32, experts [N, k] int32), ties to the lower
    expert index, renormalized when `norm_topk_prob`. Rows past N in the last block are masked
    on load and store. row_block: rows per program (default topk_row_block(N)).
    layer_1 [1] int32 (optional): a third output, groups [N, k] int32 = experts + layer * E (the
    multiply is done here, so the caller passes the layer index as it is: no XLA kernel)."""
    s_count, n, e = partials_sne.shape
    n = n if rows is None else rows
    if e != _pow2(e) or not 0 < top_k <= e:
        raise ValueError(f"topk_from_partials needs E a power of two and 0 < top_k <= E, got E={e}, "
                         f"top_k={top_k}; use moe.route for these shapes")
    bm = topk_row_block(n) if row_block is None else min(_pow2(row_block), _pow2(n))
    kp = _pow2(top_k)   # the output tile is a power of two wide; columns >= top_k are not stored

    with_groups = layer_1 is not None

    def kernel(p_ref, *refs):
        if with_groups:
            layer_ref, w_ref, e_ref, g_ref = refs
        else:
            w_ref, e_ref = refs
        r0 = pl.program_id(0) * bm
        row = r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, e), 0)
        logits = jnp.zeros((bm, e), jnp.float32)
        for s in range(s_count):
            logits = logits + plt.load(p_ref.at[jnp.int32(s), pl.ds(r0, bm), :], mask=row < n, other=0.0)
        ex = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
        probs = ex / jnp.sum(ex, axis=1, keepdims=True)

        col = jax.lax.broadcasted_iota(jnp.int32, (bm, e), 1)
        kcol = jax.lax.broadcasted_iota(jnp.int32, (bm, kp), 1)
        w_out = jnp.zeros((bm, kp), jnp.float32)
        e_out = jnp.zeros((bm, kp), jnp.int32)
        for j in range(top_k):
            # The index from an arg-max reduction (ties to the lower index: jax.lax.top_k's order)
            # beside the max, not a min-index reduction that waits for it: half the reductions in
            # a row (run 69: 2.54-2.62 against 2.73 us per layer at batch 1). A NaN row still
            # yields experts in range (no value compares greater than NaN).
            best = jnp.max(probs, axis=1, keepdims=True)                                 # [bm, 1]
            idx = jnp.argmax(probs, axis=1).astype(jnp.int32)[:, None]                   # [bm, 1]
            w_out = jnp.where(kcol == j, best, w_out)
            e_out = jnp.where(kcol == j, idx, e_out)
            probs = jnp.where(col == idx, -1.0, probs)     # probabilities are >= 0: -1 is never picked
        if norm_topk_prob:
            w_out = w_out / jnp.sum(w_out, axis=1, keepdims=True)   # columns >= top_k hold 0
        out_rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, kp), 0)
        keep = (out_rows < n) & (kcol < top_k)
        plt.store(w_ref.at[pl.ds(r0, bm), pl.ds(0, kp)], w_out, mask=keep)
        plt.store(e_ref.at[pl.ds(r0, bm), pl.ds(0, kp)], e_out, mask=keep)
        if with_groups:
            plt.store(g_ref.at[pl.ds(r0, bm), pl.ds(0, kp)], e_out + layer_ref[0] * e, mask=keep)

    ids = jax.ShapeDtypeStruct((n, top_k), jnp.int32)
    out_shape = (jax.ShapeDtypeStruct((n, top_k), jnp.float32), ids) + ((ids,) if with_groups else ())
    operands = (partials_sne,) + ((jnp.asarray(layer_1, jnp.int32).reshape(1),) if with_groups else ())
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(n, bm),),
        compiler_params=plt.CompilerParams(num_warps=_num_warps(bm, e), num_stages=1),
        interpret=_interpret() if interpret is None else interpret,
        name="qwen3_router_topk",
    )(*operands)
