"""The transposing FP8 dequantize (qwen3_jax/kernels/dequantize.py) against fp8.dequantize of the
swapped weight: the same float32 product and rounding, so the same bits.

CPU: Pallas interpret mode on small shapes, both scale layouts, an offset into stacked groups,
and the MoE prefill path's copy with either writer. GPU (marked): compiled at 30B-A3B expert
shapes; on the device machine `QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu
tests/test_kernels_dequantize.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax.fp8 import dequantize
from qwen3_jax.kernels import dequantize as dq


def stored(seed, g, n, k, block, layout):
    """FP8 weights [G, N, K] and float32 scales in the given layout (module doc)."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((g, n, k)) * 100, jnp.float8_e4m3fn)
    shape = (g, -(-k // block), n) if layout == "k" else (g, k, -(-n // block))
    return w, jnp.asarray(rng.uniform(1e-4, 1e-2, shape), jnp.float32)


def xla_copy(w, scale, offset, groups, layout, block):
    sl = lambda a: a[offset:offset + groups]   # noqa: E731
    return dequantize(jnp.swapaxes(sl(w), 1, 2), sl(scale), 1 if layout == "k" else 2, block, jnp.bfloat16)


@pytest.mark.parametrize("layout", ["k", "n"])
@pytest.mark.parametrize("tile", [32, 64])
def test_transposed_copy_is_bit_identical_to_xla(layout, tile):
    w, scale = stored(7, 6, 128, 256, 64, layout)
    got = dq.dequantize_transposed(w, scale, jnp.int32(2), groups=3, layout=layout, block=64, tile=tile)
    want = xla_copy(w, scale, 2, 3, layout, 64)
    assert got.shape == (3, 256, 128) and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_transposed_copy_refuses_shapes_it_cannot_tile():
    w, scale = stored(1, 2, 48, 64, 64, "k")
    assert not dq.covered(40, 64, 128) and dq.covered(128, 256, 128)
    with pytest.raises(ValueError, match="no tile"):
        dq.dequantize_transposed(w[:, :40], scale[..., :40], jnp.int32(0), groups=1, layout="k", block=64)
    with pytest.raises(ValueError, match="needs scale"):
        dq.dequantize_transposed(w, scale[:, :1, :1], jnp.int32(0), groups=1, layout="k", block=64)


@pytest.mark.parametrize("copy", dq.COPIES)
def test_moe_prefill_copy_with_either_writer_matches(copy, monkeypatch):
    """moe_ffn's dequantized layer (the prefill path, FP8 stored [out, in]) gives the same bf16
    experts whichever writes the copy."""
    from qwen3_jax.kernels.moe_ffn import ExpertArrays, _dequantized_layer

    layers, e, d, f, block = 2, 4, 128, 64, 64
    gate, gs = stored(1, layers * e, f, d, block, "k")
    up, us = stored(2, layers * e, f, d, block, "k")
    down, ds = stored(3, layers * e, d, f, block, "n")
    arrays = ExpertArrays(gate, up, down, gs, us, ds, block, e, jnp.int32(e), True)
    monkeypatch.setattr(dq, "COPY", copy)
    out = _dequantized_layer(arrays, jnp.bfloat16)
    for got, (w, s, layout) in zip((out.gate, out.up, out.down), ((gate, gs, "k"), (up, us, "k"), (down, ds, "n"))):
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray(xla_copy(w, s, e, e, layout, block), np.float32))


def test_transposed_copy_lowers_to_triton_at_30b_expert_shapes():
    sds = jax.ShapeDtypeStruct
    fn = jax.jit(lambda w, s, o: dq.dequantize_transposed(w, s, o, groups=128, layout="k", block=128,
                                                          interpret=False))
    text = fn.trace(sds((48 * 128, 768, 2048), jnp.float8_e4m3fn), sds((48 * 128, 16, 768), jnp.float32),
                    sds((), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1 and "stablehlo.transpose" not in text


@pytest.mark.gpu
@pytest.mark.parametrize("layout,n,k", [("k", 768, 2048), ("n", 2048, 768)])
def test_gpu_transposed_copy_matches_xla_at_30b_expert_shapes(layout, n, k):
    w, scale = stored(3, 2 * 128, n, k, 128, layout)
    got = jax.jit(lambda w, s, o: dq.dequantize_transposed(w, s, o, groups=128, layout=layout, block=128))(
        w, scale, jnp.int32(128))
    want = jax.jit(lambda w, s: xla_copy(w, s, 128, 128, layout, 128))(w, scale)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
