"""Grouped matmul on tensor cores: rows come in blocks of `bm`, block b multiplies by W[groups[b]].

For prefill and large decode batches: tokens sorted by expert and padded to whole blocks
(moe_blocks.py) so every block reads one expert's weight tiles, once per block. FP8 weights are
dequantized tile by tile in registers (never materialized in memory).

Shapes (G groups, K in, N out, R = NB * bm rows):
  x [R, K] bf16/f16, groups [NB] int32 in [-1, G) (-1: block skipped, its rows left unwritten),
  or [1]: every block reads group groups[0] (one weight for all rows: the router's logits),
  weights: 1 array [G, K, N] -> float32 [R, N] (out_dtype: rows rounded from the float32 sums to
  another dtype, e.g. the MoE down's bf16 rows); or 2 (gate, up) -> silu(x@W0) * (x@W1) in x's
  dtype (the MoE hidden activation, as the reference computes it from float32 products).
  k_splits=S (not a pair): S programs per tile split the K steps, -> float32 partial sums
  [S, R, N] for the caller to add (a projection of few rows has too few tiles to keep the SMs
  streaming otherwise: linear.py).
  concat=True: 1-3 weights of the same K side by side (q, k and v), each with its own N and
  float32 output; the grid's column tiles run over all of them, one launch for the three.
  With w_nk the weights are stored [G, N, K] (the checkpoint's [out, in]); scales never swap.
  n_first: the grid runs a block's N tiles next to each other (grid (N / bn, NB, S)), so the
  programs in flight share x's rows in L2 and read a few experts' whole weights; by default the
  blocks of one N tile run together (grid (NB, N / bn, S)), sharing weight tiles, and x's rows
  are read again for every N tile: at an 8k prompt's 73k rows (300 MB of x, past the 50 MB L2)
  that is 6 reads of x for gate/up and 16 of h for the down (NOTES, runs 158-160: n_first took
  14% off those matmuls at 8k and 5.7% off the FP8 model's 8k prefill).
  scales: None or per weight float32, layout "k" [G, ceil(K/block), N] or "n" [G, K, ceil(N/block)].

rows [R] int32 (optional; longer is fine, the rest unread): x is [N, K] and padded row r reads
x[rows[r]], gathered in the kernel (no [R, K] copy of x in memory). block_valid [NB] int32
(optional): only the first block_valid[b] rows of block b are real; the rest are not stored
(their results are never read, so a down projection writes only its real rows) and, with rows,
read x row 0 (rows[] holds anything there: moe_blocks.route_blocks leaves pad rows unwritten).

Numerics: float32 accumulation. Layout "k" multiplies the exactly converted FP8 tile product by
its per-column scale after each K block (more precise than dequantize-then-round); layout "n"
dequantizes the tile to x's dtype first, exactly as fp8.dequantize does.
convert="f16" (FP8 weights): the MMA runs in float16, as gemv's w8a16 does. e4m3 -> f16 is one
packed instruction per two values (-> bf16 takes a trip through float32), and at prefill sizes
that conversion, not HBM, bounds the kernel. x is rounded to f16 (pass it as f16 to skip the
per-tile conversion: 11 significant bits, range +-65504); layout "n" multiplies the converted
tile by its per-row scale in f16 (the dequantized weight to 11 bits rather than bf16's 8). A
block scale is amax / 448, below f16's smallest normal (6e-5) for a block whose largest weight
is under 0.027, so the scale is pre-multiplied by 2^10 (gemv's trick) and the float32 product
divided by it, exactly.
w_lhs=True (weights stored [G, N, K] only): the MMA computes the transposed tile, W [bn, bk] x
x^T [bk, bm] -> [bn, bm], stored transposed. The weight, converted in registers, is then the
MMA's left operand, which Hopper's wgmma takes from registers (its right operand must come from
shared memory, so a converted right operand costs a trip through shared memory or the older
mma.sync), and the tile's MMA height is bn rather than bm (wgmma's is 64). Same products, same
float32 accumulation per K step. Measured faster for prefill-sized blocks and slower for decode-sized
ones (MATMUL_DEFAULTS says where it runs).
convert="e4m3" (FP8 weights): W8A8, the checkpoints' `activation_scheme: dynamic`. x arrives
already quantized, e4m3 [R, K] with x_scales float32 [R, K // qg] (qg-wide groups along K, qg a
multiple of bk: gemv.quantize_rows, run once per token before the rows are gathered, not once
per tile). The MMA runs e4m3 x e4m3 into float32 per K step, the step's product is multiplied
by x's group scale and the weight's block scale, and no tile is converted. Layout "n" reads one
weight scale per tile (its first K row): exact for a checkpoint's block scales, whose expanded
per-K-row values repeat in runs of the checkpoint's block (model.Weight.fp8_scale_run), when bk
divides that run and the K width held here (the callers, moe_ffn.py and linear.py, choose so).
Layout "k" does the same when the caller passes scale_run, the run of equal expanded scales
along N, and bn divides it: the step's product is then scaled by one number per row.
x_scales_ahead=True (W8A8 with rows): XLA gathers x's scales into the padded rows' order before
the kernel ([R, K // qg] float32, a few MB at an 8k prompt), which then reads them as an
ungathered x's. Gathered in the kernel, each K step's [bm] scales are loaded through the row
indices, which then stay live in the MMA accumulator's layout for the whole loop: at bm 128 with 8
warps that pushes the W8A8 pair past 255 registers a thread (~240 bytes spilled a thread as
compiled for sm_90a by benchmarks/kernel_registers.py; none with the scales ahead).
quantize_out=True (a pair, e4m3): the silu product leaves quantized for the next W8A8 matmul, e4m3
[R, N] and float32 scales [R, N // bn], one group per output tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import interpret as _interpret
from .gemv import E4M3_MAX


F16_SCALE_PRE = 1024.0   # keeps an FP8 block scale a normal f16 number (module doc)


@functools.partial(jax.jit, static_argnames=("bm", "layout", "block", "bn", "bk", "num_warps",
                                             "num_stages", "convert", "w_nk", "w_lhs", "quantize_out",
                                             "k_splits", "concat", "n_first", "scale_run", "x_scales_ahead",
                                             "out_dtype", "interpret"))
def grouped_matmul(x_rk, groups_b, weights, scales=None, *, bm, layout="k", block=128, bn=64, bk=64,
                   num_warps=4, num_stages=3, convert="cast", w_nk=False, w_lhs=False, x_scales=None,
                   quantize_out=False, k_splits=1, concat=False, n_first=False, scale_run=None, x_scales_ahead=False,
                   rows=None, block_valid=None, out_dtype=None, interpret=None):
    weights = tuple(weights)
    scales = tuple(scales) if scales is not None else ()
    g_count, k_dim, n_dim = weights[0].shape
    if w_nk:
        n_dim, k_dim = k_dim, n_dim
    n_dims = [w.shape[1 if w_nk else 2] for w in weights]
    if concat:   # side by side: each weight its own N and output; the grid's tiles run over all of them
        if any(w.shape[0] != g_count or w.shape[2 if w_nk else 1] != k_dim for w in weights):
            raise ValueError(f"concat weights need the same groups and K, got {[w.shape for w in weights]}")
        if quantize_out or any(n % bn for n in n_dims):
            raise ValueError(f"concat needs bn={bn} to divide every N {n_dims} and no quantize_out")
        n_dim = sum(n_dims)
    if w_lhs and not w_nk:
        raise ValueError("w_lhs=True (the weight as the MMA's left operand) needs weights stored [G, N, K] (w_nk=True)")
    # x tile [bm, bk] against the weight tile as stored; w_lhs: weight tile [bn, bk] against x's
    dims = (((1,), (1,)), ((), ())) if w_nk else (((1,), (0,)), ((), ()))
    gathered = rows is not None
    r_count = rows.shape[0] if gathered else x_rk.shape[0]
    nb = groups_b.shape[0] if groups_b.shape[0] > 1 else r_count // bm
    shared = groups_b.shape[0] == 1   # one group for every block
    fp8 = len(scales) > 0
    pair = len(weights) == 2 and not concat
    if gathered and r_count > nb * bm:   # entries past the blocks are spare (route_blocks)
        r_count = nb * bm
    if r_count != nb * bm:
        raise ValueError(f"{'rows has' if gathered else 'x has'} {r_count} rows, expected {nb} blocks x bm={bm}")
    if block_valid is not None and block_valid.shape != (nb,):
        raise ValueError(f"block_valid must be [{nb}] (one count per block), got {block_valid.shape}")
    if n_dim % bn or k_dim % bk:
        raise ValueError(f"grouped_matmul tiles bn={bn}, bk={bk} do not divide K={k_dim}, N={n_dim}")
    if fp8 and ((layout == "k" and block % bk) or (layout == "n" and block % bn)):
        raise ValueError(f"FP8 layout {layout!r} needs the tile along the scale blocks to divide {block}")
    if convert not in ("cast", "f16", "e4m3"):
        raise ValueError(f"convert must be 'cast', 'f16' or 'e4m3', got {convert!r}")
    a8 = convert == "e4m3"
    if a8:
        _check_w8a8(x_rk, x_scales, fp8, k_dim, bk, block)
    elif x_scales is not None:
        raise ValueError("x_scales are the scales of an e4m3 x; pass them with convert='e4m3' only")
    if out_dtype is not None and (pair or concat or k_splits > 1):
        raise ValueError("out_dtype sets one weight's output rows (the MoE's down); a pair, concat or "
                         "k_splits > 1 has its own output dtype: leave out_dtype None")
    if quantize_out and not (a8 and pair):
        raise ValueError("quantize_out=True needs convert='e4m3' and a (gate, up) pair")
    qg = k_dim // x_scales.shape[1] if a8 else 0
    scales_gathered = a8 and gathered and x_scales_ahead
    if scales_gathered:   # x's scales in the padded rows' order, read like an ungathered x's
        x_scales = jnp.take(x_scales, rows[:r_count], axis=0, mode="clip")   # pad rows: any row's
    steps = k_dim // bk
    if k_splits > 1 and (pair or steps % k_splits):
        raise ValueError(f"k_splits={k_splits} needs no (gate, up) pair and K steps ({steps} of bk={bk}) it divides")
    steps //= k_splits   # per program: split s runs K steps s*steps .. (s+1)*steps - 1
    # layout "k" W8A8: the expanded per-column scales repeat in runs of scale_run along N; a
    # tile inside one run reads one scale (a scalar) instead of a [bn] vector
    k_scalar = a8 and layout == "k" and scale_run is not None and scale_run % bn == 0
    n_first = n_first and nb < 2 ** 16   # the blocks then take CUDA's second grid axis (at most 65535)
    cdt = x_rk.dtype
    mdt = jnp.float16 if fp8 and convert == "f16" else cdt   # the MMA's operand dtype
    pre = F16_SCALE_PRE if fp8 and layout == "n" and mdt == jnp.float16 else 1.0
    nw = len(weights)

    def kernel(groups_ref, *refs):
        if gathered:
            rows_ref, refs = refs[0], refs[1:]
        if block_valid is not None:
            valid_ref, refs = refs[0], refs[1:]
        x_ref, refs = refs[0], refs[1:]
        if a8:
            xs_ref, refs = refs[0], refs[1:]
        w_refs, s_refs = refs[:nw], refs[nw:nw + len(scales)]
        o_refs = refs[nw + len(scales):nw + len(scales) + (nw if concat else 1)]
        b, j = (pl.program_id(1), pl.program_id(0)) if n_first else (pl.program_id(0), pl.program_id(1))
        split = pl.program_id(2)
        first = split * steps   # the split's first K step
        g = groups_ref[0 if shared else b]
        m0 = pl.multiple_of(b * bm, bm)
        real = None   # [bm] bool: rows of the block that are real (block_valid)
        if block_valid is not None:
            real = jax.lax.broadcasted_iota(jnp.int32, (bm,), 0) < valid_ref[b]
        if gathered:
            src = rows_ref[pl.ds(m0, bm)]
            if real is not None:
                src = jnp.where(real, src, 0)   # a pad row's index is whatever was left there

        def x_tile(k0):
            if not gathered:
                return x_ref[pl.ds(m0, bm), pl.ds(k0, bk)]
            return x_ref[src, pl.ds(k0, bk)]   # [bm, bk] gathered: each row's bk values contiguous

        def x_group_scale(col):
            return xs_ref[src, col] if gathered and not scales_gathered else xs_ref[pl.ds(m0, bm), col]

        def tile(ws, ss, n0):
            """float32 [bm, bn] sums of x's rows against columns n0.. of each weight in ws (scales ss)."""
            def body(t, accs):
                k0 = pl.multiple_of((first + t) * bk, bk)
                xt = x_tile(k0).astype(mdt)
                out = []
                for i, (w_ref, acc) in enumerate(zip(ws, accs)):
                    if w_nk:
                        w = w_ref[g, pl.ds(n0, bn), pl.ds(k0, bk)]     # [bn, bk]
                    else:
                        w = w_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)]     # [bk, bn]

                    def dot(w):   # [bm, bn], or with w_lhs [bn, bm]
                        a, b = (w.astype(mdt), xt) if w_lhs else (xt, w.astype(mdt))
                        return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

                    def by_k(col):   # a per-K-row scale against the tile as stored
                        return col[None, :] if w_nk else col[:, None]
                    if a8:   # x's group scale per row, the weight's per column or per tile
                        sx = x_group_scale(k0 // qg)
                        ws_ = (ss[i][g, k0 // block, n0] if k_scalar
                               else ss[i][g, k0 // block, pl.ds(n0, bn)] if layout == "k"
                               else ss[i][g, k0, n0 // block])
                        if k_scalar:   # one product per row rather than a [bn, bm] outer product
                            scale = (sx * ws_)[None, :] if w_lhs else (sx * ws_)[:, None]
                        elif layout == "k":
                            scale = ws_[:, None] * sx[None, :] if w_lhs else sx[:, None] * ws_[None, :]
                        else:
                            scale = (sx[None, :] if w_lhs else sx[:, None]) * ws_
                        acc = acc + dot(w) * scale
                    elif fp8 and layout == "k":
                        col = ss[i][g, k0 // block, pl.ds(n0, bn)]
                        acc = acc + dot(w) * (col[:, None] if w_lhs else col[None, :])
                    else:
                        if fp8 and mdt == jnp.float16:
                            col = (ss[i][g, pl.ds(k0, bk), n0 // block] * pre).astype(mdt)
                            w = w.astype(mdt) * by_k(col)
                        elif fp8:
                            col = ss[i][g, pl.ds(k0, bk), n0 // block]
                            w = (w.astype(jnp.float32) * by_k(col)).astype(cdt)
                        acc = acc + dot(w)
                    out.append(acc)
                return tuple(out)

            accs = jax.lax.fori_loop(0, steps, body,
                                     tuple(jnp.zeros((bn, bm) if w_lhs else (bm, bn), jnp.float32) for _ in ws))
            if w_lhs:
                accs = tuple(acc.T for acc in accs)
            if pre != 1.0:
                accs = tuple(acc * (1.0 / pre) for acc in accs)
            return accs

        def store(o_ref, res, n0):
            idx = ((split,) if k_splits > 1 else ()) + (pl.ds(m0, bm), pl.ds(n0, bn))
            if real is not None:   # pad rows stay unwritten: nothing reads them
                plt.store(o_ref.at[idx], res, mask=jnp.broadcast_to(real[:, None], res.shape))
            else:
                o_ref[idx] = res

        if concat:   # the program's tile lies in one weight: tiles [start, start + N_i / bn) are weight i's
            start = 0
            for i, n_i in enumerate(n_dims):
                @pl.when((g >= 0) & (j >= start) & (j < start + n_i // bn))
                def _one(i=i, start=start):
                    n0 = pl.multiple_of((j - start) * bn, bn)
                    (acc,) = tile((w_refs[i],), (s_refs[i],) if fp8 else (), n0)
                    store(o_refs[i], acc, n0)
                start += n_i // bn
            return

        n0 = pl.multiple_of(j * bn, bn)

        @pl.when(g >= 0)
        def _compute():
            accs = tile(w_refs, s_refs, n0)
            if pair:
                a, u = accs
                res = a / (1.0 + jnp.exp(-a)) * u
                if quantize_out:   # one e4m3 group per row of this tile
                    amax = jnp.max(jnp.abs(res), axis=1)
                    hs = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
                    if real is not None:
                        plt.store(refs[-1].at[pl.ds(m0, bm), j], hs, mask=real)
                    else:
                        refs[-1][pl.ds(m0, bm), j] = hs
                    res = res / hs[:, None]
                res = res.astype(o_refs[0].dtype)
            else:
                res = accs[0].astype(o_refs[0].dtype)
            store(o_refs[0], res, n0)

    # a pair's silu product leaves in x's dtype (bf16 for an e4m3 x), or quantized
    if pair:
        out_dtype = jnp.float8_e4m3fn if quantize_out else jnp.bfloat16 if a8 else cdt
    elif out_dtype is None:
        out_dtype = jnp.float32
    lead = (k_splits,) if k_splits > 1 else ()
    out_shape = jax.ShapeDtypeStruct((*lead, r_count, n_dim), out_dtype)
    if concat:
        out_shape = tuple(jax.ShapeDtypeStruct((*lead, r_count, n), out_dtype) for n in n_dims)
    if quantize_out:
        out_shape = (out_shape, jax.ShapeDtypeStruct((r_count, n_dim // bn), jnp.float32))
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(n_dim // bn, nb, k_splits) if n_first else (nb, n_dim // bn, k_splits),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=_interpret() if interpret is None else interpret,
        name=("qwen3_grouped_matmul_w8a8" if a8 else "qwen3_grouped_matmul_fp8") if fp8 else "qwen3_grouped_matmul",
    )(groups_b.astype(jnp.int32), *((rows.astype(jnp.int32),) if gathered else ()),
      *((block_valid.astype(jnp.int32),) if block_valid is not None else ()),
      x_rk, *((x_scales,) if a8 else ()), *weights, *scales)


def _check_w8a8(x_rk, x_scales, fp8, k_dim, bk, block):
    """convert='e4m3' preconditions (module doc), as ValueErrors that say what to pass."""
    if not fp8:
        raise ValueError("convert='e4m3' (FP8 activations) needs FP8 weights and their scales")
    if x_rk.dtype != jnp.float8_e4m3fn or x_scales is None:
        raise ValueError(f"convert='e4m3' takes x already quantized (float8_e4m3fn, got {x_rk.dtype}) and "
                         "its x_scales: gemv.quantize_rows(x, group) gives both")
    if x_scales.shape[0] != x_rk.shape[0] or k_dim % x_scales.shape[1] or (k_dim // x_scales.shape[1]) % bk:
        raise ValueError(f"x_scales {x_scales.shape} do not give x {x_rk.shape} groups of a multiple of bk={bk}")
    if block % bk:
        raise ValueError(f"convert='e4m3' reads one weight scale per K step: bk={bk} must divide block={block}")


# Defaults by block height, overridable in-process like gemv.GEMV_DEFAULTS: small blocks
# (decode batches) are memory-bound, so narrow N tiles and more programs; bm >= 64 (prefill)
# is compute-bound: bigger tiles, 8 warps.
# Measured on an H100 (run 2): batch-64 MoE layer bf16 bn=128 489 us vs bn=64 636 us (floor
# 502 us at that run's bandwidth); 8k-token prefill layer: bn=128, bk=64, 8 warps 2.66 ms
# (34% of the matmul rate) vs bn=64, 4 warps 3.83 ms.
# convert: the FP8 MMA dtype (grouped_matmul's convert; ignored for bf16 weights). Runs 26-27
# (H200, benchmarks/NOTES.md), "f16" against "cast": FP8 8k prefill 287.8 -> 274.6 ms, batch-64
# decode 23.76 -> 21.54 ms, an 8k MoE layer 3758 -> 3442 us (bf16 weights: 2152 us).
# fp8_nk: overrides for FP8 weights stored [G, N, K] (the model's storage); w_lhs: the weight as
# the MMA's left operand (module doc). H200, benchmarks/NOTES.md: one FP8 MoE layer of a 1k prompt
# (run 48) bk=64 895.0 us, bk=128 804.8, w_lhs + bk=128 780.6 (bf16 weights: 728.0); the model,
# old -> these overrides -> old in one process (run 50): 1k prefill 40.87 -> 36.41 -> 40.75 ms,
# 256 17.89 -> 16.58 -> 17.79 ms, decode batch 64 17.68 -> 16.62 -> 17.67 ms (its projections'
# bm=64 blocks), batch 32 level. Decode-sized blocks were 10-23% slower with w_lhs (run 47).
# convert="e4m3" (W8A8) once the FP8 MMA could accumulate a whole dot (fp8_dot.py; before that
# it lost to f16 by 12-24%, runs 44 and 54). H200, one process (runs 55-56): an FP8 MoE layer of
# a 1k prompt 777 -> 645 us (bf16 weights 715), of an 8k prompt 3401 -> 2521 us (bf16 2186);
# the model's 1k prefill 36.29 -> 30.83 ms (bf16 29.20), decode batch 64 16.62 -> 16.44 ms.
# n_first (a block's N tiles side by side in the grid; module doc) for prefill-sized blocks, H200
# (runs 158-160): bf16 gate/up + down of an 8k prompt 2279.8 -> 1966.6 us a layer, 1k 1136.7 ->
# 1056.4; one FP8 MoE layer 2511.4 -> 2310.2 us at 8k, 621.4 -> 612.5 at 1k; the FP8 model's 8k
# prefill 186.50 -> 175.94 ms (54.8% -> 58.6% of the matmul rate), 1k level (29.66 / 29.71).
# Decode-sized blocks keep the other order (unmeasured there).
# x_scales_ahead for prefill-sized blocks: a gathered W8A8 gate/up at bm 128 spills without it
# (module doc; the MoE's prefill blocks are always gathered in the kernel).
# w_lhs off again for prefill-sized blocks once W8A8 read one weight scale a tile (run 162) and
# x's scales ahead: H200, runs 168/170, the 8k gate/up 989.5 -> 840.7 us a layer; the FP8 model
# (MoE and projections, one process) 1k 26.57 -> 26.49 ms, 2k 42.12 -> 38.97, 8k 154.36 -> 142.43.
MATMUL_DEFAULTS = {
    "small": dict(bn=128, bk=128, num_warps=4, num_stages=3, convert="e4m3", fp8_nk={}),
    "large": dict(bn=128, bk=64, num_warps=8, num_stages=3, convert="e4m3", fp8_nk=dict(w_lhs=False, bk=128),
                  n_first=True, x_scales_ahead=True),
}


def matmul_tiles(k_dim: int, n_dim: int, bm: int, fp8: bool, layout: str, block: int, *, w_nk: bool = False,
                 **override):
    """grouped_matmul keyword arguments (besides bm and w_nk) for this shape, or None if nothing
    divides."""
    from . import pick_tile
    base = MATMUL_DEFAULTS["large" if bm >= 64 else "small"]
    cfg = {**base, **(base.get("fp8_nk", {}) if fp8 and w_nk else {}), **override}
    bn, bk = cfg["bn"], cfg["bk"]
    convert = cfg["convert"] if fp8 else "cast"
    bn_t = pick_tile(n_dim, min(bn, block) if fp8 and layout == "n" else bn)
    # W8A8 reads one weight scale per K step in either layout
    bk_t = pick_tile(k_dim, min(bk, block) if fp8 and (layout == "k" or convert == "e4m3") else bk)
    if bn_t is None or bk_t is None:
        return None
    return dict(bn=bn_t, bk=bk_t, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                convert=convert, w_lhs=bool(cfg.get("w_lhs")) and fp8 and w_nk, n_first=bool(cfg.get("n_first")),
                x_scales_ahead=bool(cfg.get("x_scales_ahead")))
