"""Routing -> row blocks for grouped_matmul: sort (token, expert) assignments by expert and pad
each expert's run to whole blocks of `bm` rows, so a block reads exactly one expert.

Static sizes (jit needs them): with A = N*k assignments and E local experts, the number of
blocks is at most A // bm + min(E, A) (each non-empty expert wastes less than one block), so
R = NB * bm padded rows. Plain XLA, a handful of small fused ops.

The place of each assignment in its expert's run comes from a stable argsort of the expert ids
and gathers through the order. A sort-free rank (each assignment counting the earlier ones of
its expert, an [A, A] comparison) was measured slower: XLA ran the comparison as a 28 us loop
fusion a layer at batch 64 (run 112, benchmarks/NOTES.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


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


def block_rows(assignments: int, num_experts: int) -> int:
    """Block height for grouped_matmul: about the mean rows per expert, 16..128 (tensor-core
    tiles need 16; past 128 a bigger tile buys little)."""
    mean = max(assignments // max(num_experts, 1), 1)
    bm = 16
    while bm < 128 and bm < mean:
        bm *= 2
    return bm
