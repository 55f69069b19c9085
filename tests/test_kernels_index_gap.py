"""Pallas' int32-offset gap (kernels.index_overflows): a one-byte array of more than 2**31
elements and at most 4 GiB is read at wrapped offsets by a Pallas Triton kernel (run 86 in
benchmarks/NOTES.md), so FP8 weights of that size per device take the XLA path.

CPU: the predicate, and the kernel entries refusing such weights, on abstract arrays (nothing
allocated). GPU (marked): the gap itself, measured, so that a jax which fixes it fails here
and the guard can go; `QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_kernels_index_gap.py`.
"""

import logging

import jax
import jax.numpy as jnp
import pytest

from qwen3_jax import kernels
from qwen3_jax.kernels.linear import linear_einsum
from qwen3_jax.kernels.moe_ffn import moe_ffn_in_place

E4M3 = jnp.float8_e4m3fn
GIB = 2 ** 30


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_index_overflows_marks_one_byte_arrays_of_2_to_4_gib(caplog):
    gap = [sds((2 ** 31 + 1,), E4M3), sds((3, GIB), jnp.uint8), sds((4, GIB), E4M3), sds((12, 256, 1 << 20), jnp.int8)]
    safe = [sds((2 ** 31,), E4M3), sds((4 * GIB + 1,), E4M3), sds((3 * GIB // 2,), jnp.bfloat16),
            sds((3 * GIB // 4,), jnp.float32), sds((48, 128, 768, 2048), E4M3), None]
    with caplog.at_level(logging.WARNING, logger="qwen3_jax.kernels"):
        assert all(kernels.index_overflows(a) for a in gap)
        assert not any(kernels.index_overflows(a) for a in safe)
        assert kernels.index_overflows(*safe, gap[1])
        kernels.index_overflows(gap[1])   # logged once per shape
    logged = [r.getMessage() for r in caplog.records if "int32-offset gap" in r.getMessage()]
    assert len(logged) == len(gap) and "3.00 GiB" in logged[1] and "ep or tp" in logged[1]


def test_fp8_weights_in_the_gap_take_the_xla_path():
    """linear_einsum and moe_ffn_in_place (the projections and the MoE, on one device or per
    device on a mesh) return None for FP8 weights of 2-4 GiB and run below and above the gap.
    Abstract arrays: only the trace runs."""
    d, f, e, k = 2048, 768, 128, 8
    x = sds((1, 1, d), jnp.bfloat16)

    def projection(layers):   # a q projection of `layers` stacked layers, FP8 [L, D, H*Q]
        w, s = sds((layers, d, 32 * 128), E4M3), sds((layers, d // 128, 32 * 128), jnp.float32)
        return jax.eval_shape(lambda x, w, s: linear_einsum("btd,dn->btn", x, w, s, 0, 128, layer=jnp.int32(1)),
                              x, w, s)
    assert projection(16) is not None                # 128 MiB
    assert projection(300) is None                   # 2.34 GiB
    assert projection(600) is not None               # 4.69 GiB: int64 offsets

    def moe(layers):   # FP8 experts stored [L, E, out, in], one token routed to 8
        gate = sds((layers, e, f, d), E4M3)
        down = sds((layers, e, d, f), E4M3)
        scales = (sds((layers, e, f // 128, d // 128), jnp.float32),) * 2 + (sds((layers, e, d // 128, f // 128),
                                                                              jnp.float32),)
        xs, wts, ex = sds((1, d), jnp.bfloat16), sds((1, k), jnp.float32), sds((1, k), jnp.int32)
        return jax.eval_shape(lambda *a: moe_ffn_in_place(*a[:6], a[6:], 128, jnp.int32(1), w_nk=True),
                              xs, wts, ex, gate, gate, down, *scales)
    assert moe(8) is not None                        # 1.5 GiB per weight
    assert moe(12) is None                           # 2.25 GiB: 30B-A3B's 48 layers at ep=4
    assert moe(24) is not None                       # 4.5 GiB: int64 offsets


# -- GPU: the gap itself ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("gib", [2, 3, 4.25])
def test_gpu_pallas_reads_a_one_byte_array_right_exactly_outside_the_gap(gib):
    """A kernel reads the last row of a uint8 array of `gib` GiB: right at 2 and 4.25 GiB, wrong at
    3 (what index_overflows says). If this fails at 3 GiB, jax fixed its offsets: drop the guard."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    rows = int(gib * GIB) // 1024
    x = jnp.ones((rows, 1024), jnp.uint8).at[-1, :16].set(3)

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[pl.ds(rows - 1, 1), pl.ds(0, 16)].astype(jnp.float32)
    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((1, 16), jnp.float32), grid=(1,),
                         compiler_params=plt.CompilerParams(num_warps=1))(x)
    assert (float(out[0, 0]) == 3.0) == (not kernels.index_overflows(x))
