"""The W8A8 activation-quantize kernel (qwen3_jax/kernels/x_quantize.py) against gemv.quantize_rows.

CPU: Pallas interpret mode, bit for bit (plain x and an RMSNorm source, zero groups, padding rows),
the model's FP8 decode step with X_QUANTIZE "kernel" against "xla", and the Triton lowering at
30B-A3B shapes. GPU (marked): the compiled kernel at 30B shapes; on the device machine:
`QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_kernels_x_quantize.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import kernels
from qwen3_jax.kernels import x_quantize
from qwen3_jax.kernels.gemv import quantize_rows
from qwen3_jax.kernels.gemv_inputs import RmsNormX
from qwen3_jax.kernels.x_quantize import quantize_rows_kernel, quantize_x


def bits(a):
    return np.asarray(a).view(np.uint8)


def case(rng, m, k, layers=3):
    """x [m, k] bf16 with one all-zero group (scale 1) and a large outlier, and an RMSNorm of it."""
    x = rng.standard_normal((m, k)) * 3
    x[1, :64] = 0.0
    x[0, 5] = 900.0
    x = jnp.asarray(x, jnp.bfloat16)
    w = jnp.asarray(1 + 0.1 * rng.standard_normal((layers, k)), jnp.bfloat16)
    return x, RmsNormX(x, w, jnp.int32(layers - 1), 1e-6)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("rows", [None, 16])
def test_kernel_equals_quantize_rows_bit_for_bit(norm, rows):
    """Values and scales as quantize_rows gives them for the x the source stands for; padding rows
    (rows=16 for 5 real ones) are zeros with scale 1, as jnp.pad would leave them."""
    x, xn = case(np.random.default_rng(3), 5, 256)
    src = xn if norm else x
    q, s = quantize_rows_kernel(src, 64, rows, interpret=True)
    want_q, want_s = quantize_rows(xn.materialize() if norm else x, 64)
    r = rows or 5
    assert q.shape == (r, 256) and q.dtype == jnp.float8_e4m3fn and s.shape == (r, 4) and s.dtype == jnp.float32
    np.testing.assert_array_equal(bits(q[:5]), bits(want_q))
    np.testing.assert_array_equal(np.asarray(s[:5]), np.asarray(want_s))
    assert np.asarray(s)[1, 0] == 1.0 and not bits(q[1, :64]).any()       # the zero group
    assert not bits(q[5:]).any() and (np.asarray(s[5:]) == 1.0).all()     # padding rows


def test_quantize_x_picks_the_kernel_or_xla_with_the_same_numbers(monkeypatch):
    """X_QUANTIZE "kernel" runs the kernel where covered and XLA where not (a group or a row
    width that is no power of two, no Triton block); "xla" pads as the matmul needs. Both give
    the same bits."""
    x, xn = case(np.random.default_rng(5), 6, 512)
    monkeypatch.setattr(kernels, "interpret", lambda: True)
    outs = {}
    for mode in x_quantize.X_QUANTIZES:
        monkeypatch.setattr(x_quantize, "X_QUANTIZE", mode)
        text = str(jax.make_jaxpr(lambda x: quantize_x(RmsNormX(x, xn.weight, xn.layer, xn.eps), 128, 16))(x))
        assert ("qwen3_quantize_x" in text) == (mode == "kernel")
        outs[mode] = quantize_x(xn, 128, 16)
        assert "qwen3_quantize_x" not in str(jax.make_jaxpr(lambda x: quantize_x(x[:, :384], 96))(x))
        assert "qwen3_quantize_x" not in str(jax.make_jaxpr(lambda x: quantize_x(x[:, :384], 128))(x))
    np.testing.assert_array_equal(bits(outs["kernel"][0]), bits(outs["xla"][0]))
    np.testing.assert_array_equal(np.asarray(outs["kernel"][1]), np.asarray(outs["xla"][1]))
    with pytest.raises(ValueError, match="below x's 6 rows"):
        quantize_x(x, 128, 4)


def test_fp8_decode_step_with_the_kernel_equals_xla_quantize(monkeypatch):
    """A 2-layer FP8 model, kernels forced on (interpret mode), 8 rows a step: the projections'
    and the MoE's W8A8 matmuls take x from the kernel (the o_proj input, the normed q/k/v and
    gate/up inputs). The prefill and the decode step give the logits XLA's quantize gives, exactly."""
    from qwen3_jax import Qwen3MoeConfig, random_model
    from qwen3_jax import model as model_mod
    from qwen3_jax.config import Fp8Config
    from reference import TINY, prefill_then_decode, with_distinct_norms

    import dataclasses
    monkeypatch.setattr(model_mod, "DECODE_UNROLL", 1)
    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2, num_experts=16))
    m = with_distinct_norms(random_model(dataclasses.replace(cfg, fp8=Fp8Config()), seed=6))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (8, 4)), jnp.int32)
    outs, texts = {}, {}
    for mode in x_quantize.X_QUANTIZES:
        monkeypatch.setattr(x_quantize, "X_QUANTIZE", mode)
        fn = prefill_then_decode(m, tokens, 16)   # a new function: settings are read while tracing
        with kernels.kernels_enabled(True):
            texts[mode] = str(jax.make_jaxpr(fn)(m.state, tokens))
            outs[mode] = [np.asarray(a) for a in jax.jit(fn)(m.state, tokens)]
    assert texts["kernel"].count("qwen3_quantize_x") >= 3 and "qwen3_quantize_x" not in texts["xla"]
    assert "qwen3_grouped_matmul_w8a8" in texts["kernel"]
    for a, b in zip(outs["kernel"], outs["xla"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("hidden,heads_x_q,layers", [(2048, 4096, 48), (4096, 8192, 94)], ids=["30b", "235b"])
def test_lowers_to_triton_at_30b_and_235b_shapes(hidden, heads_x_q, layers):
    """The two sources at the presets' widths: the attention output [64, heads x head_dim] (8192
    values a row at 235B-A22B, one Triton block) and an RMSNorm'd residual [61 -> 64 rows,
    hidden] with a traced layer."""
    sds = jax.ShapeDtypeStruct

    def fn(x, w, h):
        a = quantize_rows_kernel(RmsNormX(x, w, jnp.int32(3), 1e-6), 128, 64, interpret=False)
        return a, quantize_rows_kernel(h, 128, interpret=False)
    text = jax.jit(fn).trace(sds((61, hidden), jnp.bfloat16), sds((layers, hidden), jnp.bfloat16),
                             sds((64, heads_x_q), jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2 and "qwen3_quantize_x" in text


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [False, True])
def test_gpu_kernel_matches_quantize_rows_at_30b_shapes(norm):
    """Compiled: scales bit for bit, values within one e4m3 step of XLA's (Triton's float32
    divide may round differently in the last bit), 64 rows padded from 61."""
    rng = np.random.default_rng(11)
    x, xn = case(rng, 61, 4096 if not norm else 2048, layers=48)
    src = xn if norm else x
    q, s = jax.jit(lambda: quantize_rows_kernel(src, 128, 64))()
    want_q, want_s = jax.jit(lambda: quantize_rows(xn.materialize() if norm else x, 128))()
    np.testing.assert_array_equal(np.asarray(s[:61]), np.asarray(want_s))
    got, want = np.asarray(q[:61], np.float32), np.asarray(want_q, np.float32)
    step = np.maximum(np.abs(want) / 8, 2.0 ** -9)   # one e4m3 step (3 mantissa bits), subnormals' at least
    assert (np.abs(got - want) <= step).all()
    assert (np.asarray(got != want).mean()) < 1e-3
    assert not bits(q[61:]).any() and (np.asarray(s[61:]) == 1.0).all()
