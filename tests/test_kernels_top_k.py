"""The sampler's top-k forms (serve.sampling.top_k_rows: pruned by block maxima, chunked, the
Pallas kernel of qwen3_jax/kernels/top_k.py) against jax.lax.top_k, bit for bit.

CPU: the XLA forms and the kernel in Pallas interpret mode on small rows (ties within and
across blocks, -inf, -0.0, fewer than k finite values, a vocabulary no block divides, k not a
power of two), the sampler through each, and the kernel's Triton lowering at Qwen3's 151936
columns. GPU (marked): the compiled kernel at 151936
columns; on the device machine: `QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_kernels_top_k.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import kernels
from qwen3_jax.kernels.top_k import top_k
from serve import sampling


def hard_rows(v: int = 1000) -> np.ndarray:
    """float32 [7, v]: the cases a selection can get wrong and lax.top_k orders exactly."""
    x = np.random.default_rng(5).standard_normal((7, v)).astype(np.float32)
    x[0, 60:130] = 3.0                       # 70 equal maxima across a chunk boundary
    x[1] = 1.5                               # a row of ties
    x[2, [3, 400, v - 2, v - 1]] = 9.0       # the best in the first and the last (partial) chunk
    x[3, :] = -np.inf                        # three finite values, the rest -inf
    x[3, [7, 500, v - 10]] = [1.0, 2.0, 1.0]
    x[4, 200:900] = -np.inf
    x[5] = np.round(x[5] * 4) / 4            # many ties of every value
    x[6, :] = 0.0                            # -0.0 below 0.0 (XLA's total order, as lax.top_k)
    x[6, ::3] = -0.0
    x[6, 10] = -1e-30
    return x


def assert_top_k_equal(got, x, k):
    want = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


@pytest.mark.parametrize("form,size", [("pruned", 4), ("pruned", 7), ("pruned", 10), ("pruned", 15),
                                       ("chunked", 64), ("chunked", 100), ("chunked", 999)])
@pytest.mark.parametrize("k", [64, 20])
def test_xla_top_k_forms_equal_lax_top_k(form, size, k):
    """size 10 with k = 64: 100 blocks, so blocks with tied maxima are left out (rows 1, 5, 6)."""
    x = hard_rows()
    got = jax.jit(lambda a: sampling.top_k_rows(a, k, form, size))(jnp.asarray(x))
    assert_top_k_equal(got, x, k)


def test_unknown_top_k_form_is_named():
    with pytest.raises(ValueError, match="top-k form 'sorted'.*pruned"):
        sampling.top_k_rows(jnp.zeros((1, 100)), 8, "sorted")


@pytest.mark.parametrize("k,chunk", [(64, 256), (64, 64), (20, 128), (1, 256), (64, 4096), (128, 256)])
def test_top_k_kernel_equals_lax_top_k(k, chunk):
    x = hard_rows()
    assert_top_k_equal(top_k(jnp.asarray(x), k, chunk=chunk, interpret=True), x, k)


def test_top_k_kernel_not_covered_returns_none():
    assert top_k(jnp.zeros((2, 100), jnp.bfloat16), 8, interpret=True) is None     # float32 logits only
    assert top_k(jnp.zeros((2, 100), jnp.float32), 129, interpret=True) is None    # k past MAX_K
    assert top_k(jnp.zeros((2, 10), jnp.float32), 64, interpret=True) is None      # k past V


@pytest.mark.parametrize("form,size", [("pruned", 16), ("chunked", 256), ("kernel", 256)])
def test_sampler_through_each_form_draws_the_ids_lax_top_k_gives(monkeypatch, form, size):
    """sampling.sample in top64 mode (Qwen3's settings) through each top-k form and through one
    lax.top_k: the same ids for every row (the same candidates in the same order)."""
    x = jnp.asarray(hard_rows(2048)[[0, 1, 2, 5]])
    params = (jnp.full(4, 0.6), jnp.full(4, 0.95), jnp.full(4, 20, jnp.int32), jnp.arange(4, dtype=jnp.int32),
              jnp.full(4, 3, jnp.int32))
    monkeypatch.setattr(sampling, "TOP_K_SIZE", {form: size})
    got = {}
    for f in (form, "lax"):
        monkeypatch.setattr(sampling, "TOP_K", f)
        with kernels.kernels_enabled(True):
            got[f] = np.asarray(jax.jit(lambda a: sampling.sample(a, *params, mode="top64"))(x))
    np.testing.assert_array_equal(got[form], got["lax"])


@pytest.mark.parametrize("b", [1, 64])
def test_top_k_kernel_lowers_to_triton_at_qwen3_vocab(b):
    """Two Triton launches and no sort at [B, 151936] (XLA's top_k lowers to a sort)."""
    text = jax.jit(lambda a: top_k(a, 64, interpret=False)).trace(
        jax.ShapeDtypeStruct((b, 151936), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2
    assert "sort" not in text


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 16, 256])
@pytest.mark.parametrize("chunk", [1024, 2048])
def test_gpu_top_k_kernel_equals_lax_top_k_at_qwen3_vocab(b, chunk):
    x = np.random.default_rng(b).standard_normal((b, 151936)).astype(np.float32)
    x = np.array(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))     # bf16 logits: many ties (writable)
    x[0, 5000:5100] = 6.0                                               # ties across chunks
    assert_top_k_equal(jax.jit(lambda a: top_k(a, 64, chunk=chunk))(jnp.asarray(x)), x, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("k,chunk", [(64, 256), (20, 128), (128, 256)])
def test_gpu_top_k_kernel_on_the_hard_rows(k, chunk):
    """The compiled kernel on the interpret-mode test's rows: ties, -inf, -0.0, partial chunks
    (against the GPU's own lax.top_k)."""
    x = hard_rows()
    assert_top_k_equal(jax.jit(lambda a: top_k(a, k, chunk=chunk))(jnp.asarray(x)), x, k)
