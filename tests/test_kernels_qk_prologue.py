"""The decode attention prologue (qwen3_jax/kernels/qk_prologue.py): q/k RMSNorm + RoPE + q padded
to 16 rows per kv head, in one kernel, against model.RMSNorm + model.apply_rope; its form that sums
the projections' split-K partials itself; and decode attention fed the padded q or positions.

CPU: Pallas interpret mode on small shapes, decode attention fed the padded q against its old
path, positions + length_offset against lengths, partial sums against summed inputs, and the Triton
lowering for the 30B-A3B shapes. GPU (marked): compiled against XLA; on the
device machine `QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_kernels_qk_prologue.py`.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import Qwen3MoeConfig
from qwen3_jax.kernels.decode_attention import decode_attention, decode_attention_cached, plan
from qwen3_jax.kernels.linear import linear_einsum
from qwen3_jax.kernels.qk_prologue import (covered, qk_norm_rope, qk_norm_rope_partials, qk_norm_rope_write_cache,
                                          unpad_q16)
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


def exact_partials(rng, s, b, n):
    """float32 partial sums whose sum over S is exact in float32 in any order (multiples of
    1/64 below 2**10), so the in-kernel sum and XLA's reduce give the same bits."""
    return jnp.asarray(rng.integers(-192, 192, (s, b, n)) / 64, jnp.float32)


@pytest.mark.parametrize("s_q,s_k", [(1, 1), (4, 2)])
@pytest.mark.parametrize("h,k", [(8, 2), (4, 4)])
def test_partials_input_equals_the_summed_input(s_q, s_k, h, k):
    """q/k as float32 partials [S, B, N]: the kernel's sum, rounded to bf16, gives the same
    bits as qk_norm_rope on the summed projections rounded to bf16 (what linear_einsum returns)."""
    b, qd = 3, 32
    rng = np.random.default_rng(s_q * 10 + h)
    _, _, qn, kn, cos, sin = inputs(5, b, h, k, qd)
    qp, kp = exact_partials(rng, s_q, b, h * qd), exact_partials(rng, s_k, b, k * qd)
    got = qk_norm_rope_partials(qp, kp, qn, kn, 2, cos[:, 0], sin[:, 0], EPS, heads=h, dtype=jnp.bfloat16)
    q = jnp.sum(qp, 0).astype(jnp.bfloat16).reshape(b, h, qd)
    kk = jnp.sum(kp, 0).astype(jnp.bfloat16).reshape(b, k, qd)
    want = qk_norm_rope(q, kk, qn, kn, 2, cos[:, 0], sin[:, 0], EPS)
    for a, w in zip(got, want):
        assert a.dtype == w.dtype == jnp.bfloat16 and a.shape == w.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(w, np.float32))
    # G = 3 is not covered: None, the caller keeps the XLA path
    assert qk_norm_rope_partials(exact_partials(rng, 2, b, 12 * qd), kp, qn, kn, 2, cos[:, 0], sin[:, 0], EPS,
                                 heads=12, dtype=jnp.bfloat16) is None


def cache_written_by_xla(k_all, v_all, layer, rows, pos, k_rot, v):
    """The model's XLA cache write (scatter, positions outside the cache dropped)."""
    k_all = k_all.at[layer, rows, pos].set(k_rot.astype(k_all.dtype), mode="drop")
    v_all = v_all.at[layer, rows, pos].set(v.astype(v_all.dtype), mode="drop")
    return k_all, v_all


@pytest.mark.parametrize("slots", [None, (3, 0, 1)])
def test_prologue_writes_the_new_kv_into_the_cache_in_place(slots):
    """qk_norm_rope_write_cache = qk_norm_rope_partials + the XLA scatter of k_rot and the summed
    v, bit for bit: slot rows[b] (or b), position positions[b], layer `layer` only; a position
    past the cache is dropped and nothing else in the cache changes."""
    b, h, k, qd, layers, smax = 3, 8, 2, 32, 3, 8
    rng = np.random.default_rng(29)
    _, _, qn, kn, cos, sin = inputs(7, b, h, k, qd, layers=layers)
    qp, kp, vp = (exact_partials(rng, s, b, n * qd) for s, n in ((2, h), (3, k), (3, k)))
    k_all = jnp.asarray(rng.standard_normal((layers, 4, smax, k, qd)), jnp.bfloat16)
    v_all = jnp.asarray(rng.standard_normal((layers, 4, smax, k, qd)), jnp.bfloat16)
    pos = jnp.array([5, 0, smax], jnp.int32)            # row 2 is past the cache: dropped
    rows = None if slots is None else jnp.array(slots, jnp.int32)
    got_q16, got_k, got_v, counts = jax.jit(lambda *a: qk_norm_rope_write_cache(
        *a[:3], qn, kn, jnp.int32(1), cos[:, 0], sin[:, 0], EPS, *a[3:], heads=h, dtype=jnp.bfloat16))(
        qp, kp, vp, k_all, v_all, rows, pos)
    q16, k_rot = qk_norm_rope_partials(qp, kp, qn, kn, 1, cos[:, 0], sin[:, 0], EPS, heads=h, dtype=jnp.bfloat16)
    v = jnp.sum(vp, 0).astype(jnp.bfloat16).reshape(b, k, qd)
    want_k, want_v = cache_written_by_xla(k_all, v_all, 1, jnp.arange(b) if rows is None else rows, pos, k_rot, v)
    np.testing.assert_array_equal(np.asarray(got_q16, np.float32), np.asarray(q16, np.float32))
    np.testing.assert_array_equal(np.asarray(got_k, np.float32), np.asarray(want_k, np.float32))
    np.testing.assert_array_equal(np.asarray(got_v, np.float32), np.asarray(want_v, np.float32))
    assert not np.array_equal(np.asarray(got_k, np.float32), np.asarray(k_all, np.float32))   # it did write
    # decode attention's merge counters, zeroed for it (uninitialized memory otherwise)
    assert counts.shape == (b, k) and counts.dtype == jnp.int32 and not np.any(np.asarray(counts))


def test_prologue_split_over_query_heads_changes_no_bit(monkeypatch):
    """The grid's P programs per (row, kv head) (qk_prologue.TARGET_PROGRAMS) split the query heads
    between them: P = 1 and P = G give the same q16 and cache, bit for bit."""
    from qwen3_jax.kernels import qk_prologue

    b, h, k, qd = 2, 8, 2, 32
    rng = np.random.default_rng(41)
    _, _, qn, kn, cos, sin = inputs(9, b, h, k, qd)
    qp, kp, vp = (exact_partials(rng, 2, b, n * qd) for n in (h, k, k))
    k_all = jnp.asarray(rng.standard_normal((2, b, 8, k, qd)), jnp.bfloat16)
    pos = jnp.array([3, 7], jnp.int32)
    outs = []
    for target, parts in ((1, 1), (264, 4)):
        monkeypatch.setattr(qk_prologue, "TARGET_PROGRAMS", target)
        assert qk_prologue._parts(b, k, h // k) == parts
        got = jax.jit(lambda *a: qk_norm_rope_write_cache(*a[:3], qn, kn, jnp.int32(1), cos[:, 0], sin[:, 0], EPS,
                                                          *a[3:], heads=h, dtype=jnp.bfloat16))(
            qp, kp, vp, k_all, k_all, None, pos)
        outs.append([np.asarray(a, np.float32) for a in got])
    for a, w in zip(*outs):
        np.testing.assert_array_equal(a, w)


@pytest.mark.parametrize("fp8,m", [(False, 3), (True, 40)])
def test_linear_partials_sum_to_the_projection(fp8, m):
    """linear_einsum(partials=True) -> [S, M, N] float32 whose sum, cast, is the default output
    (gemv: S = split_k; the FP8 matmul for many rows: S = its K splits, here 2 of its 4 K steps:
    linear.PROJECTION_MATMUL); bf16 with many rows is not covered."""
    rng = np.random.default_rng(m)
    w = jnp.asarray(rng.standard_normal((2, 256, 4, 32)) * 0.1, jnp.bfloat16)       # [L, D, H, Q]
    scale = None
    if fp8:
        w = w.astype(jnp.float8_e4m3fn)
        scale = jnp.asarray(rng.uniform(0.5, 1.5, (2, 2, 4, 32)), jnp.float32)      # D in 128-blocks
    x = jnp.asarray(rng.standard_normal((m, 1, 256)), jnp.bfloat16)
    p = linear_einsum("btd,dhq->bthq", x, w, scale, 0, 128, layer=jnp.int32(1), partials=True)
    y = linear_einsum("btd,dhq->bthq", x, w, scale, 0, 128, layer=jnp.int32(1))
    assert p.dtype == jnp.float32 and p.ndim == 3 and p.shape[1:] == (m, 4 * 32)
    assert p.shape[0] == 2 if m > 16 else p.shape[0] > 1      # the matmul and the gemv both split K here
    np.testing.assert_array_equal(np.asarray(jnp.sum(p, 0).astype(jnp.bfloat16).reshape(y.shape), np.float32),
                                  np.asarray(y, np.float32))
    if not fp8:
        many = jnp.zeros((40, 1, 256), jnp.bfloat16)
        assert linear_einsum("btd,dhq->bthq", many, w, None, 0, 128, layer=jnp.int32(0), partials=True) is None


@pytest.mark.parametrize("h,k,splits", [(8, 2, 4), (16, 2, 1)])
def test_decode_attention_length_offset_equals_lengths(h, k, splits):
    """decode_attention(length_offset=1) fed positions equals decode_attention fed lengths =
    positions + 1, including a position past the cache (S = 64 and past: no keys, zeros)."""
    rng = np.random.default_rng(h + splits)
    b, qd, s, n_layers = 3, 32, 64, 2
    q = jnp.asarray(rng.standard_normal((b, h, qd)), jnp.bfloat16)
    kc = jnp.asarray(rng.standard_normal((n_layers, 4, s, k, qd)), jnp.bfloat16)
    vc = jnp.asarray(rng.standard_normal((n_layers, 4, s, k, qd)), jnp.bfloat16)
    rows, pos = jnp.array([3, 0, 1]), jnp.array([36, 63, 64])
    kw = dict(scale=qd ** -0.5, bs=16, splits=splits)
    want = decode_attention(q, kc, vc, jnp.int32(1), rows, pos + 1, **kw)
    got = decode_attention(q, kc, vc, jnp.int32(1), rows, pos, length_offset=1, **kw)
    assert got.shape == want.shape == (b, h, qd) and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # position 64 = S (where the engine parks an idle slot): no key is read, the row is zeros;
    # position 63 reads all 64 keys
    assert np.all(np.asarray(got[2], np.float32) == 0) and np.all(np.isfinite(np.asarray(got, np.float32)))
    assert np.abs(np.asarray(got[1], np.float32)).max() > 0


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


@pytest.mark.parametrize("b", [1, 64])
def test_partials_prologue_lowers_to_triton_for_30b_shapes(b, monkeypatch):
    """The q/k projections as split-K partials into the prologue: 3 Triton calls and no XLA reduce."""
    h, k, qd, n_layers, d = 32, 4, 128, 48, 2048
    bf = jnp.bfloat16
    monkeypatch.setattr(sys.modules["qwen3_jax.kernels.gemv"], "_interpret", lambda: False)

    def prologue(x, wq, wk, qn, kn, cos, sin):
        qp = linear_einsum("btd,dhq->bthq", x, wq, None, 0, 128, layer=jnp.int32(3), partials=True)
        kp = linear_einsum("btd,dkq->btkq", x, wk, None, 0, 128, layer=jnp.int32(3), partials=True)
        return qk_norm_rope_partials(qp, kp, qn, kn, jnp.int32(3), cos, sin, EPS, heads=h, dtype=bf, interpret=False)
    from qwen3_jax.kernels.linear import GEMV_MAX_ROWS
    bq = min(b, GEMV_MAX_ROWS["bf16"])   # the gemv's bf16 rows (above them XLA's dot, no partials)
    text = jax.jit(prologue).trace(_sds((bq, 1, d), bf), _sds((n_layers, d, h, qd), bf), _sds((n_layers, d, k, qd), bf),
                                   _sds((n_layers, qd), bf), _sds((n_layers, qd), bf), _sds((bq, qd), bf),
                                   _sds((bq, qd), bf)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3 and "stablehlo.reduce" not in _ops(text)


def test_cache_writing_prologue_lowers_to_triton_for_30b_shapes():
    h, k, qd, n_layers = 32, 4, 128, 48
    bf, f32 = jnp.bfloat16, jnp.float32
    cache = _sds((n_layers, 4, 1024, k, qd), bf)

    def fn(qp, kp, vp, qn, kn, cos, sin, kc, vc, rows, pos):
        return qk_norm_rope_write_cache(qp, kp, vp, qn, kn, jnp.int32(3), cos, sin, EPS, kc, vc, rows, pos, heads=h,
                                        dtype=bf, interpret=False)
    text = jax.jit(fn).trace(_sds((8, 2, h * qd), f32), _sds((8, 2, k * qd), f32), _sds((8, 2, k * qd), f32),
                             _sds((n_layers, qd), bf), _sds((n_layers, qd), bf), _sds((2, qd), bf), _sds((2, qd), bf),
                             cache, cache, _sds((2,), jnp.int32), _sds((2,), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1 and "stablehlo.scatter" not in text


def _ops(text):
    import re
    return set(re.findall(r"stablehlo\.\w+", text))


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


@pytest.mark.gpu
def test_gpu_cache_writing_prologue_equals_the_xla_write_at_30b_shapes():
    h, k, qd, n_layers, b = 32, 4, 128, 48, 4
    rng = np.random.default_rng(41)
    _, _, qn, kn, cos, sin = inputs(3, b, h, k, qd, layers=n_layers)
    qp, kp, vp = (exact_partials(rng, 8, b, n * qd) for n in (h, k, k))
    k_all = jnp.asarray(rng.standard_normal((n_layers, 6, 1024, k, qd)), jnp.bfloat16)
    v_all = jnp.asarray(rng.standard_normal((n_layers, 6, 1024, k, qd)), jnp.bfloat16)
    rows, pos = jnp.array([5, 0, 2, 3], jnp.int32), jnp.array([1023, 0, 700, 1024], jnp.int32)
    got = jax.jit(lambda *a: qk_norm_rope_write_cache(*a[:3], qn, kn, jnp.int32(17), cos[:, 0], sin[:, 0], EPS,
                                                      *a[3:], heads=h, dtype=jnp.bfloat16))(qp, kp, vp, k_all, v_all,
                                                                                           rows, pos)

    def old(qp, kp, vp, k_all, v_all):
        q16, k_rot = qk_norm_rope_partials(qp, kp, qn, kn, jnp.int32(17), cos[:, 0], sin[:, 0], EPS, heads=h,
                                           dtype=jnp.bfloat16)
        v = jnp.sum(vp, 0).astype(jnp.bfloat16).reshape(b, k, qd)
        return (q16, *cache_written_by_xla(k_all, v_all, 17, rows, pos, k_rot, v))
    want = jax.jit(old)(qp, kp, vp, k_all, v_all)
    for a, w in zip(got[:3], want):   # exact partials: the same bits
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(w, np.float32))
    assert not np.any(np.asarray(got[3]))   # the merge counters


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 4])      # rows the gemv splits K for (q: 32 column tiles per row)
def test_gpu_partials_prologue_matches_the_summed_path(b):
    """Compiled: q/k projections (30B shapes, bf16) as split-K partials into the prologue against
    the old path (linear_einsum's XLA reduce + cast, then qk_norm_rope): the same bits but where
    float32 summation order moves a bf16 rounding."""
    h, k, qd, n_layers, d = 32, 4, 128, 48, 2048
    rng = np.random.default_rng(b)
    x = jnp.asarray(rng.standard_normal((b, 1, d)), jnp.bfloat16)
    wq = jnp.asarray(rng.standard_normal((n_layers, d, h, qd)) * 0.02, jnp.bfloat16)
    wk = jnp.asarray(rng.standard_normal((n_layers, d, k, qd)) * 0.02, jnp.bfloat16)
    _, _, qn, kn, cos, sin = inputs(b, b, h, k, qd, layers=n_layers)

    def new(x, wq, wk, qn, kn, cos, sin):
        qp = linear_einsum("btd,dhq->bthq", x, wq, None, 0, 128, layer=jnp.int32(5), partials=True)
        kp = linear_einsum("btd,dkq->btkq", x, wk, None, 0, 128, layer=jnp.int32(5), partials=True)
        assert qp.shape[0] > 1
        return qk_norm_rope_partials(qp, kp, qn, kn, jnp.int32(5), cos, sin, EPS, heads=h, dtype=jnp.bfloat16)

    def old(x, wq, wk, qn, kn, cos, sin):
        q = linear_einsum("btd,dhq->bthq", x, wq, None, 0, 128, layer=jnp.int32(5))
        kk = linear_einsum("btd,dkq->btkq", x, wk, None, 0, 128, layer=jnp.int32(5))
        return qk_norm_rope(q[:, 0], kk[:, 0], qn, kn, jnp.int32(5), cos, sin, EPS)

    args = (x, wq, wk, qn, kn, cos[:, 0], sin[:, 0])
    for a, w in zip(jax.jit(new)(*args), jax.jit(old)(*args)):
        a, w = np.asarray(a, np.float32), np.asarray(w, np.float32)
        assert a.shape == w.shape and np.mean(a != w) < 0.02 and rel(a, w) < 2e-3


