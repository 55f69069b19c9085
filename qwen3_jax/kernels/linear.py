"""Projections read in place from the stacked [L, ...] params: x @ W[layer], W bf16 or block-FP8
with the dequantize fused.

Why: inside the scan over layers XLA slices each layer's weight out of the stack before its
dot (a copy: the attention weights crossed memory three times per decode step), and for FP8
it writes the whole dequantized bf16 weight first (2x slower than bf16 on an H100). Few rows
(decode) go to gemv; more rows to grouped_matmul with a single group for FP8 (bf16 with many
rows stays with XLA/cuBLAS, where the slice copy is small next to the matmul, and so does FP8
from kernels.FP8_DEQUANTIZE_MIN_ROWS rows: there a dequantized bf16 copy beats converting in
the kernel).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from .. import kernels
from .gemv import gemv, gemv_tiles
from .gemv_inputs import materialize
from .grouped_matmul import grouped_matmul, matmul_tiles
from .x_quantize import quantize_x

# Rows up to which a projection runs the GEMV, by weight kind; above, FP8 runs the grouped matmul
# (PROJECTION_MATMUL) and bf16 XLA's dot. The GEMV gives each row its own programs, each reading
# the weight (from L2 at best), so its cost grows with the rows where a matmul's tile reads it
# once per block. Measured (runs 128-129, H200, 30B-A3B decode at 1k, ms per step, limit 16 ->
# this): FP8 batch 4 5.009 -> 4.867, batch 8 (with the MoE's GEMV to 8 tokens) 7.335 -> 6.469, 16
# 12.219 -> 8.731; bf16 batch 8 9.853 -> 9.473, 16 16.133 -> 12.972. FP8's matmul lost at 2 rows
# (3.524 -> 3.813), bf16's XLA dot at 2 and 4 (4.074 -> 5.372, 6.074 -> 6.769).
GEMV_MAX_ROWS = {"bf16": 4, "fp8": 2}


def gemv_max_rows(fp8: bool) -> int:
    return GEMV_MAX_ROWS["fp8" if fp8 else "bf16"]

# gemv tiles for projections over gemv's defaults, by (kind, layout). FP8 q/k/v (H200, run 17-18 in
# benchmarks/NOTES.md): an FP8 tile has half the bytes of a bf16 one in flight; bk=128 took the
# batch-1 qkv gemv 8.06 -> 7.27 us. More programs (target 528) were faster still alone (6.63 us)
# but split K 16 ways, and the prologue that sums the partials went 3.9 -> 7.0 us per layer; the
# MoE gate/up (bk=128 + target 528 in the sweep) lost in the model: its norm x load runs per program.
# With the weights stored [out, in] (w_nk), o_proj (layout "n") was fastest at bk=256 and 8 warps
# (run 32, H200: 6.24 us in [K, N], 5.94 nk with the defaults, 5.26 with these).
PROJECTION_TILES = {("fp8", "k"): dict(bk=128), ("fp8", "n", "nk"): dict(bk=256, num_warps=8)}
TARGET_PROGRAMS = 264   # two per SM of an H100: below this a memory-bound matmul starves
# Overrides of the single-group matmul's tiles for projections above GEMV_MAX_ROWS (read at
# trace time; benchmarks/projection_matmul.py and serve.bench --projection-matmul set them):
# matmul_tiles keys, plus "narrow" (False: keep the tile width instead of narrowing it to reach
# TARGET_PROGRAMS) and "k_splits" (programs per tile along K, float32 partials summed by the
# caller; "auto": below 128-row blocks the fewest that reach TARGET_PROGRAMS, each split at least
# 2 K steps; from 128-row blocks 4 splits of 64-wide tiles, as run 108 measured best).
# Measured (run 109, H200, FP8 decode, ms per step, narrow -> split): batch 32 14.144 -> 13.115,
# 64 16.141 -> 14.597, 128 18.394 -> 16.979, 256 24.014 -> 23.204.
# "concat": q, k and v in one launch side by side (projections_partials), one x quantize.
# Measured (run 112, H200, FP8 decode, ms per step, split -> split-qkv): batch 32 13.130 -> 12.809,
# 64 14.608 -> 14.339, 128 16.991 -> 16.614, 256 23.258 -> 22.836; the default since.
# "narrow-qkv": the columns narrowed first, then K split until TARGET_PROGRAMS: at 64 rows of
# 30B-A3B q/k/v that is 32-wide tiles x 2 splits where "split-qkv" runs 128 x 8, so the float32
# partials [S, M, N] shrink 4x (10.5 MB a layer at 64 rows under split-qkv, as many bytes as the
# FP8 weights the step reads); o_proj 8 splits instead of 16. Measured (run 126, H200, FP8
# decode, ms per step, split-qkv -> narrow-qkv): batch 32 11.530 -> 10.899, 64 13.009 -> 12.608,
# 128 15.228 -> 15.170 (q/k/v + o_proj 20.2 -> 15.4 us a layer at 64); the default since.
PROJECTION_MATMUL_PRESETS = {"narrow": dict(narrow=True, k_splits=1), "split": dict(narrow=False, k_splits="auto"),
                             "split-qkv": dict(narrow=False, k_splits="auto", concat=True),
                             "narrow-qkv": dict(narrow=True, k_splits="auto", concat=True)}
PROJECTION_MATMUL: dict = dict(PROJECTION_MATMUL_PRESETS["narrow-qkv"])


def _parse(eq: str):
    ins, out = eq.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    contracted = [c for c in ws if c in xs and c not in out]
    return xs, ws, out, contracted


def _as_matrices(eq: str, x, w, scale, block_axis: int, layer, w_nk: bool = False):
    """einsum(eq, x, W) as x2 [M, K] @ w3 [G, K, N] ([G, N, K] with w_nk: w stored [out..., in...],
    the weight's subscript with its contracted letters moved last): (x2, w3, s3, layout, x's
    leading dims, the weight's output dims, the innermost of the dims flattened into s3's expanded
    axis (N for layout 'k', K for 'n')), or None when the equation or the FP8 block axis is not
    covered (or w is a one-byte array Pallas would index wrongly: kernels.index_overflows)."""
    if kernels.index_overflows(w):
        return None
    xs, ws, out, contracted = _parse(eq)
    nc = len(contracted)
    if ws[:nc] != "".join(contracted) or xs[-nc:] != "".join(contracted) or out != xs[:-nc] + ws[nc:]:
        return None
    wshape = w.shape[1:] if layer is not None else w.shape
    if w_nk:
        wshape = wshape[-nc:] + wshape[:-nc]   # as stored [out..., in...] -> the einsum's [in..., out...]
    k_dim, n_dim = math.prod(wshape[:nc]), math.prod(wshape[nc:])
    fp8 = scale is not None
    if not fp8:
        layout = "k"
    elif nc == 1 and block_axis == 0:
        layout = "k"
    elif block_axis == len(wshape) - 1 and block_axis >= nc:
        layout = "n"
    else:
        return None
    lead = x.shape[:-nc]
    w3 = w.reshape(-1, n_dim, k_dim) if w_nk else w.reshape(-1, k_dim, n_dim)
    s3 = None
    if fp8:
        s3 = scale.reshape(w3.shape[0], -1, n_dim) if layout == "k" else scale.reshape(w3.shape[0], k_dim, -1)
    inner = wshape[-1] if layout == "k" else wshape[nc - 1]
    return x.reshape(math.prod(lead), k_dim), w3, s3, layout, lead, wshape[nc:], inner


def _n_run(scale_run: int | None, inner: int) -> int | None:
    """Layout 'k': a run of equal scales along the flattened N, or None where the caller claims
    none. A checkpoint's blocks repeat along the flattened output ([H*Q, D] in Hugging Face's
    layout); scales expanded per axis repeat along the innermost one (Q) and restart at each
    head: runs of gcd(scale_run, Q) hold for both."""
    return math.gcd(scale_run, inner) if scale_run else None


def linear_einsum(eq: str, x, w, scale, block_axis: int, block: int, layer=None, out_dtype=None,
                  partials: bool = False, w_nk: bool = False, scale_run: int | None = None):
    """einsum(eq, x, W[layer]) in `out_dtype` (default x's dtype), W = w (bf16, scale None) or dequantize(w, scale);
    None when the equation, shapes or row count are not covered (the caller uses XLA).

    partials=True: the float32 sums before their reduction and cast, [S, M, N] (M rows of x's
    leading letters, N the weight's output letters flattened; S split-K slices of the gemv, 1
    from the matmul): a consumer kernel that sums them itself saves XLA's reduce kernel.

    Supported: the weight's contracted letters lead its subscript and end x's (q/k/v:
    'btd,dhq->bthq'; o_proj: 'bthq,hqd->btd'); for FP8 the block axis (per-layer weight axis)
    is the contracted axis (layout 'k', one contracted dim) or the last axis (layout 'n').
    w / scale are [L, ...] when `layer` is given, else per-layer. w_nk: w is stored with the
    contracted axes last ([out..., in...], model.Weight's nk); scale is always in eq's order.
    scale_run: the checkpoint's block along the non-block dims (model.Weight.fp8_scale_run, which
    the model always passes), which a W8A8 K step of layout 'n' must not cross (None: `block`);
    for layout 'k', an N tile of the W8A8 matmul inside one run reads one weight scale
    (grouped_matmul's scale_run; None: a scale per column, right for any scales).
    """
    mats = _as_matrices(eq, x, w, scale, block_axis, layer, w_nk)
    if mats is None:
        return None
    x2, w3, s3, layout, lead, out_dims, inner = mats
    if s3 is None and x2.shape[0] > gemv_max_rows(False):
        return None
    if s3 is not None and kernels.fp8_dequantized(x2.shape[0]):
        return None   # XLA dequantizes the layer's weight and runs cuBLAS (kernels.FP8_DEQUANTIZE_MIN_ROWS)
    group = jnp.asarray(layer if layer is not None else 0, jnp.int32)
    if layout == "k" and s3 is not None:
        scale_run = _n_run(scale_run, inner)
    y = linear(x2, w3, s3, layout, block, group, partials=partials, w_nk=w_nk, scale_run=scale_run)
    if y is None or partials:
        return y
    return y.reshape(*lead, *out_dims).astype(out_dtype or x.dtype)


def projections_partials(specs, block: int, layer, w_nk: bool = False, scale_run: int | None = None):
    """Several projections of the same x in one gemv launch (decode: q, k and v side by side).

    specs [(eq, x, w [L, ...], scale or None, block_axis)], x the same in each -> one float32
    [S, M, N_i] partial sum per spec (see linear_einsum's partials), or None when one launch does
    not cover them (mixed bf16/FP8 or layouts, a gemv mode without side-by-side tiles; rows above
    the gemv limit unless PROJECTION_MATMUL's "concat" puts FP8 weights side by side in one
    grouped_matmul launch): the caller then runs them one by one. Saves a launch per extra
    projection (k and v of 30B-A3B at batch 1: -0.31 ms per step on an H200, NOTES run 10).
    w_nk: every w stored [out..., in...] (see linear_einsum); scale_run: every weight's (see
    linear_einsum)."""
    mats = [_as_matrices(eq, x, w, scale, axis, layer, w_nk) for eq, x, w, scale, axis in specs]
    if any(m is None for m in mats):
        return None
    x2 = mats[0][0]
    m, k_dim = x2.shape
    fp8 = {mt[2] is not None for mt in mats}
    layouts = {mt[3] for mt in mats}
    if len(fp8) > 1 or len(layouts) > 1 or any(mt[0].shape != x2.shape for mt in mats):
        return None
    fp8, layout = fp8.pop(), layouts.pop()
    if m > gemv_max_rows(fp8):   # the FP8 matmul, side by side where PROJECTION_MATMUL asks (bf16: XLA's)
        if not (fp8 and PROJECTION_MATMUL.get("concat")) or kernels.fp8_dequantized(m):
            return None
        runs = [_n_run(scale_run, mt[6]) for mt in mats] if layout == "k" else [None]
        run = math.gcd(*runs) if None not in runs else None
        return _matmul(x2, [mt[1] for mt in mats], tuple(mt[2] for mt in mats), layout, block,
                       jnp.asarray(layer, jnp.int32), w_nk, run)
    t = gemv_tiles(k_dim, tuple(mt[1].shape[1 if w_nk else 2] for mt in mats), m, fp8, layout, block,
                   w_nk=w_nk, **projection_tiles(fp8, layout, w_nk))
    if t is None or t["mode"] != "dot":
        return None
    group = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    return list(gemv(x2, m, group, tuple(mt[1] for mt in mats), tuple(mt[2] for mt in mats) if fp8 else None,
                     row_div=1, layout=layout, block=block, concat=True, **t))


def projection_tiles(fp8: bool, layout: str, w_nk: bool = False) -> dict:
    """PROJECTION_TILES for this weight kind, layout and storage order (gemv_tiles overrides)."""
    key = ("fp8" if fp8 else "bf16", layout)
    return PROJECTION_TILES.get((*key, "nk"), {}) if w_nk else PROJECTION_TILES.get(key, {})


def linear(x_mk, w_gkn, scale, layout: str, block: int, group, partials: bool = False, w_nk: bool = False,
           scale_run: int | None = None):
    """x [M, K] (an array or a gemv_inputs source) @ W[group] (dequantized if `scale`) -> [M, N]
    float32, or None if no tiling fits. w [G, K, N], or [G, N, K] with w_nk. scale_run: see
    linear_einsum.
    partials=True: [S, M, N] float32 whose sum over S is that (S = the gemv's split_k, or the
    matmul's K splits: PROJECTION_MATMUL), the reduction left to the caller."""
    m, k_dim = x_mk.shape
    n_dim = w_gkn.shape[1 if w_nk else 2]
    fp8 = scale is not None
    scales = (scale,) if fp8 else None
    if m <= gemv_max_rows(fp8):
        t = gemv_tiles(k_dim, n_dim, m, fp8, layout, block, w_nk=w_nk, **projection_tiles(fp8, layout, w_nk))
        if t is None:
            return None
        # rows by row_div and a [1] group: no operand / a bitcast, where arange / full are kernels
        (y,) = gemv(x_mk, m, jnp.reshape(group, (1,)).astype(jnp.int32), (w_gkn,), scales, row_div=1,
                    layout=layout, block=block, **t)
        return y if partials else jnp.sum(y, axis=0)
    parts = _matmul(x_mk, (w_gkn,), scales, layout, block, group, w_nk, scale_run)
    if parts is None:
        return None
    return parts[0] if partials else jnp.sum(parts[0], axis=0)


def _matmul(x_mk, ws, scales, layout: str, block: int, group, w_nk: bool, scale_run: int | None):
    """x [M, K] @ W_i[group] for each weight in ws (one grouped_matmul launch, side by side when
    several) -> [float32 [S, M, N_i]] partial sums over S K splits, or None if no tiling fits.
    The tiles follow PROJECTION_MATMUL; ws share K, layout and storage order."""
    m, k_dim = x_mk.shape
    n_dims = [w.shape[1 if w_nk else 2] for w in ws]
    fp8 = scales is not None
    bm = 16
    while bm < 128 and bm < m:
        bm *= 2
    nb = -(-m // bm)
    over = dict(PROJECTION_MATMUL)
    narrow, k_splits = over.pop("narrow", True), over.pop("k_splits", 1)
    over.pop("concat", None)
    t = matmul_tiles(k_dim, math.gcd(*n_dims), bm, fp8, layout, block, w_nk=w_nk, **over)
    if t is None:
        return None

    def tiles(bn):
        return nb * sum(n // bn for n in n_dims)

    def divides(bn):
        return all(n % bn == 0 for n in n_dims)

    if t["convert"] == "e4m3" and layout == "n":   # one weight scale per K step (grouped_matmul)
        t = dict(t, bk=math.gcd(t["bk"], scale_run or block))
    elif t["convert"] == "e4m3" and scale_run:     # N tiles inside one run: one weight scale a tile
        t = dict(t, scale_run=scale_run)
    # One group means parallelism only from row blocks x column tiles: narrow the columns (and
    # use 4 warps) until two programs per SM exist, or a k/v projection runs on 4 SMs. The weight
    # as the MMA's left operand needs bn >= 64 (wgmma's height; run 48 in benchmarks/NOTES.md:
    # with bn=32 it cost batch-64 decode +2.6%).
    while narrow and tiles(t["bn"]) < TARGET_PROGRAMS and t["bn"] > 32 and divides(t["bn"] // 2):
        t = dict(t, bn=t["bn"] // 2, num_warps=4, w_lhs=t["w_lhs"] and t["bn"] // 2 >= 64)
    steps = k_dim // t["bk"]
    if k_splits == "auto":
        k_splits = 1
        if bm >= 128:   # [S, M, N] partials grow with the rows: 64-wide tiles, 4 splits (run 108)
            if t["bn"] > 64 and divides(64):
                t = dict(t, bn=64)
            k_splits = 4 if steps % 8 == 0 else 1
        else:           # the fewest splits that give TARGET_PROGRAMS, each at least 2 K steps
            while tiles(t["bn"]) * k_splits < TARGET_PROGRAMS and steps % (4 * k_splits) == 0:
                k_splits *= 2
    if steps % k_splits:
        return None
    extra = {}
    if t["convert"] == "e4m3":   # W8A8: x quantized once here, in groups of the kernel's K step, rows padded
        x2, sx = quantize_x(x_mk, t["bk"], nb * bm)
        extra = dict(x_scales=sx)
    else:
        x2 = materialize(x_mk)
        x2 = jnp.pad(x2.astype(jnp.float16) if t["convert"] == "f16" else x2, ((0, nb * bm - m), (0, 0)))
    ys = grouped_matmul(x2, jnp.full((nb,), group, jnp.int32), tuple(ws), scales, bm=bm,
                        layout=layout, block=block, w_nk=w_nk, k_splits=k_splits, concat=len(ws) > 1, **t, **extra)
    ys = ys if len(ws) > 1 else (ys,)
    return [y[:, :m] if k_splits > 1 else y[None, :m] for y in ys]
