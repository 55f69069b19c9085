"""Qwen's block-FP8 weights: quantize, dequantize, and the in-memory scale layout.

Checkpoint format: weight float8_e4m3fn [out, in], weight_scale_inv [ceil(out/b0), ceil(in/b1)],
dequantized = weight * scale_inv per (b0 x b1) block.

In memory we keep the weight in our einsum layout (e.g. experts gate W[E, D, F]) and a float32
scale of the *same rank*: the model dim D (never sharded) stays in 128-blocks, every other dim is
expanded to one scale per element. A shard boundary anywhere on a non-D dim therefore cuts the
scale exactly where it cuts the weight: 30B-A3B at tp=4 (192-wide shards of F=768, which
splits 128-blocks) needs nothing special. The cost is weight_elements / 128 float32 values,
about 3% of the FP8 bytes.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def dequantize(w8, scale, block_axis: int, block: int, dtype):
    """w8 [..., D, ...] float8 with scale [..., ceil(D/block), ...] float32 -> dtype, same shape as w8."""
    size = w8.shape[block_axis]
    expanded = jnp.repeat(scale, block, axis=block_axis, total_repeat_length=scale.shape[block_axis] * block)
    expanded = jax_slice(expanded, block_axis, size)
    return (w8.astype(jnp.float32) * expanded).astype(dtype)


def jax_slice(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(0, size)
    return x[tuple(idx)]


def quantize_blocks(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """HF layout w [out, in] (any float) -> (float8_e4m3fn [out, in], scale_inv float32 [ceil(out/b0), ceil(in/b1)]).

    Per block: scale_inv = amax / 448, so the block's largest value maps to FP8's largest.
    """
    out_dim, in_dim = w.shape
    b0, b1 = block
    nb0, nb1 = math.ceil(out_dim / b0), math.ceil(in_dim / b1)
    padded = np.zeros((nb0 * b0, nb1 * b1), np.float32)
    padded[:out_dim, :in_dim] = w.astype(np.float32)
    tiles = padded.reshape(nb0, b0, nb1, b1)
    amax = np.abs(tiles).max(axis=(1, 3))
    scale_inv = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    q = tiles / scale_inv[:, None, :, None]
    q8 = np.clip(q, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q8.reshape(nb0 * b0, nb1 * b1)[:out_dim, :in_dim], scale_inv


def dequantize_blocks(w8: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """HF layout, host side: float8 [out, in] and scale_inv [nb0, nb1] -> float32 [out, in]."""
    out_dim, in_dim = w8.shape
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], axis=0), block[1], axis=1)
    return w8.astype(np.float32) * s[:out_dim, :in_dim]


def expected_scale_shape(weight_shape, block: tuple[int, int]) -> tuple[int, int]:
    return (math.ceil(weight_shape[0] / block[0]), math.ceil(weight_shape[1] / block[1]))
