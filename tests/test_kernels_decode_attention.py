"""Decode attention's key-split merge (qwen3_jax/kernels/decode_attention.py, COMBINE): in the
kernel by the last program of each (row, kv head), against the XLA merge and a plain softmax.

CPU: Pallas interpret mode (programs run one after another, so the atomic counter is exercised
but not raced). GPU (marked): compiled at 30B-A3B shapes, repeated to catch a race between the
programs (the merge's order is fixed, so every repetition must give the same bits); on the device
machine `QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_kernels_decode_attention.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax.kernels.decode_attention import decode_attention, plan


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cache_and_q(seed, b, h, k, qd, s, layers=2, slots=None):
    rng = np.random.default_rng(seed)
    slots = slots or b
    kc = jnp.asarray(rng.standard_normal((layers, slots, s, k, qd)), jnp.bfloat16)
    vc = jnp.asarray(rng.standard_normal((layers, slots, s, k, qd)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((b, h, qd)), jnp.bfloat16)
    return q, kc, vc


def softmax_attention(q, kc, vc, layer, rows, lengths, scale):
    """Plain XLA attention of q [B, H, Q] over layer `layer`, cache rows `rows`, keys < lengths,
    with the kernel's roundings (scores to bf16 before the scale, probabilities to bf16)."""
    b, h, qd = q.shape
    k = kc.shape[3]
    keys, vals = kc[layer][rows], vc[layer][rows]
    sc = jnp.einsum("bkgq,bskq->bkgs", q.reshape(b, k, h // k, qd), keys, preferred_element_type=jnp.float32)
    sc = sc.astype(jnp.bfloat16).astype(jnp.float32) * scale
    mask = jnp.arange(keys.shape[1])[None, :] < lengths[:, None]
    sc = jnp.where(mask[:, None, None], sc, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(sc, -1).astype(jnp.bfloat16)
    return jnp.einsum("bkgs,bskq->bkgq", p, vals, preferred_element_type=jnp.float32).reshape(b, h, qd)


@pytest.mark.parametrize("h,k,splits", [(8, 2, 4), (16, 2, 8), (4, 2, 1), (12, 2, 4)])
def test_merge_in_the_kernel_equals_the_xla_merge(h, k, splits):
    """Groups of 4, 8 (merged in the kernel), one split (the program merges itself) and a group
    of 6 (not a power of two: falls back to the XLA merge); a length that leaves splits empty and
    one past the cache."""
    b, qd, s = 3, 32, 128
    q, kc, vc = cache_and_q(h * splits, b, h, k, qd, s, slots=4)
    rows, lengths = jnp.array([3, 0, 1]), jnp.array([20, 128, 77])
    kw = dict(scale=qd ** -0.5, bs=16, splits=splits)
    got = decode_attention(q, kc, vc, jnp.int32(1), rows, lengths, combine="kernel", **kw)
    xla = decode_attention(q, kc, vc, jnp.int32(1), rows, lengths, combine="xla", **kw)
    want = softmax_attention(q, kc, vc, 1, rows, lengths, qd ** -0.5)
    assert got.shape == (b, h, qd) and got.dtype == jnp.bfloat16
    assert rel(got, xla) < 4e-3 and rel(got, want) < 1e-2
    if (h // k) & (h // k - 1):   # not a power of two: the XLA merge itself, bit for bit
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(xla, np.float32))
    # (that the kernel merge runs, with no XLA merge around it, is the lowering test below)
    with pytest.raises(ValueError, match="combine='both'"):
        decode_attention(q, kc, vc, jnp.int32(1), rows, lengths, combine="both", **kw)


@pytest.mark.parametrize("combine", ["kernel", "xla"])
@pytest.mark.parametrize("splits", [1, 4])
def test_a_row_past_the_cache_reads_nothing(combine, splits):
    """The engine parks an idle slot at position S (its cache write is dropped). Its row used to
    read the whole cache row every step; now a length past S reads no key: the row is zeros (no
    0/0 in either merge), and the other rows are exactly what they are without it."""
    b, h, k, qd, s = 3, 8, 2, 32, 128
    q, kc, vc = cache_and_q(7, b, h, k, qd, s, slots=4)
    rows, pos = jnp.array([3, 0, 1]), jnp.array([40, s, 127])      # row 1 idle, row 2 the last position
    kw = dict(scale=qd ** -0.5, bs=16, splits=splits, combine=combine, length_offset=1)
    got = np.asarray(decode_attention(q, kc, vc, jnp.int32(1), rows, pos, **kw), np.float32)
    assert np.all(got[1] == 0) and np.all(np.isfinite(got))
    live = np.asarray(decode_attention(q[::2], kc, vc, jnp.int32(1), rows[::2], pos[::2], **kw), np.float32)
    np.testing.assert_array_equal(got[::2], live)
    want = softmax_attention(q[::2], kc, vc, 1, rows[::2], pos[::2] + 1, qd ** -0.5)
    assert rel(live, want) < 1e-2


def test_a_kv_window_bounds_the_grid_not_the_answer(monkeypatch):
    """The engine's decode window (every live row's keys below it) sets the grid: planned over
    64 keys of a 512-key cache the kernel covers 64 keys in fewer splits, and gives the whole
    cache's answer (keys past a row's length are masked either way); an idle row past S still
    reads nothing. A window the plan cannot tile is refused with the way out."""
    import sys

    da = sys.modules["qwen3_jax.kernels.decode_attention"]
    grids = []

    def recording(*args, **kw):
        grids.append((kw["window"], kw["bs"], kw["splits"]))
        return decode_attention(*args, **kw)
    monkeypatch.setattr(da, "decode_attention", recording)

    b, h, k, qd, s, w = 3, 8, 2, 32, 512, 64
    q, kc, vc = cache_and_q(5, b, h, k, qd, s, slots=4)
    rows, pos = jnp.array([3, 0, 1]), jnp.array([40, s, 63])     # row 1 idle
    got = da.decode_attention_cached(q[:, None], kc, vc, 1, rows, pos[:, None], qd ** -0.5, kv_window=w)
    whole = da.decode_attention_cached(q[:, None], kc, vc, 1, rows, pos[:, None], qd ** -0.5)
    assert grids == [(w, *plan(b, k, w)), (s, *plan(b, k, s))] and plan(b, k, w)[1] < plan(b, k, s)[1]
    got, whole = np.asarray(got[:, 0], np.float32), np.asarray(whole[:, 0], np.float32)
    assert np.all(got[1] == 0)
    live = np.array([0, 2])
    want = softmax_attention(q[live], kc, vc, 1, rows[live], pos[live] + 1, qd ** -0.5)
    assert rel(got[live], whole[live]) < 4e-3 and rel(got[live], want) < 1e-2
    with pytest.raises(ValueError, match="multiple of bs \\* splits"):
        decode_attention(q, kc, vc, jnp.int32(1), rows, pos, scale=1.0, bs=16, splits=4, window=40)


def test_merge_in_the_kernel_is_one_launch_with_no_xla_merge():
    """The kernel merge leaves no exp / reduce around the Triton call (the XLA merge has both);
    the counters are the only extra operand (aliased to an output, so no copy)."""
    q, kc, vc = cache_and_q(0, 1, 32, 4, 128, 1024, layers=3)
    bs, splits = plan(1, 4, 1024)

    def text(combine):
        def fn(q, kc, vc, lengths):
            return decode_attention(q, kc, vc, jnp.int32(2), None, lengths, scale=128 ** -0.5, bs=bs, splits=splits,
                                    combine=combine, interpret=False)
        return jax.jit(fn).trace(q, kc, vc, jnp.array([700])).lower(lowering_platforms=("cuda",)).as_text()
    merged, separate = text("kernel"), text("xla")
    assert merged.count("xla.gpu.triton") == separate.count("xla.gpu.triton") == 1
    assert "stablehlo.exponential" in separate and "stablehlo.exponential" not in merged
    assert "stablehlo.reduce" not in merged and "output_operand_aliases" in merged


def test_prologue_zeroed_counters_leave_no_zeros_kernel():
    """The cache-writing prologue's counters fed to the merge: the same result as counters made
    inside, and the lowered step (prologue + attention) has no zeros op of its own."""
    from qwen3_jax.kernels.qk_prologue import qk_norm_rope_write_cache

    b, h, k, qd, s, layers = 2, 8, 2, 32, 64, 2
    rng = np.random.default_rng(5)
    qp, kp, vp = (jnp.asarray(rng.standard_normal((2, b, n * qd)), jnp.float32) for n in (h, k, k))
    qn = kn = jnp.ones((layers, qd), jnp.bfloat16)
    cos = jnp.asarray(rng.standard_normal((b, qd)), jnp.bfloat16)
    sin = jnp.asarray(rng.standard_normal((b, qd)), jnp.bfloat16)
    _, kc, vc = cache_and_q(1, b, h, k, qd, s, layers=layers)
    pos = jnp.array([20, 63], jnp.int32)
    kw = dict(scale=qd ** -0.5, bs=16, splits=4, group=h // k, length_offset=1)

    def step(qp, kp, vp, kc, vc, pos, own_counts, interpret=None):
        q16, kc, vc, counts = qk_norm_rope_write_cache(qp, kp, vp, qn, kn, jnp.int32(1), cos, sin, 1e-6, kc, vc,
                                                       None, pos, heads=h, dtype=jnp.bfloat16, interpret=interpret)
        return decode_attention(q16, kc, vc, jnp.int32(1), None, pos, counts=None if own_counts else counts,
                                interpret=interpret, **kw)
    args = (qp, kp, vp, kc, vc, pos)
    np.testing.assert_array_equal(np.asarray(jax.jit(step, static_argnums=6)(*args, True), np.float32),
                                  np.asarray(jax.jit(step, static_argnums=6)(*args, False), np.float32))

    def zeros_ops(own_counts):
        text = jax.jit(lambda *a: step(*a, own_counts, interpret=False)).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
        return [ln for ln in text.splitlines() if "broadcast_in_dim" in ln and ln.endswith("tensor<2x2xi32>")]
    assert len(zeros_ops(True)) == 1 and not zeros_ops(False)
    with pytest.raises(ValueError, match="counts must be zeros"):
        decode_attention(jnp.zeros((b, k, 16, qd), jnp.bfloat16), kc, vc, jnp.int32(1), None, pos,
                         counts=jnp.zeros((b,), jnp.int32), **kw)


# -- GPU: compiled, against XLA, repeated --------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 8, 64])
def test_gpu_merge_in_the_kernel_matches_xla_and_repeats_bit_for_bit(b):
    h, k, qd, s = 32, 4, 128, 1024
    q, kc, vc = cache_and_q(b, b, h, k, qd, s, layers=3)
    bs, splits = plan(b, k, s)
    rng = np.random.default_rng(b)
    lengths = jnp.asarray(rng.integers(1, s + 1, b), jnp.int32).at[0].set(s)
    rows = jnp.arange(b, dtype=jnp.int32)
    fn = jax.jit(lambda q, lengths, combine: decode_attention(q, kc, vc, jnp.int32(2), None, lengths,
                                                              scale=qd ** -0.5, bs=bs, splits=splits,
                                                              combine=combine), static_argnums=2)
    first = np.asarray(fn(q, lengths, "kernel"), np.float32)
    for _ in range(50):
        np.testing.assert_array_equal(np.asarray(fn(q, lengths, "kernel"), np.float32), first)
    assert rel(first, fn(q, lengths, "xla")) < 4e-3
    assert rel(first, softmax_attention(q, kc, vc, 2, rows, lengths, qd ** -0.5)) < 1e-2


def test_plan_caps_the_key_splits():
    """decode_attention.plan: splits grow until batch x kv heads x splits reaches TARGET_PROGRAMS,
    at most MAX_SPLITS (run 131: batch 1 at 8k ran 2.3x slower on 128 splits than on 32) and no
    more than the key blocks. The figures the runs measured, as the rule gives them."""
    assert plan(1, 4, 1024) == (64, 16)      # every key block its own split
    assert plan(1, 4, 8192) == (64, 32)      # capped (128 without the cap)
    assert plan(2, 4, 32768) == (64, 32)     # capped (64 without)
    assert plan(8, 4, 8192) == (64, 16)      # the target: 512 programs, under the cap
    assert plan(64, 4, 1024) == (64, 2)
