"""Prefill attention through cuDNN's fused (flash) attention when the prompt starts at position 0.

The plain-XLA attention (../attention.py) materializes float32 scores [B, K, G, T, S]: 8.6 GB
per layer for one 8k prompt, ~80% of an 8k prefill's time on an H100 (run 2,
benchmarks/NOTES.md); past attention.SCORE_BLOCK_BYTES per device it does so one block of
queries at a time, which also bounds what XLA reserves for the fallback branch below. cuDNN's fused kernel never writes
them. Its causal mask is aligned at the top left (query t sees keys s <= t), which is the
model's mask (s <= positions[b, t]) exactly when positions[b, t] == t for every row; otherwise
(a chunk continuing a cached prompt, left padding) the plain-XLA attention runs instead,
chosen at run time by lax.cond, so results never depend on the guess.

Numerics: cuDNN keeps the scores in float32 through the softmax; the reference (as
transformers in bf16) rounds them to bf16 first. Agreement is to bf16 precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_prefill_attention(q_bthq, k_bskq, v_bskq, positions_bt, scale: float, fallback):
    """-> attention output [B, T, H, Q] (before o_proj). `fallback()` computes the same with
    the plain-XLA math; it runs whenever the positions are not 0..T-1 in every row."""
    t = q_bthq.shape[1]
    try:   # cuDNN refuses some shapes/versions at trace time: then this call is the XLA math
        jax.eval_shape(lambda: _fused(q_bthq, k_bskq, v_bskq, scale))
    except (NotImplementedError, RuntimeError, ValueError):
        return fallback()
    from_zero = jnp.all(positions_bt == jnp.arange(t, dtype=positions_bt.dtype)[None, :])
    return jax.lax.cond(from_zero, lambda _: _fused(q_bthq, k_bskq, v_bskq, scale),
                        lambda _: fallback().astype(q_bthq.dtype), None)


def _fused(q, k, v, scale):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        implementation="cudnn").astype(q.dtype)
