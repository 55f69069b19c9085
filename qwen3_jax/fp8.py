"""Qwen's block-FP8 weights: quantize, dequantize, the in-memory scale layout, and which modules stay unquantized.

Checkpoint format: weight float8_e4m3fn [out, in], weight_scale_inv [ceil(out/b0), ceil(in/b1)],
dequantized = weight * scale_inv per (b0 x b1) block. The last block of a dim may be partial
(e.g. 192 = 128 + 64): its scale covers only the rows/columns that exist.

In memory we keep the weight in our einsum layout (e.g. experts gate W[E, D, F]) and a float32
scale of the *same rank*: the model dim D (never sharded) stays in 128-blocks, every other dim is
expanded to one scale per element. A shard boundary anywhere on a non-D dim therefore cuts the
scale exactly where it cuts the weight: 30B-A3B at tp=4 (192-wide shards of F=768, which
splits 128-blocks) needs nothing special. The cost is weight_elements / 128 float32 values,
about 3% of the FP8 bytes.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

# FP8 expert and attention weights are stored [out, in], the checkpoint's own order
# (model.Weight's nk): the decode GEMVs read 8-bit tiles with K contiguous 5-18% faster
# (benchmarks/NOTES.md, runs 32-34). Read when a model is built or loaded; False (the einsum
# order [in, out]) is for A/B timing (serve.bench --fp8-order).
NK_ORDER = True
FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
SCALE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def dequantize(w8, scale, block_axis: int, block: int, dtype):
    """w8 [..., D, ...] float8 with scale [..., ceil(D/block), ...] float32 -> dtype, same shape as w8.

    The block axis split into (blocks, block) and the scale broadcast over it: one elementwise
    fusion. (A repeat of the scales, its form before, lowered to a scatter, a cumulative sum and
    a gather every layer inside the prefill's projection copies: run 163, benchmarks/NOTES.md.)
    A partial edge block is zero-padded first and sliced off after."""
    axis = block_axis % w8.ndim
    size, blocks = w8.shape[axis], scale.shape[axis]
    w = w8.astype(jnp.float32)
    if blocks * block != size:
        w = jnp.pad(w, [(0, blocks * block - size) if a == axis else (0, 0) for a in range(w.ndim)])
    split = w.reshape(w.shape[:axis] + (blocks, block) + w.shape[axis + 1:])
    out = (split * jnp.expand_dims(scale, axis + 1)).reshape(w.shape)
    return jax_slice(out, axis, size).astype(dtype)


def jax_slice(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(0, size)
    return x[tuple(idx)]


def quantize_blocks(w: np.ndarray, block: tuple[int, int], scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """HF layout w [out, in] (any float) -> (float8_e4m3fn [out, in], scale_inv [ceil(out/b0), ceil(in/b1)]).

    Per block: scale_inv = amax / 448, so the block's largest value maps to FP8's largest. With
    a bfloat16 `scale_dtype` the scale is rounded *up* to the next bfloat16 before the weight is
    divided by it, so the stored pair dequantizes consistently and nothing clips past 448.
    """
    out_dim, in_dim = w.shape
    b0, b1 = block
    nb0, nb1 = math.ceil(out_dim / b0), math.ceil(in_dim / b1)
    if (out_dim, in_dim) == (nb0 * b0, nb1 * b1):
        padded = w.astype(np.float32)  # always a fresh copy: the steps below work in place
    else:  # partial edge blocks: zero padding changes no block's amax
        padded = np.zeros((nb0 * b0, nb1 * b1), np.float32)
        padded[:out_dim, :in_dim] = w
    tiles = padded.reshape(nb0, b0, nb1, b1)
    amax = np.maximum(tiles.max(axis=(1, 3)), -tiles.min(axis=(1, 3)))
    scale_inv = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    scale_inv = _round_up(scale_inv, np.dtype(scale_dtype))
    np.divide(tiles, scale_inv.astype(np.float32)[:, None, :, None], out=tiles)
    np.clip(tiles, -FP8_MAX, FP8_MAX, out=tiles)
    return _cast_fp8(padded)[:out_dim, :in_dim], scale_inv


_CAST_FP8 = jax.jit(lambda a: a.astype(FP8_DTYPE))


def _cast_fp8(x: np.ndarray) -> np.ndarray:
    """float32 within +-448 -> float8_e4m3fn, round to nearest even, on the host CPU.

    XLA's cast gives the same bits as ml_dtypes' astype (subnormals and ties included) about
    5x faster, which is most of the quantize tool's time on a large checkpoint.
    """
    return np.asarray(_CAST_FP8(jax.device_put(x, jax.devices("cpu")[0])))


def _round_up(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Positive float32 values -> `dtype`, rounded towards +inf (so amax / scale <= 448)."""
    if dtype == np.float32:
        return x
    if dtype != SCALE_DTYPES["bfloat16"]:
        raise ValueError(f"scale dtype {dtype} is not supported; use one of {sorted(SCALE_DTYPES)}")
    y = x.astype(dtype)
    low = y.astype(np.float32) < x
    bits = y.view(np.uint16).copy()
    bits[low] += 1  # the next bfloat16 up (all values are positive and finite)
    return bits.view(dtype)


def dequantize_blocks(w8: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """HF layout, host side: float8 [out, in] and scale_inv [nb0, nb1] -> float32 [out, in]."""
    out_dim, in_dim = w8.shape
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], axis=0), block[1], axis=1)
    return w8.astype(np.float32) * s[:out_dim, :in_dim]


def expected_scale_shape(weight_shape, block: tuple[int, int]) -> tuple[int, int]:
    return (math.ceil(weight_shape[0] / block[0]), math.ceil(weight_shape[1] / block[1]))


# -- modules_to_not_convert ---------------------------------------------------------------------

def module_kept_unquantized(module: str, patterns) -> bool:
    """transformers' rule for `modules_to_not_convert` on one module name (no `.weight`).

    A pattern matches as a regex from the start up to a module boundary ('model.layers.1'
    matches 'model.layers.1.mlp.gate_proj', not 'model.layers.11...'; 'mlp.gate' does not match
    'mlp.gate_proj'), or as a plain suffix ('o_proj' matches every layer's o_proj).
    """
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p) for p in patterns)


def kind_modules(cfg, kind: str) -> list[str]:
    """Every HF module name of one projection kind: 'self_attn.q_proj' (all layers),
    'mlp.gate_proj' (dense layers), 'mlp.experts.gate_proj' (every expert of every MoE layer)."""
    layers = range(cfg.num_hidden_layers)
    if kind.startswith("mlp.experts."):
        proj = kind.rsplit(".", 1)[1]
        return [f"model.layers.{i}.mlp.experts.{x}.{proj}" for i in layers if cfg.is_moe_layer(i)
                for x in range(cfg.num_experts)]
    if kind.startswith("mlp."):
        return [f"model.layers.{i}.{kind}" for i in layers if not cfg.is_moe_layer(i)]
    return [f"model.layers.{i}.{kind}" for i in layers]


@functools.lru_cache(maxsize=None)
def kind_kept_unquantized(cfg, kind: str) -> bool:
    """True when modules_to_not_convert names any module of this kind.

    Our params stack a kind over layers (and experts), so one listed module keeps the whole kind
    in the compute dtype; the loader dequantizes the kind's FP8 tensors on the host, which
    gives exactly the numbers of the checkpoint's mixed layout at the cost of that kind's
    memory.
    """
    patterns = cfg.fp8.modules_to_not_convert if cfg.fp8 is not None else ()
    return bool(patterns) and any(module_kept_unquantized(m, patterns) for m in kind_modules(cfg, kind))
