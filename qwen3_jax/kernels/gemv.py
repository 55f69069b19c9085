"""Grouped GEMV: each output row r is x[rows[r]] @ W[groups[r]], bf16 or block-FP8 weights.

The decode-time workhorse: at batch 1 the MoE FFN is 8 rows (one per routed expert), each
reading only its own expert. Two ways to do the arithmetic (static `mode`):
  "fma": CUDA-core FMA into a float32 [bk, bn] accumulator (one reduction at the end);
  "dot": tensor cores on a 16-row tile whose row 0 is x and rows 1..15 are zero (the MMA's
    minimum height; the wasted FLOPs are free in a memory-bound kernel, and Triton pipelines
    the loads that feed a dot).
FP8 weights are converted in registers, never materialized. Block scales: layout "k" scales
the product of each K block per column; layout "n" folds the per-row scale into x (in float32
for "fma"; for "dot", x * scale is rounded to x's dtype before the MMA).

Shapes (G groups, K in, N out, R output rows, S = split_k):
  x [M, K] (any float), or a gemv_inputs source standing for one (RmsNormX, SwigluX: a
    producer's output finished in each program's x load, no XLA kernel between),
  rows [R] int32 in [0, M); or with row_div=d (static) the int R, and output row r reads x row
    r // d (d=1: row r; d=k: the k assignments of each token), with no index operand,
  groups [R] int32 in [-1, G) (-1: row is zeros, no weight read), or [1]: one group for every
    row (a projection's layer, with no broadcast kernel),
  weights: 1 or 2 arrays [G, K, N] of one dtype (2 = gate and up, sharing x and every tile), or
    with concat=True (mode "dot") any number [G, K, N_i] laid side by side along the grid's
    column axis: q, k, v in one launch, each with its own output [S, R, N_i],
  scales: None or one float32 array per weight:
    layout "k": [G, ceil(K/block), N]  (K in blocks, N per element; gate/up, q/k/v)
    layout "n": [G, K, ceil(N/block)]  (K per element, N in blocks; down, o_proj)
  -> one float32 [S, R, N] per weight: partial sums over S slices of K (sum them).

Numerics: float32 products of the exactly converted weight (FP8 -> f32, times its f32 scale)
and float32 activations, float32 accumulation.

convert="bits" turns e4m3 into float32 with integer ops and one select (fp8_bits_to_f32)
instead of the hardware conversion, whose throughput (16/clock/SM) is close to what a
full-bandwidth FP8 stream needs. Exact for every finite e4m3 value, subnormals included.
convert="f16" (mode "dot" only) converts e4m3 to float16, exactly, and runs the MMA in float16
with x rounded to float16 (11 significant bits, more than bf16's 8; range +-65504).
convert="e4m3" (mode "dot" only, FP8 weights): W8A8, the checkpoints' `activation_scheme:
dynamic`. The weight is not converted at all; x is quantized to e4m3 per bk-wide group with a
dynamic float32 scale amax/448 (layout "n": after folding the weight's per-row scale into x),
and the MMA runs on e4m3 x e4m3 into float32. This changes the numerics: x keeps 4 significant
bits, ~2-3% relative error per product on random data (what FP8 serving engines accept);
`quantize_rows` is the exact emulation tests compare against.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import interpret as _interpret
from .gemv_inputs import as_source


def fp8_bits_to_f32(w8):
    """float8_e4m3fn -> float32, exactly, by moving bits: e4m3's 4 exponent + 3 mantissa bits
    go under float32's exponent with the bias difference (127 - 7) added, which is right for
    normal values; a subnormal (exponent 0, value m * 2**-9) then reads (1 + m/8) * 2**-7, so
    it is mapped back with 2 * v - 2**-6. The sign bit is OR-ed in last. NaN is not kept."""
    u = jax.lax.bitcast_convert_type(w8, jnp.uint8).astype(jnp.uint32)
    mag = jax.lax.bitcast_convert_type(((u & 0x7F) << 20) + (120 << 23), jnp.float32)
    mag = jnp.where((u & 0x78) == 0, 2.0 * mag - 2.0 ** -6, mag)
    bits = jax.lax.bitcast_convert_type(mag, jnp.uint32) | ((u & 0x80) << 24)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def gemv(x_mk, rows_r, groups_r, weights, scales=None, *, row_div=None, **kw):
    """See the module doc; rows_r is an int32 array [R], or with row_div the int R."""
    x_mk = as_source(x_mk)
    if len(x_mk.shape) != 2:
        raise ValueError(f"gemv takes x as [M, K], got shape {x_mk.shape}; reshape it first")
    if not x_mk.covered(kw.get("bk", 128)):   # e.g. a norm over a K that is no Triton block
        x_mk = as_source(x_mk.materialize())
    if row_div is None:
        return _gemv(x_mk, rows_r, groups_r, weights, scales, **kw)
    if not isinstance(rows_r, int) or row_div < 1:
        raise ValueError(f"with row_div={row_div}, pass the output row count as rows_r (an int), got {rows_r!r}")
    return _gemv(x_mk, None, groups_r, weights, scales, n_rows=rows_r, row_div=row_div, **kw)


@functools.partial(jax.jit, static_argnames=("layout", "block", "bn", "bk", "split_k", "num_warps",
                                             "num_stages", "acc2d", "convert", "mode", "concat", "n_rows",
                                             "row_div", "w_nk", "interpret"))
def _gemv(x_mk, rows_r, groups_r, weights, scales=None, *, layout="k", block=128, bn=64, bk=128,
          split_k=1, num_warps=4, num_stages=3, acc2d=True, convert="cast", mode="fma", concat=False,
          n_rows=None, row_div=None, w_nk=False, interpret=None):
    weights = tuple(weights)
    scales = tuple(scales) if scales is not None else ()
    if w_nk and mode != "dot":
        raise ValueError("weights stored [G, N, K] (w_nk=True) need mode='dot'")
    g_count, k_dim, n_dim = _gkn(weights[0], w_nk)
    fp8 = len(scales) > 0
    if x_mk.k_dim != k_dim:
        raise ValueError(f"x has K={x_mk.k_dim} but the weights {weights[0].shape} have K={k_dim}")
    for w in weights:
        _check(k_dim, _gkn(w, w_nk)[2], bn, bk, split_k, fp8, layout, block)
    if concat and mode != "dot":
        raise ValueError("concat=True (projections side by side in one launch) needs mode='dot'")
    if not concat and any(w.shape != weights[0].shape for w in weights):
        raise ValueError(f"weights of shapes {[w.shape for w in weights]} share tiles only with one shape; "
                         "pass concat=True to lay different widths side by side")
    steps = k_dim // (bk * split_k)
    nw = len(weights)
    rows_r = _RowMap(rows_r, rows_r.shape[0] if row_div is None else n_rows, row_div)
    per_row = groups_r.shape[0] == rows_r.count
    if not per_row and groups_r.shape[0] != 1:
        raise ValueError(f"groups has {groups_r.shape[0]} entries; give one per row ({rows_r.count}) or one for all")
    program = functools.partial(_program, rows_r=rows_r, per_row=per_row, nx=len(x_mk.operands()), nw=nw,
                                ns=len(scales))
    bits = fp8 and convert == "bits" and mode == "fma"
    cdt = x_mk.dtype if x_mk.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    if convert == "e4m3" and not (fp8 and mode == "dot"):
        raise ValueError(f"convert='e4m3' (FP8 activations) needs FP8 weights and mode='dot', got "
                         f"{'FP8' if fp8 else 'bf16'} weights and mode={mode!r}")
    if mode == "dot":
        if fp8 and convert in ("f16", "e4m3"):
            cdt = jnp.float16 if convert == "f16" else jnp.float8_e4m3fn
        return _gemv_dot(x_mk, rows_r, groups_r, weights, scales, program, layout, block, bn, bk, split_k,
                         num_warps, num_stages, cdt, concat, w_nk, interpret)

    def kernel(*refs):
        x_refs, w_refs, s_refs, o_refs, (r, j, s), g, row = program(refs)
        n0 = pl.multiple_of(j * bn, bn)

        @pl.when(g >= 0)
        def _compute():
            state = x_mk.prepare(x_refs, row)

            def body(t, accs):
                k0 = pl.multiple_of((s * steps + t) * bk, bk)
                xk = x_mk.load(x_refs, state, row, k0, bk)
                out = []
                for i, (w_ref, acc) in enumerate(zip(w_refs, accs)):
                    w = w_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)]
                    w = fp8_bits_to_f32(w) if bits else w.astype(jnp.float32)
                    xs = xk
                    if fp8 and layout == "k":
                        w = w * s_refs[i][g, k0 // block, pl.ds(n0, bn)][None, :]
                    elif fp8:
                        xs = xk * s_refs[i][g, pl.ds(k0, bk), n0 // block]
                    prod = w * xs[:, None]
                    out.append(acc + prod if acc2d else acc + jnp.sum(prod, axis=0))
                return tuple(out)

            shape = (bk, bn) if acc2d else (bn,)
            accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros(shape, jnp.float32) for _ in w_refs))
            for o_ref, acc in zip(o_refs, accs):
                o_ref[s, r, pl.ds(n0, bn)] = jnp.sum(acc, axis=0) if acc2d else acc

        @pl.when(g < 0)
        def _zeros():
            _write_zeros(o_refs, s, r, n0, bn)

    return _launch(kernel, "qwen3_gemv", x_mk, rows_r, groups_r, weights, scales, bn, split_k, num_warps,
                   num_stages, interpret)


def _gemv_dot(x_mk, rows_r, groups_r, weights, scales, program, layout, block, bn, bk, split_k, num_warps,
              num_stages, cdt, concat, w_nk, interpret):
    """mode="dot": the same contract as gemv, tensor cores on a zero-padded 16-row tile.
    program: the kernel's ref and program-id unpacking (_program, bound in _gemv).
    w_nk: weights stored [G, N, K] (K contiguous, the checkpoint's [out, in])."""
    k_dim = _gkn(weights[0], w_nk)[1]
    fp8 = len(scales) > 0
    steps = k_dim // (bk * split_k)
    # f16 MMA (convert="f16": e4m3 -> f16 is one packed instruction per two values): layout "n"
    # folds a per-element scale (~1e-4) into x, which would sit in f16's subnormal range; a
    # power-of-two pre-scale keeps it normal and is divided out of the float32 product exactly.
    pre = 1024.0 if fp8 and cdt == jnp.float16 and x_mk.dtype != jnp.float16 else 1.0
    a8 = cdt == jnp.float8_e4m3fn
    parts = _column_parts(weights, bn, concat, w_nk)
    dims = (((1,), (1 if w_nk else 0,)), ((), ()))   # x16 [16, bk] against the tile as stored

    def compute(w_idx, x_refs, w_refs, s_refs, o_refs, g, row, s, r, n0, first):
        state = x_mk.prepare(x_refs, row)

        def quantized(xs):
            if not a8:
                return jnp.where(first, jnp.broadcast_to(xs[None, :], (16, bk)), 0.0).astype(cdt), None
            sx = _dynamic_scale(xs)
            return jnp.where(first, jnp.broadcast_to((xs / sx)[None, :], (16, bk)), 0.0).astype(cdt), sx

        def body(t, accs):
            k0 = pl.multiple_of((s * steps + t) * bk, bk)
            xk = x_mk.load(x_refs, state, row, k0, bk)
            shared = quantized(xk) if not (fp8 and layout == "n") else None   # one x tile for every weight
            out = []
            for i, acc in zip(w_idx, accs):
                if w_nk:
                    w = w_refs[i][g, pl.ds(n0, bn), pl.ds(k0, bk)].astype(cdt)
                else:
                    w = w_refs[i][g, pl.ds(k0, bk), pl.ds(n0, bn)].astype(cdt)
                x16, sx = shared or quantized(xk * (s_refs[i][g, pl.ds(k0, bk), n0 // block] * pre))
                part = jax.lax.dot_general(x16, w, dims, preferred_element_type=jnp.float32)
                if a8:
                    part = part * sx
                if fp8 and layout == "k":
                    part = part * s_refs[i][g, k0 // block, pl.ds(n0, bn)][None, :]
                elif fp8:
                    part = part * (1.0 / pre)
                out.append(acc + part)
            return tuple(out)

        accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((16, bn), jnp.float32) for _ in w_idx))
        for i, acc in zip(w_idx, accs):
            o_refs[i][s, r, pl.ds(n0, bn)] = jnp.sum(acc, axis=0)   # rows 1..15 are exact zeros

    def kernel(*refs):
        x_refs, w_refs, s_refs, o_refs, (r, j, s), g, row = program(refs)
        first = jax.lax.broadcasted_iota(jnp.int32, (16, bk), 0) == 0

        def part(lo, w_idx):
            n0 = pl.multiple_of((j - lo) * bn, bn)

            @pl.when(g >= 0)
            def _compute():
                compute(w_idx, x_refs, w_refs, s_refs, o_refs, g, row, s, r, n0, first)

            @pl.when(g < 0)
            def _zeros():
                _write_zeros([o_refs[i] for i in w_idx], s, r, n0, bn)

        if len(parts) == 1:
            part(0, parts[0][2])
        else:   # each program's column tile belongs to one projection
            for lo, hi, w_idx in parts:
                pl.when((j >= lo) & (j < hi))(functools.partial(part, lo, w_idx))

    return _launch(kernel, "qwen3_gemv_dot", x_mk, rows_r, groups_r, weights, scales, bn, split_k, num_warps,
                   num_stages, interpret, n_tiles=parts[-1][1], w_nk=w_nk)


def _gkn(w, w_nk):
    """(groups, K, N) of a weight stored [G, K, N], or [G, N, K] with w_nk."""
    g, a, b = w.shape
    return (g, b, a) if w_nk else (g, a, b)


def _column_parts(weights, bn, concat, w_nk=False):
    """[(first tile, end tile, weight indices)] along the grid's column axis: one part whose
    weights share every tile (gate/up), or with concat one part per weight, side by side."""
    widths = [_gkn(w, w_nk)[2] for w in weights]
    if not concat:
        return [(0, widths[0] // bn, tuple(range(len(weights))))]
    parts, lo = [], 0
    for i, n in enumerate(widths):
        parts.append((lo, lo + n // bn, (i,)))
        lo += n // bn
    return parts


E4M3_MAX = 448.0


def _dynamic_scale(x):
    """The float32 scale that maps x's largest magnitude to e4m3's largest finite value (1 for
    an all-zero group)."""
    amax = jnp.max(jnp.abs(x))
    return jnp.where(amax > 0, amax / E4M3_MAX, 1.0)


def quantize_rows(x_mk, group: int):
    """What convert="e4m3" does to x, in plain JAX: x [M, K] -> (e4m3 values [M, K], float32
    scales [M, K // group]) with x ~= values * scale per group of `group` columns."""
    m, k_dim = x_mk.shape
    xg = x_mk.astype(jnp.float32).reshape(m, k_dim // group, group)
    amax = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
    sx = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    return (xg / sx).astype(jnp.float8_e4m3fn).reshape(m, k_dim), sx[..., 0]


class _RowMap:
    """Which row of x output row r reads: an int32 array operand, or (static) r // div, which
    needs no operand (a constant index array becomes an iota or broadcast kernel every layer)."""

    def __init__(self, rows, count, div):
        self.rows, self.count, self.div = rows, count, div

    def operands(self):
        return () if self.rows is None else (self.rows.astype(jnp.int32),)

    def reader(self, refs):
        """kernel refs -> (r -> row, the groups ref, the rest)."""
        if self.rows is None:
            return (lambda r: r // self.div), refs[0], refs[1:]
        rows_ref = refs[0]
        return (lambda r: rows_ref[r]), refs[1], refs[2:]


def _program(refs, *, rows_r, per_row, nx, nw, ns):
    """A gemv kernel's refs -> (x refs, weight refs, scale refs, output refs, program ids (row,
    column tile, split), its group, the x row it reads)."""
    row_of, groups_ref, refs = rows_r.reader(refs)
    x_refs, refs = refs[:nx], refs[nx:]
    w_refs, s_refs, o_refs = refs[:nw], refs[nw:nw + ns], refs[nw + ns:]
    r, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    return x_refs, w_refs, s_refs, o_refs, (r, j, s), groups_ref[r if per_row else 0], row_of(r)


def _write_zeros(o_refs, s, r, n0, bn):
    """A row routed nowhere (group < 0) still owns its output tile: write zeros."""
    for o_ref in o_refs:
        o_ref[s, r, pl.ds(n0, bn)] = jnp.zeros((bn,), jnp.float32)


def _launch(kernel, name, x_mk, rows_r, groups_r, weights, scales, bn, split_k, num_warps, num_stages,
            interpret, n_tiles=None, w_nk=False):
    """Grid (rows, column tiles (N / bn unless given), split_k); outputs [split_k, rows, N_i]
    float32 per weight."""
    r_count = rows_r.count
    widths = [_gkn(w, w_nk)[2] for w in weights]
    n_tiles = widths[0] // bn if n_tiles is None else n_tiles
    out_shape = tuple(jax.ShapeDtypeStruct((split_k, r_count, n), jnp.float32) for n in widths)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(r_count, n_tiles, split_k),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=_interpret() if interpret is None else interpret,
        name=name + "_fp8" if scales else name,
    )(*rows_r.operands(), groups_r.astype(jnp.int32), *x_mk.operands(), *weights, *scales)


def _check(k_dim, n_dim, bn, bk, split_k, fp8, layout, block):
    if n_dim % bn or k_dim % (bk * split_k):
        raise ValueError(f"gemv tiles bn={bn}, bk={bk}, split_k={split_k} do not divide K={k_dim}, "
                         f"N={n_dim}; pick tiles with kernels.pick_tile")
    if fp8 and layout == "k" and block % bk:
        raise ValueError(f"FP8 layout 'k' needs bk={bk} to divide the scale block {block}")
    if fp8 and layout == "n" and block % bn:
        raise ValueError(f"FP8 layout 'n' needs bn={bn} to divide the scale block {block}")
    if layout not in ("k", "n"):
        raise ValueError(f"layout must be 'k' or 'n', got {layout!r}")


# Defaults by weight kind, overridable in-process (serve.bench --sweep installs the fastest
# measured; benchmarks/NOTES.md has the numbers). target_programs: split K until rows x column
# tiles x splits reaches it, so small batches still put every SM to work.
# Measured on an H100 (run 2, one MoE layer of 30B-A3B at batch 1): bf16 "dot", bn=128, 8 warps
# 63 us (other variants 66-86 us); FP8 "fma", bk=64, bn=128 58-62 us (the "bits" conversion 73 us).
# Run 8 (2026-11-28, benchmarks/NOTES.md): bf16 "dot" with bk=64 60.2 us (default 65.8 us); FP8
# "dot" with convert="f16" 57.3 us, the fastest FP8 variant, and the whole FP8 decode step at
# batch 1 went 4.95 -> 4.39 ms with it.
# Run 13 (device time per kernel from the profiler, H100, every decode gemv shape of 30B-A3B at
# batch 1): 2 pipeline stages beat 3 where a program runs <= 4 K steps (qkv, MoE gate/up and down:
# 3-9% faster, bf16 and FP8), and o_proj (K=4096: 128 programs at split 8) gained 20-26% from
# split 16. num_stages None = that rule (short_loop_steps: the most K steps per program that get
# 2 stages); an int forces it.
GEMV_DEFAULTS = {
    "bf16": dict(bn=128, bk=64, num_warps=8, num_stages=None, acc2d=True, convert="cast", mode="dot",
                 target_programs=264, max_split=16, short_loop_steps=4),
    "fp8": dict(bn=128, bk=64, num_warps=4, num_stages=None, acc2d=True, convert="auto", mode="dot",
                target_programs=264, max_split=16, short_loop_steps=4),
}
# FP8 convert "auto" (kernels.FP8_GEMM): "e4m3" (W8A8) for layout "k" with at least this many rows,
# else "f16" (W8A16). Run 41 (H200, 30B-A3B FP8 stored [out, in], benchmarks/NOTES.md): at batch 8
# W8A8 took the MoE gate/up (64 rows) from 3641 to 2677 us per step, while the layout-"n" gemvs
# (down, o_proj) were 4% slower with it and batch 1 (8 rows) was 3.9% slower as a whole. Run 42
# (W8A8 from 16 rows against W8A16, ms per step): batch 2 (16 MoE rows) 3.683 / 3.664, batch 4
# 5.266 / 5.752, batch 8 7.569 / 8.526, batch 16 12.453 / 13.228. So from 32 rows: batch 2 keeps
# the more precise 16-bit activations at no cost.
W8A8_MIN_ROWS = 32
# Over GEMV_DEFAULTS by (kind, layout). Runs 17-18 (H200, FP8 w8a16, device time per gemv at
# batch 1, benchmarks/NOTES.md): o_proj (layout "n", 4 K steps per program) 6.95 -> 6.32 us with 3
# stages; the MoE down (3 steps) is best with 2. The q/k/v tiles are linear.PROJECTION_TILES.
GEMV_LAYOUT_DEFAULTS = {
    ("fp8", "n"): dict(short_loop_steps=3),
}
# Over those for weights stored [G, N, K] (w_nk; the model's FP8 weights). Run 32 (H200, device
# time per gemv at batch 1, benchmarks/NOTES.md): MoE gate/up 12.22 us ([G, K, N], the defaults)
# -> 11.49 (w_nk) -> 11.12 us (w_nk, bk=128); MoE down 7.49 -> 6.54 -> 6.37 us (w_nk, bk=128, 8
# warps, 3 stages). [G, K, N] with those tiles was slower (gate/up bk=128 + 8 warps: 15.46 us).
GEMV_NK_DEFAULTS = {
    ("fp8", "k"): dict(bk=128),
    ("fp8", "n"): dict(bk=128, num_warps=8, num_stages=3),
}


def gemv_tiles(k_dim: int, n_dim, rows: int, fp8: bool, layout: str, block: int, w_nk: bool = False, **override):
    """gemv keyword arguments for this shape: defaults (GEMV_DEFAULTS, GEMV_LAYOUT_DEFAULTS, with
    w_nk GEMV_NK_DEFAULTS, then override) shrunk until they divide the shape, then K split for
    enough programs; w_nk is passed through. None if nothing divides.
    n_dim: an int, or a tuple of widths laid side by side (gemv concat=True; bn divides each)."""
    from . import pick_tile
    widths = tuple(n_dim) if isinstance(n_dim, tuple) else (n_dim,)
    kind = "fp8" if fp8 else "bf16"
    cfg = {**GEMV_DEFAULTS[kind], **GEMV_LAYOUT_DEFAULTS.get((kind, layout), {}),
           **(GEMV_NK_DEFAULTS.get((kind, layout), {}) if w_nk else {}), **override}
    bn, bk = cfg["bn"], cfg["bk"]
    bn_t = pick_tile(math.gcd(*widths), min(bn, block) if fp8 and layout == "n" else bn)
    bk_t = pick_tile(k_dim, min(bk, block) if fp8 and layout == "k" else bk)
    if bn_t is None or bk_t is None:
        return None
    tiles = sum(n // bn_t for n in widths)
    split = 1
    while (rows * tiles * split < cfg["target_programs"] and split * 2 <= cfg["max_split"]
           and k_dim % (bk_t * split * 2) == 0):
        split *= 2
    stages = cfg["num_stages"]
    if stages is None:
        stages = 2 if k_dim // (bk_t * split) <= cfg["short_loop_steps"] else 3
    convert = cfg["convert"]
    if convert == "auto":
        convert = "e4m3" if fp8 and layout == "k" and rows >= W8A8_MIN_ROWS else "f16"
    return dict(bn=bn_t, bk=bk_t, split_k=split, num_warps=cfg["num_warps"], num_stages=stages,
                acc2d=cfg["acc2d"], convert=convert, mode=cfg["mode"], w_nk=w_nk)
