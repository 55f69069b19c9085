"""The Pallas kernels (qwen3_jax/kernels) against plain references.

CPU: Pallas interpret mode checks each kernel's logic on small shapes, and the Triton lowering
(Pallas -> Triton IR, the step that rejects unsupported ops) runs for the real 30B-A3B shapes
without a GPU. GPU (marked): the compiled kernels against the plain-XLA path; on the device
machine: `QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_kernels.py`.
"""

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import kernels
from qwen3_jax.fp8 import dequantize
from qwen3_jax.kernels.linear import linear_einsum, projections_partials
from qwen3_jax.kernels.gemv import fp8_bits_to_f32, gemv, quantize_rows
from qwen3_jax.kernels.grouped_matmul import grouped_matmul
from qwen3_jax.kernels import moe_blocks
from qwen3_jax.kernels.moe_blocks import expert_blocks, num_blocks
from qwen3_jax.kernels.moe_ffn import ExpertArrays, moe_ffn
from qwen3_jax.kernels.x_quantize import quantize_x
from qwen3_jax.moe import expert_ffn
from jaxpr_walk import equations


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fp8_weights(rng, shape, block_axis, block=128, checkpoint_blocks=False):
    """Random FP8 weight (N(0,1) in e4m3) and a positive float32 scale in our in-memory layout.
    The expanded axes get a scale per element, which catches a kernel reading the wrong one;
    checkpoint_blocks=True repeats each value over `block` elements along each expanded axis (an
    int: over that many), as a checkpoint's block scales are when expanded (what W8A8's layout
    "n" relies on; runs are per axis, so a flattened axis pair repeats with its inner one)."""
    w8 = jnp.asarray(rng.standard_normal(shape), jnp.float8_e4m3fn)
    s_shape = list(shape)
    s_shape[block_axis] = -(-shape[block_axis] // block)
    if not checkpoint_blocks:
        return w8, jnp.asarray(rng.uniform(0.01, 0.03, s_shape), jnp.float32)
    run = block if checkpoint_blocks is True else checkpoint_blocks
    coarse = [-(-n // run) if 0 < i != block_axis else n for i, n in enumerate(s_shape)]
    scale = rng.uniform(0.01, 0.03, coarse)
    for i in range(1, len(shape)):
        if i != block_axis:
            scale = np.repeat(scale, run, axis=i)[(slice(None),) * i + (slice(0, shape[i]),)]
    return w8, jnp.asarray(scale, jnp.float32)


def gemv_reference(x, rows, groups, w):
    x, w, groups = np.asarray(x, np.float64), np.asarray(w, np.float64), np.asarray(groups)
    out = np.einsum("rk,rkn->rn", x[np.asarray(rows)], w[np.maximum(groups, 0)])
    return out * (groups >= 0)[:, None]


# -- CPU: interpret mode ------------------------------------------------------------------------

def test_fp8_bits_conversion_is_exact_for_every_finite_value():
    all8 = jax.lax.bitcast_convert_type(jnp.arange(256, dtype=jnp.uint8), jnp.float8_e4m3fn)
    want = np.asarray(all8.astype(jnp.float32))
    got = np.asarray(fp8_bits_to_f32(all8))
    finite = np.isfinite(want)
    assert finite.sum() == 254  # e4m3fn: only 0x7F / 0xFF are NaN
    np.testing.assert_array_equal(got[finite], want[finite])


@pytest.mark.parametrize("split_k,acc2d,mode", [(1, True, "fma"), (2, False, "fma"), (2, True, "dot")])
def test_gemv_bf16_matches_reference_and_zeroes_skipped_rows(split_k, acc2d, mode):
    rng = np.random.default_rng(split_k)
    x = jnp.asarray(rng.standard_normal((5, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 128, 64)), jnp.bfloat16)
    rows, groups = jnp.array([0, 1, 2, 3, 4, 4]), jnp.array([0, 2, 1, -1, 2, 0])
    (y,) = gemv(x, rows, groups, (w,), bn=32, bk=32, split_k=split_k, acc2d=acc2d, mode=mode)
    assert y.shape == (split_k, 6, 64)
    assert rel(y.sum(0), gemv_reference(x, rows, groups, w)) < 1e-6
    assert np.all(np.asarray(y[:, 3]) == 0.0)


@pytest.mark.parametrize("layout,convert,mode", [("k", "cast", "fma"), ("k", "bits", "fma"), ("n", "cast", "fma"),
                                                ("n", "bits", "fma"), ("k", "cast", "dot"), ("n", "cast", "dot"),
                                                ("k", "f16", "dot"), ("n", "f16", "dot")])
def test_gemv_fp8_fuses_the_block_dequantize(layout, convert, mode):
    rng = np.random.default_rng(7)
    block = 64
    x = jnp.asarray(rng.standard_normal((4, 128)), jnp.bfloat16)
    w8, scale = fp8_weights(rng, (2, 128, 64), 1 if layout == "k" else 2, block)
    wd = dequantize(w8, scale, 1 if layout == "k" else 2, block, jnp.float32)
    rows, groups = jnp.array([3, 0, 1, 2]), jnp.array([1, 0, -1, 1])
    g, u = gemv(x, rows, groups, (w8, w8), (scale, scale), layout=layout, block=block, bn=32, bk=32,
                convert=convert, mode=mode)
    want = gemv_reference(x, rows, groups, wd)
    # "dot" with layout "n" rounds x * scale to bf16 (f16 with convert "f16") before the MMA
    # (module doc): bf16-level error; f16 x of a bf16 x is exact in range, products exact in f32
    tol = 5e-3 if (mode, layout) == ("dot", "n") else 1e-5 if convert == "f16" else 1e-6
    assert rel(g.sum(0), want) < tol and rel(u.sum(0), want) < tol


@pytest.mark.parametrize("kind", ["bf16", "fp8-k", "fp8-n"])
def test_gemv_reads_weights_stored_n_by_k(kind):
    """Weights stored [G, N, K] (w_nk, the checkpoint's [out, in]) give the [G, K, N] product."""
    rng = np.random.default_rng(23)
    block = 64
    x = jnp.asarray(rng.standard_normal((4, 128)), jnp.bfloat16)
    rows, groups = jnp.array([3, 0, 1, 2]), jnp.array([1, 0, -1, 1])
    if kind == "bf16":
        w, ss, kw = jnp.asarray(rng.standard_normal((2, 128, 64)), jnp.bfloat16), None, {}
        want = gemv_reference(x, rows, groups, w)
    else:
        layout = kind[-1]
        w, scale = fp8_weights(rng, (2, 128, 64), 1 if layout == "k" else 2, block)
        ss, kw = (scale,), dict(layout=layout, block=block, convert="f16")
        want = gemv_reference(x, rows, groups, dequantize(w, scale, 1 if layout == "k" else 2, block, jnp.float32))
    (base,) = gemv(x, rows, groups, (w,), ss, bn=32, bk=32, split_k=2, mode="dot", **kw)
    stored = jnp.swapaxes(w, 1, 2)
    (y,) = gemv(x, rows, groups, (stored,), ss, bn=32, bk=32, split_k=2, mode="dot", w_nk=True, **kw)
    assert y.shape == (2, 4, 64)
    assert rel(y.sum(0), base.sum(0)) < 1e-6
    assert rel(y.sum(0), want) < (5e-3 if kind == "fp8-n" else 1e-5)
    assert np.all(np.asarray(y[:, 2]) == 0.0)
    with pytest.raises(ValueError, match="need mode='dot'"):
        gemv(x, rows, groups, (stored,), ss, bn=32, bk=32, mode="fma", w_nk=True, **kw)


def w8a8_reference(x, rows, groups, w8, scale, layout, block, group):
    """What gemv convert="e4m3" computes, in float64 from the same float32 steps: x (times the
    weight's per-row scale for layout "n", per column block) quantized per `group` columns,
    then the exact product with the e4m3 weight, times both scales."""
    xr = jnp.asarray(x)[jnp.asarray(rows)].astype(jnp.float32)
    g = np.maximum(np.asarray(groups), 0)
    w = np.asarray(w8.astype(jnp.float32), np.float64)[g]                  # [R, K, N]
    sc = np.asarray(scale, np.float64)[g]
    n_dim = w.shape[2]
    out = np.zeros((len(g), n_dim))
    for nb in range(-(-n_dim // block)):
        cols = slice(nb * block, (nb + 1) * block)
        xs = xr if layout == "k" else xr * jnp.asarray(scale)[jnp.asarray(g), :, nb]
        q, sx = quantize_rows(xs, group)
        xd = np.asarray(q.astype(jnp.float32), np.float64) * np.repeat(np.asarray(sx, np.float64), group, axis=1)
        wd = w[:, :, cols] * (np.repeat(sc[:, :, cols], block, axis=1)[:, :w.shape[1]] if layout == "k" else 1.0)
        out[:, cols] = np.einsum("rk,rkn->rn", xd, wd)
    return out * (np.asarray(groups) >= 0)[:, None]


@pytest.mark.parametrize("layout", ["k", "n"])
def test_gemv_w8a8_quantizes_activations_per_group(layout):
    """convert="e4m3": FP8 x FP8 MMA on x quantized per bk group (the checkpoints' dynamic
    activation scheme) equals its emulation; it is visibly not the bf16-activation product."""
    rng = np.random.default_rng(17)
    block = 64
    x = jnp.asarray(rng.standard_normal((4, 128)) * np.linspace(0.1, 4, 128), jnp.bfloat16)
    w8, scale = fp8_weights(rng, (2, 128, 128), 1 if layout == "k" else 2, block)
    rows, groups = jnp.array([3, 0, 1, 2]), jnp.array([1, 0, -1, 1])
    (y,) = gemv(x, rows, groups, (w8,), (scale,), layout=layout, block=block, bn=32, bk=32,
                convert="e4m3", mode="dot")
    assert rel(y.sum(0), w8a8_reference(x, rows, groups, w8, scale, layout, block, 32)) < 1e-5
    exact = gemv_reference(x, rows, groups, dequantize(w8, scale, 1 if layout == "k" else 2, block, jnp.float32))
    assert 3e-3 < rel(y.sum(0), exact) < 5e-2
    assert np.all(np.asarray(y[:, 2]) == 0.0)
    with pytest.raises(ValueError, match="FP8 weights and mode='dot'"):
        gemv(x, rows, groups, (w8,), (scale,), layout=layout, block=block, bn=32, bk=32, convert="e4m3", mode="fma")


@pytest.mark.parametrize("fp8", [False, True])
def test_gemv_concat_runs_projections_of_different_widths_in_one_launch(fp8, monkeypatch):
    rng = np.random.default_rng(23)
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.bfloat16)
    widths = (128, 32, 32)                                       # q, k, v
    if fp8:
        ws, ss = zip(*[fp8_weights(rng, (2, 128, n), 1, 64) for n in widths])
        want = [dequantize(w, s, 1, 64, jnp.float32) for w, s in zip(ws, ss)]
    else:
        ws, ss = [jnp.asarray(rng.standard_normal((2, 128, n)), jnp.bfloat16) for n in widths], None
        want = ws
    rows, groups = jnp.array([2, 0]), jnp.array([1, 1])
    outs = gemv(x, rows, groups, ws, ss, block=64, bn=32, bk=32, split_k=2, mode="dot", concat=True)
    assert [o.shape for o in outs] == [(2, 2, n) for n in widths]
    for o, w in zip(outs, want):
        assert rel(o.sum(0), gemv_reference(x, rows, groups, w)) < 1e-5
    with pytest.raises(ValueError, match="concat=True"):
        gemv(x, rows, groups, ws, ss, block=64, bn=32, bk=32, mode="dot")
    # The model's entry: einsums of one x (q as [L, D, H, Q]) -> their partial sums in one launch
    # (3 rows: above FP8's own GEMV limit, raised here for this test)
    from qwen3_jax.kernels import linear as linear_mod
    monkeypatch.setattr(linear_mod, "GEMV_MAX_ROWS", {"bf16": 4, "fp8": 4})
    specs = [("btd,dhq->bthq", x[None], ws[0].reshape(2, 128, 4, 32), None if ss is None else ss[0].reshape(2, 2, 4, 32), 0)]
    specs += [("btd,dk->btk", x[None], w, None if ss is None else s, 0) for w, s in zip(ws[1:], (ss or (None,) * 3)[1:])]
    parts = projections_partials(specs, 64, jnp.int32(1))
    layer1 = jnp.ones(3, jnp.int32)
    for p, w in zip(parts, want):
        assert rel(p.sum(0), gemv_reference(x, jnp.arange(3), layer1, w)) < 1e-5
    # Rows past the gemv limit: one launch each, unless PROJECTION_MATMUL puts FP8 weights side by
    # side in the grouped matmul ("narrow-qkv", the default, and "split-qkv"; their own test below)
    monkeypatch.setattr(linear_mod, "PROJECTION_MATMUL", dict(linear_mod.PROJECTION_MATMUL_PRESETS["split"]))
    assert projections_partials([(specs[0][0], jnp.zeros((1, 40, 128), x.dtype), *specs[0][2:])] * 2, 64, 1) is None


def _x_sources(rng):
    """One of each gemv_inputs source, each standing for an x of [2, 256], as the decode step builds them."""
    from qwen3_jax.kernels.gemv_inputs import RmsNormX, SwigluX

    f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)   # noqa: E731
    norm_w = jnp.asarray(1 + 0.2 * rng.standard_normal((3, 256)), jnp.bfloat16)
    x = jnp.asarray(3 * rng.standard_normal((2, 1, 256)), jnp.bfloat16)
    return {"rmsnorm": RmsNormX(x, norm_w, jnp.int32(2), 1e-6).reshape(2, 256),
            "swiglu": SwigluX(f32(4, 2, 256), f32(4, 2, 256), jnp.bfloat16)}


@pytest.mark.parametrize("source", ["rmsnorm", "swiglu"])
@pytest.mark.parametrize("fp8", [False, True])
def test_gemv_finishes_a_producer_output_in_its_x_load(source, fp8):
    """gemv on a gemv_inputs source (the RMSNorm or the swiglu done in each program's x load)
    equals gemv on the source's XLA materialization, bit for bit but for the order of float32
    sums; and that materialization is the model's own math."""
    from qwen3_jax.model import RMSNorm

    rng = np.random.default_rng(31)
    src = _x_sources(rng)[source]
    if fp8:
        w, scale = fp8_weights(rng, (3, 256, 64), 1, 64)
        ws, ss = (w,), (scale,)
    else:
        ws, ss = (jnp.asarray(rng.standard_normal((3, 256, 64)), jnp.bfloat16),), None
    groups = jnp.array([2], jnp.int32)
    kw = dict(row_div=1, block=64, bn=32, bk=32, split_k=2, mode="dot", convert="f16" if fp8 else "cast")
    (got,) = gemv(src, 2, groups, ws, ss, **kw)
    (want,) = gemv(src.materialize(), 2, groups, ws, ss, **kw)
    assert rel(got, want) < 1e-6
    # ... and the finishing ran in the kernel: no XLA norm or sigmoid outside it
    outside = _primitives_outside_kernels(jax.make_jaxpr(lambda: gemv(src, 2, groups, ws, ss, **kw))().jaxpr)
    assert outside["pallas_call"] == 1 and not any(outside[p] for p in ("rsqrt", "logistic")), outside
    if source == "rmsnorm":   # the model's RMSNorm on layer 2's weight
        norm = RMSNorm(256, 1e-6, dtype=jnp.bfloat16)
        norm.weight[...] = src.weight[2]
        assert np.array_equal(np.asarray(src.materialize()), np.asarray(norm(src.x)[:, 0]))
        # a row that is no Triton block (K = 96) is normed by XLA first, not in the kernel
        odd = dataclasses.replace(src, x=src.x[..., :96], weight=src.weight[:, :96], shape=(2, 96))
        assert not odd.covered(32)
        w96, s96 = (ws[0][:, :96],), None if ss is None else (ss[0][:, :2],)
        (got,) = gemv(odd, 2, groups, w96, s96, **dict(kw, split_k=1))
        (want,) = gemv(odd.materialize(), 2, groups, w96, s96, **dict(kw, split_k=1))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_decode_attention_split_combine_is_the_softmax_over_all_keys():
    """combine_splits of 4 key splits' (weighted values, running max, sum of exponentials) equals
    the softmax over all 64 keys; rows past the group (the MMA padding) are dropped."""
    from qwen3_jax.kernels.decode_attention import combine_splits

    rng = np.random.default_rng(37)
    scores, values = rng.standard_normal((2, 2, 16, 64)) * 3, rng.standard_normal((2, 2, 64, 32))
    chunks = np.split(scores, 4, axis=-1)
    m = np.stack([c.max(-1) for c in chunks], 2)                                    # [B, KV, NS, 16]
    e = [np.exp(c - mc[..., None]) for c, mc in zip(chunks, np.moveaxis(m, 2, 0))]
    acc = np.stack([ei @ v for ei, v in zip(e, np.split(values, 4, axis=2))], 2)
    l = np.stack([ei.sum(-1) for ei in e], 2)
    got = combine_splits(*(jnp.asarray(a, jnp.float32) for a in (acc, m, l)), 4, jnp.float32)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    full = (p / p.sum(-1, keepdims=True)) @ values                                  # [B, KV, 16, Q]
    assert got.shape == (2, 8, 32) and rel(got, full[:, :, :4].reshape(2, 8, 32)) < 1e-6


def test_grouped_matmul_single_and_fused_silu_pair():
    rng = np.random.default_rng(3)
    bm, block = 16, 64
    x = jnp.asarray(rng.standard_normal((3 * bm, 128)), jnp.bfloat16)
    groups = jnp.array([1, 0, -1])
    w = jnp.asarray(rng.standard_normal((2, 128, 64)) * 0.1, jnp.bfloat16)
    y = grouped_matmul(x, groups, (w,), bm=bm, bn=32, bk=32)
    xf, wf = np.asarray(x, np.float64), np.asarray(w, np.float64)
    want = np.concatenate([xf[:bm] @ wf[1], xf[bm:2 * bm] @ wf[0]])
    assert y.dtype == jnp.float32 and rel(y[:2 * bm], want) < 1e-6

    w8, sk = fp8_weights(rng, (2, 128, 64), 1, block)
    wd = np.asarray(dequantize(w8, sk, 1, block, jnp.float32), np.float64)
    h = grouped_matmul(x, groups, (w8, w8), (sk, sk), bm=bm, layout="k", block=block, bn=32, bk=32)
    a = np.concatenate([xf[:bm] @ wd[1], xf[bm:2 * bm] @ wd[0]])
    assert h.dtype == jnp.bfloat16 and rel(h[:2 * bm], a / (1 + np.exp(-a)) * a) < 5e-3

    w8n, sn = fp8_weights(rng, (2, 128, 64), 2, block)
    wdn = np.asarray(dequantize(w8n, sn, 2, block, jnp.bfloat16), np.float64)  # same rounding as the kernel
    y = grouped_matmul(x, groups, (w8n,), (sn,), bm=bm, layout="n", block=block, bn=32, bk=32)
    assert rel(y[:2 * bm], np.concatenate([xf[:bm] @ wdn[1], xf[bm:2 * bm] @ wdn[0]])) < 1e-6


def test_grouped_matmul_in_either_grid_order_gives_the_same_rows():
    """n_first (a block's N tiles side by side in the grid) only reorders the programs: a gathered
    gate/up pair with block_valid and a K-split single give exactly the default order's values."""
    rng = np.random.default_rng(11)
    bm = 16
    x = jnp.asarray(rng.standard_normal((40, 128)), jnp.bfloat16)
    groups = jnp.array([1, 0, -1])
    rows = jnp.asarray(rng.integers(0, 40, 3 * bm), jnp.int32)
    valid = jnp.array([16, 9, 0])
    w, u = (jnp.asarray(rng.standard_normal((2, 128, 128)) * 0.1, jnp.bfloat16) for _ in range(2))
    kw = dict(bm=bm, bn=32, bk=32)
    x48 = jnp.zeros((3 * bm, 128), x.dtype)
    for order, grid in ((False, "grid=(3, 4, 1)"), (True, "grid=(4, 3, 1)")):   # 3 blocks, 4 N tiles
        assert grid in str(jax.make_jaxpr(lambda x: grouped_matmul(x, groups, (w,), n_first=order, **kw))(x48))
    outs = [grouped_matmul(x, groups, (w, u), rows=rows, block_valid=valid, n_first=o, **kw) for o in (False, True)]
    real = np.r_[0:16, 16:25]
    np.testing.assert_array_equal(np.asarray(outs[0], np.float32)[real], np.asarray(outs[1], np.float32)[real])
    xs = jnp.asarray(rng.standard_normal((3 * bm, 128)), jnp.bfloat16)
    outs = [grouped_matmul(xs, groups, (w,), k_splits=2, n_first=o, **kw) for o in (False, True)]
    np.testing.assert_array_equal(np.asarray(outs[0])[:, :2 * bm], np.asarray(outs[1])[:, :2 * bm])
    xf, wf = np.asarray(xs, np.float64), np.asarray(w, np.float64)
    want = np.concatenate([xf[:bm] @ wf[1], xf[bm:2 * bm] @ wf[0]])
    assert rel(np.asarray(outs[1]).sum(0)[:2 * bm], want) < 1e-6


@pytest.mark.parametrize("layout,convert", [("k", "cast"), ("n", "cast"), ("k", "f16"), ("n", "f16")])
def test_grouped_matmul_reads_weights_stored_n_by_k(layout, convert):
    """w_nk: the same products from FP8 weights stored [G, N, K] (scales as before)."""
    rng = np.random.default_rng(6)
    bm, block = 16, 64
    x = jnp.asarray(rng.standard_normal((3 * bm, 128)), jnp.bfloat16)
    groups = jnp.array([1, -1, 0])
    w8, s = fp8_weights(rng, (2, 128, 64), 1 if layout == "k" else 2, block)
    kw = dict(bm=bm, layout=layout, block=block, bn=32, bk=32, convert=convert)
    want = grouped_matmul(x, groups, (w8,), (s,), **kw)
    got = grouped_matmul(x, groups, (jnp.swapaxes(w8, 1, 2),), (s,), w_nk=True, **kw)
    rows = np.r_[0:bm, 2 * bm:3 * bm]   # block 1 is skipped: its rows are never written
    assert rel(np.asarray(got)[rows], np.asarray(want)[rows]) < 1e-6


def test_grouped_matmul_weight_as_left_operand():
    """w_lhs: the transposed tile product W x^T, stored transposed, equals the x-left product
    (layout "k" gate/up pair with the silu, layout "n" single), and needs [G, N, K] storage."""
    rng = np.random.default_rng(8)
    bm, block = 16, 64
    x = jnp.asarray(rng.standard_normal((3 * bm, 128)), jnp.float16)
    groups = jnp.array([1, 0, -1])
    rows = np.r_[0:2 * bm]   # block 2 is skipped: its rows are never written
    kw = dict(bm=bm, block=block, bn=32, bk=32, convert="f16", w_nk=True)
    w8, sk = fp8_weights(rng, (2, 128, 64), 1, block)
    u8, su = fp8_weights(rng, (2, 128, 64), 1, block)
    pair = ((jnp.swapaxes(w8, 1, 2), jnp.swapaxes(u8, 1, 2)), (sk, su))
    want = np.asarray(grouped_matmul(x, groups, *pair, layout="k", **kw), np.float64)[rows]
    got = np.asarray(grouped_matmul(x, groups, *pair, layout="k", w_lhs=True, **kw), np.float64)[rows]
    assert rel(got, want) < 4e-3   # bf16-rounded h: an ulp apart at most where the sums' order differs
    w8n, sn = fp8_weights(rng, (2, 128, 64), 2, block)
    single = ((jnp.swapaxes(w8n, 1, 2),), (sn,))
    want = np.asarray(grouped_matmul(x, groups, *single, layout="n", **kw))[rows]
    got = np.asarray(grouped_matmul(x, groups, *single, layout="n", w_lhs=True, **kw))[rows]
    assert rel(got, want) < 1e-6
    with pytest.raises(ValueError, match="needs weights stored"):
        grouped_matmul(x, groups, (w8n,), (sn,), layout="n", w_lhs=True, **dict(kw, w_nk=False))


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float16])
def test_grouped_matmul_fp8_through_the_f16_mma(x_dtype):
    """convert="f16": FP8 tiles converted to f16 (layout "n": times the row scale in f16), x
    rounded to f16 (or passed as f16), float32 accumulation: the dequantized product to f16
    precision, h in x's dtype."""
    rng = np.random.default_rng(4)
    bm, block = 16, 64
    x = jnp.asarray(rng.standard_normal((3 * bm, 128)), x_dtype)
    xf = np.asarray(x.astype(jnp.float32), np.float64)
    groups = jnp.array([1, 0, -1])
    w8, sk = fp8_weights(rng, (2, 128, 64), 1, block)
    wd = np.asarray(dequantize(w8, sk, 1, block, jnp.float32), np.float64)
    kw = dict(bm=bm, block=block, bn=32, bk=32, convert="f16")
    y = grouped_matmul(x, groups, (w8,), (sk,), layout="k", **kw)
    assert rel(y[:2 * bm], np.concatenate([xf[:bm] @ wd[1], xf[bm:2 * bm] @ wd[0]])) < 1e-5
    h = grouped_matmul(x, groups, (w8, w8), (sk, sk), layout="k", **kw)
    a = np.concatenate([xf[:bm] @ wd[1], xf[bm:2 * bm] @ wd[0]])
    assert h.dtype == x_dtype and rel(h[:2 * bm], a / (1 + np.exp(-a)) * a) < 5e-3
    w8n, sn = fp8_weights(rng, (2, 128, 64), 2, block)
    wdn = np.asarray(dequantize(w8n, sn, 2, block, jnp.float32), np.float64)
    y = grouped_matmul(x, groups, (w8n,), (sn,), layout="n", **kw)
    # the row scale rounded to f16 and the f16 product: ~2^-11 relative per weight
    assert rel(y[:2 * bm], np.concatenate([xf[:bm] @ wdn[1], xf[bm:2 * bm] @ wdn[0]])) < 2e-3
    # scales of blocks whose weights are all under 0.0005 (f16 subnormals unless pre-scaled)
    tiny = sn * 1e-4
    wdt = np.asarray(dequantize(w8n, tiny, 2, block, jnp.float32), np.float64)
    y = grouped_matmul(x, groups, (w8n,), (tiny,), layout="n", **kw)
    assert rel(y[:2 * bm], np.concatenate([xf[:bm] @ wdt[1], xf[bm:2 * bm] @ wdt[0]])) < 2e-3
    with pytest.raises(ValueError, match="convert must be"):
        grouped_matmul(x, groups, (w8,), (sk,), layout="k", **dict(kw, convert="bits"))


def _w8a8_emulation(xq, sx, w_dq, groups, bm):
    """What a W8A8 grouped matmul computes, in float64: the dequantized e4m3 x (per group of
    K // sx.shape[1] columns) times each block's dequantized weight [G, K, N]."""
    r, k_dim = xq.shape
    xd = (np.asarray(xq.astype(jnp.float32), np.float64).reshape(r, sx.shape[1], -1)
          * np.asarray(sx, np.float64)[..., None]).reshape(r, k_dim)
    w = np.asarray(w_dq, np.float64)
    return np.concatenate([xd[b * bm:(b + 1) * bm] @ w[max(g, 0)] for b, g in enumerate(np.asarray(groups))])


@pytest.mark.parametrize("layout,scale_run", [("k", None), ("k", 64), ("n", None)])
@pytest.mark.parametrize("storage", ["kn", "nk", "nk-lhs"])
def test_grouped_matmul_w8a8_on_prequantized_x(layout, scale_run, storage):
    """convert="e4m3": x arrives quantized (quantize_rows, here in 64-wide groups, two K steps of
    32 each), the MMA runs e4m3 x e4m3 and the step's product takes x's group scale and the
    weight's block scale. Equal to its float64 emulation; to W8A8's own bound from the exact
    product. Layout "k" with scale_run (N tiles inside runs of equal scales) reads one weight
    scale a tile: the same values on a checkpoint's scales, and a per-column scale it cannot see.
    Bad inputs are refused with what to pass."""
    rng = np.random.default_rng(9)
    bm, block = 16, 64
    x = jnp.asarray(rng.standard_normal((2 * bm, 128)), jnp.bfloat16)
    groups = jnp.array([1, 0])
    w8, s = fp8_weights(rng, (2, 128, 64), 1 if layout == "k" else 2, block, checkpoint_blocks=True)
    wd = dequantize(w8, s, 1 if layout == "k" else 2, block, jnp.float32)
    xq, sx = quantize_rows(x, 64)
    kw = dict(bm=bm, layout=layout, block=block, bn=32, bk=32, convert="e4m3", x_scales=sx,
              w_nk=storage != "kn", w_lhs=storage == "nk-lhs", scale_run=scale_run)
    stored = w8 if storage == "kn" else jnp.swapaxes(w8, 1, 2)
    got = grouped_matmul(xq, groups, (stored,), (s,), **kw)
    exact = np.concatenate([np.asarray(x[:bm], np.float64) @ np.asarray(wd[1], np.float64),
                            np.asarray(x[bm:], np.float64) @ np.asarray(wd[0], np.float64)])
    assert got.dtype == jnp.float32
    assert rel(got, _w8a8_emulation(xq, sx, wd, groups, bm)) < 1e-5 and 1e-3 < rel(got, exact) < 6e-2
    if scale_run:   # per-column scales: one read a tile misses them (the path was taken)
        _, s_col = fp8_weights(rng, (2, 128, 64), 1, block)
        off = grouped_matmul(xq, groups, (stored,), (s_col,), **kw)
        want = _w8a8_emulation(xq, sx, dequantize(w8, s_col, 1, block, jnp.float32), groups, bm)
        assert rel(off, want) > 1e-2
        assert rel(grouped_matmul(xq, groups, (stored,), (s_col,), **dict(kw, scale_run=None)), want) < 1e-5
    with pytest.raises(ValueError, match="takes x already quantized"):
        grouped_matmul(x, groups, (w8,), (s,), **dict(kw, w_nk=False, w_lhs=False))
    with pytest.raises(ValueError, match="needs FP8 weights"):
        grouped_matmul(xq, groups, (wd.astype(jnp.bfloat16),), None, **dict(kw, w_nk=False, w_lhs=False))
    with pytest.raises(ValueError, match="must divide block" if layout == "n" else "scale blocks to divide"):
        grouped_matmul(xq, groups, (w8,), (s,), **dict(kw, w_nk=False, w_lhs=False, bk=128, block=64,
                                                       x_scales=quantize_rows(x, 128)[1]))


def test_grouped_matmul_w8a8_pair_leaves_the_silu_product_quantized():
    """quantize_out=True: the gate/up pair's silu(g) * u leaves as e4m3 with one float32 scale
    per row of each bn-wide tile (amax / 448), ready for the down's W8A8 matmul."""
    rng = np.random.default_rng(10)
    bm, block, bn = 16, 64, 32
    x = jnp.asarray(rng.standard_normal((3 * bm, 128)), jnp.bfloat16)
    groups = jnp.array([1, 0, -1])
    (g8, gs), (u8, us) = (fp8_weights(rng, (2, 64, 128), 2, block) for _ in range(2))   # [G, N, K], nk
    xq, sx = quantize_rows(x, 64)
    hq, hs = grouped_matmul(xq, groups, (g8, u8), (jnp.swapaxes(gs, 1, 2), jnp.swapaxes(us, 1, 2)), bm=bm,
                            layout="k", block=block, bn=bn, bk=32, convert="e4m3", w_nk=True, x_scales=sx,
                            quantize_out=True)
    assert hq.dtype == jnp.float8_e4m3fn and hs.shape == (3 * bm, 64 // bn)
    a, u = (_w8a8_emulation(xq[:2 * bm], sx[:2 * bm], jnp.swapaxes(dequantize(w, sc, 2, block, jnp.float32), 1, 2),
                            groups[:2], bm) for w, sc in ((g8, gs), (u8, us)))
    h = a / (1 + np.exp(-a)) * u                                                     # [2 bm, N]
    want_s = np.abs(h).reshape(2 * bm, -1, bn).max(-1) / 448.0
    assert rel(hs[:2 * bm], want_s) < 1e-5
    got_h = (np.asarray(hq[:2 * bm].astype(jnp.float32), np.float64).reshape(2 * bm, -1, bn)
             * np.asarray(hs[:2 * bm], np.float64)[..., None]).reshape(2 * bm, -1)
    # e4m3 keeps 3 mantissa bits: within 1/16 of each value (subnormals: half their spacing)
    assert rel(got_h, h) < 4e-2 and np.all(np.abs(got_h - h) <= 1.001 * np.abs(h) / 16 + want_s.repeat(bn, 1) / 512)
    with pytest.raises(ValueError, match="quantize_out=True needs"):
        grouped_matmul(xq, groups, (g8,), (jnp.swapaxes(gs, 1, 2),), bm=bm, layout="k", block=block, bn=bn, bk=32,
                       convert="e4m3", w_nk=True, x_scales=sx, quantize_out=True)


def test_grouped_matmul_w8a8_scales_gathered_ahead_or_in_the_kernel():
    """x_scales_ahead: x's scales gathered into the padded rows by XLA before the kernel give the
    gathered W8A8 pair exactly the in-kernel gather's h and h scales, on every real row (pad rows,
    whose row indices hold anything, are never written either way)."""
    rng = np.random.default_rng(14)
    bm, block = 16, 64
    x = jnp.asarray(rng.standard_normal((40, 128)), jnp.bfloat16)
    xq, sx = quantize_rows(x, 64)
    groups, valid = jnp.array([1, 0, -1]), jnp.array([16, 9, 0])
    rows = jnp.asarray(np.r_[rng.integers(0, 40, 25), np.full(3 * bm - 25, 10 ** 6)], jnp.int32)   # pad rows: junk
    (g8, gs), (u8, us) = (fp8_weights(rng, (2, 64, 128), 2, block) for _ in range(2))
    kw = dict(bm=bm, layout="k", block=block, bn=32, bk=32, convert="e4m3", w_nk=True, x_scales=sx,
              quantize_out=True, rows=rows, block_valid=valid)
    ss = (jnp.swapaxes(gs, 1, 2), jnp.swapaxes(us, 1, 2))
    (h0, s0), (h1, s1) = (grouped_matmul(xq, groups, (g8, u8), ss, x_scales_ahead=a, **kw) for a in (False, True))
    real = np.r_[0:16, 16:25]
    np.testing.assert_array_equal(np.asarray(h1.astype(jnp.float32))[real], np.asarray(h0.astype(jnp.float32))[real])
    np.testing.assert_array_equal(np.asarray(s1)[real], np.asarray(s0)[real])
    assert np.abs(np.asarray(h0.astype(jnp.float32))[real]).max() > 0


@pytest.mark.parametrize("fp8", [False, "nk"])
def test_moe_ffn_xla_routed_blocks_gather_x_in_the_kernel(monkeypatch, fp8):
    """The XLA-built blocks (BLOCK_ROUTING "xla", and "kernel" past route_blocks' walk): the gate/up
    kernel gathers x's rows itself (W8A8 at these 64-row blocks with x's scales gathered ahead:
    MATMUL_DEFAULTS "large"), so no XLA gather copies x into the padded rows; the values equal
    those on route_blocks' blocks ("kernel-scan") bit for bit, and the reference's to the kernels'
    bound."""
    from qwen3_jax.kernels import moe_ffn as moe_mod

    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MOE_MIN_ROWS", 0)
    rng = np.random.default_rng(16)
    x, weights, experts, arrays, want = _moe_case(rng, bool(fp8), n=128, e=4, d=128, f=128, k=2,
                                                  nk=fp8 == "nk", checkpoint_blocks=True)

    def row_gathers(jaxpr):   # XLA gathers making [> N, D]: x's padded rows (its e4m3 form), the combine's y[pos]
        return sum(eqn.primitive.name == "gather" and eqn.outvars[0].aval.shape[1:] == (128,)
                   and eqn.outvars[0].aval.shape[0] > 128 for eqn in equations(jaxpr, into_kernels=False))

    got, gathers = {}, {}
    for routing in ("xla", "kernel-scan"):
        monkeypatch.setattr(moe_mod, "BLOCK_ROUTING", routing)
        fn = lambda: moe_ffn(x, weights, experts, arrays, strategy="blocks")   # noqa: E731 (new: make_jaxpr caches by function)
        gathers[routing] = row_gathers(jax.make_jaxpr(fn)().jaxpr)
        got[routing] = np.asarray(fn())
    assert gathers["xla"] == 1   # the combine's y[pos] only: no copy of x
    np.testing.assert_array_equal(got["xla"], got["kernel-scan"])
    assert rel(got["xla"], want) < (6e-2 if fp8 else 1e-2)


@pytest.mark.parametrize("routing", ["kernel-scan", "xla"])
def test_moe_down_rows_in_x_dtype_are_the_float32_rows_rounded(monkeypatch, routing):
    """moe_ffn.DOWN_ROWS "x" (the default): the down writes its rows in x's dtype (bf16 here), each
    the float32 row rounded once, so the MoE output moves by bf16 rounding only (against "f32",
    and both to the reference's bound); the down's pallas_call does write bf16 rows. A float32 x
    keeps float32 rows."""
    from qwen3_jax.kernels import moe_ffn as moe_mod

    monkeypatch.setattr(moe_mod, "BLOCK_ROUTING", routing)
    rng = np.random.default_rng(23)
    x, weights, experts, arrays, want = _moe_case(rng, False, n=64, e=4, d=128, f=128, k=2)

    def down_rows_dtypes(jaxpr):   # the grouped matmuls' output dtypes, in order: the down's last
        return [v.aval.dtype for eqn in equations(jaxpr, into_kernels=False) if eqn.primitive.name == "pallas_call"
                and "grouped_matmul" in str(eqn.params.get("name", eqn.params.get("name_and_src_info")))
                for v in eqn.outvars]

    got, dtypes = {}, {}
    for rows in moe_mod.DOWN_ROWS_CHOICES:
        monkeypatch.setattr(moe_mod, "DOWN_ROWS", rows)
        for xin in (x, x.astype(jnp.float32)):
            fn = lambda xin=xin: moe_ffn(xin, weights, experts, arrays, strategy="blocks")   # noqa: E731
            dtypes[rows, xin.dtype] = down_rows_dtypes(jax.make_jaxpr(fn)().jaxpr)
            got[rows, xin.dtype] = np.asarray(fn())
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    assert dtypes["x", bf16][-1] == bf16 and dtypes["f32", bf16][-1] == f32 and dtypes["x", f32][-1] == f32
    # bf16 rounding of each expert's row (2^-9 relative), not more, and a real change
    assert 0 < rel(got["x", bf16], got["f32", bf16]) < 4e-3
    np.testing.assert_array_equal(got["x", f32], got["f32", f32])
    assert rel(got["x", bf16], want) < 1e-2


def test_grouped_matmul_out_dtype_rounds_the_float32_rows():
    """out_dtype=bf16 on one weight: exactly the float32 output rounded (real rows; pad rows of a
    block_valid block stay unwritten either way); refused for a pair."""
    rng = np.random.default_rng(24)
    x = jnp.asarray(rng.standard_normal((64, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((2, 128, 64)) * 0.1, jnp.bfloat16)
    groups, valid = jnp.array([1, 0]), jnp.array([32, 20])
    kw = dict(bm=32, bn=32, bk=32, block_valid=valid, interpret=True)
    f32 = np.asarray(grouped_matmul(x, groups, (w,), **kw))
    b16 = grouped_matmul(x, groups, (w,), out_dtype=jnp.bfloat16, **kw)
    assert b16.dtype == jnp.bfloat16
    real = np.r_[np.arange(32), 32 + np.arange(20)]
    np.testing.assert_array_equal(np.asarray(b16)[real], np.asarray(jnp.asarray(f32[real]).astype(jnp.bfloat16)))
    with pytest.raises(ValueError, match="leave out_dtype None"):
        grouped_matmul(x, groups, (w, w), out_dtype=jnp.bfloat16, bm=32, bn=32, bk=32, interpret=True)


@pytest.mark.parametrize("nk", [False, True])
def test_moe_ffn_w8a8_blocks_quantize_each_token_once(monkeypatch, nk):
    """MATMUL_DEFAULTS convert="e4m3" (the default): the blocks path quantizes x per token before
    the gather and runs both matmuls W8A8 (h quantized by the gate/up kernel). Held to W8A8's
    bound against the float32 reference, and above bf16's (it did run W8A8)."""
    from qwen3_jax.kernels import grouped_matmul as gm_mod

    from qwen3_jax.kernels import moe_ffn as moe_mod

    assert {cfg["convert"] for cfg in gm_mod.MATMUL_DEFAULTS.values()} == {"e4m3"}
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MOE_MIN_ROWS", 0)
    quantized = []
    monkeypatch.setattr(moe_mod, "quantize_x", lambda x, g, rows=None: quantized.append(tuple(x.shape))
                        or quantize_x(x, g, rows))
    rng = np.random.default_rng(13)
    x, weights, experts, arrays, want = _moe_case(rng, True, n=24, nk=nk, checkpoint_blocks=True)
    fn = lambda *a: moe_ffn(*a, arrays, strategy="blocks")   # noqa: E731
    assert str(jax.make_jaxpr(fn)(x, weights, experts)).count("name=qwen3_grouped_matmul_w8a8") == 2
    assert quantized == [x.shape]   # the 24 tokens, not their 48 gathered assignment rows
    assert 1e-2 < rel(fn(x, weights, experts), want) < 6e-2


@pytest.mark.parametrize("bm,first", [(4, 0), (2, 3)])
def test_expert_blocks_put_every_assignment_in_a_block_of_its_expert(bm, first):
    rng = np.random.default_rng(bm)
    n, k, e_local = 7, 3, 5
    experts = jnp.asarray(np.stack([rng.choice(9, k, replace=False) for _ in range(n)]), jnp.int32)
    blk = expert_blocks(experts, e_local, bm, first_expert=first)
    rows, groups, pos, here = map(np.asarray, (blk.rows, blk.groups, blk.pos, blk.here))
    ex = np.asarray(experts).reshape(-1) - first
    assert len(groups) == num_blocks(n * k, e_local, bm) and len(rows) == len(groups) * bm
    np.testing.assert_array_equal(here, (ex >= 0) & (ex < e_local))
    p = pos[here]
    assert len(set(p.tolist())) == len(p)                         # one row per assignment
    np.testing.assert_array_equal(rows[p], (np.arange(n * k) // k)[here])
    np.testing.assert_array_equal(groups[p // bm], ex[here])
    used = groups >= 0
    assert used.sum() == sum(-(-np.sum(ex == e) // bm) for e in range(e_local))
    assert np.all(used[:used.sum()])                              # used blocks come first


def test_block_rows_reads_each_expert_once_from_prefill_means():
    """moe_blocks.block_rows: from a mean of SLACK_MIN_MEAN rows an expert (prefill chunks) the
    block is twice the mean's height, so a uniform top-8-of-128 routing of a 1024-token chunk puts
    each expert in one block (its weights read once) where blocks of the mean's height (64) give
    about half the experts a second one; decode batches (smaller means) keep the mean's height."""
    assert [moe_blocks.block_rows(t * 8 // 128) for t in (1, 16, 256, 512, 1024, 8192)] == [16, 16, 16, 64, 128, 128]
    rng = np.random.default_rng(0)
    counts = np.bincount(np.stack([rng.choice(128, 8, replace=False) for _ in range(1024)]).ravel(), minlength=128)
    blocks = lambda bm: int(np.sum(-(-counts // bm)))   # noqa: E731
    bm = moe_blocks.block_rows(1024 * 8 // 128)
    assert blocks(bm) == 128 <= num_blocks(1024 * 8, 128, bm)
    assert blocks(64) > 1.3 * 128


@pytest.mark.parametrize("n,k,e,bm,first", [(64, 8, 128, 16, 0), (24, 8, 128, 16, 0), (64, 8, 64, 16, 64),
                                             (7, 3, 5, 2, 3), (300, 8, 128, 32, 0), (600, 8, 128, 64, 0),
                                             (520, 8, 64, 32, 64), (2048, 8, 128, 128, 0)])
def test_route_blocks_kernel_agrees_with_expert_blocks(n, k, e, bm, first):
    """moe_blocks.route_blocks (a histogram kernel and a placement kernel, counting sort) against
    expert_blocks (XLA's stable argsort): the same groups, rows and positions, each block's count
    of real rows, the weights masked to the experts held here. Routed ids span two devices' ranges
    and one token routes nowhere (-1, a padding row); first and offset are traced, as on a mesh.
    The last three cases run past the in-kernel walk of the histogram (4096 assignments: XLA sums
    it between the kernels), one of them a mesh device's share and the last the served
    2048-token chunk's shape (16384 assignments, 128-row blocks)."""
    rng = np.random.default_rng(n + e)
    ex = np.stack([rng.choice(max(128, first + e), k, replace=False) for _ in range(n)]).astype(np.int32)
    ex[1] = -1
    w = rng.uniform(0.1, 1.0, (n, k)).astype(np.float32)
    fn = jax.jit(lambda ex, w, first, off: moe_blocks.route_blocks(ex, w, e, bm, first, off, groups_per_layer=1))
    args = (jnp.asarray(ex), jnp.asarray(w), jnp.int32(first), jnp.int32(7))
    xla_sums = any(eqn.primitive.name == "cumsum" for eqn in equations(fn.trace(*args).jaxpr, into_kernels=False))
    assert xla_sums == (n * k > moe_blocks.ROUTE_BLOCKS_MAX_ASSIGNMENTS)
    rb = fn(*args)
    blk = expert_blocks(jnp.asarray(ex), e, bm, first_expert=first)
    groups, valid, pos, rows = map(np.asarray, (rb.groups, rb.block_valid, rb.pos, rb.rows))
    here = np.asarray(blk.here)
    np.testing.assert_array_equal(groups, np.where(np.asarray(blk.groups) >= 0, np.asarray(blk.groups) + 7, -1))
    np.testing.assert_array_equal(pos, np.asarray(blk.pos))
    np.testing.assert_array_equal(np.asarray(rb.weights), np.where(here, w.reshape(-1), 0))
    assert len(rows) == len(groups) * bm + 1   # a spare last entry
    local = ex.reshape(-1)[here] - first
    for b, g in enumerate(groups):   # blocks fill an expert's run in order; the last may be partial
        if g < 0:
            assert valid[b] == 0
            continue
        rank = b - np.flatnonzero(groups == g)[0]
        assert valid[b] == min(bm, np.sum(local == g - 7) - rank * bm) > 0
        np.testing.assert_array_equal(rows[b * bm:b * bm + valid[b]], np.asarray(blk.rows)[b * bm:b * bm + valid[b]])
    assert valid.sum() == here.sum()


@pytest.mark.parametrize("fp8", [False, True, "nk"])
def test_moe_ffn_block_routing_kernel_matches_xla_routing(fp8, monkeypatch, fp8_w8a16):
    """The blocks path with route_blocks (x gathered in the gate/up kernel, the down writing real
    rows only) against the XLA routing (argsort, x gathered by XLA), both against the float32
    reference, on the experts [3, 9) of a routing over 12 (a mesh device's share: tokens routed
    elsewhere count nothing)."""
    from qwen3_jax.kernels import moe_ffn as moe_mod

    rng = np.random.default_rng(17)
    x, weights, experts, arrays, _ = _moe_case(rng, bool(fp8), n=40, e=12, k=3, nk=fp8 == "nk")
    mine = dataclasses.replace(arrays, **{f: getattr(arrays, f)[3:9] for f in
                                          ("gate", "up", "down", "gate_scale", "up_scale", "down_scale")
                                          if getattr(arrays, f) is not None}, num_experts=6)
    part = [m.astype(jnp.float32) for m in (mine.gate, mine.up, mine.down)]
    if fp8:
        part = [dequantize(jnp.swapaxes(m, 1, 2) if fp8 == "nk" else m, s, ax, 64, jnp.float32)
                for m, s, ax in zip((mine.gate, mine.up, mine.down),
                                    (mine.gate_scale, mine.up_scale, mine.down_scale), (1, 1, 2))]
    want = expert_ffn(x.astype(jnp.float32), weights, experts, *part, first_expert=3)
    out = {}
    for routing in moe_mod.BLOCK_ROUTINGS:
        monkeypatch.setattr(moe_mod, "BLOCK_ROUTING", routing)
        fn = jax.jit(lambda *a: moe_ffn(*a, mine, first_expert=3, strategy="blocks"))
        text = str(fn.trace(x, weights, experts).jaxpr)
        assert ("qwen3_route_blocks" in text) == (routing != "xla") and ("sort[dimension" in text) == (routing == "xla")
        out[routing] = fn(x, weights, experts)
    assert rel(out["kernel"], want) < 1e-2 and rel(out["xla"], want) < 1e-2
    assert rel(out["kernel"], out["xla"]) < 1e-6   # the same products in the same order
    np.testing.assert_array_equal(out["kernel-scan"], out["kernel"])   # 120 assignments: the same kernels


def test_moe_ffn_sizes_row_blocks_by_the_experts_routed_among():
    """A mesh device holding 16 of 128 experts: 256 tokens at top-8 give its experts 16 rows each
    on average, so its row blocks are 16 high (ExpertArrays.routed_experts = 128), not the 128 that
    2048 assignments over its 16 experts alone would suggest; the output matches the reference
    either way."""
    rng = np.random.default_rng(5)
    x, weights, experts, arrays, _ = _moe_case(rng, False, n=256, e=128, k=8)
    mine = dataclasses.replace(arrays, gate=arrays.gate[16:32], up=arrays.up[16:32], down=arrays.down[16:32],
                               num_experts=16)
    want = expert_ffn(x.astype(jnp.float32), weights, experts, *(m.astype(jnp.float32)
                      for m in (mine.gate, mine.up, mine.down)), first_expert=16)
    for routed, bm in ((128, 16), (0, 128)):
        arr = dataclasses.replace(mine, routed_experts=routed)
        fn = jax.jit(lambda *a: moe_ffn(*a, arr, first_expert=16, strategy="blocks"))
        mm = [e for e in equations(fn.trace(x, weights, experts).jaxpr, into_kernels=False)
              if e.primitive.name == "pallas_call" and e.params["name"].startswith("qwen3_grouped_matmul")]
        assert mm and mm[0].outvars[0].aval.shape[0] == num_blocks(256 * 8, 16, bm) * bm
        assert rel(fn(x, weights, experts), want) < 1e-2


def _moe_case(rng, fp8, n, e=6, d=128, f=64, k=2, block=64, nk=False, checkpoint_blocks=False):
    """A routed MoE FFN case; nk: FP8 weights stored [E, out, in] (ExpertArrays.w_nk, the model's);
    checkpoint_blocks: see fp8_weights."""
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    logits = rng.standard_normal((n, e))
    experts = jnp.asarray(np.argsort(-logits, axis=1)[:, :k], jnp.int32)
    weights = jnp.asarray(rng.uniform(0.2, 0.8, (n, k)), jnp.float32)
    if fp8:
        (g, gs), (u, us), (dn, ds) = (fp8_weights(rng, sh, ax, block, checkpoint_blocks)
                                      for sh, ax in (((e, d, f), 1), ((e, d, f), 1), ((e, f, d), 2)))
        swap = (lambda a: jnp.swapaxes(a, 1, 2)) if nk else (lambda a: a)
        arrays = ExpertArrays(swap(g), swap(u), swap(dn), gs, us, ds, block=block, num_experts=e, w_nk=nk)
        mats = [dequantize(g, gs, 1, block, jnp.float32), dequantize(u, us, 1, block, jnp.float32),
                dequantize(dn, ds, 2, block, jnp.float32)]
    else:
        mats = [jnp.asarray(rng.standard_normal(s) * 0.05, jnp.bfloat16) for s in ((e, d, f), (e, d, f), (e, f, d))]
        arrays = ExpertArrays(*mats, num_experts=e)
    want = expert_ffn(x.astype(jnp.float32), weights, experts, *[m.astype(jnp.float32) for m in mats])
    return x, weights, experts, arrays, want


@pytest.mark.parametrize("fp8", [False, True, "nk"])
@pytest.mark.parametrize("strategy", ["gemv", "blocks"])
def test_moe_ffn_kernels_match_the_reference_expert_ffn(fp8, strategy, fp8_w8a16):
    rng = np.random.default_rng(11)
    x, weights, experts, arrays, want = _moe_case(rng, bool(fp8), n=9, nk=fp8 == "nk")
    got = moe_ffn(x, weights, experts, arrays, strategy=strategy)
    # bf16 activations and the bf16 hidden activation bound the agreement with a float32 reference
    assert rel(got, want) < 1e-2


@pytest.mark.parametrize("nk", [False, True])
def test_fp8_gemv_auto_numerics_quantize_activations_from_32_rows(nk):
    """kernels.FP8_GEMM 'auto' (the default): W8A8 for layout-"k" FP8 gemvs (the MoE gate/up) of
    gemv.W8A8_MIN_ROWS rows or more, W8A16 below and for layout "n" (the down); bf16 untouched.
    17 tokens x 2 experts (34 rows) are held to W8A8's bound, 9 x 2 (18 rows) to bf16's."""
    from qwen3_jax.kernels.gemv import W8A8_MIN_ROWS, gemv_tiles

    assert kernels.fp8_gemm() == "auto" and W8A8_MIN_ROWS == 32
    assert gemv_tiles(128, 64, 32, True, "k", 64, w_nk=nk)["convert"] == "e4m3"
    assert gemv_tiles(128, 64, 31, True, "k", 64, w_nk=nk)["convert"] == "f16"
    assert gemv_tiles(128, 64, 64, True, "n", 64, w_nk=nk)["convert"] == "f16"
    assert gemv_tiles(128, 64, 64, False, "k", 64)["convert"] == "cast"
    rng = np.random.default_rng(12)
    for n, bound in ((17, 6e-2), (9, 1e-2)):
        x, weights, experts, arrays, want = _moe_case(rng, True, n=n, nk=nk)
        got = moe_ffn(x, weights, experts, arrays, strategy="gemv")
        assert rel(got, want) < bound, (n, rel(got, want))
    x, weights, experts, arrays, want = _moe_case(rng, True, n=17, nk=nk)
    assert rel(moe_ffn(x, weights, experts, arrays, strategy="gemv"), want) > 1e-2   # W8A8 did run


@pytest.mark.parametrize("nk", [False, True])
def test_fp8_at_compute_bound_sizes_runs_on_a_dequantized_bf16_copy(monkeypatch, nk, fp8_w8a16):
    """kernels.FP8_DEQUANTIZE_MOE_MIN_ROWS: from that many assignments per expert the blocks-path
    MoE runs the bf16 kernel on this layer's experts dequantized by XLA (swapped back from [E,
    out, in] with nk); kernels.FP8_DEQUANTIZE_MIN_ROWS: from that many rows an FP8 projection is
    left to XLA (linear_einsum gives None). Below them both stay on the FP8 kernels (W8A16
    here, to compare at bf16 precision). Same numbers."""
    rng = np.random.default_rng(29)
    x, weights, experts, arrays, want = _moe_case(rng, True, n=24, e=6, k=2, nk=nk)   # 8 rows per expert
    two = {f: jnp.concatenate([jnp.zeros_like(getattr(arrays, f)), getattr(arrays, f)])
           for f in ("gate", "up", "down", "gate_scale", "up_scale", "down_scale")}
    stacked = dataclasses.replace(arrays, **two, offset=jnp.int32(6))   # layer 1 of 2 (layer 0: zeros)

    def kernel_names(min_rows):
        monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MOE_MIN_ROWS", min_rows)
        jaxpr = str(jax.make_jaxpr(lambda *a: moe_ffn(*a, stacked, strategy="blocks"))(x, weights, experts))
        return jaxpr.count("name=qwen3_grouped_matmul_fp8"), jaxpr.count("name=qwen3_grouped_matmul")
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MIN_ROWS", 4)   # projections only: no effect on the MoE
    assert kernel_names(0) == (2, 2) and kernel_names(9) == (2, 2) and kernel_names(8) == (0, 2)
    got = moe_ffn(x, weights, experts, stacked, strategy="blocks")
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MOE_MIN_ROWS", 0)
    assert rel(got, moe_ffn(x, weights, experts, stacked, strategy="blocks")) < 5e-3 and rel(got, want) < 1e-2
    wq, sq = fp8_weights(rng, (2, 128, 4, 32), 1, 64)
    xq = jnp.asarray(rng.standard_normal((1, 40, 128)), jnp.bfloat16)
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MIN_ROWS", 41)
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MOE_MIN_ROWS", 1)   # the MoE's only: no effect here
    assert linear_einsum("btd,dhq->bthq", xq, wq, sq, 0, 64, layer=jnp.int32(1)) is not None
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MIN_ROWS", 40)
    assert linear_einsum("btd,dhq->bthq", xq, wq, sq, 0, 64, layer=jnp.int32(1)) is None


def test_moe_ffn_reads_the_right_layer_of_stacked_experts():
    rng = np.random.default_rng(5)
    x, weights, experts, arrays, want = _moe_case(rng, False, n=3)
    junk = [jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in (arrays.gate, arrays.up, arrays.down)]
    stacked = ExpertArrays.from_stacked(*[jnp.stack([j, a]) for j, a in zip(junk, (arrays.gate, arrays.up, arrays.down))],
                                        layer=jnp.int32(1))
    assert stacked.num_experts == 6 and stacked.gate.shape[0] == 12
    got = moe_ffn(x, weights, experts, stacked, strategy="gemv")
    assert rel(got, want) < 1e-2


@pytest.mark.parametrize("m", [3, 40])
def test_fp8_einsum_projections_read_layer_in_place(m, fp8_w8a16):
    """q and o projections from FP8 weights read in place, in the einsum order and stored [out,
    in] (w_nk: q [L, H, Q, D], o [L, D, H, Q], as the model keeps them): the same products."""
    rng = np.random.default_rng(m)
    block = 64
    wq, sq = fp8_weights(rng, (2, 128, 4, 16), 1, block)        # [L, D, H, Q], D blocked
    wo, so = fp8_weights(rng, (2, 4, 16, 128), 3, block)        # [L, H, Q, D], D blocked
    x = jnp.asarray(rng.standard_normal((1, m, 128)), jnp.bfloat16)
    q = linear_einsum("btd,dhq->bthq", x, wq, sq, 0, block, layer=jnp.int32(1))
    want = jnp.einsum("btd,dhq->bthq", x.astype(jnp.float32), dequantize(wq[1], sq[1], 0, block, jnp.float32))
    assert q.shape == (1, m, 4, 16) and q.dtype == jnp.bfloat16 and rel(q, want) < 5e-3
    q_nk = linear_einsum("btd,dhq->bthq", x, jnp.moveaxis(wq, 1, 3), sq, 0, block, layer=jnp.int32(1), w_nk=True)
    assert q_nk.shape == q.shape and rel(q_nk, want) < 5e-3
    o = linear_einsum("bthq,hqd->btd", q, wo, so, 2, block, layer=jnp.int32(0))
    o_nk = linear_einsum("bthq,hqd->btd", q, jnp.moveaxis(wo, 3, 1), so, 2, block, layer=jnp.int32(0), w_nk=True)
    want = jnp.einsum("bthq,hqd->btd", q.astype(jnp.float32), dequantize(wo[0], so[0], 2, block, jnp.float32))
    assert o.shape == o_nk.shape == (1, m, 128) and rel(o, want) < 5e-3 and rel(o_nk, want) < 5e-3


def test_fp8_q_projection_w8a8_reads_one_weight_scale_a_tile(monkeypatch):
    """Layout "k" (q/k/v) on the W8A8 matmul: the expanded scales repeat in runs along the
    flattened H x Q output, so an N tile inside one run reads one scale (scale_run, gcd'd with Q).
    Alone and side by side with k and v (projections_partials): to W8A8's bound on scales in
    runs of 32, and wrong on per-column scales claimed to run, which proves the path is taken.
    Without a claimed run (scale_run None, a library caller's default) per-column scales are
    read per column: right."""
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MIN_ROWS", 0)
    rng = np.random.default_rng(15)
    block = 64
    x = jnp.asarray(rng.standard_normal((1, 40, 128)), jnp.bfloat16)
    w8, s_run = fp8_weights(rng, (2, 128, 2, 64), 1, block, checkpoint_blocks=32)   # [L, D, H, Q]
    _, s_col = fp8_weights(rng, (2, 128, 2, 64), 1, block)                          # a scale per column

    def q(scale, run):
        return linear_einsum("btd,dhq->bthq", x, w8, scale, 0, block, layer=jnp.int32(1), scale_run=run)

    def want(scale):
        return jnp.einsum("btd,dhq->bthq", x.astype(jnp.float32), dequantize(w8[1], scale[1], 0, block, jnp.float32))
    assert 1e-3 < rel(q(s_run, 32), want(s_run)) < 6e-2
    assert rel(q(s_col, 32), want(s_col)) > 0.1          # one scale a tile cannot see per-column scales
    assert 1e-3 < rel(q(s_col, None), want(s_col)) < 6e-2
    spec = ("btd,dhq->bthq", x, w8, s_run, 0)
    parts = kernels.projections_partials([spec, spec], block, jnp.int32(1), scale_run=32)
    for p in parts:
        assert 1e-3 < rel(np.asarray(p).sum(0).reshape(1, 40, 2, 64), want(s_run)) < 6e-2
    bad = ("btd,dhq->bthq", x, w8, s_col, 0)
    (p,) = kernels.projections_partials([bad], block, jnp.int32(1), scale_run=32)
    assert rel(np.asarray(p).sum(0).reshape(1, 40, 2, 64), want(s_col)) > 0.1
    (p,) = kernels.projections_partials([bad], block, jnp.int32(1))
    assert 1e-3 < rel(np.asarray(p).sum(0).reshape(1, 40, 2, 64), want(s_col)) < 6e-2


def test_fp8_projections_w8a8_quantize_x_once(monkeypatch):
    """MATMUL_DEFAULTS convert="e4m3" (the default): a prefill-sized FP8 projection quantizes x
    per row and K step and runs the W8A8 kernel, q (layout "k") and o (layout "n",
    checkpoint-block scales) in either storage order, to W8A8's bound. x is quantized once per
    call, as one [40, K] array (not per tile: the kernel gets it quantized)."""
    from qwen3_jax.kernels import linear as linear_mod
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MIN_ROWS", 0)
    quantized = []
    monkeypatch.setattr(linear_mod, "quantize_x", lambda x, g, rows=None: quantized.append(tuple(x.shape))
                        or quantize_x(x, g, rows))
    rng = np.random.default_rng(14)
    block = 64
    wq, sq = fp8_weights(rng, (2, 128, 4, 16), 1, block, checkpoint_blocks=True)   # [L, D, H, Q]
    wo, so = fp8_weights(rng, (2, 4, 16, 128), 3, block, checkpoint_blocks=True)   # [L, H, Q, D]
    x = jnp.asarray(rng.standard_normal((1, 40, 128)), jnp.bfloat16)
    want_q = jnp.einsum("btd,dhq->bthq", x.astype(jnp.float32), dequantize(wq[1], sq[1], 0, block, jnp.float32))
    for w_nk, w in ((False, wq), (True, jnp.moveaxis(wq, 1, 3))):
        fn = lambda x: linear_einsum("btd,dhq->bthq", x, w, sq, 0, block, layer=jnp.int32(1), w_nk=w_nk)  # noqa: E731,B023
        quantized.clear()
        assert str(jax.make_jaxpr(fn)(x)).count("name=qwen3_grouped_matmul_w8a8") == 1
        assert quantized == [(40, 128)]
        assert 1e-3 < rel(fn(x), want_q) < 6e-2
    q = want_q.astype(jnp.bfloat16)
    want_o = jnp.einsum("bthq,hqd->btd", q.astype(jnp.float32), dequantize(wo[0], so[0], 2, block, jnp.float32))
    for w_nk, w in ((False, wo), (True, jnp.moveaxis(wo, 3, 1))):
        quantized.clear()
        o = linear_einsum("bthq,hqd->btd", q, w, so, 2, block, layer=jnp.int32(0), w_nk=w_nk)
        assert quantized == [(40, 64)]
        assert o.shape == (1, 40, 128) and 1e-3 < rel(o, want_o) < 6e-2


def test_w8a8_layout_n_keeps_each_k_step_inside_one_scale_run(monkeypatch):
    """A checkpoint whose blocks are not square ([out 64, in 16] here): o_proj's scale repeats
    in runs of 16 along K while its D block is 64. Told the run (model.Weight.fp8_scale_run), the
    W8A8 projection and MoE down narrow their K steps to it and stay within W8A8's bound; assuming
    square blocks they would read one scale for four runs."""
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MIN_ROWS", 0)
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MOE_MIN_ROWS", 0)
    rng = np.random.default_rng(15)
    wo, so = fp8_weights(rng, (2, 4, 32, 128), 3, 64, checkpoint_blocks=16)   # [L, H, Q, D]
    q = jnp.asarray(rng.standard_normal((1, 40, 4, 32)), jnp.bfloat16)
    want = jnp.einsum("bthq,hqd->btd", q.astype(jnp.float32), dequantize(wo[0], so[0], 2, 64, jnp.float32))
    w_nk = jnp.moveaxis(wo, 3, 1)
    errs = [rel(linear_einsum("bthq,hqd->btd", q, w_nk, so, 2, 64, layer=jnp.int32(0), w_nk=True, scale_run=run),
                want) for run in (16, None)]
    assert 1e-3 < errs[0] < 6e-2 and errs[1] > 0.1, errs
    (g, gs), (u, us), (dn, ds) = (fp8_weights(rng, sh, ax, 64, checkpoint_blocks=run)
                                  for sh, ax, run in (((6, 128, 64), 1, 64), ((6, 128, 64), 1, 64), ((6, 64, 128), 2, 16)))
    x = jnp.asarray(rng.standard_normal((24, 128)), jnp.bfloat16)
    experts = jnp.asarray(np.argsort(-rng.standard_normal((24, 6)), axis=1)[:, :2], jnp.int32)
    weights = jnp.asarray(rng.uniform(0.2, 0.8, (24, 2)), jnp.float32)
    mats = [dequantize(a, s_, ax, 64, jnp.float32) for a, s_, ax in ((g, gs, 1), (u, us, 1), (dn, ds, 2))]
    want = expert_ffn(x.astype(jnp.float32), weights, experts, *mats)
    sw = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    errs = [rel(moe_ffn(x, weights, experts, ExpertArrays(sw(g), sw(u), sw(dn), gs, us, ds, block=64, num_experts=6,
                                                          w_nk=True, scale_run=run), strategy="blocks"), want)
            for run in (16, None)]
    assert 1e-3 < errs[0] < 6e-2 and errs[1] > 0.1, errs


@pytest.mark.parametrize("narrow", [True, False])
def test_projection_split_along_k_sums_to_the_unsplit_result(monkeypatch, narrow):
    """linear.PROJECTION_MATMUL k_splits: S programs per tile each take K/S of the K steps and
    leave float32 partials [S, M, N] (grouped_matmul's k_splits) whose sum is the unsplit
    product up to float32 reassociation, for q (layout "k") and o (layout "n", K steps inside
    the checkpoint's scale runs), W8A8 in either storage order; the partials come out as such
    where the caller asks for them (the attention kernel sums q/k/v's itself). A split that does
    not divide the K steps is not covered (XLA takes it)."""
    from qwen3_jax.kernels import linear as linear_mod
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MIN_ROWS", 0)
    rng = np.random.default_rng(16)
    block = 64
    wq, sq = fp8_weights(rng, (2, 256, 4, 16), 1, block, checkpoint_blocks=True)   # [L, D, H, Q]
    wo, so = fp8_weights(rng, (2, 4, 64, 128), 3, block, checkpoint_blocks=True)   # [L, H, Q, D]
    x = jnp.asarray(rng.standard_normal((1, 40, 256)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((1, 40, 4, 64)), jnp.bfloat16)
    cases = [("btd,dhq->bthq", x, wq, sq, 0, (False, True)), ("bthq,hqd->btd", q, wo, so, 2, (False, True))]
    for eq, xin, w, sc, axis, orders in cases:
        for w_nk in orders:
            wt = jnp.moveaxis(w, 1, 3) if (w_nk and axis == 0) else jnp.moveaxis(w, 3, 1) if w_nk else w

            def run(**over):
                monkeypatch.setattr(linear_mod, "PROJECTION_MATMUL", dict(narrow=narrow, **over))
                return linear_einsum(eq, xin, wt, sc, axis, block, layer=jnp.int32(1), w_nk=w_nk, partials=True)
            whole = run()
            split = run(k_splits=4)
            assert whole.shape[0] == 1 and split.shape == (4, *whole.shape[1:])
            np.testing.assert_allclose(np.asarray(split.sum(0)), np.asarray(whole[0]), rtol=2e-5, atol=2e-5)
            assert rel(split[0], whole[0]) > 0.1          # a split holds part of the sum, not all of it
            assert run(k_splits=3) is None
            auto = run(k_splits="auto")                   # as many as the K steps allow here (2 each)
            assert auto.shape[0] > 1
            np.testing.assert_allclose(np.asarray(auto.sum(0)), np.asarray(whole[0]), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("preset", ["split-qkv", "narrow-qkv"])
@pytest.mark.parametrize("w_nk", [False, True])
def test_qkv_side_by_side_in_one_matmul_launch_equal_one_by_one(monkeypatch, w_nk, preset):
    """linear.PROJECTION_MATMUL "split-qkv" (and "narrow-qkv", its narrower tiles and fewer K
    splits): q, k and v of 40 rows in one grouped_matmul launch
    (concat: each its own N and output, the grid's tiles over all three) give each projection's
    own launch's partial sums up to float32 reassociation (their K splits may differ), W8A8;
    "split" leaves many rows to one launch each (None)."""
    from qwen3_jax.kernels import linear as linear_mod
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MIN_ROWS", 0)
    rng = np.random.default_rng(17)
    block = 64
    x = jnp.asarray(rng.standard_normal((1, 40, 256)), jnp.bfloat16)
    specs = []
    for heads in (8, 2, 2):                                                   # q, k, v: N = 128, 32, 32
        w, sc = fp8_weights(rng, (2, 256, heads, 16), 1, block)              # [L, D, H, Q]
        specs.append(("btd,dhq->bthq", x, jnp.moveaxis(w, 1, 3) if w_nk else w, sc, 0))
    monkeypatch.setattr(linear_mod, "PROJECTION_MATMUL", dict(linear_mod.PROJECTION_MATMUL_PRESETS["split"]))
    assert projections_partials(specs, block, jnp.int32(1), w_nk=w_nk) is None
    monkeypatch.setattr(linear_mod, "PROJECTION_MATMUL", dict(linear_mod.PROJECTION_MATMUL_PRESETS[preset]))
    calls = []
    real = linear_mod.grouped_matmul
    monkeypatch.setattr(linear_mod, "grouped_matmul", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    together = projections_partials(specs, block, jnp.int32(1), w_nk=w_nk)
    assert len(calls) == 1 and calls[0]["concat"]
    for got, (eq, xi, w, sc, axis) in zip(together, specs):
        alone = linear_einsum(eq, xi, w, sc, axis, block, layer=jnp.int32(1), partials=True, w_nk=w_nk)
        assert got.shape[1:] == alone.shape[1:]
        np.testing.assert_allclose(np.asarray(got.sum(0)), np.asarray(alone.sum(0)), rtol=2e-5, atol=2e-5)


def test_qkv_side_by_side_lowers_to_one_triton_launch_at_30b_shapes(monkeypatch, cuda_lowering):
    """q/k/v of 30B-A3B-FP8 ([out, in], W8A8) at 64 rows under "split-qkv": one Triton launch for
    the three matmuls, after the one that quantizes their x (x_quantize)."""
    from qwen3_jax.kernels import linear as linear_mod
    monkeypatch.setattr(linear_mod, "PROJECTION_MATMUL", dict(linear_mod.PROJECTION_MATMUL_PRESETS["split-qkv"]))
    sds = jax.ShapeDtypeStruct

    def fn(x, wq, sq, wk, sk, wv, sv):
        specs = [("btd,dhq->bthq", x, wq, sq, 0), ("btd,dkq->btkq", x, wk, sk, 0), ("btd,dkq->btkq", x, wv, sv, 0)]
        with kernels.kernels_enabled(True):
            return projections_partials(specs, 128, jnp.int32(3), w_nk=True)
    f8, f32 = jnp.float8_e4m3fn, jnp.float32
    args = (sds((1, 64, 2048), jnp.bfloat16), sds((48, 32, 128, 2048), f8), sds((48, 16, 32, 128), f32),
            sds((48, 4, 128, 2048), f8), sds((48, 16, 4, 128), f32), sds((48, 4, 128, 2048), f8),
            sds((48, 16, 4, 128), f32))
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2 and text.count('"qwen3_quantize_x"') == 1


def test_narrow_qkv_shrinks_the_partials_at_30b_shapes(monkeypatch):
    """At 64 rows of 30B-A3B-FP8 q/k/v ([out, in], one launch): "split-qkv" writes 8 K splits of
    float32 partials, "narrow-qkv" 2 (32-wide tiles: the same programs, a quarter of the bytes)."""
    from qwen3_jax.kernels import linear as linear_mod
    sds = jax.ShapeDtypeStruct
    f8, f32 = jnp.float8_e4m3fn, jnp.float32
    args = (sds((1, 64, 2048), jnp.bfloat16), sds((48, 32, 128, 2048), f8), sds((48, 16, 32, 128), f32),
            sds((48, 4, 128, 2048), f8), sds((48, 16, 4, 128), f32), sds((48, 4, 128, 2048), f8),
            sds((48, 16, 4, 128), f32))

    def splits(preset):
        monkeypatch.setattr(linear_mod, "PROJECTION_MATMUL", dict(linear_mod.PROJECTION_MATMUL_PRESETS[preset]))

        def fn(x, wq, sq, wk, sk, wv, sv):
            specs = [("btd,dhq->bthq", x, wq, sq, 0), ("btd,dkq->btkq", x, wk, sk, 0),
                     ("btd,dkq->btkq", x, wv, sv, 0)]
            with kernels.kernels_enabled(True):
                return projections_partials(specs, 128, jnp.int32(3), w_nk=True)
        return {out.shape[0] for out in jax.eval_shape(fn, *args)}
    assert splits("split-qkv") == {8} and splits("narrow-qkv") == {2}


def test_grouped_matmul_concat_refuses_weights_it_cannot_put_side_by_side():
    x = jnp.zeros((16, 64), jnp.bfloat16)
    g = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="same groups and K"):
        grouped_matmul(x, g, (jnp.zeros((1, 64, 32), jnp.bfloat16), jnp.zeros((1, 32, 32), jnp.bfloat16)),
                       bm=16, bn=16, bk=16, concat=True, interpret=True)
    with pytest.raises(ValueError, match="bn=32 to divide every N"):
        grouped_matmul(x, g, (jnp.zeros((1, 64, 32), jnp.bfloat16), jnp.zeros((1, 64, 48), jnp.bfloat16)),
                       bm=16, bn=32, bk=16, concat=True, interpret=True)


def test_fp8_projection_with_the_weight_on_the_left(monkeypatch, fp8_w8a16):
    """With the weight as the MMA's left operand asked for (MATMUL_DEFAULTS' fp8_nk w_lhs; off by
    default since run 170), a prefill-sized FP8 projection stored [out, in] whose tiles stay >= 64
    wide runs so and gives the same products; once the tiles narrow below 64 (the "narrow" rule,
    and "narrow-qkv", the default) it runs with x on the left. The "split" rule keeps the tile and
    the weight on the left."""
    from qwen3_jax.kernels import grouped_matmul as gm_mod
    from qwen3_jax.kernels import linear as linear_mod

    assert not gm_mod.MATMUL_DEFAULTS["large"]["fp8_nk"]["w_lhs"]
    large = gm_mod.MATMUL_DEFAULTS["large"]
    monkeypatch.setitem(gm_mod.MATMUL_DEFAULTS, "large", dict(large, fp8_nk=dict(large["fp8_nk"], w_lhs=True)))
    calls = []
    real = linear_mod.grouped_matmul
    monkeypatch.setattr(linear_mod, "grouped_matmul", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    rng = np.random.default_rng(12)
    block = 64
    wq, sq = fp8_weights(rng, (2, 128, 8, 16), 1, block)        # [L, D, H, Q], N = 128
    x = jnp.asarray(rng.standard_normal((1, 64, 128)), jnp.bfloat16)
    want = jnp.einsum("btd,dhq->bthq", x.astype(jnp.float32), dequantize(wq[1], sq[1], 0, block, jnp.float32))
    narrow = linear_mod.PROJECTION_MATMUL_PRESETS["narrow"]
    for target, lhs, rule in ((1, True, narrow), (linear_mod.TARGET_PROGRAMS, False, narrow),
                              (linear_mod.TARGET_PROGRAMS, True, linear_mod.PROJECTION_MATMUL_PRESETS["split"])):
        monkeypatch.setattr(linear_mod, "TARGET_PROGRAMS", target)
        monkeypatch.setattr(linear_mod, "PROJECTION_MATMUL", dict(rule))
        q = linear_einsum("btd,dhq->bthq", x, jnp.moveaxis(wq, 1, 3), sq, 0, block, layer=jnp.int32(1), w_nk=True)
        assert calls[-1]["w_lhs"] is lhs and (calls[-1]["bn"] >= 64) is lhs, calls[-1]
        assert rel(q, want) < 5e-3


def test_bf16_projection_reads_layer_in_place_and_leaves_many_rows_to_xla():
    rng = np.random.default_rng(9)
    w = jnp.asarray(rng.standard_normal((3, 128, 4, 16)) * 0.1, jnp.bfloat16)   # [L, D, H, Q]
    x = jnp.asarray(rng.standard_normal((2, 1, 128)), jnp.bfloat16)
    q = linear_einsum("btd,dhq->bthq", x, w, None, 0, 128, layer=jnp.int32(2))
    want = jnp.einsum("btd,dhq->bthq", x.astype(jnp.float32), w[2].astype(jnp.float32))
    assert q.shape == (2, 1, 4, 16) and rel(q, want) < 5e-3
    many = jnp.zeros((1, 40, 128), jnp.bfloat16)
    assert linear_einsum("btd,dhq->bthq", many, w, None, 0, 128, layer=jnp.int32(0)) is None


@pytest.mark.parametrize("bs,splits", [(16, 2), (32, 1)])
def test_decode_attention_reads_the_cache_in_place_like_the_xla_path(bs, splits):
    from qwen3_jax.kernels.decode_attention import decode_attention

    rng = np.random.default_rng(bs)
    n_layers, slots, s, k, q_dim, h = 2, 3, 64, 2, 32, 8
    kc = jnp.asarray(rng.standard_normal((n_layers, slots, s, k, q_dim)), jnp.bfloat16)
    vc = jnp.asarray(rng.standard_normal((n_layers, slots, s, k, q_dim)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((2, h, q_dim)), jnp.bfloat16)
    rows, lengths = jnp.array([2, 0]), jnp.array([37, 64])
    got = decode_attention(q, kc, vc, jnp.int32(1), rows, lengths, scale=q_dim ** -0.5, bs=bs, splits=splits)
    # the model's plain-XLA decode attention on the sliced cache
    keys, vals = kc[1][np.asarray(rows)], vc[1][np.asarray(rows)]
    sc = jnp.einsum("btkgq,bskq->bkgts", q.reshape(2, 1, k, h // k, q_dim), keys, preferred_element_type=jnp.float32)
    sc = sc.astype(jnp.bfloat16).astype(jnp.float32) * q_dim ** -0.5
    mask = jnp.arange(s)[None, None, :] < lengths[:, None, None]
    sc = jnp.where(mask[:, None, None], sc, jnp.finfo(jnp.float32).min)
    want = jnp.einsum("bkgts,bskq->btkgq", jax.nn.softmax(sc, -1).astype(jnp.bfloat16), vals).reshape(2, h, q_dim)
    assert got.shape == (2, h, q_dim) and rel(got, want) < 1e-2
    # slots None: row b reads slot b, with no index operand (no iota for XLA to run every layer)
    kw = dict(scale=q_dim ** -0.5, bs=bs, splits=splits)
    ident = decode_attention(q, kc[:, 1:], vc[:, 1:], jnp.int32(1), None, lengths, **kw)
    np.testing.assert_array_equal(np.asarray(ident), np.asarray(
        decode_attention(q, kc[:, 1:], vc[:, 1:], jnp.int32(1), jnp.arange(2), lengths, **kw)))
    closed = jax.make_jaxpr(lambda *a: decode_attention(*a, None, lengths, **kw))(q, kc, vc, jnp.int32(1))
    assert _primitives_outside_kernels(closed.jaxpr)["iota"] == 0


def test_switch_defaults_off_on_cpu_and_honours_overrides(monkeypatch):
    monkeypatch.delenv("QWEN3_JAX_KERNELS", raising=False)
    assert not kernels.enabled() and not kernels.active(None, jnp.bfloat16)
    with kernels.kernels_enabled(True):
        assert kernels.active(None, jnp.bfloat16)
        assert not kernels.active(None, jnp.float32)      # float32 keeps XLA's numerics
    monkeypatch.setenv("QWEN3_JAX_KERNELS", "on")
    assert kernels.enabled()
    monkeypatch.setenv("QWEN3_JAX_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="QWEN3_JAX_KERNELS"):
        kernels.enabled()


def test_describe_says_whether_the_kernels_run_and_why_not(monkeypatch):
    monkeypatch.delenv("QWEN3_JAX_KERNELS", raising=False)
    assert kernels.describe() == "kernels: off (no GPU, cpu; the plain-XLA path)"
    with kernels.kernels_enabled(False):
        assert kernels.describe().startswith("kernels: off (switched off: QWEN3_JAX_KERNELS=off")
    with kernels.kernels_enabled(True):
        assert kernels.describe() == ("kernels: on (Pallas interpret mode, no GPU: slow; FP8 GEMV auto, FP8 matmul "
                                      "w8a8; prefill chunks over the cache: the chunk kernel (keys split up to 512 "
                                      "programs); bf16/f16 compute only)")
        monkeypatch.setattr(kernels, "on_gpu", lambda: True)
        assert ("prefill chunks over the cache: the chunk kernel (keys split up to 512 programs) below 256 tokens, "
                "the cuDNN split from there;") in kernels.describe()
    monkeypatch.setenv("QWEN3_JAX_KERNELS", "sometimes")
    assert kernels.describe().startswith("kernels: not usable (QWEN3_JAX_KERNELS='sometimes' is not understood")


def test_a_jax_without_pallas_triton_still_serves_on_the_xla_path():
    """Pallas' Triton back end is deprecated from jax 0.11. Where it cannot be imported (blocked
    here in a fresh interpreter), the package imports, the model runs on XLA with the kernels on
    auto, and asking for the kernels is an error that names the cause and the way out."""
    code = textwrap.dedent("""
        import sys
        sys.modules["jax.experimental.pallas.triton"] = None   # what an import of a removed module meets
        import dataclasses
        import jax.numpy as jnp
        from flax import nnx
        sys.path.insert(0, "tests")
        from reference import TINY
        from qwen3_jax import Qwen3MoeConfig, kernels, random_model
        from qwen3_jax.config import Fp8Config
        assert kernels.TRITON_MISSING and "pallas.triton" in kernels.TRITON_MISSING, kernels.TRITON_MISSING
        print(kernels.describe())
        cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2))
        m = random_model(dataclasses.replace(cfg, fp8=Fp8Config()), seed=2)
        tokens = jnp.array([[1, 2, 3]])
        logits = nnx.merge(m.graphdef, m.state)(tokens)[0]
        print("logits", logits.shape, bool(jnp.isfinite(logits).all()))
        kernels.set_enabled(True)
        try:
            nnx.merge(m.graphdef, m.state)(tokens)
        except RuntimeError as err:
            print("asked:", err)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("QWEN3_JAX_KERNELS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("kernels: off (jax ") and "has no Pallas Triton back end" in lines[0]
    assert lines[1] == "logits (1, 3, 128) True"   # TINY's vocabulary
    assert lines[2].startswith("asked: the Pallas kernels were asked for") and "QWEN3_JAX_KERNELS=off" in lines[2]


# Kernels on vs off for a whole bf16 model: measured 0.004-0.010 on the tiny models here (bf16
# rounding in another order). Reading the wrong layer of the router or of the experts moves the
# logits by ~0.04 (test_decode_step_on_the_kernels_matches_plain_xla checks that the bound bites).
TOL_BF16_MODEL = 2e-2


def test_tiny_model_with_kernels_matches_plain_xla(fp8_w8a16):
    from flax import nnx

    from qwen3_jax import Qwen3MoeConfig, random_model
    from qwen3_jax.config import Fp8Config
    from reference import TINY, with_distinct_norms

    # FP8 covers every kernel the model calls (q/k/v/o projections and the MoE); 2 layers check
    # that layer 1 reads its own slice of the stacked params. The 3 tokens take the projections'
    # grouped matmul (above FP8's 2 GEMV rows), held to bf16 precision in W8A16 (fp8_w8a16).
    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2))
    m = with_distinct_norms(random_model(dataclasses.replace(cfg, fp8=Fp8Config()), seed=2))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 3)), jnp.int32)
    outs = []
    for on in (False, True):
        with kernels.kernels_enabled(on):
            fwd = jax.jit(lambda st, t: nnx.merge(m.graphdef, st)(t)[0])
            outs.append(np.asarray(fwd(m.state, tokens)))
    # bf16 activations: kernels accumulate in another order and do not round the dequantized
    # FP8 weight to bf16 before the product, so agreement is to bf16 precision, not bitwise.
    assert rel(outs[1], outs[0]) < TOL_BF16_MODEL


def test_decode_step_on_the_kernels_matches_plain_xla(monkeypatch):
    """One device, kernels forced on (interpret mode): prefill, then a decode step through the
    fused prologue (q/k norm + RoPE + q padding), decode attention and the routing kernels.
    The layers stay a scan (DECODE_UNROLL 1): the kernels get a traced layer index, as in a
    48-layer model (tiny models are otherwise unrolled, with constant indices)."""
    from qwen3_jax import Qwen3MoeConfig, random_model
    from qwen3_jax import model as model_mod
    from reference import TINY, prefill_then_decode, with_distinct_norms

    monkeypatch.setattr(model_mod, "DECODE_UNROLL", 1)

    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2, head_dim=32,
                                        num_experts=16))
    m = with_distinct_norms(random_model(cfg, seed=4))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 5)), jnp.int32)
    outs = []
    for on in (False, True):
        fn = prefill_then_decode(m, tokens, 16)   # a new function: JAX caches traces per function
        with kernels.kernels_enabled(on):
            jaxpr = str(jax.make_jaxpr(fn)(m.state, tokens))
            outs.append([np.asarray(a) for a in jax.jit(fn)(m.state, tokens)])
    for name in ("qwen3_qk_norm_rope_kv", "qwen3_decode_attention", "qwen3_router_topk"):
        assert name in jaxpr, name
    for a, b in zip(outs[1], outs[0]):
        assert rel(a, b) < TOL_BF16_MODEL
    # The bound bites: the same model with the two layers' routers swapped (what a kernel reading
    # the wrong layer would compute) is farther off than the bound.
    swapped = object.__new__(type(m))
    swapped.__dict__.update(m.__dict__)
    swapped.state = jax.tree_util.tree_map_with_path(
        lambda p, x: x[::-1] if "router" in jax.tree_util.keystr(p) else x, m.state)
    fn = prefill_then_decode(swapped, tokens, 16)
    with kernels.kernels_enabled(False):
        wrong = [np.asarray(a) for a in jax.jit(fn)(swapped.state, tokens)]
    assert rel(wrong[1], outs[0][1]) > 1.5 * TOL_BF16_MODEL


def test_decode_step_with_an_idle_row_at_the_cache_end(monkeypatch):
    """The engine's decode step on the kernels (interpret mode): rows 0-1 live after a 5-token
    prefill, row 2 an idle slot at position S (the cache length). The live rows' logits are the
    plain-XLA path's; the idle row (which reads no key: test_kernels_decode_attention checks the
    zeros) stays finite, as an empty softmax's 0 / 0 would not, and leaves the cache as it was."""
    from flax import nnx

    from qwen3_jax import Qwen3MoeConfig, random_model
    from qwen3_jax import model as model_mod
    from reference import TINY, with_distinct_norms

    monkeypatch.setattr(model_mod, "DECODE_UNROLL", 1)
    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2, head_dim=32,
                                        num_experts=16))
    m = with_distinct_norms(random_model(cfg, seed=5))
    s = 16
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (3, 5)), jnp.int32)
    positions = jnp.asarray([[5], [5], [s]], jnp.int32)

    def run(st, tok):   # a new function per call: JAX caches traces per function
        model = nnx.merge(m.graphdef, st)
        _, cache = model(tok, None, m.init_cache(3, s))
        step, after = model(tok[:, -1:], positions, cache)
        return step, cache, after
    outs = []
    for on in (False, True):
        with kernels.kernels_enabled(on):
            fn = jax.jit(lambda st, tok: run(st, tok))
            if on:
                assert "qwen3_decode_attention" in str(jax.make_jaxpr(fn)(m.state, tokens))
            outs.append(fn(m.state, tokens))
    (ref, _, _), (got, before, after) = outs
    assert rel(got[:2], ref[:2]) < TOL_BF16_MODEL
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):   # row 2's write was dropped
        np.testing.assert_array_equal(np.asarray(a[:, 2], np.float32), np.asarray(b[:, 2], np.float32))


def test_rows_past_the_cache_route_to_no_expert(monkeypatch):
    """A decode row at position S (an engine's padding row or idle slot) gets group -1 in every
    layer's MoE gemv (no expert weight read: run 76 measured 20 such rows at 3.9x the cost of the
    one live row when they routed as live rows) and expert -1 for the grouped matmul (no block),
    live rows their experts; the live rows' logits are the plain-XLA path's, on either path."""
    from flax import nnx

    from qwen3_jax import Qwen3MoeConfig, random_model
    from qwen3_jax import model as model_mod
    from reference import TINY, with_distinct_norms

    monkeypatch.setattr(model_mod, "DECODE_UNROLL", 8)   # layers unrolled: the groups are this trace's values
    seen = []
    stacked = kernels.moe_ffn_stacked

    def recording(x, weights, experts, gate, up, down, layer, groups=None):
        seen.append((groups, experts))
        return stacked(x, weights, experts, gate, up, down, layer, groups)
    monkeypatch.setattr(kernels, "moe_ffn_stacked", recording)
    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2, head_dim=32,
                                        num_experts=16))
    m = with_distinct_norms(random_model(cfg, seed=6))
    s, k = 16, cfg.num_experts_per_tok
    # 3 rows: the gemv path; 40 rows (80 assignments, over bf16's 64): the grouped matmul's
    for b, idle in ((3, [1]), (40, [1, 7, 30, 39])):
        tokens = jnp.asarray(np.random.default_rng(b).integers(0, cfg.vocab_size, (b, 5)), jnp.int32)
        positions = np.full((b, 1), 5, np.int32)
        positions[idle] = s                                   # rows parked past the cache
        live = np.setdiff1d(np.arange(b), idle)

        def run(st, tok):
            model = nnx.merge(m.graphdef, st)
            _, cache = model(tok, None, m.init_cache(b, s))
            del seen[:]   # the prefill's (T > 1: no mask)
            logits, _ = model(tok[:, -1:], jnp.asarray(positions), cache)
            return logits, list(seen)
        with kernels.kernels_enabled(False):   # a new function per jit: JAX caches traces per function
            ref, _ = jax.jit(lambda st, tok: run(st, tok))(m.state, tokens)
        with kernels.kernels_enabled(True):
            got, routed = jax.jit(lambda st, tok: run(st, tok))(m.state, tokens)
        assert len(routed) == cfg.num_hidden_layers
        for groups, experts in routed:
            g, e = np.asarray(groups).reshape(b, k), np.asarray(experts)
            assert (g[idle] == -1).all() and (g[live] >= 0).all()
            assert (e[idle] == -1).all() and (e[live] >= 0).all()
        assert rel(got[live], ref[live]) < TOL_BF16_MODEL


def test_decode_step_on_chosen_slots_equals_the_full_batch(monkeypatch):
    """The engine's small decode batches (serve/engine.py decode_batch_sizes): kernels on
    (interpret mode), a decode step over slots [2, 0] of a 3-slot cache (slot 1 not in the
    batch) gives those rows' logits and cache writes of the step over all 3 slots; so does it with
    a KV window of 16 of the 64 positions (the decode-attention grid planned over 16 keys)."""
    from flax import nnx

    from qwen3_jax import Qwen3MoeConfig, random_model
    from qwen3_jax import model as model_mod
    from reference import TINY, with_distinct_norms

    monkeypatch.setattr(model_mod, "DECODE_UNROLL", 1)
    da = sys.modules["qwen3_jax.kernels.decode_attention"]
    windows, kernel = [], da.decode_attention

    def recording(*args, **kw):   # the grid's key window of each decode-attention call traced
        windows.append(kw["window"])
        return kernel(*args, **kw)
    monkeypatch.setattr(da, "decode_attention", recording)
    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2, head_dim=32,
                                        num_experts=16))
    m = with_distinct_norms(random_model(cfg, seed=8))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (3, 5)), jnp.int32)
    slots = jnp.asarray([2, 0], jnp.int32)

    def run(st, tok):
        model = nnx.merge(m.graphdef, st)
        _, cache = model(tok, None, m.init_cache(3, 64))
        pos = jnp.full((3, 1), 5, jnp.int32)
        full, full_cache = model(tok[:, -1:], pos, cache)
        part, part_cache = model(tok[slots, -1:], pos[slots], cache, slots)
        windowed, _ = model(tok[slots, -1:], pos[slots], cache, slots, kv_window=16)
        return full, full_cache, part, part_cache, windowed
    with kernels.kernels_enabled(True):
        fn = jax.jit(run)
        text = str(jax.make_jaxpr(fn)(m.state, tokens))
        assert "qwen3_decode_attention" in text and "qwen3_qk_norm_rope_kv" in text
        full, full_cache, part, part_cache, windowed = fn(m.state, tokens)
    assert set(windows) == {64, 16}   # the whole cache, and the kv_window reaching the kernel
    assert rel(part, np.asarray(full, np.float32)[np.asarray(slots)]) < TOL_BF16_MODEL
    assert rel(windowed, np.asarray(full, np.float32)[np.asarray(slots)]) < TOL_BF16_MODEL
    for a, b in zip(jax.tree.leaves(part_cache), jax.tree.leaves(full_cache)):   # the same writes, slots 0 and 2
        for sl in (0, 2):
            np.testing.assert_array_equal(np.asarray(a[:, sl], np.float32), np.asarray(b[:, sl], np.float32))


def test_fp8_decode_of_many_rows_writes_the_cache_in_the_prologue(fp8_w8a16):
    """FP8, 18 rows (above the gemv's 16): q/k/v come from the FP8 matmul as separate partials,
    and still go through the cache-writing prologue. Kernels (W8A16) on vs off, to bf16 precision."""
    import dataclasses

    from qwen3_jax import Qwen3MoeConfig, random_model
    from qwen3_jax.config import Fp8Config
    from reference import TINY, prefill_then_decode, with_distinct_norms

    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2, head_dim=32,
                                        num_experts=16))
    m = with_distinct_norms(random_model(dataclasses.replace(cfg, fp8=Fp8Config()), seed=8))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (18, 4)), jnp.int32)
    outs = []
    for on in (False, True):
        fn = prefill_then_decode(m, tokens, 16)   # decode attention tiles the cache by 16
        with kernels.kernels_enabled(on):
            jaxpr = str(jax.make_jaxpr(fn)(m.state, tokens))
            outs.append([np.asarray(a) for a in jax.jit(fn)(m.state, tokens)])
    assert "qwen3_qk_norm_rope_kv" in jaxpr and "qwen3_grouped_matmul_fp8" in jaxpr
    for a, b in zip(outs[1], outs[0]):
        assert rel(a, b) < TOL_BF16_MODEL


def _primitives_outside_kernels(jaxpr):
    """Counter of primitive names in a jaxpr and its sub-jaxprs (loops, jits), not looking
    inside pallas_call kernels: what XLA, not Pallas, will run."""
    import collections

    return collections.Counter(eqn.primitive.name for eqn in equations(jaxpr, into_kernels=False))


@pytest.mark.parametrize("mesh", ["tp=2", "ep=2"])
def test_on_a_mesh_unrolled_decode_layers_equal_the_layer_loop(mesh, monkeypatch):
    """On a mesh with the kernels on (every weight read in place per device) the decode step's
    layer loop unrolls as on one device: DECODE_UNROLL 2 traces a scan of 2-layer iterations
    and gives the DECODE_UNROLL 1 step's logits and cache."""
    from flax import nnx

    from qwen3_jax import Qwen3MoeConfig, random_model
    from qwen3_jax import model as model_mod
    from reference import TINY, with_distinct_norms

    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", head_dim=32, num_experts=16))
    m = with_distinct_norms(random_model(cfg, mesh=mesh, seed=6))
    cache = m.init_cache(2, 16)
    tok, pos = jnp.asarray([[3], [7]], jnp.int32), jnp.asarray([[4], [9]], jnp.int32)
    outs = []
    with kernels.kernels_enabled(True):
        for unroll in (1, 2):
            monkeypatch.setattr(model_mod, "DECODE_UNROLL", unroll)
            step = jax.jit(lambda st, t, c: nnx.merge(m.graphdef, st)(t, pos, c))   # a new trace each time
            assert ("unroll=2" in str(jax.make_jaxpr(step)(m.state, tok, cache))) == (unroll == 2)
            logits, new = step(m.state, tok, cache)
            outs.append([np.asarray(logits, np.float32)] + [np.asarray(a, np.float32) for a in new.k])
    for a, b in zip(*outs):   # the same kernels on the same slices: the same bits (measured: 0 difference)
        np.testing.assert_array_equal(b, a)


def test_unrolled_decode_layers_equal_the_layer_loop(monkeypatch):
    """Kernels on (interpret mode), 3 layers, every gemv x-load fusion on: model.DECODE_UNROLL 1
    (a while loop, traced layer index), 2 (a loop of 2-layer iterations and a remainder) and 3
    (no loop, constant indices) give the same decode step."""
    from flax import nnx

    from qwen3_jax import Qwen3MoeConfig, random_model
    from qwen3_jax import model as model_mod
    from reference import TINY, with_distinct_norms

    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", head_dim=32, num_experts=16))
    m = with_distinct_norms(random_model(cfg, seed=6))
    cache = m.init_cache(2, 16)
    monkeypatch.setattr(kernels, "X_LOADS", set(kernels.X_LOADS_ALL))   # every x-load fusion
    tok, pos = jnp.asarray([[3], [7]], jnp.int32), jnp.asarray([[4], [9]], jnp.int32)
    outs, scans = [], []
    with kernels.kernels_enabled(True):
        for unroll in (1, 2, 3):
            monkeypatch.setattr(model_mod, "DECODE_UNROLL", unroll)
            step = jax.jit(lambda st, t, c: nnx.merge(m.graphdef, st)(t, pos, c))   # a new trace each time
            closed = jax.make_jaxpr(step)(m.state, tok, cache)
            jaxpr = str(closed)
            assert "qwen3_qk_norm_rope_kv" in jaxpr and ("unroll=2" in jaxpr) == (unroll == 2)
            # Between the kernels no XLA norm or swiglu is left: the RMSNorms and the swiglu run
            # in the gemvs' x loads (gemv_inputs); only the final norm before the LM head has its
            # rsqrt in XLA. (The attention split combine's exp stays in XLA: runs 16 and 24.)
            outside = _primitives_outside_kernels(closed.jaxpr)
            assert (outside["rsqrt"], outside["logistic"]) == (1, 0), outside
            scans.append(jaxpr.count("scan["))   # the kernels' own loops are scans too
            logits, new = step(m.state, tok, cache)
            outs.append([np.asarray(logits, np.float32)] + [np.asarray(a, np.float32) for a in new.k])
    assert scans[0] == scans[1] == scans[2] + 1   # 3 layers per iteration: no layer loop left
    # XLA fuses the bf16 glue between kernels differently across unrolled layers (excess
    # precision kept between fused ops), so agreement is to bf16 rounding, not bitwise
    for got in outs[1:]:
        for a, b in zip(got, outs[0]):
            assert rel(a, b) < 1e-2, rel(a, b)   # measured: 0 (2 per iteration), 0.006-0.008 (no loop)


@pytest.fixture(scope="module")
def per_device_case():
    """The FP8 model of test_kernels_run_per_device_on_a_mesh on one device, once for both meshes:
    (config, tokens, its plain-XLA prefill + decode outputs, the model)."""
    from qwen3_jax import Qwen3MoeConfig, random_model
    from qwen3_jax.config import Fp8Config
    from reference import TINY, prefill_then_decode, with_distinct_norms

    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2,
                                        moe_intermediate_size=64))
    cfg = dataclasses.replace(cfg, fp8=Fp8Config())
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 5)), jnp.int32)
    one = with_distinct_norms(random_model(cfg, seed=2))
    with kernels.kernels_enabled(False):
        ref = [np.asarray(a) for a in jax.jit(prefill_then_decode(one, tokens, 16))(one.state, tokens)]
    return cfg, tokens, ref, one


# ep=2: data-parallel attention (local rows) + experts split; tp=8: heads split, and local
# shapes below the smallest tiles (the XLA fallback on the local slice). The GPU test
# (tests/test_multi_gpu.py) covers every mesh of the issue.
@pytest.mark.parametrize("mesh", ["ep=2", "tp=8"])
def test_kernels_run_per_device_on_a_mesh(mesh, per_device_case, fp8_w8a16):
    """On a mesh the kernels run inside shard_map on each device's shards (kernels/sharded.py):
    projections on local heads, the MoE on local experts and F columns, decode attention on
    local heads and rows. Same numbers as one device, to bf16 precision. At tp=8 each device
    holds 8 of F=64 expert columns and one head, below the smallest tiles: those calls fall back
    to XLA on the local slice, still with the same numbers."""
    from qwen3_jax import random_model
    from reference import prefill_then_decode, with_distinct_norms

    cfg, tokens, ref, one = per_device_case
    sharded = with_distinct_norms(random_model(cfg, mesh=mesh, seed=2))
    with kernels.kernels_enabled(True):   # both counts under this test's settings (W8A16: no x quantize)
        calls = {"one": str(jax.make_jaxpr(prefill_then_decode(one, tokens, 16))(one.state, tokens)).count("pallas_call"),
                 "mesh": str(jax.make_jaxpr(prefill_then_decode(sharded, tokens, 16))(sharded.state, tokens)).count("pallas_call")}
        out = [np.asarray(a) for a in jax.jit(prefill_then_decode(sharded, tokens, 16))(sharded.state, tokens)]
    # Every kernel call of one device is there on the mesh (the scan body holds one of each).
    assert calls["one"] >= 7
    assert calls["mesh"] < calls["one"] if mesh == "tp=8" else calls["mesh"] == calls["one"], calls
    for a, b in zip(out, ref):
        assert rel(a, b) < TOL_BF16_MODEL


def test_on_an_ep_mesh_row_blocks_follow_the_mean_over_all_experts(monkeypatch):
    """The model on ep=2 (4 of TINY's 8 experts a device): a 128-token prefill at top-2 gives each
    expert 32 rows on average, and each device's MoE sizes its row blocks from that mean (what one
    device would), not from 256 assignments over its own 4 experts (64)."""
    from qwen3_jax import Qwen3MoeConfig, random_model
    from qwen3_jax.kernels import moe_ffn as moe_mod
    from reference import TINY, prefill_then_decode

    means = []
    real = moe_mod.block_rows
    monkeypatch.setattr(moe_mod, "block_rows", lambda mean: means.append(mean) or real(mean))
    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2))
    sharded = random_model(cfg, mesh="ep=2", seed=2)
    tokens = jnp.zeros((1, 128), jnp.int32)
    with kernels.kernels_enabled(True):
        jax.make_jaxpr(prefill_then_decode(sharded, tokens, 160))(sharded.state, tokens)
    assert means and set(means) == {128 * 2 // 8}


@pytest.mark.parametrize("mesh,batch", [("ep=2", 4), ("tp=2,ep=4", 4), ("ep=2", 1)])
def test_on_a_mesh_each_device_routes_the_gathered_tokens(mesh, batch, monkeypatch):
    """moe.GatheredRouting: on a mesh the MoE's shard_map gathers only x and every device routes
    its data group's tokens with the routing kernels (16 experts: covered), where routing first
    gathered x, the routing weights and the experts (3 all-gathers). Same numbers as one device to
    bf16 precision, and the same as routing first: the routing arithmetic is the kernels' on both.
    Batch 1 on ep=2 does not split over the 2 data groups, so its rows are whole on each device:
    nothing is gathered or scattered, one psum sums the experts (moe._moe_ffn_whole). In the
    decode step x crosses devices raw and the post-attention norm runs in the router's and the
    gate/up gemv's x loads (GatheredRouting's view), as on one device."""
    from qwen3_jax import model as model_mod
    from qwen3_jax import random_model
    from qwen3_jax.config import load_preset
    from qwen3_jax.kernels import gemv as gemv_mod
    from qwen3_jax.kernels.gemv_inputs import RmsNormX
    from reference import prefill_then_decode, with_distinct_norms

    norm_loads = []   # per traced gemv launch: does its x load apply a norm?
    traced = gemv_mod._gemv

    def spy(x, *a, **kw):
        norm_loads.append(isinstance(x, RmsNormX))
        return traced(x, *a, **kw)

    monkeypatch.setattr(gemv_mod, "_gemv", spy)
    monkeypatch.setattr(model_mod, "DECODE_UNROLL", 1)   # one traced layer body

    cfg = dataclasses.replace(load_preset("Qwen3-30B-A3B"), num_hidden_layers=2, hidden_size=256,
                              num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=16,
                              moe_intermediate_size=128, intermediate_size=512, vocab_size=512)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (batch, 6)), jnp.int32)
    outs, jaxprs = [], []
    with kernels.kernels_enabled(True):
        for m in (random_model(cfg, seed=3), random_model(cfg, mesh=mesh, seed=3)):
            m = with_distinct_norms(m)
            fn = prefill_then_decode(m, tokens, 16)
            norm_loads.clear()
            jaxprs.append(str(jax.make_jaxpr(fn)(m.state, tokens)))
            outs.append([np.asarray(a, np.float64) for a in jax.jit(fn)(m.state, tokens)])
    assert "qwen3_router_topk" in jaxprs[1]
    assert sum(norm_loads) == 2, norm_loads   # the mesh's decode: the router and gate/up gemvs
    # one MoE shard_map in prefill, one in decode: x in each, and decode's live-row mask at batch 4
    # (the engine's idle slots); routing first gathered weights and experts too (6)
    gathers, scatters = jaxprs[1].count("= all_gather["), jaxprs[1].count("= reduce_scatter[")
    assert (gathers, scatters) == ((3, 2) if batch > 1 else (0, 0)), (gathers, scatters)
    for a, b in zip(*outs):
        assert rel(b, a) < TOL_BF16_MODEL


# -- CPU: Triton lowering of the real shapes (no GPU needed, nothing allocated) ------------------

def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _abstract_model_step_args(preset: str, mesh: str, slots: int, length: int):
    """A 2-layer `preset` on `mesh` as abstract arrays (nothing allocated) -> (graphdef, params,
    KV cache of `slots` x `length`), with the loader's shardings, as sharding.workspace compiles
    the server's steps."""
    from flax import nnx

    from qwen3_jax.api import abstract_model, build_context, state_shardings
    from qwen3_jax.config import load_preset
    from qwen3_jax.model import KVCache, cache_shapes

    cfg = dataclasses.replace(load_preset(preset), num_hidden_layers=2)
    _, ctx, kv_rep = build_context(cfg, mesh, None)
    graphdef, abstract = nnx.split(abstract_model(cfg, jnp.bfloat16, kv_rep, ctx))
    if ctx is None:   # one card
        state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), abstract)
    else:
        state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                             abstract, state_shardings(abstract, ctx))
    cache = KVCache(*[[jax.ShapeDtypeStruct(kv, jnp.bfloat16, sharding=ctx and ctx.sharding(KVCache.AXES, kv))
                       for kv in shapes] for shapes in zip(*cache_shapes(cfg, slots, length, kv_rep))])
    return graphdef, state, cache


@pytest.mark.parametrize("preset,mesh,batch", [("Qwen3-30B-A3B-FP8", "tp=2", 1), ("Qwen3-30B-A3B", "ep=2", 8),
                                                ("Qwen3-30B-A3B-FP8", "ep=2", 64), ("Qwen3-30B-A3B-FP8", "tp=1", 64)])
def test_mesh_decode_step_lowers_to_triton_at_30b_shapes(preset, mesh, batch, monkeypatch, cuda_lowering):
    """The whole decode step on a mesh, lowered for CUDA with 30B-A3B's per-device shapes (abstract
    arrays, nothing allocated): every kernel of the one-card layer is there per device (attention
    with its prologue, the gemvs, the routing kernels; at 64 rows of FP8 the W8A8 matmuls and
    their x quantize) and no expert matmul fell back to XLA; tp=1 is one card's step."""
    from serve.bench import make_decode

    graphdef, state, cache = _abstract_model_step_args(preset, mesh, batch, 1024)
    ids = jax.ShapeDtypeStruct((batch,), jnp.int32)
    with kernels.kernels_enabled(True):
        text = make_decode(graphdef, 2).trace(state, ids, ids, cache).lower(lowering_platforms=("cuda",)).as_text()
    gemv = "qwen3_gemv_dot_fp8" if "FP8" in preset else "qwen3_gemv_dot"
    names = ("qwen3_decode_attention_rope", "qwen3_router_topk") + (
        (gemv,) if batch <= 8 else ("qwen3_grouped_matmul_w8a8", "qwen3_quantize_x", "qwen3_route_blocks"))
    for name in names:
        assert name in text, name
    assert "__gpu$xla.gpu.triton" in text and "ragged_dot" not in text


@pytest.mark.parametrize("mesh", ["tp=1", "ep=2"])
def test_prefill_with_routing_kernels_at_every_size_lowers_to_triton(mesh, monkeypatch, cuda_lowering):
    """BLOCK_ROUTING "kernel-scan": a 2048-token prefill chunk of 30B-A3B-FP8 (16384 assignments,
    past route_blocks' in-kernel walk) on one card and on ep=2, lowered for CUDA (abstract arrays):
    the routing kernels and the gathered W8A8 matmuls, no argsort; with "kernel" (the default)
    the same chunk routes in XLA."""
    from qwen3_jax.kernels import moe_ffn as moe_mod
    from serve.bench import make_prefill

    graphdef, state, cache = _abstract_model_step_args("Qwen3-30B-A3B-FP8", mesh, 1, 2048)
    ids = jax.ShapeDtypeStruct((1, 2048), jnp.int32)
    text = {}
    for routing in ("kernel", "kernel-scan"):
        monkeypatch.setattr(moe_mod, "BLOCK_ROUTING", routing)
        with kernels.kernels_enabled(True):
            text[routing] = make_prefill(graphdef).trace(state, ids, cache).lower(
                lowering_platforms=("cuda",)).as_text()
    scan = text["kernel-scan"]
    assert "qwen3_route_histogram" in scan and "qwen3_route_blocks" in scan and "qwen3_grouped_matmul_w8a8" in scan
    assert "qwen3_route_blocks" not in text["kernel"] and "qwen3_grouped_matmul_w8a8" in text["kernel"]
    assert "stablehlo.sort" in text["kernel"] and "stablehlo.sort" not in scan


@pytest.mark.parametrize("fp8", [False, True])
def test_kernels_lower_to_triton_for_30b_shapes(fp8):
    from qwen3_jax.kernels.grouped_matmul import matmul_tiles
    from qwen3_jax.kernels.gemv import gemv_tiles

    e, d, f = 48 * 128, 2048, 768
    wd = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
    gate, down = _sds((e, d, f), wd), _sds((e, f, d), wd)
    gs, ds = (_sds((e, d // 128, f), jnp.float32), _sds((e, f, d // 128), jnp.float32)) if fp8 else (None, None)
    x, rows = _sds((8, d), jnp.bfloat16), _sds((8,), jnp.int32)

    def decode(x, rows, gate, down, gs, ds):   # x RMSNorm'd and the swiglu done in the x loads
        from qwen3_jax.kernels.gemv_inputs import RmsNormX, SwigluX
        t1, t2 = gemv_tiles(d, f, 8, fp8, "k", 128), gemv_tiles(f, d, 8, fp8, "n", 128)
        xn = RmsNormX(x, jnp.ones((48, d), jnp.bfloat16), rows[0], 1e-6)
        g, u = gemv(xn, rows, rows, (gate, gate), (gs, gs) if fp8 else None, layout="k", interpret=False, **t1)
        return gemv(SwigluX(g, u), rows, rows, (down,), (ds,) if fp8 else None, layout="n", interpret=False, **t2)

    def prefill(xr, groups, gate, down, gs, ds):   # FP8 W8A16 here; W8A8: the test after this one
        t1, t2 = matmul_tiles(d, f, 128, fp8, "k", 128, convert="f16"), matmul_tiles(f, d, 128, fp8, "n", 128, convert="f16")
        h = grouped_matmul(xr, groups, (gate, gate), (gs, gs) if fp8 else None, bm=128, layout="k",
                           interpret=False, **t1)
        return grouped_matmul(h, groups, (down,), (ds,) if fp8 else None, bm=128, layout="n",
                              interpret=False, **t2)

    for fn, args in ((decode, (x, rows)), (prefill, (_sds((4 * 128, d), jnp.bfloat16), _sds((4,), jnp.int32)))):
        text = jax.jit(fn).trace(*args, gate, down, gs, ds).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == 2


def test_w8a8_and_side_by_side_gemv_lower_to_triton_for_30b_shapes():
    from qwen3_jax.kernels.gemv import gemv_tiles

    d, f, e8 = 2048, 768, jnp.float8_e4m3fn
    x, rows = _sds((1, d), jnp.bfloat16), _sds((1,), jnp.int32)
    qkv = [(_sds((48, d, n), e8), _sds((48, d // 128, n), jnp.float32)) for n in (4096, 512, 512)]
    down = (_sds((48 * 128, f, d), e8), _sds((48 * 128, f, d // 128), jnp.float32))

    def fn(x, rows, qkv, down):
        t = gemv_tiles(d, (4096, 512, 512), 1, True, "k", 128, convert="e4m3")
        outs = gemv(x, rows, rows, [w for w, _ in qkv], [s for _, s in qkv], layout="k", concat=True,
                    interpret=False, **t)
        t2 = gemv_tiles(f, d, 1, True, "n", 128, convert="e4m3")
        h = outs[0].sum(0)[:, :f].astype(jnp.bfloat16)
        return gemv(h, rows, rows, (down[0],), (down[1],), layout="n", interpret=False, **t2)
    text = jax.jit(fn).trace(x, rows, qkv, down).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2


@pytest.mark.parametrize("w_lhs", [False, True])
def test_w8a8_grouped_matmul_lowers_to_triton_for_30b_shapes(w_lhs):
    """The prefill MoE's W8A8 pair (quantized output) and down on [E, out, in] experts."""
    from qwen3_jax.kernels.grouped_matmul import matmul_tiles

    e, d, f, e8, bm = 48 * 128, 2048, 768, jnp.float8_e4m3fn, 128
    gate, gs = _sds((e, f, d), e8), _sds((e, d // 128, f), jnp.float32)
    down, ds = _sds((e, d, f), e8), _sds((e, f, d // 128), jnp.float32)

    def prefill(xq, sx, groups, gate, gs, down, ds):
        t1 = matmul_tiles(d, f, bm, True, "k", 128, w_nk=True, convert="e4m3", w_lhs=w_lhs)
        t2 = matmul_tiles(f, d, bm, True, "n", 128, w_nk=True, convert="e4m3", w_lhs=w_lhs)
        hq, hs = grouped_matmul(xq, groups, (gate, gate), (gs, gs), bm=bm, layout="k", x_scales=sx, w_nk=True,
                                quantize_out=True, interpret=False, **t1)
        return grouped_matmul(hq, groups, (down,), (ds,), bm=bm, layout="n", x_scales=hs, w_nk=True,
                              interpret=False, **t2)
    args = (_sds((4 * bm, d), e8), _sds((4 * bm, d // 128), jnp.float32), _sds((4,), jnp.int32))
    text = jax.jit(prefill).trace(*args, gate, gs, down, ds).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2


@pytest.mark.parametrize("n", [64, 256])
def test_decode_moe_blocks_lower_to_five_triton_calls_at_30b_shapes(n, monkeypatch, cuda_lowering):
    """A decode batch's MoE on the blocks path (FP8 experts stored [L*E, out, in], W8A8): x's
    quantize, the two routing kernels and the two grouped matmuls, x gathered inside the first;
    no XLA sort and no gather of x's rows."""
    from qwen3_jax.kernels.moe_ffn import moe_ffn_in_place

    l, e, d, f, e8 = 48, 128, 2048, 768, jnp.float8_e4m3fn
    gate, gs = _sds((l, e, f, d), e8), _sds((l, e, d // 128, f), jnp.float32)
    down, ds = _sds((l, e, d, f), e8), _sds((l, e, f, d // 128), jnp.float32)

    def decode(x, w, ex, gate, gs, down, ds):
        return moe_ffn_in_place(x, w, ex, gate, gate, down, (gs, gs, ds), 128, jnp.int32(5), w_nk=True)
    args = (_sds((n, d), jnp.bfloat16), _sds((n, 8), jnp.float32), _sds((n, 8), jnp.int32))
    text = jax.jit(decode).trace(*args, gate, gs, down, ds).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 5 and "qwen3_route_blocks" in text and "qwen3_quantize_x" in text
    assert "stablehlo.sort" not in text and text.count('"stablehlo.gather"') <= 1   # y's rows, gathered back


@pytest.mark.parametrize("accumulate", ["mma", "f32"])
def test_fp8_dots_lower_with_the_mma_accumulating_each_dot(accumulate, monkeypatch, capfd):
    """fp8_dot: an e4m3 x e4m3 dot reaches Triton with maxNumImpreciseAcc unlimited (its default
    0 makes Hopper wait for and add every 32-deep wgmma into float32); bf16 dots and the "f32"
    setting lower as Pallas does."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
    from qwen3_jax.kernels import fp8_dot

    monkeypatch.setattr(fp8_dot, "ACCUMULATE", accumulate)
    assert fp8_dot.install()   # already installed by the package: a no-op that says so

    def kernel(x_ref, w_ref, o_ref):
        o_ref[...] = jax.lax.dot_general(x_ref[...], w_ref[...], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
    lines = {}
    for dt in (jnp.float8_e4m3fn, jnp.bfloat16):
        call = pl.pallas_call(kernel, out_shape=_sds((64, 64), jnp.float32), debug=True,   # prints the Triton IR
                              compiler_params=plt.CompilerParams(num_warps=4, num_stages=1))
        jax.jit(call).trace(_sds((64, 128), dt), _sds((64, 128), dt)).lower(lowering_platforms=("cuda",))
        lines[dt] = [ln for ln in capfd.readouterr().out.splitlines() if "tt.dot" in ln]
    assert len(lines[jnp.float8_e4m3fn]) == len(lines[jnp.bfloat16]) == 1
    assert ("maxNumImpreciseAcc = 1073741824" in lines[jnp.float8_e4m3fn][0]) == (accumulate == "mma")
    assert "maxNumImpreciseAcc" not in lines[jnp.bfloat16][0]


def test_decode_attention_lowers_to_triton_for_30b_cache():
    from qwen3_jax.kernels.decode_attention import decode_attention, plan

    bs, splits = plan(4, 4, 1024)
    assert (bs, splits) == (64, 16)
    cache = _sds((48, 4, 1024, 4, 128), jnp.bfloat16)

    def fn(q, kc, vc, rows, lengths):
        return decode_attention(q, kc, vc, jnp.int32(3), rows, lengths, scale=128 ** -0.5, bs=bs, splits=splits,
                                interpret=False)
    text = jax.jit(fn).trace(_sds((4, 32, 128), jnp.bfloat16), cache, cache, _sds((4,), jnp.int32),
                             _sds((4,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


# -- GPU: compiled kernels against the plain-XLA path -------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, "w8a16", "w8a8", "w8a16-nk", "w8a16-nk-lhs", "w8a8-nk-lhs"])
@pytest.mark.parametrize("n", [1, 8, 64, 512])
def test_gpu_moe_ffn_matches_xla_at_30b_layer_shapes(fp8, n, monkeypatch):
    """w8a16 / w8a8: the FP8 GEMVs and grouped matmuls with bf16 / e4m3 activations (w8a8-nk-lhs
    is the model's default form); -nk: experts stored [E, out, in]; -lhs: the grouped matmul (n >=
    64) with the weight as the MMA's left operand. W8A8 on checkpoint-block scales, to its bound."""
    from qwen3_jax.kernels import grouped_matmul as gm_mod

    rng = np.random.default_rng(n)
    kind, nk, lhs = (fp8 or "").split("-")[0], "-nk" in (fp8 or ""), (fp8 or "").endswith("-lhs")
    x, weights, experts, arrays, want = _moe_case(rng, bool(fp8), n=n, e=32, d=2048, f=768, k=8, block=128, nk=nk,
                                                  checkpoint_blocks=True)
    for size, cfg in gm_mod.MATMUL_DEFAULTS.items():
        monkeypatch.setitem(gm_mod.MATMUL_DEFAULTS, size, dict(cfg, convert="f16" if kind == "w8a16" else "e4m3",
                                                               fp8_nk=dict(cfg["fp8_nk"], w_lhs=lhs)))
    before = kernels.fp8_gemm()
    if fp8:
        kernels.set_fp8_gemm(kind)
    try:
        got = moe_ffn(x, weights, experts, arrays)
    finally:
        if before in kernels.FP8_GEMM:
            kernels.set_fp8_gemm(before)
    # w8a8: e4m3 activations, ~3% per product on random data
    assert rel(got, want) < (6e-2 if kind == "w8a8" else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [64, 256, 1024])
def test_gpu_block_routing_kernel_matches_xla_routing_at_30b_shapes(n, monkeypatch):
    """The blocks path with route_blocks (x gathered in the kernel, real rows written only)
    against the XLA routing, FP8 experts [E, out, in] (the model's form), W8A8: decode batches,
    and a 1024-token chunk (8192 assignments, bm 64) where "kernel" is XLA's routing and
    "kernel-scan" the kernels with XLA summing the histogram, with x gathered in the kernel either
    way."""
    from qwen3_jax.kernels import moe_ffn as moe_mod

    rng = np.random.default_rng(n + 1)
    x, weights, experts, arrays, want = _moe_case(rng, True, n=n, e=128, d=2048, f=768, k=8, block=128, nk=True,
                                                  checkpoint_blocks=True)
    experts = experts.at[3].set(-1)   # a padding row: routed nowhere
    out = {}
    for routing in moe_mod.BLOCK_ROUTINGS:
        monkeypatch.setattr(moe_mod, "BLOCK_ROUTING", routing)
        out[routing] = np.asarray(moe_ffn(x, weights, experts, arrays, strategy="blocks"))
    assert np.isfinite(out["kernel"]).all() and not out["kernel"][3].any()
    assert rel(out["kernel"], out["xla"]) < 1e-6 and rel(out["kernel-scan"], out["xla"]) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["k", "n"])
def test_gpu_w8a8_gemv_matches_its_emulation_at_30b_shapes(layout):
    from qwen3_jax.kernels.gemv import gemv_tiles

    rng = np.random.default_rng(31)
    k_dim, n_dim = (2048, 768) if layout == "k" else (768, 2048)
    w8, scale = fp8_weights(rng, (4, k_dim, n_dim), 1 if layout == "k" else 2)
    x = jnp.asarray(rng.standard_normal((8, k_dim)), jnp.bfloat16)
    rows, groups = jnp.arange(8), jnp.array([0, 3, 1, 2, 2, -1, 0, 1])
    t = gemv_tiles(k_dim, n_dim, 8, True, layout, 128, convert="e4m3")
    (y,) = gemv(x, rows, groups, (w8,), (scale,), layout=layout, block=128, **t)
    # the GPU's float32 division may differ from XLA's by an ulp, flipping a rare e4m3 rounding
    assert rel(y.sum(0), w8a8_reference(x, rows, groups, w8, scale, layout, 128, t["bk"])) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True, "nk"])
def test_gpu_qkv_in_one_launch_matches_three(fp8):
    rng = np.random.default_rng(37)
    x = jnp.asarray(rng.standard_normal((1, 1, 2048)), jnp.bfloat16)
    nk = fp8 == "nk"
    specs = []
    for shape in ((3, 2048, 32, 128), (3, 2048, 4, 128), (3, 2048, 4, 128)):
        w, s = fp8_weights(rng, shape, 1) if fp8 else (jnp.asarray(rng.standard_normal(shape) * 0.02, jnp.bfloat16), None)
        specs.append(("btd,dhq->bthq", x, jnp.moveaxis(w, 1, 3) if nk else w, s, 0))
    parts = projections_partials(specs, 128, jnp.int32(2), w_nk=nk)
    assert parts is not None
    for p, spec in zip(parts, specs):
        one = linear_einsum(*spec, 128, layer=jnp.int32(2), partials=True, w_nk=nk)
        assert rel(p.sum(0), one.sum(0)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("kind,layout", [("bf16", "k"), ("w8a16", "k"), ("w8a16", "n"), ("w8a8", "k")])
def test_gpu_gemv_reads_weights_stored_n_by_k_at_30b_shapes(kind, layout):
    """Compiled: the [G, N, K] storage with its own tiles equals the default gemv (MoE gate/up
    and down shapes at batch 1)."""
    from qwen3_jax.kernels.gemv import gemv_tiles

    rng = np.random.default_rng(3)
    k_dim, n_dim = (2048, 768) if layout == "k" else (768, 2048)
    x = jnp.asarray(rng.standard_normal((1, k_dim)), jnp.bfloat16)
    groups = jnp.asarray(rng.permutation(32)[:8], jnp.int32)
    fp8 = kind != "bf16"
    if fp8:
        w, scale = fp8_weights(rng, (32, k_dim, n_dim), 1 if layout == "k" else 2)
        ss, conv = (scale,), dict(convert="f16" if kind == "w8a16" else "e4m3")
    else:
        w, ss, conv = jnp.asarray(rng.standard_normal((32, k_dim, n_dim)), jnp.bfloat16), None, {}
    t = gemv_tiles(k_dim, n_dim, 8, fp8, layout, 128, **conv)
    (want,) = gemv(x, 8, groups, (w,), ss, row_div=8, layout=layout, **t)
    # GEMV_NK_DEFAULTS, as the model; w8a8 keeps bk, the width of its activation quantization groups
    t_nk = gemv_tiles(k_dim, n_dim, 8, fp8, layout, 128, w_nk=True, **conv, **({"bk": t["bk"]} if kind == "w8a8" else {}))
    (got,) = gemv(x, 8, groups, (jnp.swapaxes(w, 1, 2),), ss, row_div=8, layout=layout, **t_nk)
    assert rel(got.sum(0), want.sum(0)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("convert", ["cast", "f16", "e4m3", "e4m3-nk", "e4m3-nk-lhs"])
def test_gpu_fp8_prefill_moe_and_projection_through_either_mma(convert, monkeypatch):
    """Compiled, prefill-sized (512 tokens): the blocks-path MoE and an FP8 projection with the
    FP8 matmul converting to x's dtype or to f16, or W8A8 (e4m3 x; experts also stored [E, out,
    in], with the weight on either side), match XLA's dequantized reference (W8A8 to its bound).
    The projection's scales are a checkpoint's blocks expanded and claimed to run, as the model
    passes them: W8A8's N tile reads one weight scale a run (linear_einsum's scale_run)."""
    from qwen3_jax.kernels import grouped_matmul as gm_mod

    nk, lhs = "-nk" in convert, convert.endswith("-lhs")
    convert = convert.split("-")[0]
    for size in ("small", "large"):
        cfg = dict(gm_mod.MATMUL_DEFAULTS[size], convert=convert)
        monkeypatch.setitem(gm_mod.MATMUL_DEFAULTS, size, dict(cfg, fp8_nk=dict(cfg["fp8_nk"], w_lhs=lhs)))
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MIN_ROWS", 0)   # the FP8 kernels, not the bf16 copies
    monkeypatch.setattr(kernels, "FP8_DEQUANTIZE_MOE_MIN_ROWS", 0)
    rng = np.random.default_rng(5)
    a8 = convert == "e4m3"
    x, weights, experts, arrays, want = _moe_case(rng, True, n=512, e=32, d=2048, f=768, k=8, block=128, nk=nk,
                                                  checkpoint_blocks=True)
    err = rel(moe_ffn(x, weights, experts, arrays, strategy="blocks"), want)
    assert (1e-3 < err < 6e-2) if a8 else err < 1e-2
    wq, sq = fp8_weights(rng, (3, 2048, 32, 128), 1, checkpoint_blocks=True)
    xq = jnp.asarray(rng.standard_normal((1, 512, 2048)), jnp.bfloat16)
    q = linear_einsum("btd,dhq->bthq", xq, wq, sq, 0, 128, layer=jnp.int32(2), scale_run=128)
    ref = jnp.einsum("btd,dhq->bthq", xq.astype(jnp.float32), dequantize(wq[2], sq[2], 0, 128, jnp.float32))
    assert rel(q, ref) < (6e-2 if a8 else 5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 48, 300])   # the gemv; split-K projections in 64- and 128-row blocks
def test_gpu_fp8_einsum_matches_dequantized_einsum(m, fp8_w8a16):
    """q and o projections at 30B shapes, in the einsum order and stored [out, in] (w_nk, the
    model's), W8A16 to bf16 precision (W8A8: test_gpu_fp8_prefill_moe_and_projection...)."""
    rng = np.random.default_rng(m)
    wq, sq = fp8_weights(rng, (3, 2048, 32, 128), 1)
    x = jnp.asarray(rng.standard_normal((1, m, 2048)), jnp.bfloat16)
    q = linear_einsum("btd,dhq->bthq", x, wq, sq, 0, 128, layer=jnp.int32(2))
    want = jnp.einsum("btd,dhq->bthq", x.astype(jnp.float32), dequantize(wq[2], sq[2], 0, 128, jnp.float32))
    assert rel(q, want) < 5e-3
    q_nk = linear_einsum("btd,dhq->bthq", x, jnp.moveaxis(wq, 1, 3), sq, 0, 128, layer=jnp.int32(2), w_nk=True)
    assert rel(q_nk, want) < 5e-3
    wo, so = fp8_weights(rng, (3, 32, 128, 2048), 3)
    o_nk = linear_einsum("bthq,hqd->btd", q, jnp.moveaxis(wo, 3, 1), so, 2, 128, layer=jnp.int32(1), w_nk=True)
    want = jnp.einsum("bthq,hqd->btd", q.astype(jnp.float32), dequantize(wo[1], so[1], 2, 128, jnp.float32))
    assert rel(o_nk, want) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 5])
def test_gpu_prefill_attention_matches_xla_from_zero_and_falls_back_otherwise(offset):
    from flax import nnx

    from qwen3_jax.model import Attention
    from qwen3_jax import Qwen3MoeConfig
    from reference import TINY

    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", hidden_size=256, num_attention_heads=8,
                                        num_key_value_heads=2, head_dim=64))
    attn = Attention(cfg, dtype=jnp.bfloat16, kv_rep=1, stack=None, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(offset)
    t, s = 96, 128
    q = jnp.asarray(rng.standard_normal((2, t, 8, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, s, 2, 64)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((2, s, 2, 64)), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + offset, (2, t))
    mask = jnp.arange(s)[None, None, :] <= pos[:, :, None]
    outs = []
    for on in (False, True):
        with kernels.kernels_enabled(on):
            f = jax.jit(lambda q, k, v, m, p: attn.attend(q, k, v, m, positions_bt=p))
            outs.append(np.asarray(f(q, k, v, mask, pos), np.float32))
    assert rel(outs[1], outs[0]) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("numerics", ["w8a16", "default"])
def test_gpu_model_with_kernels_matches_plain_xla_prefill_and_decode(numerics, request):
    """bf16 and FP8 models, kernels on against the plain-XLA path, both against float32. FP8 with
    W8A16 kernels is held to bf16 precision; with the defaults (W8A8 grouped matmuls: the 64-token
    prefill) each FP8 matmul's activations carry e4m3 rounding, so the bound adds W8A8's per-matmul
    bound (6e-2, as the kernel tests hold it)."""
    from flax import nnx

    from qwen3_jax import Qwen3MoeConfig, random_model
    from qwen3_jax.config import Fp8Config
    from reference import TINY, with_distinct_norms

    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=3, hidden_size=256,
                                        moe_intermediate_size=128, head_dim=32))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 64)), jnp.int32)
    if numerics == "w8a16":
        request.getfixturevalue("fp8_w8a16")

    def outputs(m, on):
        with kernels.kernels_enabled(on):
            def run(st, tok):
                model = nnx.merge(m.graphdef, st)
                cache = m.init_cache(2, 80)
                logits, cache = model(tok, None, cache)
                pos = jnp.full((2, 1), 64, jnp.int32)
                step, _ = model(tok[:, -1:], pos, cache)
                return logits, step
            calls = str(jax.make_jaxpr(run)(m.state, tokens)).count("pallas_call")
            assert (calls >= 7) if on else calls == 0, (on, calls)   # the kernels did run (or not)
            return [np.asarray(a, np.float64) for a in jax.jit(run)(m.state, tokens)]

    for fp8 in (False, True):
        c = dataclasses.replace(cfg, fp8=Fp8Config() if fp8 else None)
        # the same weights in float32 (bf16 draws are rounded float32 draws): the precise answer
        exact = outputs(with_distinct_norms(random_model(c, dtype="float32", seed=3)), False)
        m = with_distinct_norms(random_model(c, seed=3))
        off, on = outputs(m, False), outputs(m, True)
        # On the GPU bf16 alone moves these logits 1-2.5% (cuDNN attention, accumulation order;
        # 0.024 between kernels on and off was measured on an H200), so the kernels are held to
        # the plain-XLA bf16 path's own distance from float32, not to that path.
        w8a8 = fp8 and numerics == "default"
        for e, a, b in zip(exact, off, on):
            assert rel(b, e) < max(1.5 * rel(a, e), 5e-3) + (6e-2 if w8a8 else 0), (fp8, rel(b, e), rel(a, e))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [8, 48, 200])
def test_gpu_decode_step_with_split_k_projections_matches_narrow_tiles(batch, monkeypatch):
    """Two 30B-A3B-FP8 layers, one decode step at 8, 48 and 200 rows (8: the MoE on the GEMV, the
    projections on the matmul, the default limits since run 129): the projections split along K
    (linear.PROJECTION_MATMUL "split", "split-qkv" with q/k/v in one launch, and "narrow-qkv", the
    default, narrowed then split with q/k/v in one launch; q/k/v's partials summed by the attention
    kernel, o's by XLA) and the narrowed tiles ("narrow")
    all against the plain-XLA path: each split as close to it as narrow. Not against each other bit for bit: a float32 reassociation moves
    a bf16 rounding, and a router near a tie then picks another expert for that row (run 110: the
    two 1.1-1.4% apart over all rows)."""
    import qwen3_jax
    from flax import nnx

    from qwen3_jax.kernels import linear as linear_mod
    from serve.bench import fill_cache, resolve_bench_config

    model = qwen3_jax.random_model(resolve_bench_config("Qwen3-30B-A3B-FP8", 2), dtype="bfloat16")
    cache = fill_cache(model.init_cache(batch, 256), jax.random.key(1))
    tok = jax.random.randint(jax.random.key(2), (batch, 1), 0, model.config.vocab_size, jnp.int32)
    pos = jnp.full((batch, 1), 100, jnp.int32)
    out = {}
    for preset in ("narrow-qkv", "split-qkv", "split", "narrow", "xla"):   # a fresh function each: read while tracing
        if preset != "xla":
            monkeypatch.setattr(linear_mod, "PROJECTION_MATMUL", dict(linear_mod.PROJECTION_MATMUL_PRESETS[preset]))
        with kernels.kernels_enabled(preset != "xla"):
            logits, _ = jax.jit(lambda st, c: nnx.merge(model.graphdef, st)(tok, pos, c))(model.state, cache)
        out[preset] = np.asarray(logits, np.float64)
    for preset in ("narrow-qkv", "split-qkv", "split"):
        assert rel(out[preset], out["xla"]) < 1.2 * rel(out["narrow"], out["xla"]) + 2e-3, (
            preset, rel(out[preset], out["xla"]), rel(out["narrow"], out["xla"]))


@pytest.mark.parametrize("nk", [False, True])
def test_prefill_matmul_sweep_times_the_fp8_kernel_and_the_dequantized_copy(nk):
    """benchmarks/gemv_sweeps.py prefill's logic on tiny shapes (interpret mode, large-block tiles
    via 64 rows per expert): each FP8 variant runs the FP8 kernel, one row the bf16 copy, all agree
    with XLA, and kernels.FP8_DEQUANTIZE_MOE_MIN_ROWS is restored. nk: experts stored [E, out, in],
    where the weight can be the MMA's left operand."""
    from qwen3_jax.kernels import tune

    before = kernels.FP8_DEQUANTIZE_MOE_MIN_ROWS
    second = dict(convert="f16", bk=128, w_lhs=True) if nk else dict(convert="f16", bk=128)
    with kernels.kernels_enabled(True):
        rows = tune.sweep_prefill_matmul(1e12, e=4, d=256, f=128, k=2, layers=1, tokens=128, reps=1,
                                         variants=[dict(convert="cast"), second], nk=nk, log=lambda s: None)
    assert [(r["kind"], r["variant"]) for r in rows] == [("bf16", "default"), ("fp8", "convert=cast"),
                                                         ("fp8", tune._fmt(second)), ("fp8", "dequantized=bf16")]
    assert all(r["rel_err"] < 1e-2 for r in rows) and kernels.FP8_DEQUANTIZE_MOE_MIN_ROWS == before


def test_gemv_shape_sweep_gives_the_same_numbers_for_every_tile_choice(monkeypatch):
    """serve.bench --sweep-gemv's logic on tiny shapes (interpret mode; the device time, read from
    the GPU profiler, is stubbed): every decode gemv shape runs under each tile variant and each
    variant's result equals the default tiles' result."""
    from qwen3_jax.kernels import tune

    calls = []
    monkeypatch.setattr(tune, "_gemv_device_seconds", lambda call: (calls.append(call()), (1e-6, ""))[1])
    with kernels.kernels_enabled(True):
        rows = tune.sweep_gemv_shapes(1e12, d=256, heads=4, kv=2, hd=32, f=128, k=2, layers=2,
                                      kinds=("w8a16",), variants=[{}, dict(bn=64)], log=lambda s: None)
    assert {r["shape"] for r in rows} == {"qkv", "o_proj", "moe_gate_up", "moe_down"} and len(calls) == len(rows) == 8
    assert all(r["rel_err"] < 1e-5 for r in rows)
    assert {r["tiles"]["bn"] for r in rows} == {64, 128}   # the variant changed the tiles where it could
