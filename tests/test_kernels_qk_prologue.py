"""The decode attention prologue (qwen3_jax/kernels/qk_prologue.py): q/k RMSNorm + RoPE + q padded
to 16 rows per kv head, in one kernel, against model.RMSNorm + model.apply_rope.

CPU: Pallas interpret mode on small shapes, decode attention fed the padded q against its old
path, and the Triton lowering for the 30B-A3B shapes. GPU (marked): compiled against XLA; on the
device machine `QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_kernels_qk_prologue.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import Qwen3MoeConfig
from qwen3_jax.kernels.decode_attention import decode_attention, decode_attention_cached, plan
from qwen3_jax.kernels.qk_prologue import covered, qk_norm_rope, unpad_q16
from qwen3_jax.model import RMSNorm, apply_rope, rope_tables
from reference import TINY

EPS = 1e-6


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inputs(seed, b, h, k, qd, layers=3, dtype=jnp.bfloat16):
    """Projections of one token per row, distinct norm weights per layer, and the RoPE tables
    of the model at distinct positions."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, h, qd)) * 3, dtype)
    k_ = jnp.asarray(rng.standard_normal((b, k, qd)) * 3, dtype)
    qn = jnp.asarray(rng.uniform(0.5, 1.5, (layers, qd)), dtype)
    kn = jnp.asarray(rng.uniform(0.5, 1.5, (layers, qd)), dtype)
    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", head_dim=qd))
    pos = jnp.asarray(rng.integers(0, 250, (b, 1)), jnp.int32)
    cos, sin = rope_tables(cfg, pos, dtype)                               # [B, 1, Q]
    return q, k_, qn, kn, cos, sin


def reference(q, k, qn, kn, layer, cos, sin):
    """The model's own modules: RMSNorm with layer `layer`'s weight, then apply_rope."""
    def norm(w):
        m = RMSNorm(w.shape[0], EPS, dtype=w.dtype, axis_name="head_dim")
        m.weight[...] = w
        return m

    q_ref = apply_rope(norm(qn[layer])(q[:, None]), cos, sin)[:, 0]       # [B, H, Q]
    k_ref = apply_rope(norm(kn[layer])(k[:, None]), cos, sin)[:, 0]       # [B, K, Q]
    return q_ref, k_ref


# -- CPU: interpret mode ------------------------------------------------------------------------

@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("h,k", [(4, 4), (8, 2), (16, 1)])      # G = 1, 4, 16
def test_qk_norm_rope_matches_model_norm_and_rope(b, h, k):
    qd = 32
    q, kk, qn, kn, cos, sin = inputs(b * 100 + h, b, h, k, qd)
    got = jax.jit(lambda *a: qk_norm_rope(*a, EPS))(q, kk, qn, kn, jnp.int32(1), cos[:, 0], sin[:, 0])
    q16, k_rot = got
    g = h // k
    assert q16.shape == (b, k, 16, qd) and q16.dtype == q.dtype
    assert k_rot.shape == (b, k, qd) and k_rot.dtype == kk.dtype
    q_ref, k_ref = reference(q, kk, qn, kn, 1, cos, sin)
    # bf16 outputs: each element within a couple of bf16 ulps of the reference
    np.testing.assert_allclose(np.asarray(q16[:, :, :g], np.float32).reshape(b, h, qd),
                               np.asarray(q_ref, np.float32), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(k_rot, np.float32), np.asarray(k_ref, np.float32), rtol=2e-2, atol=2e-2)
    assert rel(unpad_q16(q16, h), q_ref) < 5e-3 and rel(k_rot, k_ref) < 5e-3
    assert not np.any(np.asarray(q16[:, :, g:], np.float32))                # padding rows are zero
    # The norm weights of another layer give different numbers: the kernel reads layer 1.
    q_other, k_other = reference(q, kk, qn, kn, 2, cos, sin)
    assert rel(unpad_q16(q16, h), q_other) > 5e-2 and rel(k_rot, k_other) > 5e-2


def test_uncovered_shapes_return_none():
    q, kk, qn, kn, cos, sin = inputs(0, 1, 12, 4, 32)                     # G = 3
    assert not covered(12, 4, 32) and qk_norm_rope(q, kk, qn, kn, 0, cos[:, 0], sin[:, 0], EPS) is None
    assert not covered(64, 2, 32)                                          # G = 32 > 16 rows
    assert not covered(8, 2, 24)                                           # Q/2 = 12, not a power of two
    assert covered(32, 4, 128) and covered(64, 4, 128)


@pytest.mark.parametrize("h,k", [(8, 2), (4, 4)])
def test_decode_attention_on_q16_equals_the_padding_path(h, k):
    """decode_attention fed the prologue's q16 (group=G) equals it fed q [B, H, Q] (it pads)."""
    rng = np.random.default_rng(h)
    b, qd, s = 3, 32, 64
    q, kk, qn, kn, cos, sin = inputs(7, b, h, k, qd)
    q16, _ = qk_norm_rope(q, kk, qn, kn, 2, cos[:, 0], sin[:, 0], EPS)
    kc = jnp.asarray(rng.standard_normal((2, 4, s, k, qd)), jnp.bfloat16)
    vc = jnp.asarray(rng.standard_normal((2, 4, s, k, qd)), jnp.bfloat16)
    rows, pos = jnp.array([3, 0, 1]), jnp.array([[36], [63], [5]])
    old = decode_attention_cached(unpad_q16(q16, h)[:, None], kc, vc, 1, rows, pos, qd ** -0.5)
    new = decode_attention_cached(q16, kc, vc, 1, rows, pos, qd ** -0.5, group=h // k)
    assert new.shape == old.shape == (b, 1, h, qd)
    np.testing.assert_array_equal(np.asarray(new, np.float32), np.asarray(old, np.float32))
    with pytest.raises(ValueError, match="padded to"):
        bs, splits = plan(b, k, s)
        decode_attention(q, kc, vc, jnp.int32(1), rows, pos[:, 0] + 1, scale=1.0, bs=bs, splits=splits, group=h // k)


# -- CPU: Triton lowering of the 30B-A3B shapes (no GPU needed, nothing allocated) --------------

def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("b", [1, 64])
def test_qk_norm_rope_lowers_to_triton_for_30b_shapes(b):
    h, k, qd, n_layers = 32, 4, 128, 48
    bf = jnp.bfloat16

    def fn(q, kk, qn, kn, cos, sin):
        return qk_norm_rope(q, kk, qn, kn, jnp.int32(3), cos, sin, EPS, interpret=False)
    text = jax.jit(fn).trace(_sds((b, h, qd), bf), _sds((b, k, qd), bf), _sds((n_layers, qd), bf),
                             _sds((n_layers, qd), bf), _sds((b, qd), bf), _sds((b, qd), bf)
                             ).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1

    # Together with decode attention on the padded q: still one Triton call each, no pad.
    cache = _sds((n_layers, b, 1024, k, qd), bf)
    bs, splits = plan(b, k, 1024)

    def step(q, kk, qn, kn, cos, sin, kc, vc, rows, lengths):
        q16, _ = qk_norm_rope(q, kk, qn, kn, jnp.int32(3), cos, sin, EPS, interpret=False)
        return decode_attention(q16, kc, vc, jnp.int32(3), rows, lengths, scale=qd ** -0.5, bs=bs, splits=splits,
                                group=h // k, interpret=False)
    lowered = jax.jit(step).trace(_sds((b, h, qd), bf), _sds((b, k, qd), bf), _sds((n_layers, qd), bf),
                                  _sds((n_layers, qd), bf), _sds((b, qd), bf), _sds((b, qd), bf), cache, cache,
                                  _sds((b,), jnp.int32), _sds((b,), jnp.int32)).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("xla.gpu.triton") == 2 and "stablehlo.pad" not in text


# -- GPU: compiled against XLA ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 64])
def test_gpu_qk_norm_rope_matches_xla_at_30b_shapes(b):
    h, k, qd = 32, 4, 128
    q, kk, qn, kn, cos, sin = inputs(b, b, h, k, qd, layers=48)
    q16, k_rot = jax.jit(lambda *a: qk_norm_rope(*a, EPS))(q, kk, qn, kn, jnp.int32(17), cos[:, 0], sin[:, 0])
    q_ref, k_ref = jax.jit(reference, static_argnums=4)(q, kk, qn, kn, 17, cos, sin)
    assert rel(unpad_q16(q16, h), q_ref) < 5e-3 and rel(k_rot, k_ref) < 5e-3
    assert not np.any(np.asarray(q16[:, :, h // k:], np.float32))
