"""Routing -> row blocks for grouped_matmul: sort (token, expert) assignments by expert and pad
each expert's run to whole blocks of `bm` rows, so a block reads exactly one expert.

Static sizes (jit needs them): with A = N*k assignments and E local experts, the number of
blocks is at most A // bm + min(E, A) (each non-empty expert wastes less than one block), so
R = NB * bm padded rows.

Two ways to build them:
  expert_blocks: plain XLA. The place of each assignment in its expert's run comes from a stable
    argsort of the expert ids and gathers through the order: at batch 64 the sort, the
    scatters, the cumsum and the gathers are ~10 kernels a layer (run 112's profile). A
    sort-free rank in XLA (each assignment counting the earlier ones of its expert, an [A, A]
    comparison) was slower: a 28 us loop fusion a layer (run 112, benchmarks/NOTES.md).
  route_blocks: two Pallas kernels, a counting sort over chunks of ROUTE_CHUNK assignments
    (A <= ROUTE_BLOCKS_MAX_ASSIGNMENTS: decode batches and the engine's prefill chunks). The
    first writes each chunk's rows per expert (a program a chunk); the second (a program a
    chunk) sums them into each expert's count and the counts of the chunks before its own,
    cumsums the blocks, ranks each of its assignments among its expert's (earlier chunks + an
    [C, C] comparison inside the chunk) and scatters its token into its padded row; the same
    programs write each block's expert and count of real rows (grouped_matmul's block_valid)
    and the routing weights masked to the experts held here. One program walking every chunk
    in turn cost 86 us a layer at batch 64 (run 119): the walk is a chain of ~1.7 us steps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import interpret as _interpret


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExpertBlocks:
    """rows [R] int32: the token each padded row reads (pad rows read token 0, never used);
    groups [NB] int32: the local expert of each block, -1 past the last used block;
    pos [A] int32: the padded row of each assignment in (token, slot) order (0 if not here);
    here [A] bool: the assignment's expert is held here."""

    rows: jax.Array
    groups: jax.Array
    pos: jax.Array
    here: jax.Array



def num_blocks(assignments: int, num_experts: int, bm: int) -> int:
    return assignments // bm + min(num_experts, assignments)


def expert_blocks(experts_nk, num_experts: int, bm: int, first_expert=0) -> ExpertBlocks:
    """experts [N, k] global ids -> ExpertBlocks for the experts [first, first + num_experts)."""
    n, k = experts_nk.shape
    a = n * k
    nb = num_blocks(a, num_experts, bm)
    r = nb * bm
    local = experts_nk.reshape(-1).astype(jnp.int32) - first_expert
    here = (local >= 0) & (local < num_experts)
    key = jnp.where(here, local, num_experts)              # not-here sorts last
    counts = jnp.zeros((num_experts + 1,), jnp.int32).at[key].add(1)[:num_experts]
    nblk = (counts + bm - 1) // bm
    blk_end = jnp.cumsum(nblk)
    blk_start = blk_end - nblk
    order = jnp.argsort(key, stable=True)
    skey = key[order]
    run_start = jnp.cumsum(counts) - counts             # first sorted index of each expert
    ek = jnp.minimum(skey, num_experts - 1)
    rank = jnp.arange(a, dtype=jnp.int32) - run_start[ek]
    pos_sorted = jnp.where(skey < num_experts, blk_start[ek] * bm + rank, r)
    rows = jnp.zeros((r,), jnp.int32).at[pos_sorted].set((order // k).astype(jnp.int32), mode="drop")
    pos = jnp.zeros((a,), jnp.int32).at[order].set(jnp.minimum(pos_sorted, r - 1))
    b = jnp.arange(nb, dtype=jnp.int32)
    group = jnp.sum(blk_end[None, :] <= b[:, None], axis=1).astype(jnp.int32)
    groups = jnp.where(b < blk_end[-1], group, -1)
    return ExpertBlocks(rows=rows, groups=groups, pos=jnp.where(here, pos, 0), here=here)


# The tallest block; benchmarks set it lower to time smaller tiles at prefill sizes.
MAX_BLOCK_ROWS = 128
# From a mean of SLACK_MIN_MEAN rows an expert (prefill chunks of 512+ tokens at top-8 of 128),
# the block is at least the mean times BLOCK_ROWS_SLACK. Routing spreads the counts (about
# sqrt(mean) either side under uniform top-k), so a block of the mean's height leaves about half
# the experts a second, mostly empty block that reads the expert's weights again; a taller block
# wastes MMA rows instead. Run 179 (H200, benchmarks/NOTES.md), slack 2 against 1: prefill 512
# tokens bf16 -11.7% (FP8 level), 1024 -4.2% (FP8 -2.6%); decode batch 256 (mean 16) bf16 -2.6%
# but FP8 +2.2%, so smaller means keep the mean's height.
BLOCK_ROWS_SLACK = 2.0
SLACK_MIN_MEAN = 32


def block_rows(mean_rows: int) -> int:
    """Block height for grouped_matmul from the mean rows an expert gets (assignments over the
    experts tokens route among, ExpertArrays.rows_per_expert): a power of two >= that mean (times
    BLOCK_ROWS_SLACK from a mean of SLACK_MIN_MEAN), 16..MAX_BLOCK_ROWS (tensor-core tiles need 16;
    past 128 a bigger tile buys little)."""
    mean = max(mean_rows, 1)
    want = mean * BLOCK_ROWS_SLACK if mean >= SLACK_MIN_MEAN else mean
    bm = 16
    while bm < MAX_BLOCK_ROWS and bm < want:
        bm *= 2
    return bm


# route_blocks: up to a 512-token prefill chunk of top-8 routing, each program of the second
# kernel reads the whole [A / ROUTE_CHUNK, E] histogram and sums the rows before its chunk (the
# in-kernel walk: no XLA kernel between the two). Past that XLA sums them (an exclusive cumsum
# over the histogram's chunks, and the experts' block starts: a few small kernels) and each
# program reads its chunk's row only.
ROUTE_BLOCKS_MAX_ASSIGNMENTS = 4096
ROUTE_CHUNK = 64
MAX_LOCAL_EXPERTS = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RoutedBlocks:
    """route_blocks' output. rows [R + 1] int32: the token each padded row reads (pad rows and
    the spare last entry: never written, any value; block_valid says which rows are real); groups [NB] int32: each block's
    weight group (local expert + offset), -1 past the last used block; block_valid [NB] int32:
    the real rows at the start of each block (0 for unused blocks); pos [A] int32: the padded
    row of each assignment in (token, slot) order, 0 if its expert is not held here; weights
    [A] float32: the routing weight, 0 where the expert is not held here."""

    rows: jax.Array
    groups: jax.Array
    block_valid: jax.Array
    pos: jax.Array
    weights: jax.Array


def route_blocks_covered(assignments: int, num_experts: int, walk_only: bool = False) -> bool:
    """route_blocks takes these sizes (walk_only: and runs them without XLA summing the
    histogram, up to ROUTE_BLOCKS_MAX_ASSIGNMENTS)."""
    return (0 < assignments and (not walk_only or assignments <= ROUTE_BLOCKS_MAX_ASSIGNMENTS)
            and 0 < num_experts <= MAX_LOCAL_EXPERTS)


def route_blocks(experts_nk, weights_nk, num_experts: int, bm: int, first_expert=0, layer=0, *,
                 groups_per_layer: int | None = None, interpret=None) -> RoutedBlocks:
    """experts [N, k] global ids (-1 or any id outside [first, first + num_experts): not held
    here), weights [N, k] -> RoutedBlocks for grouped_matmul over the experts [first, first +
    num_experts), whose weights are groups offset.. with offset = layer * groups_per_layer
    (default num_experts: experts stacked [L*E, ...]). first_expert, layer: ints or traced
    int32 scalars, passed as they are (the multiply runs in the kernel: no XLA kernel a layer).
    Row order within an expert's run is (token, slot) order, as expert_blocks' stable sort gives.
    Past ROUTE_BLOCKS_MAX_ASSIGNMENTS XLA sums the histogram between the two kernels."""
    n, k = experts_nk.shape
    if not route_blocks_covered(n * k, num_experts):
        raise ValueError(f"route_blocks covers 1 to {MAX_LOCAL_EXPERTS} local experts and at least one "
                         f"assignment, got {num_experts} and {n * k}; use expert_blocks")
    scalars = [jnp.asarray(v, jnp.int32).reshape(1) for v in (first_expert, layer)]   # reshapes: bitcasts
    return _route_blocks(experts_nk.reshape(-1).astype(jnp.int32), weights_nk.reshape(-1).astype(jnp.float32),
                         *scalars, k=k, num_experts=num_experts, bm=bm,
                         per_layer=num_experts if groups_per_layer is None else groups_per_layer,
                         scan=n * k > ROUTE_BLOCKS_MAX_ASSIGNMENTS, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("k", "num_experts", "bm", "per_layer", "scan", "interpret"))
def _route_blocks(experts_a, weights_a, first_1, layer_1, *, k, num_experts, bm, per_layer, scan, interpret):
    a = experts_a.shape[0]
    e = num_experts
    ep = _pow2(e)   # Triton blocks are powers of two; columns >= e stay empty
    nb = num_blocks(a, e, bm)
    c = ROUTE_CHUNK
    chunks = pl.cdiv(a, c)
    cp = _pow2(chunks)
    lane = functools.partial(jax.lax.broadcasted_iota, jnp.int32)
    params = plt.CompilerParams(num_warps=4, num_stages=1)
    interpret = _interpret() if interpret is None else interpret

    def chunk_keys(e_ref, first, i):
        """Chunk i: (assignment index [C], local expert [C] (-1: not here or past A), one-hot [C, E])."""
        idx = i * c + lane((c,), 0)
        key = plt.load(e_ref.at[pl.ds(i * c, c)], mask=idx < a, other=-1) - first
        key = jnp.where((idx < a) & (key >= 0) & (key < e), key, -1)
        return idx, key, key[:, None] == lane((c, ep), 1)

    def histogram(first_ref, e_ref, hist_ref):   # program i: chunk i's rows per expert
        i = pl.program_id(0)
        hist_ref[i, :] = jnp.sum(chunk_keys(e_ref, first_ref[0], i)[2].astype(jnp.int32), axis=0)

    hist = pl.pallas_call(
        histogram, out_shape=jax.ShapeDtypeStruct((chunks, ep), jnp.int32), grid=(chunks,),
        compiler_params=params, interpret=interpret, name="qwen3_route_histogram",
    )(first_1, experts_a)

    def place(first_ref, layer_ref, e_ref, w_ref, *refs):
        # the histogram [chunks, E], or with scan XLA's sums of it: each chunk's earlier rows per
        # expert [chunks, E] and the experts' counts, block starts and ends [3, E]
        if scan:
            seen_ref, sums_ref, *refs = refs
        else:
            hist_ref, *refs = refs
        rows_ref, groups_ref, valid_ref, pos_ref, wout_ref = refs
        i = pl.program_id(0)
        first, offset = first_ref[0], layer_ref[0] * per_layer
        if scan:
            counts, blk_start, blk_end = sums_ref[0, :], sums_ref[1, :], sums_ref[2, :]
            nblk = blk_end - blk_start
        else:
            rows_i = lane((cp, ep), 0)
            h = plt.load(hist_ref.at[pl.ds(0, cp), :], mask=rows_i < chunks, other=0)   # [chunks, E]
            counts = jnp.sum(h, axis=0)
            nblk = (counts + bm - 1) // bm
            blk_end = jnp.cumsum(nblk)
            blk_start = blk_end - nblk

        @pl.when(i < chunks)
        def _assignments():   # this chunk's rows: rank = earlier chunks' + earlier in this chunk
            idx, key, hot = chunk_keys(e_ref, first, i)
            seen = seen_ref[i, :] if scan else jnp.sum(jnp.where(rows_i < i, h, 0), axis=0)
            before = jnp.sum(jnp.where(hot, seen[None, :], 0), axis=1)        # seen[key]
            start = jnp.sum(jnp.where(hot, blk_start[None, :], 0), axis=1)    # blk_start[key]
            j = lane((c,), 0)
            earlier = (key[:, None] == key[None, :]) & (j[None, :] < j[:, None])
            p = start * bm + before + jnp.sum(earlier.astype(jnp.int32), axis=1)
            here, live = key >= 0, idx < a
            plt.store(pos_ref.at[pl.ds(i * c, c)], jnp.where(here, p, 0), mask=live)
            w = plt.load(w_ref.at[pl.ds(i * c, c)], mask=live, other=0.0)
            plt.store(wout_ref.at[pl.ds(i * c, c)], jnp.where(here, w, 0.0), mask=live)
            # lanes not held here aim at the spare last entry: a masked lane of a scatter must not
            # share an index with a live one (interpret mode stores it back as read)
            plt.store(rows_ref.at[jnp.where(here, p, nb * bm)], idx // k, mask=here)

        @pl.when(i * c < nb)
        def _blocks():   # blocks i*C..: the expert owning each, its real rows
            b = i * c + lane((c,), 0)
            grp = jnp.sum((blk_end[None, :] <= b[:, None]).astype(jnp.int32), axis=1)
            mine = lane((c, ep), 1) == grp[:, None]
            cnt = jnp.sum(jnp.where(mine, counts[None, :], 0), axis=1)
            first_blk = jnp.sum(jnp.where(mine, blk_start[None, :], 0), axis=1)
            used, keep = b < jnp.sum(nblk), b < nb
            plt.store(groups_ref.at[pl.ds(i * c, c)], jnp.where(used, grp + offset, -1), mask=keep)
            plt.store(valid_ref.at[pl.ds(i * c, c)],
                      jnp.where(used, jnp.minimum(bm, cnt - (b - first_blk) * bm), 0), mask=keep)

    i32 = jnp.int32
    out_shape = (jax.ShapeDtypeStruct((nb * bm + 1,), i32), jax.ShapeDtypeStruct((nb,), i32),
                 jax.ShapeDtypeStruct((nb,), i32), jax.ShapeDtypeStruct((a,), i32),
                 jax.ShapeDtypeStruct((a,), jnp.float32))
    sums = (hist,)
    if scan:
        # the counts are the running sum's last row, not a second reduction over the chunks: XLA
        # fused a column sum with the running sum into one kernel that took 114 us a layer at 1024
        # chunks (H200, run 170's 8k profile, `input_reduce_subtract_fusion`)
        running = jnp.cumsum(hist, axis=0)
        counts = running[-1]
        nblk = (counts + bm - 1) // bm
        blk_end = jnp.cumsum(nblk)
        sums = (running - hist, jnp.stack([counts, blk_end - nblk, blk_end]))
    rows, groups, valid, pos, w = pl.pallas_call(
        place, out_shape=out_shape, grid=(max(chunks, pl.cdiv(nb, c)),),
        compiler_params=params, interpret=interpret, name="qwen3_route_blocks",
    )(first_1, layer_1, experts_a, weights_a, *sums)
    return RoutedBlocks(rows=rows, groups=groups, block_valid=valid, pos=pos, weights=w)


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()
