"""Pallas' int32-offset gap: a one-byte array of more than 2**31 elements and at most 4 GiB is
read at wrapped offsets by a Pallas Triton kernel as jax lowers it (run 86 in
benchmarks/NOTES.md). kernels/index_width.py gives such arrays int64 offsets; where it cannot,
kernels.index_overflows sends FP8 weights of that size per device to the XLA path.

CPU: the predicate; the offsets' width in the lowered Triton module; the kernel entries taking
gap-sized weights when widened and refusing them when not, on abstract arrays (nothing
allocated). GPU (marked): the gap itself with and without the widening, and the MoE and a
projection on gap-sized FP8 stacks against the same kernels on a copy of the one layer they
read; `QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_kernels_index_gap.py`.
"""

import contextlib
import io
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import kernels
from qwen3_jax.kernels import index_width
from qwen3_jax.kernels.linear import linear_einsum
from qwen3_jax.kernels.moe_ffn import moe_ffn_in_place

E4M3 = jnp.float8_e4m3fn
GIB = 2 ** 30
D30, F30, E30, K30 = 2048, 768, 128, 8       # Qwen3-30B-A3B: hidden, expert width, experts, top-k


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.fixture
def narrow(monkeypatch):
    """Pallas' own offsets (what a jax where index_width cannot install gets)."""
    monkeypatch.setattr(index_width, "WIDEN", False)


def read_last_row(rows):
    """A kernel reading 16 bytes of the last row of a [rows, 1024] uint8 array."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[pl.ds(rows - 1, 1), pl.ds(0, 16)].astype(jnp.float32)
    return lambda debug=False: pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((1, 16), jnp.float32), grid=(1,),
        compiler_params=plt.CompilerParams(num_warps=1), debug=debug)


def test_the_gap_is_one_byte_arrays_of_2_to_4_gib_and_refused_only_unwidened(caplog, narrow):
    """Which arrays lie in the gap; the guard refuses them, logged once per shape, only while the
    offsets are not widened."""
    gap = [sds((2 ** 31 + 1,), E4M3), sds((3, GIB), jnp.uint8), sds((4, GIB), E4M3), sds((12, 256, 1 << 20), jnp.int8)]
    safe = [sds((2 ** 31,), E4M3), sds((4 * GIB + 1,), E4M3), sds((3 * GIB // 2,), jnp.bfloat16),
            sds((3 * GIB // 4,), jnp.float32), sds((48, 128, 768, 2048), E4M3), None]
    assert all(index_width.in_gap(a.shape, a.dtype) for a in gap)
    assert not any(index_width.in_gap(a.shape, a.dtype) for a in safe if a is not None)
    with caplog.at_level(logging.WARNING, logger="qwen3_jax.kernels"):
        assert all(kernels.index_overflows(a) for a in gap)
        assert not any(kernels.index_overflows(a) for a in safe)
        assert kernels.index_overflows(*safe, gap[1])
        kernels.index_overflows(gap[1])   # logged once per shape
        index_width.WIDEN = True
        assert not any(kernels.index_overflows(a) for a in gap)   # widened: the kernels take them
    logged = [r.getMessage() for r in caplog.records if "int32-offset gap" in r.getMessage()]
    assert len(logged) == len(gap) and "3.00 GiB" in logged[1] and "ep or tp" in logged[1]


@pytest.mark.parametrize("gib,bits", [(1, 32), (2, 32), (3, 64), (4, 64), (4.25, 64)])
def test_lowered_offsets_are_int64_exactly_where_int32_would_wrap(gib, bits):
    """The Triton module (Pallas' debug print, lowered for CUDA on the CPU) offsets the uint8
    array's pointer by i64 from just past 2**31 elements, by i32 below (unchanged); unwidened,
    3 and 4 GiB get Pallas' i32 (the offsets that read wrong on the GPU)."""
    rows = int(gib * GIB) // 1024
    call = read_last_row(rows)

    def offset_bits():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            jax.jit(call(debug=True)).trace(sds((rows, 1024), jnp.uint8)).lower(lowering_platforms=("cuda",))
        found = re.findall(r"tt\.addptr .*!tt\.ptr<i8>>, tensor<1x16xi(\d+)>", buf.getvalue())
        assert len(found) == 1, buf.getvalue()
        return int(found[0])
    assert offset_bits() == bits
    index_width.WIDEN = False
    try:
        assert offset_bits() == (64 if gib > 4 else 32)
    finally:
        index_width.WIDEN = True


def q_projection(x, w, s, layer):
    """A q projection reading layer `layer` of FP8 [L, D, H*Q] weights in place."""
    return linear_einsum("btd,dn->btn", x, w, s, 0, 128, layer=layer)


def moe_layer(x, weights, experts, gate, up, down, scales, layer):
    """The MoE FFN on layer `layer` of FP8 experts stored [L, E, out, in]."""
    return moe_ffn_in_place(x, weights, experts, gate, up, down, scales, 128, layer, w_nk=True)


def expert_shapes(layers):
    """gate/up, down and their (gate, up, down) scales, 30B-A3B's experts stored [L, E, out, in];
    the scales as the kernels read them (moe_ffn.ExpertArrays: expanded along F)."""
    gate, down = (layers, E30, F30, D30), (layers, E30, D30, F30)
    scales = ((layers, E30, D30 // 128, F30),) * 2 + ((layers, E30, F30, D30 // 128),)
    return gate, down, scales


@pytest.mark.parametrize("widen", [True, False])
def test_fp8_weights_in_the_gap_take_the_kernels_when_widened(widen, monkeypatch):
    """linear_einsum and moe_ffn_in_place (the projections and the MoE, on one device or per
    device on a mesh) take FP8 weights of 2-4 GiB when the offsets are widened, and return None
    (the XLA path) when not; below and above the gap they run either way. Abstract arrays:
    only the trace runs."""
    monkeypatch.setattr(index_width, "WIDEN", widen)
    x = sds((1, 1, D30), jnp.bfloat16)

    def projection(layers):
        w, s = sds((layers, D30, 32 * 128), E4M3), sds((layers, D30 // 128, 32 * 128), jnp.float32)
        return jax.eval_shape(lambda *a: q_projection(*a, jnp.int32(1)), x, w, s)
    assert projection(16) is not None                       # 128 MiB
    assert (projection(300) is not None) == widen           # 2.34 GiB
    assert projection(600) is not None                      # 4.69 GiB: Pallas' own int64 offsets

    def moe(layers):
        gate, down, scales = expert_shapes(layers)
        xs, wts, ex = sds((1, D30), jnp.bfloat16), sds((1, K30), jnp.float32), sds((1, K30), jnp.int32)
        return jax.eval_shape(lambda x, w, e, g, d, *s: moe_layer(x, w, e, g, g, d, s, jnp.int32(1)),
                              xs, wts, ex, sds(gate, E4M3), sds(down, E4M3), *(sds(sh, jnp.float32) for sh in scales))
    assert moe(8) is not None                               # 1.5 GiB per weight
    assert (moe(12) is not None) == widen                   # 2.25 GiB: 30B-A3B's 48 layers at ep=4
    assert moe(24) is not None                              # 4.5 GiB


# -- GPU: the gap itself, and the kernels on gap-sized weights -----------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("gib", [2, 3, 4.25])
def test_gpu_widened_offsets_read_every_size_right_and_pallas_own_wrap_in_the_gap(gib):
    """A kernel reads the last row of a uint8 array of `gib` GiB: right at every size with the
    widening; with Pallas' own offsets right at 2 and 4.25 GiB and wrong at 3 (run 86). If the
    latter reads right at 3 GiB, jax fixed its offsets and index_width can go."""
    rows = int(gib * GIB) // 1024
    x = jnp.ones((rows, 1024), jnp.uint8).at[-1, :16].set(3)
    assert float(read_last_row(rows)()(x)[0, 0]) == 3.0
    index_width.WIDEN = False
    try:
        assert (float(read_last_row(rows)()(x)[0, 0]) == 3.0) == (not index_width.in_gap(x.shape, x.dtype))
    finally:
        index_width.WIDEN = True


def e4m3_normal(key, shape):
    return jax.random.normal(key, shape, jnp.float32).astype(E4M3)


@pytest.mark.gpu
def test_gpu_moe_on_gap_sized_experts_equals_the_layer_alone():
    """30B-A3B's FP8 experts at ep=4 hold 12 layers' worth per device: 2.25 GiB per weight, in
    the gap. The MoE kernels read layer 11 of that stack (the largest offsets; experts 120-127)
    and give the bits they give on a copy of layer 11 alone (offsets far below 2**31)."""
    gate_shape, down_shape, scale_shapes = expert_shapes(12)
    keys = jax.random.split(jax.random.key(0), 8)
    gate, up, down = (e4m3_normal(keys[0], gate_shape), e4m3_normal(keys[1], gate_shape),
                      e4m3_normal(keys[2], down_shape))
    scales = tuple(jax.random.uniform(k, sh, jnp.float32, 0.01, 0.03) for k, sh in zip(keys[3:6], scale_shapes))
    assert index_width.in_gap(gate.shape, gate.dtype) and not kernels.index_overflows(gate, up, down)
    x = jax.random.normal(keys[6], (1, D30), jnp.float32).astype(jnp.bfloat16)
    weights = jax.random.uniform(keys[7], (1, K30), jnp.float32, 0.05, 0.2)
    experts = jnp.arange(E30 - K30, E30, dtype=jnp.int32)[None]
    got = jax.jit(moe_layer)(x, weights, experts, gate, up, down, scales, jnp.int32(11))
    alone = [a[11:12] for a in (gate, up, down, *scales)]
    want = jax.jit(moe_layer)(x, weights, experts, *alone[:3], tuple(alone[3:]), jnp.int32(0))
    assert got is not None and float(jnp.linalg.norm(want)) > 0
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.gpu
def test_gpu_projection_on_a_gap_sized_stack_equals_the_layer_alone():
    """A q projection of 300 stacked FP8 layers (2.34 GiB; 235B-A22B's attention at ep=32 is in
    the gap too), read at layer 299, against the same kernel on a copy of that layer alone."""
    keys = jax.random.split(jax.random.key(1), 3)
    w = e4m3_normal(keys[0], (300, D30, 32 * 128))
    s = jax.random.uniform(keys[1], (300, D30 // 128, 32 * 128), jnp.float32, 0.01, 0.03)
    x = jax.random.normal(keys[2], (1, 1, D30), jnp.float32).astype(jnp.bfloat16)
    assert index_width.in_gap(w.shape, w.dtype)
    got = jax.jit(q_projection)(x, w, s, jnp.int32(299))
    want = jax.jit(q_projection)(x, w[299:300], s[299:300], jnp.int32(0))
    assert got is not None and float(jnp.linalg.norm(want.astype(jnp.float32))) > 0
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
