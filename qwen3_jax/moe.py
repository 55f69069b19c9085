"""Sparse MoE: routing and the drop-free expert FFN, on one device or under expert parallelism.

Legend: N tokens (B*T flattened), D model dim, E experts, F expert intermediate, k top-k.

Expert parallelism (`ep > 1` or any multi-device mesh) runs the FFN inside `shard_map`:
every device all-gathers the (small) token activations of its data group, computes only its own
E/ep experts' slice F/etp for every token routed to them, and a reduce-scatter/psum returns each
token's sum. Why this and not an all-to-all dispatch: for decode (N <= a few hundred tokens)
the all-gather moves N*D activations, tiny next to the E/ep * 3*D*F expert bytes each device must
read anyway, and it keeps every device's work a fixed shape (no capacity factor, so nothing is
ever dropped). Prefill of long prompts would favour an all-to-all; see BENCHMARKS.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.context import ShardingContext
from sharding.rules import view_size


def route(x_nd, router_de, top_k: int, norm_topk_prob: bool):
    """Router in float32: softmax over E, top-k, renormalize. -> (weights [N,k] f32, experts [N,k] i32)."""
    logits = jnp.einsum("nd,de->ne", x_nd.astype(jnp.float32), router_de.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def expert_ffn(x_nd, weights_nk, experts_nk, gate_edf, up_edf, down_efd, first_expert=0):
    """Drop-free grouped FFN over the experts held here: sum_k w * down(silu(gate(x)) * up(x)).

    gate/up [E_local, D, F_local], down [E_local, F_local, D]; assignments to experts outside
    [first_expert, first_expert + E_local) contribute nothing (another device holds them).
    Returns [N, D] float32 (partial over F when F is split).
    """
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


def moe_ffn(x_nd, weights_nk, experts_nk, expert_weights, ctx: ShardingContext | None):
    """x [N, D] -> [N, D] in x's dtype. `expert_weights()` is (gate, up, down) or a callable
    returning them dequantized (called where the shards live, so FP8 dequantizes locally)."""
    if ctx is None or ctx.spec.num_devices == 1:
        gate, up, down = expert_weights.materialize()
        return expert_ffn(x_nd, weights_nk, experts_nk, gate, up, down).astype(x_nd.dtype)

    spec = ctx.spec
    axes = spec.axes
    data_axes, expert_axes = axes["data"], axes["expert"]
    all_axes = tuple(ctx.mesh.axis_names)
    dp = view_size(spec, "data")
    n = x_nd.shape[0]
    pad = (-n) % dp
    if pad:
        x_nd = jnp.pad(x_nd, ((0, pad), (0, 0)))
        weights_nk = jnp.pad(weights_nk, ((0, pad), (0, 0)))
        experts_nk = jnp.pad(experts_nk, ((0, pad), (0, 0)))
    tok = P(data_axes, None)
    raw = expert_weights.arrays()
    raw_specs = expert_weights.pspecs(ctx)

    def body(x, w, e, *local_raw):
        x = jax.lax.all_gather(x, data_axes, axis=0, tiled=True)
        w = jax.lax.all_gather(w, data_axes, axis=0, tiled=True)
        e = jax.lax.all_gather(e, data_axes, axis=0, tiled=True)
        gate, up, down = expert_weights.materialize(local_raw)
        first = _linear_index(expert_axes, ctx) * gate.shape[0]
        y = expert_ffn(x, w, e, gate, up, down, first_expert=first)
        y = jax.lax.psum_scatter(y, data_axes, scatter_dimension=0, tiled=True)
        rest = tuple(a for a in all_axes if a not in data_axes)
        return jax.lax.psum(y, rest) if rest else y

    y = jax.shard_map(body, mesh=ctx.mesh, in_specs=(tok, tok, tok, *raw_specs), out_specs=tok,
                      check_vma=False)(x_nd, weights_nk, experts_nk, *raw)
    return y[:n].astype(x_nd.dtype)
