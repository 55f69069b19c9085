"""Qwen3-MoE in Flax NNX, written once for one device.

Axis letters (used in every weight and activation name):
  B batch   T sequence   S cache length   D model dim   H query heads   K kv heads
  G query heads per kv head   Q head dim   E experts   F expert intermediate
  I dense intermediate   V vocab   L layers   N tokens (B*T flattened)

Sharding enters only through the logical axis names each Param carries (`logical_axes`) and a
few `constrain` calls on activations; sharding/rules.py maps names to mesh axes. The one
exception is the MoE FFN, which runs under shard_map when a mesh is given (moe.py).

Layers are stacked: each run of consecutive same-kind layers (MoE or dense) is one Segment
whose params carry a leading L dim and whose forward is a `lax.scan`, so compile time does not
grow with depth.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from sharding.context import ShardingContext, constrain
from sharding.rules import partition_spec, view_size

from .attention import attention, query_block
from .config import Qwen3MoeConfig, yarn_inv_freq
from . import fp8 as fp8_format
from .fp8 import FP8_DTYPE, dequantize, kind_kept_unquantized
from . import kernels
from .kernels.gemv_inputs import RmsNormX, materialize
from .moe import GatheredRouting, expert_ffn, moe_ffn, route


def _init(kind: str, shape, dtype, rngs: nnx.Rngs | None, std: float = 0.02):
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _stacked(shape, axes, stack: int | None):
    if stack is None:
        return tuple(shape), tuple(axes)
    return (stack, *shape), ("layers", *axes)


class Weight(nnx.Module):
    """One weight matrix: plain (`w` in the compute dtype) or FP8 (`w` e4m3 + float32 `scale`).

    `block_axis` is the model-dim axis D of the per-layer shape; FP8 scales keep D in blocks of
    `block` and every other dim per element (see fp8.py for why).

    `nk_split=(lead, n_in)`: the per-layer einsum layout is [lead axes, n_in input axes, output
    axes] (experts gate [E, D, F]: (1, 1); q_proj [D, H, Q]: (0, 1); o_proj [H, Q, D]: (0, 2)).
    With fp8.NK_ORDER (the default) an FP8 `w` is then stored [lead, out, in] (the checkpoint's
    [out, in], K contiguous: experts gate [E, F, D], q_proj [H, Q, D], o_proj [D, H, Q]) while
    `scale` stays in the einsum layout. The FP8 GEMVs read 8-bit tiles with K contiguous 5-18%
    faster (benchmarks/NOTES.md, runs 32-35). bf16 weights ignore it; the `nk` property says
    whether `w` is stored so.
    """

    def __init__(self, shape, axes, *, dtype, rngs, stack=None, fp8_block: int | None = None,
                 fp8_scale_run: int | None = None, block_axis: int = 0, init: str = "normal",
                 repeat: tuple[int, int] | None = None, nk_split: tuple[int, int] | None = None):
        """`repeat=(axis, r)`: random init draws shape[axis] // r values and repeats each r times,
        so KV-head replication (tp > kv heads) gives the same random model as one device.
        fp8_scale_run: the checkpoint's block along the non-D dims, where the expanded scale
        repeats in runs of that length (default fp8_block: square blocks); W8A8 kernels keep their
        K steps inside one run."""
        self.block_axis = block_axis
        self.fp8_block = fp8_block
        self.fp8_scale_run = fp8_scale_run or fp8_block
        self.rank = len(shape)   # per layer
        full_shape, full_axes = _stacked(shape, axes, stack)

        def draw(dt, std=0.02):
            if repeat is None or repeat[1] == 1:
                return _init(init, full_shape, dt, rngs, std)
            axis = repeat[0] + (stack is not None)
            base = list(full_shape)
            base[axis] //= repeat[1]
            return jnp.repeat(_init(init, tuple(base), dt, rngs, std), repeat[1], axis=axis)

        if fp8_block is None:
            self.nk_split = None
            self.w = nnx.Param(draw(dtype), logical_axes=full_axes)
            return
        # Random FP8 weights: values in the e4m3 range with a scale that gives std ~0.02.
        self.nk_split = nk_split if fp8_format.NK_ORDER else None
        w8 = draw(jnp.float32, std=1.0).astype(FP8_DTYPE)
        if self.nk:
            order = self._stored_order(len(full_shape))
            w8, full_axes = jnp.transpose(w8, order), tuple(full_axes[a] for a in order)
        self.w = nnx.Param(w8, logical_axes=full_axes)
        scale_shape = list(shape)
        scale_shape[block_axis] = -(-shape[block_axis] // fp8_block)
        scale_axes = list(axes)
        scale_axes[block_axis] = "embed_blocks"
        s_shape, s_axes = _stacked(scale_shape, scale_axes, stack)
        self.scale = nnx.Param(jnp.full(s_shape, 0.02, jnp.float32), logical_axes=s_axes)

    @property
    def is_fp8(self) -> bool:
        return self.fp8_block is not None

    @property
    def nk(self) -> bool:
        """w is stored [lead, out, in] (FP8 with nk given), not in the einsum layout."""
        return self.nk_split is not None

    def _stored_order(self, ndim: int) -> list[int]:
        """Axis order of the stored w as a transpose of the einsum-layout array of rank ndim
        (any leading dims: the layer stack, a layer's slice)."""
        lead, n_in = self.nk_split
        first = ndim - self.rank + lead          # the first input axis
        axes = list(range(ndim))
        return axes[:first] + axes[first + n_in:] + axes[first:first + n_in]

    def to_einsum(self, w):
        """An array of this weight as stored (the stack, a layer's slice, a device's shard) in the
        einsum layout."""
        return jnp.transpose(w, np.argsort(self._stored_order(w.ndim))) if self.nk else w

    @property
    def einsum_shape(self) -> tuple[int, ...]:
        """The shape of w in the einsum layout (the stored shape unless nk)."""
        shape = tuple(self.w.shape)
        return tuple(shape[a] for a in np.argsort(self._stored_order(len(shape)))) if self.nk else shape

    def __call__(self, dtype):
        """The weight in `dtype`, in the einsum layout (dequantized in-graph for FP8)."""
        if not self.is_fp8:
            return self.w[...].astype(dtype)
        return self.dequantize(self.w[...], self.scale[...], dtype)

    def dequantize(self, w, scale, dtype):
        """Arrays of this weight as stored (a layer's slice, a device's shard) -> `dtype` in the
        einsum layout: an nk weight put back in einsum order, then the block dequantize."""
        w = self.to_einsum(w)
        return dequantize(w, scale, self.block_axis - self.rank, self.fp8_block, dtype)   # from the end: any leading dims


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, stack=None, axis_name="embed"):
        shape, axes = _stacked((dim,), (axis_name,), stack)
        self.weight = nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)
        self.eps = eps

    def __call__(self, x):
        # As transformers: normalize in float32, cast back, then scale in the weight's dtype.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


def rope_tables(cfg: Qwen3MoeConfig, positions_bt, dtype):
    """cos, sin [B, T, Q] for integer positions (yarn folds its attention factor into both)."""
    inv_freq, attn_factor = yarn_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
    freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * attn_factor).astype(dtype), (jnp.sin(emb) * attn_factor).astype(dtype)


def apply_rope(x_bthq, cos_btq, sin_btq):
    half = x_bthq.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthq[..., half:], x_bthq[..., :half]], axis=-1)
    return x_bthq * cos_btq[:, :, None, :] + rotated * sin_btq[:, :, None, :]


def _fp8(cfg: Qwen3MoeConfig, hf_module: str, d_is_input: bool) -> dict:
    """Weight's FP8 arguments for one projection kind: fp8_block, the block size along D (None to
    keep the kind in the compute dtype), and fp8_scale_run, the checkpoint's block along the
    other dim (where the in-memory scale repeats in runs of that length).

    A projection any module of which modules_to_not_convert names (transformers' matching, see
    fp8.kind_kept_unquantized) stays unquantized in every layer; the loader dequantizes any FP8
    tensors of that kind, so numerics are unchanged.
    """
    if cfg.fp8 is None or kind_kept_unquantized(cfg, hf_module):
        return dict(fp8_block=None)
    blocks = (cfg.fp8.block_in, cfg.fp8.block_out)   # HF [out, in]: D is `in` when d_is_input
    return dict(fp8_block=blocks[not d_is_input], fp8_scale_run=blocks[d_is_input])


def _sub(stacked, name):
    """(module with [L, ...] params, layer) -> (its `name` child, layer), or None."""
    return None if stacked is None else (getattr(stacked[0], name), stacked[1])


# Logical axis of each einsum letter of the attention projections (see the legend above).
_LETTER_AXES = {"b": "batch", "t": "seq", "d": "embed", "h": "heads", "k": "kv_heads", "q": "head_dim"}


def _einsum_w(eq, x, weight: Weight, ctx, stacked=None):
    """einsum(eq, x, weight) in x's dtype. With kernels on (kernels.usable) and `stacked` =
    (the same Weight with [L, ...] params, layer index), the kernel reads layer i in place (no
    per-layer slice copy; FP8 dequantized in registers, not into a bf16 copy first); on a mesh
    it does so on each device's shards (kernels/sharded.py)."""
    if stacked is not None and kernels.usable(x.dtype):
        full, i = stacked
        w, scale = full.w[...], (full.scale[...] if weight.is_fp8 else None)
        if kernels.single_device(ctx):
            y = kernels.linear_einsum(eq, x, w, scale, weight.block_axis, weight.fp8_block, layer=i, w_nk=full.nk,
                                      scale_run=weight.fp8_scale_run)
            if y is not None:
                return y
        else:
            return _einsum_w_per_device(eq, materialize(x), full, i, ctx)
    return jnp.einsum(eq, materialize(x), weight(x.dtype))


def _einsum_local_slice(eq, x, full: Weight, w_l, scale_l, layer):
    """einsum(eq, x, layer `layer` of a device's shard w_l (+ scale_l)) by XLA, float32: where no
    kernel tiling fits the local shapes, on the layer's local slice."""
    w_i = w_l[layer] if scale_l is None else full.dequantize(w_l[layer], scale_l[layer], x.dtype)
    return jnp.einsum(eq, x, w_i.astype(x.dtype), preferred_element_type=jnp.float32)


def _einsum_w_per_device(eq, x, full: Weight, layer, ctx):
    """_einsum_w on a mesh: the projection kernel on local shards (heads split over tp); a
    split contracted dim (o_proj's heads) is summed across devices in float32."""
    xs, out = eq.replace(" ", "").split("->")
    xs, ws = xs.split(",")
    x_axes = tuple(_LETTER_AXES[c] for c in xs)
    out_axes = tuple(_LETTER_AXES[c] for c in out)
    w_axes = tuple(full.w.get_metadata()["logical_axes"])
    if full.nk:   # the weight's letters in storage order ([lead, out, in])
        ws = "".join(ws[a] for a in full._stored_order(len(ws)))
    contracted = [1 + ws.index(c) for c in ws if c in xs and c not in out]   # +1: the layers dim
    psum_over = kernels.sharded.mesh_axes_of(ctx, w_axes, full.w.shape, contracted)
    sizes = dict(zip(xs, x.shape)) | dict(zip(ws, full.w.shape[1:]))
    out_shape = tuple(sizes[c] for c in out)
    operands, in_axes = [x, full.w[...]], [x_axes, w_axes]
    if full.is_fp8:
        operands.append(full.scale[...])
        in_axes.append(tuple(full.scale.get_metadata()["logical_axes"]))
    operands.append(jnp.asarray(layer, jnp.int32))
    in_axes.append(None)

    def local(x_l, w_l, *rest):
        scale_l, i = (rest[0], rest[1]) if full.is_fp8 else (None, rest[0])
        y = kernels.linear_einsum(eq, x_l, w_l, scale_l, full.block_axis, full.fp8_block, layer=i,
                                  out_dtype=jnp.float32, w_nk=full.nk, scale_run=full.fp8_scale_run)
        return _einsum_local_slice(eq, x_l, full, w_l, scale_l, i) if y is None else y

    y = kernels.sharded.per_device(local, ctx, operands, in_axes, out_axes, out_shape, psum_over)
    return y.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen3MoeConfig, *, dtype, kv_rep: int, stack, rngs):
        d, h, q = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        k = cfg.num_key_value_heads * kv_rep
        self.num_kv = k
        self.scale = q ** -0.5
        mk = dict(dtype=dtype, rngs=rngs, stack=stack)
        self.q_proj = Weight((d, h, q), ("embed", "heads", "head_dim"), block_axis=0, nk_split=(0, 1),
                             **_fp8(cfg, "self_attn.q_proj", True), **mk)
        self.k_proj = Weight((d, k, q), ("embed", "kv_heads", "head_dim"), block_axis=0, repeat=(1, kv_rep),
                             nk_split=(0, 1), **_fp8(cfg, "self_attn.k_proj", True), **mk)
        self.v_proj = Weight((d, k, q), ("embed", "kv_heads", "head_dim"), block_axis=0, repeat=(1, kv_rep),
                             nk_split=(0, 1), **_fp8(cfg, "self_attn.v_proj", True), **mk)
        self.o_proj = Weight((h, q, d), ("heads", "head_dim", "embed"), block_axis=2, nk_split=(0, 2),
                             **_fp8(cfg, "self_attn.o_proj", False), **mk)
        self.q_norm = RMSNorm(q, cfg.rms_norm_eps, dtype=dtype, stack=stack, axis_name="head_dim")
        self.k_norm = RMSNorm(q, cfg.rms_norm_eps, dtype=dtype, stack=stack, axis_name="head_dim")
        self.bias = cfg.attention_bias
        if self.bias:
            self.q_bias = Weight((h, q), ("heads", "head_dim"), init="zeros", **mk)
            self.k_bias = Weight((k, q), ("kv_heads", "head_dim"), init="zeros", **mk)
            self.v_bias = Weight((k, q), ("kv_heads", "head_dim"), init="zeros", **mk)
            self.o_bias = Weight((d,), ("embed",), init="zeros", **mk)

    def projections(self, x_btd, ctx, stacked=None):
        """-> q [B,T,H,Q], k [B,T,K,Q], v [B,T,K,Q] before q/k norm and RoPE.
        `stacked` = (this Attention with [L, ...] params, layer): lets kernels read in place."""
        dt = x_btd.dtype
        q = _einsum_w("btd,dhq->bthq", x_btd, self.q_proj, ctx, _sub(stacked, "q_proj"))
        k = _einsum_w("btd,dkq->btkq", x_btd, self.k_proj, ctx, _sub(stacked, "k_proj"))
        v = _einsum_w("btd,dkq->btkq", x_btd, self.v_proj, ctx, _sub(stacked, "v_proj"))
        if self.bias:
            q, k, v = q + self.q_bias(dt), k + self.k_bias(dt), v + self.v_bias(dt)
        return q, k, v

    def project(self, x_btd, cos, sin, ctx, stacked=None):
        """-> q [B,T,H,Q], k [B,T,K,Q], v [B,T,K,Q], normed and rotated."""
        q, k, v = self.projections(x_btd, ctx, stacked)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        act = ("batch", "seq", "heads", "head_dim")
        kv_act = ("batch", "seq", "kv_heads", "head_dim")
        return constrain(q, act, ctx), constrain(k, kv_act, ctx), constrain(v, kv_act, ctx)

    def attend(self, q_bthq, k_bskq, v_bskq, mask_bts, ctx=None, stacked=None, positions_bt=None,
               from_zero: bool = False):
        """Grouped-query attention; softmax in float32 as transformers does. -> [B, T, D].
        With kernels on, a GPU and `positions_bt`, a prompt starting at position 0 uses cuDNN's
        fused attention (kernels/prefill_attention.py); anything else the plain-XLA math
        (attention.py), in blocks of queries when one device's scores would be large.
        from_zero: the caller guarantees each row's tokens sit at positions 0.. from its first
        column, any padding after them (no runtime check of the positions)."""
        t, s = q_bthq.shape[1], k_bskq.shape[1]
        act = ("batch", "seq", "heads", "head_dim")
        b_local, _, h_local, _ = q_bthq.shape if ctx is None else ctx.shard_shape(act, q_bthq.shape)
        block = query_block(t, s, h_local, b_local)

        def xla_attention():
            return attention(q_bthq, k_bskq, v_bskq, mask_bts, self.scale, block)

        if positions_bt is not None and t > 1 and kernels.on_gpu() and kernels.active(ctx, q_bthq.dtype):
            out = kernels.causal_prefill_attention(q_bthq, k_bskq, v_bskq, positions_bt, self.scale, xla_attention,
                                                   from_zero=from_zero)
        else:
            out = xla_attention()
        return self.output(out, ctx, stacked)

    def output(self, out_bthq, ctx=None, stacked=None):
        """o_proj (+ bias): attention output [B, T, H, Q] -> [B, T, D]."""
        y = _einsum_w("bthq,hqd->btd", out_bthq, self.o_proj, ctx, _sub(stacked, "o_proj"))
        if self.bias:
            y = y + self.o_bias(out_bthq.dtype)
        return y


class ExpertWeights:
    """The expert matrices of one MoE layer, as moe.moe_ffn consumes them.

    arrays() are the raw (possibly FP8 + scale) arrays, pspecs() their PartitionSpecs, and
    local_ffn() the FFN of one device's experts on its shards of them. This class holds one
    layer's params (the scan's slice) and dequantizes them for XLA's ragged_dot;
    StackedExpertWeights hands the kernels the whole [L, ...] stack and the layer index.
    """

    def __init__(self, moe: "MoE", dtype):
        self.moe, self.dtype = moe, dtype
        self.weights = (moe.gate_proj, moe.up_proj, moe.down_proj)

    def arrays(self):
        out = []
        for wt in self.weights:
            out.append(wt.w[...])
            if wt.is_fp8:
                out.append(wt.scale[...])
        return tuple(out)

    def pspecs(self, ctx: ShardingContext):
        out = []
        for wt in self.weights:
            out.append(partition_spec(ctx.spec, self._axes(wt.w)))
            if wt.is_fp8:
                out.append(partition_spec(ctx.spec, self._axes(wt.scale)))
        return tuple(out)

    @staticmethod
    def _axes(var) -> tuple:
        return _unstacked_axes(var)

    def materialize(self, raw=None):
        if raw is None:
            return tuple(wt(self.dtype) for wt in self.weights)
        it = iter(raw)
        mats = []
        for wt in self.weights:
            w = next(it)
            if wt.is_fp8:
                mats.append(wt.dequantize(w, next(it), self.dtype))
            else:
                mats.append(w.astype(self.dtype))
        return tuple(mats)

    def local_ffn(self, x_nd, weights_nk, experts_nk, local_raw, shard):
        """This device's share of the FFN: its E_local experts (global ids from shard * E_local)
        and F columns -> [N, D] float32, a partial sum."""
        gate, up, down = self.materialize(local_raw)
        return expert_ffn(materialize(x_nd), weights_nk, experts_nk, gate, up, down,
                          first_expert=shard * gate.shape[0])


def _unstacked_axes(var) -> tuple:
    axes = tuple(var.get_metadata()["logical_axes"])
    return axes[1:] if axes and axes[0] == "layers" else axes


class StackedExpertWeights(ExpertWeights):
    """ExpertWeights over [L, E, ...] params + a traced layer index: on each device the kernels
    read layer i's local experts in place (kernels/moe_ffn.py), FP8 dequantized in registers."""

    def __init__(self, moe_full: "MoE", layer, dtype):
        super().__init__(moe_full, dtype)
        self.layer = jnp.asarray(layer, jnp.int32)

    def arrays(self):
        return (*super().arrays(), self.layer)

    def pspecs(self, ctx: ShardingContext):
        return (*super().pspecs(ctx), P())

    @staticmethod
    def _axes(var) -> tuple:
        return tuple(var.get_metadata()["logical_axes"])

    def local_ffn(self, x_nd, weights_nk, experts_nk, local_raw, shard):
        *raw, layer = local_raw
        fp8 = [wt.is_fp8 for wt in self.weights]
        y = None
        if all(fp8) or not any(fp8):
            mats = raw[0::2] if all(fp8) else raw
            scales = tuple(raw[1::2]) if all(fp8) else None
            e_local = mats[0].shape[1]
            y = kernels.moe_ffn_in_place(x_nd, weights_nk, experts_nk, *mats, scales,
                                         self.weights[0].fp8_block or 128, layer, shard * e_local,
                                         w_nk=self.weights[0].nk, scale_run=self.weights[2].fp8_scale_run,
                                         routed_experts=self.moe.router.w.shape[-1])   # all devices' experts
        if y is None:   # no tiling fits the local shapes: XLA on this layer's slice
            y = super().local_ffn(x_nd, weights_nk, experts_nk, [a[layer] for a in raw], shard)
        return y


def _rms_norm_view(x_nd, weight_ld, layer, *, eps: float):
    """x [N, D] seen through the norm weight_ld[layer] (gemv_inputs.RmsNormX): a moe.GatheredRouting
    view, so the post-attention norm runs in the routing's and the experts' x loads."""
    return RmsNormX(x_nd, weight_ld, jnp.asarray(layer, jnp.int32), eps)


def _route_stacked(x_nd, router_lde, layer, *, top_k: int, norm: bool):
    """Routing with layer `layer` of the stacked router [L, D, E]: the routing kernels read it in
    place where they cover x (kernels/router.py), else moe.route on the layer's slice."""
    routed = kernels.route_in_place(x_nd, router_lde, layer, top_k, norm)
    if routed is not None:
        return routed
    return route(materialize(x_nd), router_lde[layer].astype(jnp.float32), top_k, norm)


class MoE(nnx.Module):
    def __init__(self, cfg: Qwen3MoeConfig, *, dtype, stack, rngs):
        d, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        mk = dict(dtype=dtype, rngs=rngs, stack=stack)
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.router = Weight((d, e), ("embed", "router"), **mk)
        mk["nk_split"] = (1, 1)   # FP8 experts stored [E, out, in] (Weight)
        self.gate_proj = Weight((e, d, f), ("experts", "embed", "expert_mlp"), block_axis=1,
                                **_fp8(cfg, "mlp.experts.gate_proj", True), **mk)
        self.up_proj = Weight((e, d, f), ("experts", "embed", "expert_mlp"), block_axis=1,
                              **_fp8(cfg, "mlp.experts.up_proj", True), **mk)
        self.down_proj = Weight((e, f, d), ("experts", "expert_mlp", "embed"), block_axis=2,
                                **_fp8(cfg, "mlp.experts.down_proj", False), **mk)

    def __call__(self, x_btd, ctx, stacked=None, live_n=None):
        """`stacked` = (this MoE with [L, ...] params, layer): the kernels read experts in place.
        x_btd may be a gemv_inputs.RmsNormX (the post-attention norm, applied in the router's and
        the gate/up gemv's x load); XLA paths use it materialized. live_n [B*T] bool (optional):
        rows False route to no expert (expert -1, held by no device: the gemv reads no weight for
        them, the grouped matmul gives them no block, ragged_dot no group; their output is zeros)."""
        b, t, d = x_btd.shape
        x = x_btd.reshape(b * t, d)
        if stacked is not None and kernels.usable(x.dtype) and not kernels.single_device(ctx):
            full, i = stacked   # each device routes its data group's gathered tokens (moe.GatheredRouting)
            view, view_arrays = None, ()
            if isinstance(x, RmsNormX):   # the norm in the routing's and gate/up's x loads, after the gather
                view, view_arrays = functools.partial(_rms_norm_view, eps=x.eps), (x.weight, x.layer)
                x = x.x.reshape(b * t, d)
            routing = GatheredRouting(functools.partial(_route_stacked, top_k=self.top_k, norm=self.norm_topk_prob),
                                      (full.router.w[...], jnp.asarray(i, jnp.int32)), live_n, view, view_arrays)
            return moe_ffn(materialize(x), None, None, StackedExpertWeights(full, i, x.dtype), ctx,
                           routing=routing, batch=b).reshape(b, t, d)
        routed, groups = None, None
        if stacked is not None and kernels.active(ctx, x.dtype):   # router read in place, 2 kernels
            routed = kernels.route_in_place(x, stacked[0].router.w[...], stacked[1], self.top_k, self.norm_topk_prob,
                                            with_groups=True)
        if routed is not None:   # groups = experts + layer * E, written by the top-k kernel (one device)
            weights, experts, groups = routed
        else:
            weights, experts = route(materialize(x), self.router(jnp.float32), self.top_k, self.norm_topk_prob)
        if live_n is not None:   # route nowhere: run 76 measured 20 such rows at 3.9x one live row
            experts = jnp.where(live_n[:, None], experts, -1)   # outside every device's range: not here
            if groups is not None:   # the gemv path's groups: -1 reads no weight
                groups = jnp.where(jnp.repeat(live_n, self.top_k), groups, -1)
        if stacked is not None and kernels.usable(x.dtype):
            full, i = stacked
            y = kernels.moe_ffn_stacked(x, weights, experts, full.gate_proj, full.up_proj, full.down_proj, i, groups)
            if y is not None:
                return y.astype(x.dtype).reshape(b, t, d)
        return moe_ffn(materialize(x), weights, experts, ExpertWeights(self, x.dtype), ctx, batch=b).reshape(b, t, d)


class DenseMLP(nnx.Module):
    def __init__(self, cfg: Qwen3MoeConfig, *, dtype, stack, rngs):
        d, i = cfg.hidden_size, cfg.intermediate_size
        mk = dict(dtype=dtype, rngs=rngs, stack=stack)
        self.gate_proj = Weight((d, i), ("embed", "mlp"), block_axis=0,
                                **_fp8(cfg, "mlp.gate_proj", True), **mk)
        self.up_proj = Weight((d, i), ("embed", "mlp"), block_axis=0,
                              **_fp8(cfg, "mlp.up_proj", True), **mk)
        self.down_proj = Weight((i, d), ("mlp", "embed"), block_axis=1,
                                **_fp8(cfg, "mlp.down_proj", False), **mk)

    def __call__(self, x_btd, ctx, stacked=None, live_n=None):
        x_btd = materialize(x_btd)   # a gemv_inputs source on the fused decode path
        dt = x_btd.dtype
        h = jax.nn.silu(jnp.einsum("btd,di->bti", x_btd, self.gate_proj(dt)))
        h = h * jnp.einsum("btd,di->bti", x_btd, self.up_proj(dt))
        h = constrain(h, ("batch", "seq", "mlp"), ctx)
        return jnp.einsum("bti,id->btd", h, self.down_proj(dt))


class Block(nnx.Module):
    """One decoder layer (params stacked over `stack` layers)."""

    def __init__(self, cfg: Qwen3MoeConfig, kind: str, *, dtype, kv_rep, stack, rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, stack=stack)
        self.attn = Attention(cfg, dtype=dtype, kv_rep=kv_rep, stack=stack, rngs=rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, stack=stack)
        mlp_cls = MoE if kind == "moe" else DenseMLP
        self.mlp = mlp_cls(cfg, dtype=dtype, stack=stack, rngs=rngs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per segment: k, v [L, slots, S, K, Q]. Logical axes ('layers', 'batch', 'cache_seq', 'kv_heads', 'head_dim')."""

    k: list
    v: list

    AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


def _decode_attention(q_bthq, k_all, v_all, layer, slots_b, positions_bt, scale, ctx, kv_window=None, own=None,
                      in_order=False):
    """The kernel reading layer `layer` of the cache in place: one token per row, the decode-
    attention kernel (kernels/decode_attention.py); T > 1, a prefill chunk continuing its row
    (kernels/prefill_attention.py chunk_attention_cached; `own`, the chunk's (k, v), lets it
    split into two cuDNN calls there; `in_order`, Qwen3Moe's). None where neither applies (XLA
    attention then). On a mesh it runs per device on local heads and local rows. With the batch
    split over data-parallel groups that needs row b in slot b (the engine's decode step: slots
    None, one row per slot), so each device's rows are its own slots; other cases stay with XLA."""
    b, t = q_bthq.shape[:2]
    if not kernels.usable(q_bthq.dtype):
        return None
    if t == 1:
        covered, attend = kernels.decode_attention_covered, kernels.decode_attention_cached
    else:
        covered, attend = kernels.chunk_covered, kernels.chunk_attention_cached
    if not covered(q_bthq, k_all):
        return None
    # A chunk's own K/V let it split into two cuDNN calls (chunk_attention_split); decode has none.
    own = tuple(own) if t > 1 and own is not None else ()
    static = {"kv_window": kv_window, **({"in_order": in_order} if t > 1 else {})}

    def call(q, k, v, i, r, p, *own_kv):
        return attend(q, k, v, i, r, p, scale, **static, **({"own": own_kv} if own_kv else {}))

    if kernels.single_device(ctx):
        return call(q_bthq, k_all, v_all, layer, slots_b, positions_bt, *own)
    rows = jnp.arange(b, dtype=jnp.int32) if slots_b is None else slots_b
    if not _rows_are_local_slots(ctx, slots_b, k_all, b):
        return None

    def local(q, k, v, i, r, p, *own_kv):
        if view_size(ctx.spec, "data") > 1:
            r = None   # local row b is local slot b
        return call(q, k, v, i, r, p, *own_kv)

    act, kv_act = ("batch", "seq", "heads", "head_dim"), ("batch", "seq", "kv_heads", "head_dim")
    return kernels.sharded.per_device(
        local, ctx, (q_bthq, k_all, v_all, jnp.asarray(layer, jnp.int32), rows, positions_bt) + own,
        (act, KVCache.AXES, KVCache.AXES, None, ("batch",), ("batch", "seq")) + (kv_act,) * len(own), act,
        q_bthq.shape)


def _rows_are_local_slots(ctx, slots_b, k_all, b: int) -> bool:
    """A per-device decode kernel can find each row's cache slot on its own device: true unless the
    batch is split over data-parallel groups and row b is not slot b (chosen slots, or fewer rows
    than slots), since then a device's rows and its cache shard's slots differ."""
    return view_size(ctx.spec, "data") == 1 or (slots_b is None and k_all.shape[1] == b)


def _fused_decode_prologue(x_btd, k_all, attn_full: "Attention", ctx) -> bool:
    """Decode (T == 1) on one device with kernels on, shapes the prologue and decode-attention
    kernels cover: q/k norm + RoPE + the cache write run inside the attention kernel
    (_attention_with_prologue) or as one kernel before it (kernels/qk_prologue.py)."""
    b, t, _ = x_btd.shape
    h, qd = attn_full.q_proj.einsum_shape[2:4]
    kv = k_all.shape[3]
    q_like = jax.ShapeDtypeStruct((b, t, h, qd), x_btd.dtype)
    return (t == 1 and kernels.active(ctx, x_btd.dtype) and kernels.qk_prologue.covered(h, kv, qd)
            and kernels.decode_attention_covered(q_like, k_all))


def _attention_with_prologue(x_btd, k_all, attn_full: "Attention", ctx=None, slots_b=None) -> bool:
    """The decode step's prologue runs inside the attention kernel (kernels.decode_attention.
    PROLOGUE "fused") for these shapes: on one device on the fused decode path
    (_fused_decode_prologue), on a mesh per device on its local heads and rows
    (_decode_attention_rope_per_device); with the batch split over data-parallel groups only
    where row b is slot b (no slots_b), so that each device's rows are its own slots."""
    b, t, _ = x_btd.shape
    h, qd = attn_full.q_proj.einsum_shape[2:4]
    kv, s = k_all.shape[3], k_all.shape[2]
    if not kernels.single_device(ctx):
        if t != 1 or not kernels.usable(x_btd.dtype) or attn_full.bias or not _rows_are_local_slots(
                ctx, slots_b, k_all, b):
            return False
        b, _, h, _ = ctx.shard_shape(("batch", "seq", "heads", "head_dim"), (b, t, h, qd))
        kv = ctx.shard_shape(KVCache.AXES, k_all.shape)[3]
    return (kernels.decode_attention.PROLOGUE == "fused" and k_all.dtype == x_btd.dtype
            and kernels.decode_attention.rope_covered(h, kv, qd, b, s))


def _decode_attention_rope_per_device(blk, attn_full, layer, h, cos, sin, positions_bt, k_all, v_all, slots_b,
                                      kv_window, counts, ctx):
    """Decode attention with its prologue (kernels.decode_attention.decode_attention_rope) on a
    mesh, per device on its local heads, rows and cache shard, as on one device: q/k/v in one
    gemv launch (their split-K partials go to the attention kernel unsummed), the input norm in
    that gemv's x load where h is a gemv_inputs.RmsNormX, then one kernel for the q/k norm, RoPE,
    the cache write and attention. With the batch split over data-parallel groups each device's
    rows are its own slots (the engine's one-shape step; _attention_with_prologue checked it).
    -> (attention output [B, 1, H, Q], k_all, v_all, counts)."""
    b = h.shape[0]
    rows = jnp.arange(b, dtype=jnp.int32) if slots_b is None else slots_b
    data = view_size(ctx.spec, "data") > 1
    eps, scale = blk.attn.q_norm.eps, blk.attn.scale
    projs = _qkv_weights(attn_full)
    normed = isinstance(h, RmsNormX)
    x_in = (h.x, h.weight) if normed else (h,)
    params = [p for _, full in projs for p in ((full.w, full.scale) if full.is_fp8 else (full.w,))]
    flat_w = [p[...] for p in params]   # q's weight (and scale), k's, v's
    w_axes = [tuple(p.get_metadata()["logical_axes"]) for p in params]
    act = ("batch", "seq", "heads", "head_dim")
    x_axes = (("batch", "seq", "embed"),) + ((None,) if normed else ())

    def local(*operands):
        x_ops, w_ops = operands[:len(x_in)], operands[len(x_in):len(x_in) + len(flat_w)]
        qn, kn, i, c, s_, kc, vc, r, p, cnt = operands[len(x_in) + len(flat_w):]
        h_l = RmsNormX(x_ops[0], x_ops[1], i, h.eps) if normed else x_ops[0]
        it = iter(w_ops)
        local_w = [(next(it), next(it) if full.is_fp8 else None) for _, full in projs]
        parts = _qkv_partials(attn_full, h_l, i, arrays=local_w)
        if parts is None:   # no gemv tiling fits the local shapes: XLA on the layer's local slices
            x_l = materialize(h_l)
            ys = [_einsum_local_slice(eq, x_l, full, w_l, s_l, i) for (eq, full), (w_l, s_l) in zip(projs, local_w)]
            parts = [y[:, 0].reshape(1, y.shape[0], -1) for y in ys]   # one "split" each
        done = kernels.decode_attention.decode_attention_rope(
            *parts, qn, kn, i, c, s_, eps, kc, vc, None if data else r, p[:, 0], cnt,
            heads=parts[0].shape[2] // qn.shape[-1], scale=scale, kv_window=kv_window)
        if done is None:
            raise RuntimeError(f"decode_attention_rope does not cover the local shapes q {parts[0].shape}, cache "
                               f"{kc.shape}, which _attention_with_prologue accepted")
        out, kc, vc, cnt = done
        return out[:, None], kc, vc, cnt

    counts_axes = ("batch", "kv_heads")
    heads, qd = attn_full.q_proj.einsum_shape[2:4]
    return kernels.sharded.per_device(
        local, ctx,
        (*x_in, *flat_w, attn_full.q_norm.weight[...], attn_full.k_norm.weight[...], jnp.asarray(layer, jnp.int32),
         cos[:, 0], sin[:, 0], k_all, v_all, rows, positions_bt, counts),
        (*x_axes, *w_axes, None, None, None, ("batch", "head_dim"), ("batch", "head_dim"), KVCache.AXES,
         KVCache.AXES, ("batch",), ("batch", "seq"), counts_axes),
        [act, KVCache.AXES, KVCache.AXES, counts_axes], [(b, 1, heads, qd), k_all.shape, v_all.shape, counts.shape])


def _decode_layer_attention(blk, attn_full, layer, x, h, cos, sin, positions_bt, k_all, v_all, slots_b,
                            kv_window, ctx, counts=None):
    """_layer_attention for a decode step on the kernels (see _fused_decode_prologue): q/k/v in
    one gemv launch, then decode attention with its prologue in the same kernel (q/k norm, RoPE,
    the new K/V written into the cache in place: kernels.decode_attention.decode_attention_rope,
    given `counts`, its merge counters carried from layer to layer), or the prologue as a kernel
    of its own in front of it; the attention reads only each row's positions (kv_window bounds
    its grid); o_proj. Where a kernel does not cover a piece, that piece falls back to XLA
    (projections, the cache write). -> (x + attention output, k_all, v_all, counts)."""
    st = (attn_full, layer)
    norm_rope = (attn_full.q_norm.weight[...], attn_full.k_norm.weight[...], layer, cos[:, 0], sin[:, 0],
                 blk.attn.q_norm.eps)
    heads, kv = attn_full.q_proj.einsum_shape[2], k_all.shape[3]
    fused = None
    parts = None if blk.attn.bias else _qkv_partials(attn_full, h, layer)   # a bias would need the sums
    if parts is not None and counts is not None:
        done = kernels.decode_attention.decode_attention_rope(
            *parts, *norm_rope, k_all, v_all, slots_b, positions_bt[:, 0], counts, heads=heads,
            scale=blk.attn.scale, kv_window=kv_window)
        if done is not None:
            out, k_all, v_all, counts = done
            return x + blk.attn.output(out[:, None], ctx, stacked=st), k_all, v_all, counts
    if parts is not None:
        q_p, k_p, v_p = parts
        # one kernel: q/k norm + RoPE, and the new K/V written into the cache in place
        done = kernels.qk_prologue.qk_norm_rope_write_cache(
            q_p, k_p, v_p, *norm_rope, k_all, v_all, slots_b, positions_bt[:, 0], heads=heads, dtype=h.dtype)
        if done is not None:
            q16, k_all, v_all, zeros = done
            return (*_decode_attend(blk, x, q16, k_all, v_all, layer, slots_b, positions_bt, heads // kv, st, ctx,
                                    kv_window, zeros), counts)
        fused = kernels.qk_prologue.qk_norm_rope_partials(q_p, k_p, *norm_rope, heads=heads, dtype=h.dtype)
    if fused is not None:   # e.g. a cache dtype the writing prologue does not take
        q16, k_rot = fused
        v = jnp.sum(v_p, axis=0).reshape(*h.shape[:-1], *attn_full.v_proj.einsum_shape[2:]).astype(h.dtype)
    else:
        q, k, v = blk.attn.projections(h, ctx, st)
        q16, k_rot = kernels.qk_prologue.qk_norm_rope(q[:, 0], k[:, 0], *norm_rope)
    rows = np.arange(x.shape[0], dtype=np.int32) if slots_b is None else slots_b
    k_all, v_all = _write_cache(k_all, v_all, layer, rows, positions_bt, k_rot[:, None], v)
    return (*_decode_attend(blk, x, q16, k_all, v_all, layer, slots_b, positions_bt, heads // kv, st, ctx,
                            kv_window), counts)


def _qkv_weights(attn_full):
    """[(einsum, Weight)] of the q, k and v projections."""
    return (("btd,dhq->bthq", attn_full.q_proj), ("btd,dkq->btkq", attn_full.k_proj),
            ("btd,dkq->btkq", attn_full.v_proj))


def _qkv_partials(attn_full, h, layer, arrays=None):
    """q, k, v of the decode step as float32 split-K partial sums [S, B, N] (kernels.linear_einsum
    partials): one gemv launch side by side where it covers them, else one kernel each (the FP8
    matmul above kernels.linear.GEMV_MAX_ROWS). None when a projection is not covered. `arrays` [(w, scale)]
    per projection stand in for attn_full's own (a device's shards, inside shard_map)."""
    projs = _qkv_weights(attn_full)
    if arrays is None:
        arrays = [(full.w[...], full.scale[...] if full.is_fp8 else None) for _, full in projs]
    specs = [(eq, h, w, scale, full.block_axis) for (eq, full), (w, scale) in zip(projs, arrays)]
    blocks = {full.fp8_block for _, full in projs}
    orders = {full.nk for _, full in projs}
    runs = [full.fp8_scale_run for _, full in projs if full.fp8_scale_run]
    parts = (kernels.projections_partials(specs, blocks.pop(), layer, w_nk=orders.pop(),
                                          scale_run=math.gcd(*runs) if runs else None)
             if len(blocks) == 1 and len(orders) == 1 else None)
    if parts is None:
        parts = [kernels.linear_einsum(*spec, full.fp8_block, layer=layer, partials=True, w_nk=full.nk,
                                       scale_run=full.fp8_scale_run)
                 for spec, (_, full) in zip(specs, projs)]
    return None if any(p is None for p in parts) else parts


def _decode_attend(blk, x, q16, k_all, v_all, layer, slots_b, positions_bt, group, st, ctx, kv_window=None,
                   counts=None):
    """Decode attention over the cache (new K/V already written) and o_proj: -> (x + out, k_all, v_all).
    kv_window: bounds the keys the kernel's grid covers; counts: the prologue's zeroed merge counters, or None."""
    out = kernels.decode_attention_cached(q16, k_all, v_all, layer, slots_b, positions_bt, blk.attn.scale,
                                          group=group, counts=counts, kv_window=kv_window)
    return x + blk.attn.output(out, ctx, stacked=st), k_all, v_all


def _write_cache(k_all, v_all, layer, rows_b, positions_bt, k_btkq, v_btkq, in_order=False):
    """k/v [B, T, K, Q] into layer `layer` of the cache, row b at slot rows[b], positions [B, T]
    (positions past the cache are dropped).

    in_order (Qwen3Moe's promise: each row's positions start, start+1, ..., padding after them
    past the cache): the padding moves to distinct positions past the cache (still dropped), so
    no two writes share an index and XLA stores each row plainly. With indices it cannot prove
    unique, XLA's GPU scatter writes every bf16 element through an atomic loop: the prefill's two
    cache writes took ~35 us a layer each at 8k tokens (8 MB each; H200, run 170's profile,
    `input_scatter_fusion`)."""
    if in_order:
        s, t = k_all.shape[2], positions_bt.shape[1]
        positions_bt = jnp.where(positions_bt < s, positions_bt, s + jnp.arange(t, dtype=positions_bt.dtype))

    def write(cache, new):
        return cache.at[layer, rows_b[:, None], positions_bt].set(new.astype(cache.dtype), mode="drop",
                                                                  unique_indices=in_order)
    return write(k_all, k_btkq), write(v_all, v_btkq)


def _layer_attention(blk, attn_full, layer, x, h, cos, sin, positions_bt, k_all, v_all, slots_b, kv_window, ctx,
                     counts=None, fresh=False, in_order=False):
    """The attention half of a layer: without a cache (k_all None) over the tokens themselves;
    with one, the new K/V are written first, then the decode-attention kernel where it applies,
    else XLA attention over the cache; on a mesh with `counts` (Segment found the fused kernel
    covers the local shapes) all of it per device in that kernel. `fresh` (see Qwen3Moe): a
    prompt's first chunk on one device attends over its own K/V, as without a cache. `in_order`:
    see Qwen3Moe. -> (x + attention output, k_all, v_all, counts)."""
    st = (attn_full, layer)
    if k_all is not None and counts is not None:   # a mesh's decode step, the fused kernel covering it
        out, k_all, v_all, counts = _decode_attention_rope_per_device(
            blk, attn_full, layer, h, cos, sin, positions_bt, k_all, v_all, slots_b, kv_window, counts, ctx)
        return x + blk.attn.output(out, ctx, stacked=st), k_all, v_all, counts
    q, k, v = blk.attn.project(h, cos, sin, ctx, stacked=st)
    own = k_all is None or (fresh and FRESH_PREFILL and q.shape[1] > 1 and kernels.active(ctx, q.dtype))
    if k_all is not None:
        rows = jnp.arange(x.shape[0]) if slots_b is None else slots_b
        k_all, v_all = _write_cache(k_all, v_all, layer, rows, positions_bt, k, v, in_order=in_order)
    if own:
        mask = positions_bt[:, None, :] <= positions_bt[:, :, None]
        return x + blk.attn.attend(q, k, v, mask, ctx, stacked=st, positions_bt=positions_bt,
                                   from_zero=k_all is not None), k_all, v_all, counts
    out = _decode_attention(q, k_all, v_all, layer, slots_b, positions_bt, blk.attn.scale, ctx, kv_window, own=(k, v),
                            in_order=in_order)
    if out is not None:
        return x + blk.attn.output(out, ctx, stacked=st), k_all, v_all, counts
    # Attend over the first kv_window cache positions only: the caller guarantees every row's
    # positions are below it, so the rest is masked anyway and need not be read.
    window = k_all.shape[2] if kv_window is None else kv_window
    keys, values = k_all[layer, :, :window], v_all[layer, :, :window]
    if slots_b is not None:
        keys, values = keys[slots_b], values[slots_b]
    mask = jnp.arange(keys.shape[1])[None, None, :] <= positions_bt[:, :, None]
    x = x + blk.attn.attend(q, keys.astype(q.dtype), values.astype(q.dtype), mask, ctx, stacked=st,
                            positions_bt=positions_bt)
    return x, k_all, v_all, counts


# Layers per iteration of the decode step's scan on the fused kernel path (read at trace time).
# A while-loop iteration costs kernels of its own on a GPU (the counter, the condition's copy to
# the host, slices of per-layer params); unrolling trades them for compile time. Measured (H100, 30B-A3B, batch 1,
# benchmarks/NOTES.md run 12): 1 -> 4 layers per iteration took bf16 4.314 -> 4.180 ms and FP8
# 3.838 -> 3.662 ms with compile time unchanged; 48 (no loop) gained nothing more and compiled 4x
# longer. serve.bench --decode-unroll measures it.
DECODE_UNROLL = 4


# A fresh prompt chunk's attention (Qwen3Moe's `fresh`) over its own K/V (cuDNN's fused causal
# kernel) instead of chunk_attention_cached reading them back from the cache (read at trace time).
# The chunk kernel runs at ~28% of the matmul rate (run 115). Run 142 (H200, 30B, one chunk from
# position 0, own K/V against the kernel): FP8 1024 / 2048 / 8192 tokens 29.76 / 52.51 / 193.35
# against 31.73 / 57.77 / 256.04 ms; bf16 28.44 / 44.80 / 172.44 against 30.79 / 50.39 / 233.31.
# Against the cuDNN split that continuing chunks take (run 154, its order promised, an empty
# cached-key call and the merge more): FP8 29.89 / 51.95 / 186.47 against 30.86 / 53.24 / 189.63,
# bf16 28.64 / 44.61 / 172.31 against 29.65 / 45.78 / 173.69: 1-3% kept for one more compiled
# form per bucket of 512+, whose warm-up cost did not show (run 145).
FRESH_PREFILL = True


class Segment(nnx.Module):
    """`count` consecutive layers of one kind, run as a lax.scan over stacked params."""

    def __init__(self, cfg, kind, first, count, *, dtype, kv_rep, rngs):
        self.kind, self.first, self.count = kind, first, count
        self.block = Block(cfg, kind, dtype=dtype, kv_rep=kv_rep, stack=count, rngs=rngs)

    def __call__(self, x_btd, cos, sin, positions_bt, ctx, cache_kv=None, slots_b=None, kv_window=None,
                 fresh=False, in_order=False):
        graphdef, params = nnx.split(self.block)
        full = self.block  # [L, ...] params: kernels read layer i in place (a scanned slice handed
                           # to a custom call would be copied every layer)

        k0, v0 = cache_kv if cache_kv is not None else (None, None)
        fused = k0 is not None and _fused_decode_prologue(x_btd, k0, full.attn, ctx)   # same for every layer
        attention = (_decode_layer_attention if fused
                     else functools.partial(_layer_attention, fresh=fresh, in_order=in_order))
        # Decode rows past the cache (an engine's padding rows and idle slots: writes dropped,
        # output discarded) route to no expert (MoE.__call__).
        b, t = x_btd.shape[:2]
        live_n = positions_bt[:, 0] < k0.shape[2] if k0 is not None and t == 1 and b > 1 else None
        # A mesh's decode step on the kernels (every weight read in place per device): the MoE
        # takes its norm in the x loads after the gather (moe.GatheredRouting's view), and the
        # layer loop unrolls as on one device.
        mesh_decode = (not fused and k0 is not None and t == 1 and not kernels.single_device(ctx)
                       and kernels.usable(x_btd.dtype))

        def norm(blk_norm, full_norm, x, i, in_load=False):
            """On the fused path (and with `in_load`: the mesh's per-device attention, whose q/k/v
            gemv takes it) the norm is applied in the next gemv's x load (gemv_inputs.RmsNormX),
            which saves XLA's reduce and multiply kernels; elsewhere in XLA."""
            if (fused or in_load) and kernels.x_load("norm"):
                return RmsNormX(x, full_norm.weight[...], i, blk_norm.eps)
            return blk_norm(x)

        def layer(carry, xs):
            x, k_all, v_all, counts = carry
            layer_params, i = xs
            blk = nnx.merge(graphdef, layer_params)
            h = norm(blk.input_norm, full.input_norm, x, i, in_load=counts is not None and not fused)
            x, k_all, v_all, counts = attention(blk, full.attn, i, x, h, cos, sin, positions_bt, k_all, v_all,
                                                slots_b, kv_window, ctx, counts)
            x = x + blk.mlp(norm(blk.post_norm, full.post_norm, x, i, in_load=mesh_decode), ctx, stacked=(full.mlp, i),
                            live_n=live_n)
            x = constrain(x, ("batch", "seq", "embed"), ctx)
            return (x, k_all, v_all, counts), None

        # The fused attention's merge counters: zeros once per step, which each layer's kernel
        # leaves zeroed for the next (None: that kernel does not run).
        rope = k0 is not None and (fused or not kernels.single_device(ctx)) and _attention_with_prologue(
            x_btd, k0, full.attn, None if fused else ctx, slots_b)
        counts = constrain(jnp.zeros((b, k0.shape[3]), jnp.int32), ("batch", "kv_heads"), ctx) if rope else None
        # Unrolled only on the kernels' decode paths (one device's fused path, a mesh's per-device
        # kernels), which read every weight in place: on the XLA path each unrolled layer slices
        # its weights out of the stack, and those copies would be live together (the 235B plan's
        # decode workspace grew 4x). On a mesh at batch 1 the host's launches are the limit
        # (benchmarks/NOTES.md, run 97), and each loop iteration has kernels of its own.
        unroll = DECODE_UNROLL if fused or mesh_decode else 1
        carry = (x_btd, k0, v0, counts)
        if unroll >= self.count:   # no loop at all (scan keeps a while even for one layer)
            for i in range(self.count):
                carry, _ = layer(carry, (jax.tree.map(lambda a, i=i: a[i], params), jnp.int32(i)))
        else:
            carry, _ = jax.lax.scan(layer, carry, (params, jnp.arange(self.count)), unroll=unroll)
        x, k_all, v_all, _ = carry
        return x, (k_all, v_all)


def embed_rows(table_vd, tokens_bt, ctx: ShardingContext | None):
    """table [V, D] looked up at tokens [B, T] -> [B, T, D].

    With the vocabulary split over devices, each device takes the ids that fall in its own rows
    (zeros for the rest) and a psum over the vocab axes completes every row; the sum adds zeros
    only, so it is exact. Left to XLA's partitioner, a lookup of one row (decode at batch 1: a
    dynamic-slice) all-gathers the whole table first, every step: bf16 [151936, 2048] took
    1.2 ms of a 2.27 ms tp=2 step on 2 H200s (benchmarks/NOTES.md, run 99).
    """
    vocab_axes = () if ctx is None else kernels.sharded.mesh_axes_of(ctx, ("vocab", "embed"), table_vd.shape, (0,))
    if not vocab_axes:
        return table_vd[tokens_bt]

    def local(rows_vd, ids_bt):
        n = rows_vd.shape[0]
        rel = ids_bt - jax.lax.axis_index(vocab_axes) * n
        mine = (rel >= 0) & (rel < n)
        return jnp.where(mine[..., None], rows_vd[jnp.where(mine, rel, 0)], jnp.zeros((), rows_vd.dtype))

    return kernels.sharded.per_device(local, ctx, (table_vd, tokens_bt), (("vocab", "embed"), ("batch", "seq")),
                                      ("batch", "seq", "embed"), (*tokens_bt.shape, table_vd.shape[1]),
                                      psum_over=vocab_axes)


class Qwen3Moe(nnx.Module):
    """The causal LM. `kv_rep` copies each KV head so tp > num_key_value_heads shards evenly."""

    def __init__(self, cfg: Qwen3MoeConfig, *, dtype=jnp.bfloat16, kv_rep: int = 1,
                 ctx: ShardingContext | None = None, rngs: nnx.Rngs):
        self.cfg, self.ctx, self.kv_rep = cfg, ctx, kv_rep
        self.dtype = jnp.dtype(dtype)
        d, v = cfg.hidden_size, cfg.vocab_size
        self.embed = Weight((v, d), ("vocab", "embed"), dtype=dtype, rngs=rngs)
        self.segments = nnx.List([
            Segment(cfg, kind, first, count, dtype=dtype, kv_rep=kv_rep, rngs=rngs)
            for kind, first, count in cfg.layer_segments()])
        self.final_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Weight((d, v), ("embed", "vocab"), dtype=dtype, rngs=rngs)

    def __call__(self, tokens_bt, positions_bt=None, cache: KVCache | None = None, slots_b=None,
                 logits_at_b=None, kv_window: int | None = None, hidden: bool = False, fresh: bool = False,
                 in_order: bool = False):
        """tokens [B, T] int -> (logits [B, T, V] float32, updated cache).

        positions [B, T] default to 0..T-1. With `cache`, each row's K/V are written at its
        positions in cache slot `slots[b]` (default b) and attention reads that slot.
        `logits_at` [B] picks one position per row: logits come back [B, 1, V].
        `kv_window` (static) bounds the cache positions attention reads; all positions must be below it.
        `hidden`: the last layer's output [B, T, D] instead of logits (lm_logits makes them).
        `fresh` (static): every row is a prompt's first chunk, its tokens at positions 0.. from the
        first column (padding after them, at positions past the cache), nothing of its slot read.
        With a cache, on one device with kernels, attention then runs over the chunk's own K/V
        (cuDNN's fused causal kernel on a GPU) rather than the kernel reading the cache back
        (FRESH_PREFILL); the K/V are written all the same.
        `in_order` (static): the caller promises every row's positions are start, start+1, ...
        from the first column, any padding after them at positions past the cache (as the engine
        writes its chunks): a prefill chunk's attention then runs with no check of them on the
        device (kernels/prefill_attention.py chunk_attention_cached; other positions give wrong
        attention, not an error). `fresh` promises that with start 0, so it implies in_order.
        """
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        in_order = in_order or fresh
        ctx = self.ctx
        x = embed_rows(self.embed(self.dtype), tokens_bt, ctx)
        x = constrain(x, ("batch", "seq", "embed"), ctx)
        cos, sin = rope_tables(self.cfg, positions_bt, self.dtype)
        new_k, new_v = [], []
        for i, seg in enumerate(self.segments):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            x, (k, v) = seg(x, cos, sin, positions_bt, ctx, kv, slots_b, kv_window, fresh, in_order)
            new_k.append(k)
            new_v.append(v)
        cache = KVCache(new_k, new_v) if cache is not None else None
        if hidden:
            return x, cache
        if logits_at_b is not None:
            x = jnp.take_along_axis(x, logits_at_b[:, None, None].astype(jnp.int32), axis=1)
        return self.lm_logits(x), cache

    def lm_logits(self, x_btd):
        """The last layer's output [B, T, D] -> logits [B, T, V] float32 (final norm, LM head)."""
        x = self.final_norm(x_btd)
        head = self.embed(self.dtype).T if self.cfg.tie_word_embeddings else self.lm_head(self.dtype)
        return jnp.einsum("btd,dv->btv", x, head).astype(jnp.float32)


def cache_shapes(cfg: Qwen3MoeConfig, num_slots: int, max_len: int, kv_rep: int = 1):
    """[(k shape, v shape)] per segment: [L, slots, S, K, Q]."""
    k = cfg.num_key_value_heads * kv_rep
    return [((count, num_slots, max_len, k, cfg.head_dim),) * 2 for _, _, count in cfg.layer_segments()]


def init_cache(cfg: Qwen3MoeConfig, num_slots: int, max_len: int, dtype, kv_rep: int = 1,
               ctx: ShardingContext | None = None) -> KVCache:
    """Zeroed KV cache, created already sharded (never whole on one device)."""
    ks, vs = [], []
    for k_shape, v_shape in cache_shapes(cfg, num_slots, max_len, kv_rep):
        for shape, out in ((k_shape, ks), (v_shape, vs)):
            if ctx is None:
                out.append(jnp.zeros(shape, dtype))
            else:
                sh = ctx.sharding(KVCache.AXES, shape)
                out.append(jax.jit(lambda s=shape: jnp.zeros(s, dtype), out_shardings=sh)())
    return KVCache(ks, vs)
