"""The MoE expert FFN on the kernels: sum_k w_k * down(silu(gate(x)) * up(x)), drop-free.

Two strategies, chosen statically from the number of (token, expert) assignments A = N * k:
  A <= gemv_max_assignments(fp8): gemv, one row per assignment, each reading only its expert (no
    sort; an expert routed twice is read twice, cheap while A is small).
  otherwise: sort by expert into row blocks (moe_blocks) and grouped_matmul, so each touched
    expert is read once per block of rows. FP8 experts with kernels.FP8_DEQUANTIZE_MOE_MIN_ROWS
    assignments each (long prefills) are first dequantized to one bf16 copy of the layer.
Weights are read in place from the stacked [L*E, ...] params: `offset` (= layer * E, traced)
picks the layer, so the scan over layers never copies a layer's experts.

The gemv path at batch 1 is launch-bound (benchmarks/results/run5_h100.log: ~25 XLA kernels of
1-3.5 us per layer, back to back). What runs between the GEMVs:
  - groups: precomputed by the routing kernel on one device (router.route_in_place with_groups);
    on a mesh (a device holds experts first_expert.. only) still derived here in XLA;
  - row indices: none, gemv's static row_div (an index array operand, even a numpy constant,
    is an iota or broadcast kernel every layer);
  - the swiglu of the gate/up outputs: with kernels.x_load("swiglu") (default) and no split-K
    partials (batch >= 8 at 30B shapes), in the down gemv's x load (gemv_inputs.SwigluX); else
    an XLA fusion;
  - the weighted sum over k: an XLA fusion (one Pallas kernel was measured slower on an H100:
    run 6 in benchmarks/NOTES.md).
x may be a gemv_inputs source (the post-attention RMSNorm applied in the gate/up gemv's x load).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from .. import kernels
from . import dequantize as dequantize_kernel
from ..fp8 import dequantize
from .gemv import gemv, gemv_tiles
from .gemv_inputs import SwigluX, materialize
from .grouped_matmul import grouped_matmul, matmul_tiles
from .moe_blocks import block_rows, expert_blocks, route_blocks, route_blocks_covered
from .x_quantize import quantize_x

# Assignments (tokens x top-k) up to which the MoE runs the gemv, by weight kind; above, the
# blocks path. Measured crossover (benchmarks/NOTES.md): run 2 had gemv winning to 8 tokens
# (64 assignments) in bf16 and to 16 in FP8; after the blocks path's W8A8 matmul and routing
# kernels, FP8 batch 16 ran 12.219 ms on the gemvs against 8.731 on the matmuls (run 128, H200;
# the projections' share ~2.9 ms of it), and batch 8 6.469 ms with the MoE on the gemv against
# 6.719 on the blocks (run 129, projections on the matmul in both): 8 tokens in either kind.
GEMV_MAX_ASSIGNMENTS = {"bf16": 64, "fp8": 64}

# How the blocks path builds its row blocks (moe_blocks.py): "kernel-scan" (route_blocks: two
# Pallas kernels at every size, XLA summing the histogram between them past the in-kernel walk's
# 4096 assignments); "kernel" (route_blocks up to 4096 assignments, XLA's expert_blocks past it:
# argsort, scatters, ~10 XLA kernels a layer); "xla" everywhere. H200, one process a model (runs
# 168 and 170, benchmarks/NOTES.md), "kernel" -> "kernel-scan": bf16 prefill 1k 26.50 -> 24.78 ms,
# 2k 39.58 -> 37.16, FP8 1k 26.49 -> 24.98, 2k 38.97 -> 36.68 (2048 is the served chunk). Either
# way the gate/up kernel gathers x's rows itself (no [R, D] copy of x: run 168, 8k prefill
# -4.9% bf16 / -5.5% FP8 on XLA-built blocks against the copy), and on route_blocks' blocks the
# down writes real rows only.
BLOCK_ROUTINGS = ("kernel", "kernel-scan", "xla")
BLOCK_ROUTING = "kernel-scan"

# The dtype of the blocks path's down rows, which the combine gathers back per token: "x" (x's
# dtype: bf16 rows for a bf16 or FP8 model, each rounded once from its float32 sums, then added
# in float32; Hugging Face's reference adds bf16 expert outputs in bf16) or "f32". At an 8k prompt
# the rows are 600 MB in float32, written by the down and read back by the combine (run 170's
# profile: `loop_add_fusion` 143 us a layer, at the HBM rate). H200, run 174, "f32" -> "x": bf16
# prefill 1k 24.27 -> 23.28 ms, 2k 36.42 -> 34.94, 8k 149.93 -> 145.26; FP8 23.65 -> 23.16, 35.93
# -> 35.19, 141.29 -> 136.32; decode batch 16/64 level. A float32 model keeps float32 rows.
DOWN_ROWS_CHOICES = ("x", "f32")
DOWN_ROWS = "x"


def gemv_max_assignments(fp8: bool) -> int:
    return GEMV_MAX_ASSIGNMENTS["fp8" if fp8 else "bf16"]


@dataclasses.dataclass
class ExpertArrays:
    """Expert weights as the kernels read them (G = layers * E, or E for one layer):
    gate, up [G, D, F], down [G, F, D] in the compute dtype or FP8, or with w_nk the last two
    axes swapped (gate/up [G, F, D], down [G, D, F]: the checkpoint's [out, in], K contiguous);
    *_scale float32 (FP8 only), never swapped: gate/up [G, ceil(D/block), F] (layout "k"), down
    [G, F, ceil(D/block)] (layout "n"); scale_run: the checkpoint's block along F, where the
    expanded scales repeat (model.Weight.fp8_scale_run; None: `block`)."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array
    gate_scale: jax.Array | None = None
    up_scale: jax.Array | None = None
    down_scale: jax.Array | None = None
    block: int = 128
    num_experts: int = 0           # experts per layer held here
    offset: jax.Array | int = 0    # group of this layer's expert 0 (layer * num_experts)
    w_nk: bool = False
    scale_run: int | None = None
    layer: jax.Array | int | None = None   # offset's layer, when offset = layer * num_experts
    # Experts a token's top-k picks from, on every device (0: num_experts, one device). The mean
    # rows an expert held here gets is assignments / this, whatever share of them a device holds.
    routed_experts: int = 0

    @property
    def fp8(self) -> bool:
        return self.gate_scale is not None

    @property
    def d_f(self) -> tuple[int, int]:
        """(D, F): the model and expert hidden widths."""
        a, b = self.gate.shape[1:]
        return (b, a) if self.w_nk else (a, b)

    def rows_per_expert(self, assignments: int) -> int:
        """The mean rows an expert held here gets from `assignments` under uniform routing."""
        return assignments // (self.routed_experts or self.num_experts)

    @classmethod
    def from_stacked(cls, gate, up, down, scales=None, block=128, layer=None, w_nk=False, scale_run=None,
                     routed_experts=0):
        """From [L, E, ...] (or [E, ...] with layer None) params; scales = (gate, up, down) or None."""
        def fold(a):
            return a if a is None or layer is None else a.reshape(-1, *a.shape[2:])
        e = gate.shape[1] if layer is not None else gate.shape[0]
        s = scales or (None, None, None)
        off = 0 if layer is None else jnp.asarray(layer, jnp.int32) * e
        return cls(fold(gate), fold(up), fold(down), fold(s[0]), fold(s[1]), fold(s[2]), block, e, off, w_nk,
                   scale_run, None if layer is None else jnp.asarray(layer, jnp.int32), routed_experts)


def supported(arrays: ExpertArrays, assignments: int) -> bool:
    """True when tiles divide the shapes and Pallas indexes the weights right
    (kernels.index_overflows); else the caller keeps the XLA path."""
    if kernels.index_overflows(arrays.gate, arrays.up, arrays.down):
        return False
    d, f = arrays.d_f
    if assignments <= gemv_max_assignments(arrays.fp8):
        return (gemv_tiles(d, f, assignments, arrays.fp8, "k", arrays.block, w_nk=arrays.w_nk) is not None
                and gemv_tiles(f, d, assignments, arrays.fp8, "n", arrays.block, w_nk=arrays.w_nk) is not None)
    bm = block_rows(arrays.rows_per_expert(assignments))
    return (matmul_tiles(d, f, bm, arrays.fp8, "k", arrays.block, w_nk=arrays.w_nk) is not None
            and matmul_tiles(f, d, bm, arrays.fp8, "n", arrays.block, w_nk=arrays.w_nk) is not None)


def moe_ffn(x_nd, weights_nk, experts_nk, arrays: ExpertArrays, first_expert=0, *, strategy=None, groups=None,
            interpret=None):
    """x [N, D], routing weights [N, k] f32, experts [N, k] global ids -> [N, D] float32 (the
    contribution of the experts held here). `strategy` 'gemv'/'blocks' overrides the choice.

    groups [N*k] int32 (optional, gemv path): each assignment's group in `arrays`, i.e. expert +
    arrays.offset, precomputed (router.route_in_place with_groups); only where every expert is
    held here (first_expert 0, arrays holding all E of the router). The blocks path ignores it.
    interpret: Pallas interpret mode for the gemv path (None: when there is no GPU)."""
    n, d = x_nd.shape
    k = experts_nk.shape[1]
    a = n * k
    if groups is not None and not (isinstance(first_expert, int) and first_expert == 0):
        raise ValueError(f"precomputed groups assume every expert is held here, but first_expert="
                         f"{first_expert}; on a mesh pass groups=None (they are derived from experts)")
    strategy = strategy or ("gemv" if a <= gemv_max_assignments(arrays.fp8) else "blocks")
    if strategy == "gemv":
        return _gemv_path(x_nd, weights_nk, experts_nk, arrays, first_expert, groups, interpret)
    return _blocks_path(x_nd, weights_nk, experts_nk, arrays, first_expert)


def _scales(arrays, *names):
    if not arrays.fp8:
        return None
    return tuple(getattr(arrays, f"{nm}_scale") for nm in names)


def _gemv_path(x_nd, weights_nk, experts_nk, arrays, first_expert, groups, interpret):
    n, d = x_nd.shape
    k = experts_nk.shape[1]
    a = n * k
    f = arrays.d_f[1]
    route_w = weights_nk.astype(jnp.float32)   # [N, k] (not the storage flag arrays.w_nk)
    if groups is None:
        local = experts_nk.reshape(-1).astype(jnp.int32) - first_expert
        here = (local >= 0) & (local < arrays.num_experts)
        groups = jnp.where(here, local + arrays.offset, -1)
        route_w = jnp.where(here.reshape(n, k), route_w, 0.0)
    # rows by row_div (assignment r reads token r // k): an index array, even a numpy constant,
    # becomes an iota / broadcast kernel every layer (seen in the H100 profile, run 11)
    t1 = gemv_tiles(d, f, a, arrays.fp8, "k", arrays.block, w_nk=arrays.w_nk)
    g, u = gemv(x_nd, a, groups, (arrays.gate, arrays.up), _scales(arrays, "gate", "up"), row_div=k,
                layout="k", block=arrays.block, interpret=interpret, **t1)
    h = SwigluX(g, u, x_nd.dtype)   # silu(g) * u [A, F]
    # In the down gemv's x load only without split partials to sum: a sum per K step in series
    # with the step cost more than the XLA kernel (run 17, H200: batch 1 FP8 +0.19 ms, gate/up
    # split 8; batch 8 bf16 -0.29 ms, split 1).
    if not (kernels.x_load("swiglu") and g.shape[0] == 1):
        h = h.materialize()
    t2 = gemv_tiles(f, d, a, arrays.fp8, "n", arrays.block, w_nk=arrays.w_nk)
    (y,) = gemv(h, a, groups, (arrays.down,), _scales(arrays, "down"), row_div=1,
                layout="n", block=arrays.block, interpret=interpret, **t2)
    return jnp.sum((jnp.sum(y, axis=0) * route_w.reshape(-1)[:, None]).reshape(n, k, d), axis=1)


def _blocks_path(x_nd, weights_nk, experts_nk, arrays, first_expert):
    n, d = x_nd.shape
    k = experts_nk.shape[1]
    a = n * k
    d, f = arrays.d_f
    if arrays.fp8 and kernels.fp8_dequantized(arrays.rows_per_expert(a), moe=True):
        arrays = _dequantized_layer(arrays, x_nd.dtype)
    bm = block_rows(arrays.rows_per_expert(a))
    if BLOCK_ROUTING != "xla" and route_blocks_covered(a, arrays.num_experts, walk_only=BLOCK_ROUTING == "kernel"):
        # the routing kernels; the gate/up kernel gathers x's rows and the down writes real rows only
        by_layer = (arrays.layer, None) if arrays.layer is not None else (arrays.offset, 1)
        rb = route_blocks(experts_nk, weights_nk, arrays.num_experts, bm, first_expert, by_layer[0],
                          groups_per_layer=by_layer[1])
        groups, pos, w = rb.groups, rb.pos, rb.weights
        gather = dict(rows=rb.rows, block_valid=rb.block_valid)
    else:
        blk = expert_blocks(experts_nk, arrays.num_experts, bm, first_expert)
        groups, pos = jnp.where(blk.groups >= 0, blk.groups + arrays.offset, -1), blk.pos
        w = jnp.where(blk.here, weights_nk.reshape(-1), 0.0).astype(jnp.float32)
        # pad rows read token 0 and are computed; nothing reads them
        gather = dict(rows=blk.rows)

    t1 = matmul_tiles(d, f, bm, arrays.fp8, "k", arrays.block, w_nk=arrays.w_nk)
    t2 = matmul_tiles(f, d, bm, arrays.fp8, "n", arrays.block, w_nk=arrays.w_nk)
    common = dict(bm=bm, block=arrays.block, w_nk=arrays.w_nk)
    a8 = t1["convert"] == "e4m3"
    if a8:
        # W8A8: x quantized once per token, before the gather (k times fewer rows, 1-byte values
        # moved); h leaves the gate/up kernel quantized in groups of its tile width, which the
        # down's K steps must divide, as they must stay inside one scale run; gate/up's N tiles
        # inside one run read one weight scale a K step (grouped_matmul's scale_run)
        run = arrays.scale_run or arrays.block
        xq, sx = quantize_x(x_nd, t1["bk"])
        xs, in1 = xq, dict(x_scales=sx, quantize_out=True, scale_run=run)
        t2 = dict(t2, bk=math.gcd(t2["bk"], t1["bn"], run))
    else:
        # f16 MMA (FP8 weights): x converted once here, not per tile in the kernel; h comes out f16
        xs, in1 = materialize(x_nd).astype(jnp.float16 if t1["convert"] == "f16" else x_nd.dtype), {}
    h = grouped_matmul(xs, groups, (arrays.gate, arrays.up), _scales(arrays, "gate", "up"),
                       layout="k", **common, **t1, **in1, **gather)   # [R, F], or (e4m3, scales)
    h, in2 = (h[0], dict(x_scales=h[1])) if a8 else (h, {})
    valid = dict(block_valid=gather["block_valid"]) if "block_valid" in gather else {}
    rows_dtype = x_nd.dtype if DOWN_ROWS == "x" else jnp.float32
    y = grouped_matmul(h, groups, (arrays.down,), _scales(arrays, "down"), layout="n", **common, **t2,
                       **in2, **valid, out_dtype=rows_dtype)   # [R, D]
    # a select, not a product: rows never written (pad rows, unused blocks) may hold NaN bits,
    # and an assignment not held here points at row 0 with weight 0
    y_ad = jnp.where(w[:, None] != 0, y[pos].astype(jnp.float32) * w[:, None], 0.0)
    return jnp.sum(y_ad.reshape(n, k, d), axis=1)


def _dequantized_layer(arrays: ExpertArrays, dtype) -> ExpertArrays:
    """This layer's FP8 experts as one `dtype` copy in [E, K, N], for the compute-bound sizes of
    kernels.FP8_DEQUANTIZE_MOE_MIN_ROWS. Weights stored [E, N, K] (w_nk) are copied by the
    transposing kernel (dequantize.py) where it covers them and dequantize.COPY says so; else XLA
    slices, swaps back and dequantizes in one fusion. The bf16 grouped matmul on an [E, N, K]
    copy was slower at 8k tokens (H200, run 38 in benchmarks/NOTES.md: 226.8 against 215.4 ms)."""
    e, block = arrays.num_experts, arrays.block

    def layer(w, scale, axis):
        if arrays.w_nk and dequantize_kernel.COPY == "kernel" and dequantize_kernel.covered(*w.shape[1:], block):
            return dequantize_kernel.dequantize_transposed(w, scale, arrays.offset, groups=e,
                                                           layout="k" if axis == 1 else "n", block=block,
                                                           dtype=dtype)
        sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=arrays.offset, slice_size=e, axis=0)
        w = sl(w)
        return dequantize(jnp.swapaxes(w, 1, 2) if arrays.w_nk else w, sl(scale), axis, block, dtype)
    return ExpertArrays(layer(arrays.gate, arrays.gate_scale, 1), layer(arrays.up, arrays.up_scale, 1),
                        layer(arrays.down, arrays.down_scale, 2), block=block, num_experts=e)


def moe_ffn_stacked(x_nd, weights_nk, experts_nk, gate, up, down, layer, groups=None):
    """The model's entry on one device: gate/up/down are model.Weight objects holding [L, E, ...]
    params (bf16, or FP8 + scale); `layer` the traced layer index; groups [N*k] int32 = experts
    + layer * E or None (see moe_ffn). -> [N, D] float32, or None when the kernels do not cover
    this case (mixed FP8/bf16 experts, tiles that divide nothing)."""
    ws = (gate, up, down)
    fp8 = [w.is_fp8 for w in ws]
    if any(fp8) and not all(fp8):
        return None
    scales = tuple(w.scale[...] for w in ws) if all(fp8) else None
    return moe_ffn_in_place(x_nd, weights_nk, experts_nk, gate.w[...], up.w[...], down.w[...], scales,
                            gate.fp8_block or 128, layer, groups=groups, w_nk=gate.nk, scale_run=down.fp8_scale_run)


def moe_ffn_in_place(x_nd, weights_nk, experts_nk, gate, up, down, scales, block, layer, first_expert=0, *,
                     groups=None, interpret=None, w_nk=False, scale_run=None, routed_experts=0):
    """moe_ffn on layer `layer` of stacked [L, E_local, ...] arrays (this device's experts
    first_expert.. on a mesh; scales (gate, up, down) or None; w_nk, scale_run, routed_experts (the
    experts on all devices): see ExpertArrays) -> [N, D] float32, or None when no tiling fits these
    shapes. groups, interpret: see moe_ffn (groups on one device only)."""
    arrays = ExpertArrays.from_stacked(gate, up, down, scales, block=block, layer=layer, w_nk=w_nk,
                                       scale_run=scale_run, routed_experts=routed_experts)
    if not supported(arrays, experts_nk.size):
        return None
    return moe_ffn(x_nd, weights_nk, experts_nk, arrays, first_expert, groups=groups, interpret=interpret)
