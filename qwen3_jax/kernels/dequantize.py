"""FP8 weights stored [out, in] -> a bf16 copy in the einsum order [in, out], in one pass.

Prefill multiplies each FP8 expert by hundreds of rows, where the bf16 MMA on a dequantized copy
beat converting FP8 in the matmul's registers (kernels.FP8_DEQUANTIZE_MOE_MIN_ROWS; since the
W8A8 grouped matmul, run 55, the copy is off by default and this kernel runs when that threshold
is set). The model stores
FP8 experts [E, N, K] (fp8.NK_ORDER) and the bf16 grouped matmul wants [E, K, N] tiles (run 38 in
benchmarks/NOTES.md: [E, N, K] tiles were 5% slower at 8k tokens). XLA's fused dequantize +
transpose writes the copy with strided accesses: 8k-token prefill took 215.7 ms against 198.7 ms
when the weights were stored [E, K, N] (H200, run 35); with this kernel, 201.3 ms (run 41).
Here each program reads an 8-bit [bn, bk]
tile row-contiguous, scales it in float32, and writes the transposed [bk, bn] tile
row-contiguous; Triton moves the tile through shared memory for the transpose.

Grid (groups, N / bn, K / bk); group g of the output reads stored group offset + g, so a
layer's experts are copied out of the stacked [L*E, N, K] params with no slice first.
Scales (never swapped, see moe_ffn.ExpertArrays): layout "k" [G, ceil(K/block), N] (gate/up),
layout "n" [G, K, ceil(N/block)] (down). Numerics as fp8.dequantize: float32 product, one
rounding to the output dtype, so the copy is bit-identical to XLA's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import interpret as _interpret
from . import pick_tile

# Who writes the prefill copy of [out, in] FP8 experts, read at trace time: "kernel" (here) or
# "xla" (fp8.dequantize of the swapped weight); serve.bench --fp8-copy times both.
COPY = "kernel"
COPIES = ("kernel", "xla")
# Tile (bn, bk) and warps; both tile sides must divide the scale block (128). Run 40 (H200,
# benchmarks/dequantize_copy.py, one layer of 30B-A3B experts, us per copy against XLA's fusion):
# gate 272 (XLA) / 246 (64, 4 warps) / 172 (128, 8 warps); down 251 / 253 / 182. Tiles of 32 were
# slower than XLA for the down copy (360-371 us).
TILE = 128
NUM_WARPS = 8


def covered(n_dim: int, k_dim: int, block: int) -> bool:
    """A tile of at most TILE that divides N, K and the scale block exists."""
    t = min(TILE, block)
    return pick_tile(n_dim, t) is not None and pick_tile(k_dim, t) is not None and block % t == 0


@functools.partial(jax.jit, static_argnames=("groups", "layout", "block", "dtype", "tile", "num_warps",
                                             "interpret"))
def dequantize_transposed(w_gnk, scale, offset, *, groups: int, layout: str, block: int, dtype=jnp.bfloat16,
                          tile: int | None = None, num_warps: int | None = None, interpret=None):
    """w [G_all, N, K] float8 (stored [out, in]); scale per `layout` (module doc) over G_all;
    offset int32 scalar (traced): the first stored group -> [groups, K, N] in `dtype`, group g
    = dequantize(w[offset + g]).T."""
    g_all, n_dim, k_dim = w_gnk.shape
    t = min(TILE if tile is None else tile, block)
    bn, bk = pick_tile(n_dim, t), pick_tile(k_dim, t)
    if bn is None or bk is None or block % bn or block % bk:
        raise ValueError(f"dequantize_transposed: no tile <= {t} divides N={n_dim}, K={k_dim} and the "
                         f"block {block}; check covered() first and dequantize with XLA")
    if layout not in ("k", "n"):
        raise ValueError(f"layout must be 'k' or 'n', got {layout!r}")
    want = (g_all, -(-k_dim // block), n_dim) if layout == "k" else (g_all, k_dim, -(-n_dim // block))
    if scale.shape != want:
        raise ValueError(f"dequantize_transposed layout {layout!r} needs scale {want}, got {scale.shape}")

    def kernel(off_ref, w_ref, s_ref, o_ref):
        gi, ni, ki = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        g = off_ref[0] + gi
        n0, k0 = pl.multiple_of(ni * bn, bn), pl.multiple_of(ki * bk, bk)
        w = w_ref[g, pl.ds(n0, bn), pl.ds(k0, bk)].astype(jnp.float32)                  # [bn, bk]
        if layout == "k":
            w = w * s_ref[g, k0 // block, pl.ds(n0, bn)][:, None]
        else:
            w = w * s_ref[g, pl.ds(k0, bk), n0 // block][None, :]
        o_ref[gi, pl.ds(k0, bk), pl.ds(n0, bn)] = w.T.astype(dtype)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((groups, k_dim, n_dim), dtype),
        grid=(groups, n_dim // bn, k_dim // bk),
        compiler_params=plt.CompilerParams(num_warps=NUM_WARPS if num_warps is None else num_warps, num_stages=1),
        interpret=_interpret() if interpret is None else interpret,
        name="qwen3_dequantize_transposed",
    )(jnp.reshape(offset, (1,)).astype(jnp.int32), w_gnk, scale)
