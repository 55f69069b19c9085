"""The sampler's top-k (serve.sampling.top_k_rows: pruned by block maxima) against jax.lax.top_k,
bit for bit.

CPU: small rows with every case a selection can get wrong (ties within and across blocks, tied
block maxima that leave blocks out, -inf, -0.0 against 0.0, fewer than k finite values, a
vocabulary no block divides, k = 20 and 64), and the sampler through it. GPU (marked):
the same against the GPU's own lax.top_k, and Qwen3's 151936 columns, with the logprobs and
penalties the steps add when a request asks; on the device machine:
`QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_sampling_top_k.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve import sampling


def hard_rows(v: int = 1000) -> np.ndarray:
    """float32 [7, v]: the cases a selection can get wrong and lax.top_k orders exactly."""
    x = np.random.default_rng(5).standard_normal((7, v)).astype(np.float32)
    x[0, 60:130] = 3.0                       # 70 equal maxima across a block boundary
    x[1] = 1.5                               # a row of ties
    x[2, [3, 400, v - 2, v - 1]] = 9.0       # the best in the first and the last (partial) block
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


BLOCKS = [4, 7, 10, 15]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("k", [64, 20])
def test_pruned_top_k_equals_lax_top_k(block, k):
    """Block 10 with k = 64: 100 blocks, so blocks with tied maxima are left out (rows 1, 5, 6)."""
    x = hard_rows()
    got = jax.jit(lambda a: sampling.top_k_rows(a, k, "pruned", block))(jnp.asarray(x))
    assert_top_k_equal(got, x, k)


def test_unknown_top_k_form_is_named():
    with pytest.raises(ValueError, match="top-k form 'sorted'.*pruned"):
        sampling.top_k_rows(jnp.zeros((1, 100)), 8, "sorted")


def test_sampler_through_the_pruned_top_k_draws_the_ids_lax_top_k_gives(monkeypatch):
    """sampling.sample in top64 mode (Qwen3's settings) through the pruned top-k and through one
    lax.top_k: the same ids for every row (the same candidates in the same order)."""
    x = jnp.asarray(hard_rows(2048)[[0, 1, 2, 5]])
    params = (jnp.full(4, 0.6), jnp.full(4, 0.95), jnp.full(4, 20, jnp.int32), jnp.arange(4, dtype=jnp.int32),
              jnp.full(4, 3, jnp.int32))
    monkeypatch.setattr(sampling, "TOP_K_BLOCK", 16)
    got = {}
    for form in sampling.TOP_K_FORMS:
        monkeypatch.setattr(sampling, "TOP_K", form)
        got[form] = np.asarray(jax.jit(lambda a: sampling.sample(a, *params, mode="top64"))(x))
    np.testing.assert_array_equal(got["pruned"], got["lax"])


@pytest.mark.gpu
@pytest.mark.parametrize("block", BLOCKS)
def test_gpu_pruned_top_k_on_the_hard_rows(block):
    x = hard_rows()
    assert_top_k_equal(jax.jit(lambda a: sampling.top_k_rows(a, 64, "pruned", block))(jnp.asarray(x)), x, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 16, 256])
def test_gpu_default_top_k_at_qwen3_vocab(b):
    x = np.random.default_rng(b).standard_normal((b, 151936)).astype(np.float32)
    x = np.array(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))     # bf16 logits: many ties (writable)
    x[0, 5000:5100] = 6.0                                               # ties across blocks
    assert_top_k_equal(jax.jit(lambda a: sampling.top_k_rows(a, 64))(jnp.asarray(x)), x, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 64])
def test_gpu_logprobs_and_penalties_at_qwen3_vocab(b):
    """The steps' extras at 151936 columns on the GPU: token_logprobs against a float64 log_softmax
    on the host (the chosen ids' and the top 20, ties to the lower id), and greedy over penalized
    logits against the host's argmax of the same penalties."""
    rng = np.random.default_rng(b)
    x = np.array(jnp.asarray(4 * rng.standard_normal((b, 151936)), jnp.bfloat16).astype(jnp.float32))
    ids = rng.integers(0, 151936, b).astype(np.int32)
    chosen, top_ids, top = jax.jit(sampling.token_logprobs)(jnp.asarray(x), jnp.asarray(ids))
    x64 = x.astype(np.float64)
    ref = x64 - (x64.max(1, keepdims=True) + np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1, keepdims=True)))
    np.testing.assert_allclose(np.asarray(chosen), ref[np.arange(b), ids], rtol=0, atol=1e-4)
    best = np.argsort(-x, axis=1, kind="stable")[:, :sampling.LOGPROBS_MAX]
    np.testing.assert_array_equal(np.asarray(top_ids), best)
    np.testing.assert_allclose(np.asarray(top), np.take_along_axis(ref, best, 1), rtol=0, atol=1e-4)

    counts = rng.poisson(0.02, (b, 151936)).astype(np.int32)
    counts[np.arange(b), x.argmax(1)] = 10                # the plain argmax was generated 10 times
    presence, frequency = np.full(b, 1.5, np.float32), np.full(b, 0.5, np.float32)
    penalized = jax.jit(sampling.penalize)(jnp.asarray(x), jnp.asarray(counts), jnp.asarray(presence),
                                           jnp.asarray(frequency), jnp.ones(b, jnp.float32))
    want = (x - 0.5 * counts - 1.5 * (counts > 0)).argmax(1)
    assert (want != x.argmax(1)).all()
    np.testing.assert_array_equal(np.asarray(jnp.argmax(penalized, axis=1)), want)
    # repetition 1.3 on the prompt's tokens (flagged) and the generated ones, no OpenAI penalties
    flagged = counts | np.where(rng.random(counts.shape) < 0.01, sampling.PROMPT_FLAG, 0).astype(np.int32)
    rep = jax.jit(sampling.penalize)(jnp.asarray(x), jnp.asarray(flagged), jnp.zeros(b), jnp.zeros(b),
                                     jnp.full(b, 1.3, jnp.float32))
    want = np.where(flagged != 0, np.where(x > 0, x / 1.3, x * 1.3), x).argmax(1)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(rep, axis=1)), want)
