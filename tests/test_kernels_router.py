"""The routing kernels (qwen3_jax/kernels/router.py) against moe.route.

CPU: Pallas interpret mode on small shapes (exact ties, partial row blocks, both norm_topk_prob
values, layer 2 of a stacked router, the stacked-expert groups of with_groups), the model's MoE with and without them, and the Triton
lowering of the 30B-A3B shapes. GPU (marked): the compiled kernels at 30B shapes; on the device
machine: `QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_kernels_router.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import kernels
from qwen3_jax.kernels import router
from qwen3_jax.kernels.router import route_in_place, topk_from_partials
from qwen3_jax.moe import route


def stacked_router(rng, layers, d, e):
    return jnp.asarray(0.1 * rng.standard_normal((layers, d, e)), jnp.bfloat16)


def with_ties(w_lde, x_nd, layer):
    """Make routing ties exact: row 0 of x is zero (every logit 0: experts 0..k-1 by index), and
    columns 2 and 9 of W[layer] are one large column aligned with row 1 (experts 2 and 9 tie for
    the top of row 1: 2 must come first)."""
    x = np.asarray(x_nd, np.float32)
    x[0] = 0.0
    w = np.asarray(w_lde, np.float32)
    col = 0.5 * np.sign(x[1])
    w[layer, :, 2] = col
    w[layer, :, 9] = col
    return jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)


@pytest.mark.parametrize("n", [1, 5, 20])       # 5: 3 masked rows in a block of 8; 20: 16 + 4 rows
@pytest.mark.parametrize("norm", [True, False])
def test_route_in_place_matches_route_on_layer_2_with_exact_ties(n, norm):
    rng = np.random.default_rng(n)
    layers, d, e, k = 3, 64, 16, 4
    w = stacked_router(rng, layers, d, e)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    if n > 1:
        x, w = with_ties(w, x, layer=2)
    got_w, got_e = route_in_place(x, w, jnp.int32(2), k, norm, interpret=True)
    want_w, want_e = route(x, w[2], k, norm)
    assert got_w.dtype == jnp.float32 and got_e.dtype == jnp.int32 and got_e.shape == (n, k)
    np.testing.assert_array_equal(np.asarray(got_e), np.asarray(want_e))
    np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=2e-6, atol=1e-7)
    if n > 1:
        assert list(np.asarray(got_e[0])) == list(range(k))       # all tied: lowest indices
        assert list(np.asarray(got_e[1, :2])) == [2, 9]           # a tied pair: lower first
    # The test tells layers apart: layer 1 routes differently.
    other_w, other_e = route(x, w[1], k, norm)
    assert not np.array_equal(np.asarray(other_e), np.asarray(want_e))


@pytest.mark.parametrize("n", [1, 5, 20])
def test_route_in_place_writes_each_assignments_stacked_group(n):
    """with_groups adds groups [N*k] = experts + layer * E (the expert's index in the stacked
    [L*E, ...] expert params) from the same top-k kernel; weights and experts stay bit-identical."""
    rng = np.random.default_rng(n + 100)
    layers, d, e, k = 4, 64, 32, 3           # k = 3: a 4-wide output tile with a masked column
    w = stacked_router(rng, layers, d, e)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    plain_w, plain_e = route_in_place(x, w, jnp.int32(3), k, True, interpret=True)
    got_w, got_e, groups = route_in_place(x, w, jnp.int32(3), k, True, with_groups=True, interpret=True)
    np.testing.assert_array_equal(np.asarray(got_w), np.asarray(plain_w))
    np.testing.assert_array_equal(np.asarray(got_e), np.asarray(plain_e))
    assert groups.dtype == jnp.int32 and groups.shape == (n * k,)
    np.testing.assert_array_equal(np.asarray(groups), np.asarray(plain_e).reshape(-1) + 3 * e)


@pytest.mark.parametrize("row_block", [1, 4])
def test_topk_from_partials_sums_splits_and_masks_rows(row_block):
    """S = 3 split-K partials, k = 3 (output tile 4 wide, one column masked), N = 10 rows in
    blocks of 4 (last block half empty) or 1."""
    rng = np.random.default_rng(row_block)
    parts = jnp.asarray(rng.standard_normal((3, 10, 32)), jnp.float32)
    got_w, got_e = topk_from_partials(parts, top_k=3, norm_topk_prob=False, row_block=row_block, interpret=True)
    probs = jax.nn.softmax(jnp.sum(parts, axis=0), axis=-1)
    want_w, want_e = jax.lax.top_k(probs, 3)
    np.testing.assert_array_equal(np.asarray(got_e), np.asarray(want_e))
    np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=2e-6)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("norm", [True, False])
def test_topk_at_128_experts_with_ties(n, norm):
    """30B-A3B's E = 128, k = 8: jax.lax.top_k's experts, with a row of ties in the top 8
    (experts 5, 40, 77 share the largest logit; the next group of equal logits spans the cut at
    k) and, for n > 1, a NaN row (its experts stay real ones)."""
    rng = np.random.default_rng(n)
    logits = rng.standard_normal((n, 128)).astype(np.float32)
    logits[0, [5, 40, 77]] = 6.0
    logits[0, [3, 9, 100, 101, 120, 127]] = 4.0          # ranks 3..8: the last (127) falls outside k
    if n > 1:
        logits[1, 17] = np.nan
    parts = jnp.asarray(np.stack([logits - 1.0, np.ones_like(logits)]))   # S = 2 partials
    w, e = topk_from_partials(parts, top_k=8, norm_topk_prob=norm, interpret=True)
    want_w, want_e = jax.lax.top_k(jax.nn.softmax(jnp.asarray(logits[:1]), axis=-1), 8)
    assert list(np.asarray(want_e[0])) == [5, 40, 77, 3, 9, 100, 101, 120]
    if norm:
        want_w = want_w / jnp.sum(want_w, axis=-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(e[0]), np.asarray(want_e[0]))
    np.testing.assert_allclose(np.asarray(w[0]), np.asarray(want_w[0]), rtol=2e-6)
    if n > 1:
        assert ((0 <= np.asarray(e[1])) & (np.asarray(e[1]) < 128)).all()
        assert np.isnan(np.asarray(w[1])).any()
    if n > 2:   # a plain row
        np.testing.assert_array_equal(np.asarray(e[2]), np.asarray(jax.lax.top_k(logits[2], 8)[1]))


def test_route_in_place_declines_what_it_does_not_cover():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.bfloat16)
    layer = jnp.int32(0)
    assert route_in_place(x, stacked_router(rng, 1, 64, 24), layer, 2, True) is None         # E not 2^n
    assert route_in_place(x, stacked_router(rng, 1, 64, 8), layer, 2, True) is None          # E < 16
    assert route_in_place(x, stacked_router(rng, 1, 64, 1024), layer, 2, True) is None       # E > 512
    assert route_in_place(x.astype(jnp.float32), stacked_router(rng, 1, 64, 16).astype(jnp.float32),
                          layer, 2, True) is None                                            # float32
    many = jnp.zeros((router.route_max_rows() + 1, 64), jnp.bfloat16)
    assert route_in_place(many, stacked_router(rng, 1, 64, 16), layer, 2, True) is None      # too many rows


@pytest.mark.parametrize("n", [9, 17, 40, 100])   # one block of 16, one of 32, one of 64 (24 rows padded), two of 64
def test_route_in_place_by_matmul_matches_route_with_exact_ties(n, monkeypatch):
    """From LOGITS_MATMUL_MIN_ROWS rows the logits come from one split-K grouped matmul (every
    block reading W[layer] in place) and the top-k takes fewer rows a program; same routing as
    moe.route, ties included, and the gemv's logits agree. x arrives as the model passes it, an
    RMSNorm view (gemv_inputs.RmsNormX), which the matmul path materializes."""
    from qwen3_jax.kernels.gemv_inputs import RmsNormX

    rng = np.random.default_rng(n)
    layers, d, e, k = 3, 256, 32, 4
    w = stacked_router(rng, layers, d, e)
    x, w = with_ties(w, jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16), layer=1)
    norm_w = jnp.asarray(1.0 + 0.1 * rng.standard_normal((layers, d)), jnp.bfloat16)
    xn = RmsNormX(x, norm_w, jnp.int32(1), 1e-6)
    text = str(jax.make_jaxpr(lambda x: route_in_place(xn, w, jnp.int32(1), k, True))(x))
    assert "qwen3_grouped_matmul" in text and "qwen3_gemv" not in text
    got_w, got_e = route_in_place(xn, w, jnp.int32(1), k, True, interpret=True)
    want_w, want_e = route(xn.materialize(), w[1], k, True)
    np.testing.assert_array_equal(np.asarray(got_e), np.asarray(want_e))
    np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=2e-6, atol=1e-7)
    assert list(np.asarray(got_e[1, :2])) == [2, 9]
    monkeypatch.setattr(router, "LOGITS", "gemv")
    if n <= router.ROUTE_MAX_ROWS:
        gemv_w, gemv_e = route_in_place(xn, w, jnp.int32(1), k, True, interpret=True)
        np.testing.assert_array_equal(np.asarray(gemv_e), np.asarray(got_e))
        np.testing.assert_allclose(np.asarray(gemv_w), np.asarray(got_w), rtol=2e-6, atol=1e-7)
    else:
        assert route_in_place(xn, w, jnp.int32(1), k, True) is None   # past the gemv's 64 rows


def test_topk_row_block_keeps_the_programs_up():
    assert [router.topk_row_block(n) for n in (1, 16, 64, 128, 256, 1024, 4096)] == [1, 1, 1, 2, 4, 16, 16]


def test_model_moe_routes_with_the_kernels(monkeypatch):
    """The model with kernels on (interpret mode) calls the two routing kernels in its MoE layers
    and gives the same logits as with moe.route (the router's float32 rounding aside)."""
    from flax import nnx

    from qwen3_jax import Qwen3MoeConfig, random_model
    from reference import TINY

    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2, num_experts=16))
    m = random_model(cfg, seed=3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 3)), jnp.int32)
    outs, calls = [], []
    with kernels.kernels_enabled(True):
        for use in (True, False):
            if not use:
                monkeypatch.setattr(kernels, "route_in_place", lambda *a, **kw: None)
            # A new function each time: JAX caches traces per function.
            fn = jax.jit(lambda st, t: nnx.merge(m.graphdef, st)(t)[0])
            calls.append(str(jax.make_jaxpr(fn)(m.state, tokens)).count("pallas_call"))
            outs.append(np.asarray(fn(m.state, tokens), np.float64))
    assert calls[0] - calls[1] == 2, calls          # gemv + top-k in the scan body over layers
    assert np.linalg.norm(outs[0] - outs[1]) / np.linalg.norm(outs[1]) < 1e-3


# -- CPU: Triton lowering of the real shapes (no GPU needed, nothing allocated) ------------------

@pytest.mark.parametrize("n", [1, 64])
def test_router_kernels_lower_to_triton_for_30b_shapes(n):
    sds = jax.ShapeDtypeStruct

    def fn(x, w, i):
        return route_in_place(x, w, i, 8, True, interpret=False)
    text = jax.jit(fn).trace(sds((n, 2048), jnp.bfloat16), sds((48, 2048, 128), jnp.bfloat16),
                             sds((), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2

    def with_groups(x, w, i):
        return route_in_place(x, w, i, 8, True, with_groups=True, interpret=False)
    text = jax.jit(with_groups).trace(sds((n, 2048), jnp.bfloat16), sds((48, 2048, 128), jnp.bfloat16),
                                      sds((), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2
    # The groups cost no XLA arithmetic: the layer index goes in as it is (a reshape to [1]).
    for op in ("stablehlo.multiply", "stablehlo.add", "stablehlo.iota"):
        assert op not in text, op


# -- GPU: compiled kernels against moe.route ----------------------------------------------------

def assert_same_routing(got_w, got_e, want_w, probs, tol=1e-5):
    """Same routing up to float32 rounding: each row's experts are distinct and their reference
    probabilities equal the reference top-k values in order (a near-tie may swap two experts)."""
    got_e, probs = np.asarray(got_e), np.asarray(probs)
    for r in range(got_e.shape[0]):
        assert len(set(got_e[r])) == got_e.shape[1]
    picked = np.take_along_axis(probs, got_e, axis=1)
    top = np.sort(probs, axis=1)[:, ::-1][:, :got_e.shape[1]]
    np.testing.assert_allclose(picked, top, rtol=tol)
    np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=tol, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2, 7, 64])
@pytest.mark.parametrize("norm", [True, False])
def test_gpu_route_in_place_matches_route_at_30b_shapes(n, norm):
    rng = np.random.default_rng(n)
    w = jnp.asarray(0.02 * rng.standard_normal((48, 2048, 128)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((n, 2048)), jnp.bfloat16)
    layer = jnp.int32(37)
    got_w, got_e = jax.jit(lambda x, w, i: route_in_place(x, w, i, 8, norm))(x, w, layer)
    want_w, want_e = route(x, w[37], 8, norm)
    logits = np.asarray(x, np.float64) @ np.asarray(w[37], np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert_same_routing(got_w, got_e, want_w, probs)
    assert (np.asarray(got_e) == np.asarray(want_e)).mean() > 0.99
    g_w, g_e, groups = jax.jit(lambda x, w, i: route_in_place(x, w, i, 8, norm, with_groups=True))(x, w, layer)
    np.testing.assert_array_equal(np.asarray(g_e), np.asarray(got_e))
    np.testing.assert_array_equal(np.asarray(g_w), np.asarray(got_w))
    np.testing.assert_array_equal(np.asarray(groups), np.asarray(got_e).reshape(-1) + 37 * 128)
