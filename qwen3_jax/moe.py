"""Sparse MoE: routing and the drop-free expert FFN, on one device or under expert parallelism.

Legend: N tokens (B*T flattened), D model dim, E experts, F expert intermediate, k top-k.

Expert parallelism (`ep > 1` or any multi-device mesh) runs the FFN inside `shard_map` over the
whole mesh: each device all-gathers the token activations of its data group (and routes them
itself on the kernels' path, GatheredRouting; the XLA path gathers the routing too), computes
only its own E/ep experts' slice F/etp for every token routed to them (`ragged_dot`,
drop-free: no capacity factor, every token gets all k experts), then a reduce-scatter over the
data axes and a psum over the rest return each token's sum, in float32, to the devices that own
the token. A batch the data axes do not divide (batch 1 on ep=2) is whole on every device
already: no gather, one psum (moe_ffn's `batch`).

Why an all-gather + reduce and not an all-to-all dispatch, in numbers. Per device per MoE layer,
bf16 activations and experts, 8 devices; "moved" = all-gather received (x bf16 + routing 8k
bytes per token) + reduce-scatter/all-reduce (float32) in ring terms; "experts" = bytes of the
E/ep local experts (what XLA's ragged_dot reads today, see GPU_NOTES.md) / of those the tokens
touch (what an ideal kernel reads); times at 450 GB/s NVLink, 2.43 TB/s HBM, 647 TFLOP/s:

    model  mesh       tokens     moved      experts all/touched   moved/touched  all-to-all
    30B    tp=4,ep=8  decode 1    24 KiB    144 MiB /   9.0 MiB       0.3%          6 KiB
    30B    tp=4,ep=8  decode 64  770 KiB    144 MiB / 141.7 MiB       0.5%        395 KiB
    30B    tp=4,ep=8  decode 256 3.0 MiB    144 MiB / 144   MiB       2.1%        1.5 MiB
    30B    tp=4,ep=8  prefill 8k  96 MiB    144 MiB / 144   MiB        67%         49 MiB
    30B    ep=8       decode 1    84 KiB    144 MiB /   9.0 MiB       0.9%          5 KiB
    30B    ep=8       decode 64  676 KiB    144 MiB / 141.7 MiB       0.5%        299 KiB
    30B    ep=8       decode 256 2.6 MiB    144 MiB / 144   MiB       1.8%        1.2 MiB
    30B    ep=8       prefill 8k  84 MiB    144 MiB / 144   MiB        59%         37 MiB
    235B   tp=4,ep=8  decode 1    48 KiB    576 MiB /  36   MiB       0.1%         12 KiB
    235B   tp=4,ep=8  decode 64  1.5 MiB    576 MiB / 567   MiB       0.3%        790 KiB
    235B   tp=4,ep=8  decode 256 6.0 MiB    576 MiB / 576   MiB       1.0%        3.1 MiB
    235B   tp=4,ep=8  prefill 8k 192 MiB    576 MiB / 576   MiB        33%         99 MiB
    235B   ep=8       decode 1   168 KiB    576 MiB /  36   MiB       0.5%          9 KiB
    235B   ep=8       decode 64  1.3 MiB    576 MiB / 567   MiB       0.2%        598 KiB
    235B   ep=8       decode 256 5.3 MiB    576 MiB / 576   MiB       0.9%        2.3 MiB
    235B   ep=8       prefill 8k 168 MiB    576 MiB / 576   MiB        29%         75 MiB

Decode (1-256 tokens): the bytes moved are 0.1-2% of the expert bytes read, under 15 us a
layer against 4-250 us of reading; an all-to-all would save microseconds, and it needs
data-dependent sizes or a capacity factor (drops) where this keeps every shape static. At
batch 1 what costs is the number of collectives and kernels, not their bytes: on 2 H200s an
ep=2 step at batch 1 was bound by the host's launches (benchmarks/NOTES.md, run 97). So on the
kernels' path only x is gathered and every device re-routes it (the router is replicated):
GatheredRouting.

Prefill (8k tokens): the all-gather + float32 reduce moves 84-96 MiB a layer for 30B, ~190-220
us at 450 GB/s, against ~120 us of expert matmuls (77 GFLOP a device); for 235B 170-190 MiB
(~390-450 us) against ~480 us. Long prefill clearly wants an all-to-all dispatch + combine
(about half the bytes: each token goes only to the ~5.3 of 8 devices holding its k experts, in
bf16) overlapped with compute, or at least a bf16 reduce. Not implemented: prefill here is
correct, just communication-bound on 30B-sized experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.context import ShardingContext
from sharding.rules import view_size

# XLA lowers ragged_dot to a dense computation over the experts: float32 and int32 buffers of
# [E_local, assignments, max(D, F)] (seen in the compiled CPU program: 30B-A3B, one layer, a
# 4k-token prompt, f32 and s32 [128, 32768, 2048], 18.5 GiB of temp; one 32k-token prompt ran out
# of memory on a 141 GB H200 with kernels off). So expert_ffn takes the tokens in chunks whose
# such buffer stays within this budget (`token_chunk`), one chunk at a time. 4 GiB keeps the
# server's default 512-token prefill chunk of 30B-A3B (8 x 512 assignments x 128 experts x 2048
# x 4 B = 4 GiB) in one piece on one device.
RAGGED_BLOCK_BYTES = 4 << 30


def route(x_nd, router_de, top_k: int, norm_topk_prob: bool):
    """Router in float32: softmax over E, top-k, renormalize. -> (weights [N,k] f32, experts [N,k] i32)."""
    logits = jnp.einsum("nd,de->ne", x_nd.astype(jnp.float32), router_de.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def token_chunk(n: int, k: int, e_local: int, width: int, budget: int | None = None) -> int | None:
    """Tokens per chunk for expert_ffn over N tokens, or None: all at once. Chunks only when the
    dense ragged_dot buffer of all N tokens, 4 B x E_local x N*k x width (width = max(D, F)),
    exceeds `budget` (default RAGGED_BLOCK_BYTES, read at trace time); then equal chunks, as
    few as the budget allows, at least one token each."""
    budget = RAGGED_BLOCK_BYTES if budget is None else budget
    per_token = 4 * e_local * k * width
    if n <= 1 or n * per_token <= budget:
        return None
    most = max(1, budget // per_token)
    chunks = -(-n // most)
    return -(-n // chunks)


def expert_ffn(x_nd, weights_nk, experts_nk, gate_edf, up_edf, down_efd, first_expert=0):
    """Drop-free grouped FFN over the experts held here: sum_k w * down(silu(gate(x)) * up(x)).

    gate/up [E_local, D, F_local], down [E_local, F_local, D]; assignments to experts outside
    [first_expert, first_expert + E_local) contribute nothing (another device holds them).
    Returns [N, D] float32 (partial over F when F is split). Long inputs run in token chunks
    (token_chunk), one at a time; each token's result is computed the same way either way.
    """
    n, d = x_nd.shape
    e_local, _, f = gate_edf.shape
    k = experts_nk.shape[1]
    chunk = token_chunk(n, k, e_local, max(d, f))
    if chunk is None:
        return _expert_ffn(x_nd, weights_nk, experts_nk, gate_edf, up_edf, down_efd, first_expert)
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    # padded tokens route nowhere (expert -1 is outside every device's range) with weight 0
    x_nd = jnp.pad(x_nd, ((0, pad), (0, 0)))
    weights_nk = jnp.pad(weights_nk, ((0, pad), (0, 0)))
    experts_nk = jnp.pad(experts_nk, ((0, pad), (0, 0)), constant_values=-1)

    def one_chunk(i, out_nd):
        start = i * chunk
        part = [jax.lax.dynamic_slice_in_dim(a, start, chunk) for a in (x_nd, weights_nk, experts_nk)]
        y = _expert_ffn(*part, gate_edf, up_edf, down_efd, first_expert)
        return jax.lax.dynamic_update_slice_in_dim(out_nd, y, start, axis=0)

    # a loop, not chunks side by side: XLA could run those at once, holding every chunk's buffers
    out = jax.lax.fori_loop(0, chunks, one_chunk, jnp.zeros((chunks * chunk, d), jnp.float32))
    return out[:n]


def _expert_ffn(x_nd, weights_nk, experts_nk, gate_edf, up_edf, down_efd, first_expert):
    """expert_ffn on all N tokens at once."""
    n, d = x_nd.shape
    e_local = gate_edf.shape[0]
    k = experts_nk.shape[1]
    local = experts_nk - first_expert
    here = (local >= 0) & (local < e_local)
    # Tokens for other devices sort last into a phantom group E_local that ragged_dot skips.
    group = jnp.where(here, local, e_local).reshape(-1)
    order = jnp.argsort(group, stable=True)
    token = (jnp.arange(n * k, dtype=jnp.int32) // k)[order]
    w = jnp.where(here, weights_nk, 0.0).reshape(-1)[order]
    sizes = jnp.bincount(group, length=e_local + 1)[:e_local].astype(jnp.int32)
    xs = x_nd[token]
    g = jax.lax.ragged_dot(xs, gate_edf, sizes, preferred_element_type=jnp.float32)
    u = jax.lax.ragged_dot(xs, up_edf, sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(x_nd.dtype)
    y = jax.lax.ragged_dot(h, down_efd, sizes, preferred_element_type=jnp.float32)
    y = y * w[:, None]
    return jnp.zeros((n, d), jnp.float32).at[token].add(y)


def _linear_index(axes: tuple[str, ...], ctx: ShardingContext):
    idx = 0
    for a in axes:
        idx = idx * ctx.mesh.shape[a] + jax.lax.axis_index(a)
    return idx


class GatheredRouting:
    """Routing done inside moe_ffn's shard_map, after the tokens are gathered.

    The router is replicated, so every device of a data group can route the group's tokens
    itself: only x (and a [N] live mask) cross devices, where routing first and gathering after
    moves x, weights and experts. On the GPU this also lets the routing run as each device's own
    kernels (kernels/router.py: 2 a layer) instead of ~8 XLA kernels. At batch 1 on an ep mesh
    the host's launches are the limit (benchmarks/NOTES.md, run 97), so kernels count, not bytes.

    route(x [N, D], *arrays) -> (weights [N, k] float32, experts [N, k] int32); `arrays` are
    replicated operands (the stacked router, the layer index); live_n [N] bool or None: rows
    False route to expert -1 (no device's). view(x, *view_arrays) (replicated operands too), or
    None: what the routing and the experts take for the gathered x, e.g. x with the
    post-attention norm applied in the kernels' x loads (gemv_inputs.RmsNormX), so x crosses
    devices raw and no XLA norm kernel runs.
    """

    def __init__(self, route, arrays, live_n=None, view=None, view_arrays=()):
        self.route, self.arrays, self.live_n = route, tuple(arrays), live_n
        self.view, self.view_arrays = view, tuple(view_arrays)

    def operands(self):
        """The replicated operands the shard_map body needs: the route's, then the view's."""
        return (*self.arrays, *self.view_arrays)

    def apply(self, x, operands):
        """(x the routing and experts take, weights, experts) from the gathered x and operands()."""
        xs = self.view(x, *operands[len(self.arrays):]) if self.view is not None else x
        w, e = self.route(xs, *operands[:len(self.arrays)])
        return xs, w, e


def moe_ffn(x_nd, weights_nk, experts_nk, expert_weights, ctx: ShardingContext | None,
            routing: GatheredRouting | None = None, batch: int | None = None):
    """x [N, D] -> [N, D] in x's dtype. `expert_weights` (model.ExpertWeights) hands over the
    raw arrays with their PartitionSpecs and computes, where the shards live, the FFN of one
    device's experts: dequantized for XLA's ragged_dot, or read in place by the kernels.
    With `routing` (a mesh only) weights_nk and experts_nk are None: each device routes the
    gathered tokens itself.

    `batch`: the B of x's N = B*T rows. Where the data axes do not divide it (decode below one
    sequence per data group: batch 1 on ep=2), x is whole on every device already (sharding.rules
    leaves such a dim replicated), so nothing is gathered: each device runs its experts on every
    row and one psum over the mesh returns the sums everywhere. Splitting instead took a pad, an
    all-gather, a reduce-scatter and an all-gather back to the replicated layout a layer."""
    if routing is not None and (ctx is None or ctx.spec.num_devices == 1):
        raise ValueError("GatheredRouting is for a multi-device mesh; route first on one device")
    if ctx is None or ctx.spec.num_devices == 1:
        gate, up, down = expert_weights.materialize()
        return expert_ffn(x_nd, weights_nk, experts_nk, gate, up, down).astype(x_nd.dtype)

    spec = ctx.spec
    axes = spec.axes
    data_axes, expert_axes = axes["data"], axes["expert"]
    all_axes = tuple(ctx.mesh.axis_names)
    dp = view_size(spec, "data")
    n = x_nd.shape[0]
    if dp > 1 and batch is not None and batch % dp:
        return _moe_ffn_whole(x_nd, weights_nk, experts_nk, expert_weights, ctx, routing)
    pad = (-n) % dp
    per_token, extra = _routing_operands(weights_nk, experts_nk, routing)
    if pad:
        x_nd = jnp.pad(x_nd, ((0, pad), (0, 0)))
        per_token = tuple(jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in per_token)
    tok = P(data_axes, None)
    raw = expert_weights.arrays()
    raw_specs = expert_weights.pspecs(ctx)
    m = len(per_token)

    def body(x, *operands):
        gathered = [jax.lax.all_gather(a, data_axes, axis=0, tiled=True) for a in (x, *operands[:m])]
        # padding rows route nowhere: they are the gathered rows from n on (all_gather keeps order)
        pad_live = jnp.arange(gathered[0].shape[0]) < n if pad else None
        x, w, e = _routed(gathered[0], gathered[1:], operands[m:m + len(extra)], routing, pad_live)
        local_raw = operands[m + len(extra):]
        y = expert_weights.local_ffn(x, w, e, local_raw, _linear_index(expert_axes, ctx))
        y = jax.lax.psum_scatter(y, data_axes, scatter_dimension=0, tiled=True)
        rest = tuple(a for a in all_axes if a not in data_axes)
        return jax.lax.psum(y, rest) if rest else y

    in_specs = (tok, *(P(data_axes, *[None] * (a.ndim - 1)) for a in per_token), *(P() for _ in extra), *raw_specs)
    y = jax.shard_map(body, mesh=ctx.mesh, in_specs=in_specs, out_specs=tok,
                      check_vma=False)(x_nd, *per_token, *extra, *raw)
    return y[:n].astype(x_nd.dtype)


def _routing_operands(weights_nk, experts_nk, routing):
    """moe_ffn's shard_map operands besides x: (per-token arrays split like x: the routing, or
    GatheredRouting's live mask if any; the routing's replicated operands)."""
    if routing is None:
        return (weights_nk, experts_nk), ()
    return (() if routing.live_n is None else (routing.live_n,)), routing.operands()


def _routed(x, per_token, extra, routing, pad_live=None):
    """Inside the shard_map body: (x the experts take, weights, experts) from the rows' x and the
    _routing_operands (per_token as the body holds them); rows not live (routing's mask, else
    pad_live) route to expert -1."""
    if routing is None:
        return (x, *per_token)
    x, w, e = routing.apply(x, extra)
    live = per_token[0] if per_token else pad_live
    if live is not None:
        e = jnp.where(live[:, None], e, -1)
    return x, w, e


def _moe_ffn_whole(x_nd, weights_nk, experts_nk, expert_weights, ctx: ShardingContext, routing):
    """moe_ffn for rows every device holds whole: no gather, each device's experts on all rows,
    one psum over the mesh."""
    expert_axes = ctx.spec.axes["expert"]
    per_token, extra = _routing_operands(weights_nk, experts_nk, routing)
    m = len(per_token)

    def body(x, *operands):
        x, w, e = _routed(x, operands[:m], operands[m:m + len(extra)], routing)
        y = expert_weights.local_ffn(x, w, e, operands[m + len(extra):], _linear_index(expert_axes, ctx))
        return jax.lax.psum(y, tuple(ctx.mesh.axis_names))

    whole = P(None, None)
    in_specs = (whole, *(P(*[None] * a.ndim) for a in per_token), *(P() for _ in extra),
                *expert_weights.pspecs(ctx))
    y = jax.shard_map(body, mesh=ctx.mesh, in_specs=in_specs, out_specs=whole,
                      check_vma=False)(x_nd, *per_token, *extra, *expert_weights.arrays())
    return y.astype(x_nd.dtype)
