"""Decode attention with its prologue in one kernel (kernels/decode_attention.py,
decode_attention_rope): q/k RMSNorm + RoPE from the projections' split-K partials, the new K/V
written into the cache, and attention with the key splits merged in the kernel, against the two
kernels it replaces (qk_prologue.qk_norm_rope_write_cache, then decode_attention), which
tests/test_kernels_qk_prologue.py and tests/test_kernels_decode_attention.py hold to XLA.

CPU: Pallas interpret mode, and the Triton lowering at 30B-A3B shapes. GPU (marked): compiled at
30B-A3B shapes and repeated; on the device machine
`QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_kernels_decode_attention_rope.py`.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import Qwen3MoeConfig, kernels, random_model
from qwen3_jax.config import Fp8Config
from qwen3_jax.kernels import decode_attention as da
from qwen3_jax.kernels.decode_attention import decode_attention_cached, decode_attention_rope
from qwen3_jax.kernels.qk_prologue import qk_norm_rope_write_cache
from qwen3_jax.model import rope_tables
from reference import TINY, with_distinct_norms

EPS = 1e-6
TOL_BF16_MODEL = 2e-2   # as tests/test_kernels.py: a bf16 model's logits, two paths


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def step_inputs(seed, b, h, k, qd, s, layers, slots, positions):
    """A decode step's projections as float32 partials (3 splits for q, 2 for k and v) whose sums
    are exact in any order (multiples of 1/64), distinct norm weights per layer, the model's RoPE
    tables at the rows' positions, and a random bf16 cache [layers, slots, s, k, qd]."""
    rng = np.random.default_rng(seed)

    def partials(n_split, n):
        return jnp.asarray(rng.integers(-192, 192, (n_split, b, n)) / 64, jnp.float32)

    qp, kp, vp = partials(3, h * qd), partials(2, k * qd), partials(2, k * qd)
    qn = jnp.asarray(rng.uniform(0.5, 1.5, (layers, qd)), jnp.bfloat16)
    kn = jnp.asarray(rng.uniform(0.5, 1.5, (layers, qd)), jnp.bfloat16)
    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", head_dim=qd))
    cos, sin = rope_tables(cfg, jnp.minimum(positions, s - 1)[:, None], jnp.bfloat16)
    key_k, key_v = jax.random.split(jax.random.key(seed))   # drawn where the test runs (GiBs at 30B shapes)
    kc = jax.random.normal(key_k, (layers, slots, s, k, qd), jnp.bfloat16)
    vc = jax.random.normal(key_v, (layers, slots, s, k, qd), jnp.bfloat16)
    return qp, kp, vp, qn, kn, cos[:, 0], sin[:, 0], kc, vc


def two_kernels(qp, kp, vp, qn, kn, layer, cos, sin, kc, vc, rows, pos, *, heads, scale, kv_window=None):
    """What the fused kernel replaces: the cache-writing prologue, then decode attention."""
    q16, kc, vc, counts = qk_norm_rope_write_cache(qp, kp, vp, qn, kn, layer, cos, sin, EPS, kc, vc, rows, pos,
                                                   heads=heads, dtype=jnp.bfloat16)
    out = decode_attention_cached(q16, kc, vc, layer, rows, pos[:, None], scale, group=heads // kc.shape[3],
                                  counts=counts, kv_window=kv_window)
    return out[:, 0], kc, vc


def fused(qp, kp, vp, qn, kn, layer, cos, sin, kc, vc, rows, pos, counts, *, heads, scale, kv_window=None):
    return decode_attention_rope(qp, kp, vp, qn, kn, layer, cos, sin, EPS, kc, vc, rows, pos, counts, heads=heads,
                                 scale=scale, kv_window=kv_window)


def check_against_two_kernels(b, h, k, qd, s, slots, rows, pos, layer, seed, kv_window=None, tol=4e-3, layers=3):
    """The fused kernel against the two kernels: the cache writes bit for bit (exact partials), the
    attention output to bf16 precision (the new key's probability is not rounded to bf16 before
    its value product), idle rows (position >= s) zeros, the counters zeroed again. -> output."""
    args = step_inputs(seed, b, h, k, qd, s, layers, slots, pos)
    rows = None if rows is None else jnp.asarray(rows, jnp.int32)
    kw = dict(heads=h, scale=qd ** -0.5, kv_window=kv_window)
    zeros = jnp.zeros((b, k), jnp.int32)
    out, kc, vc, counts = jax.jit(lambda *a: fused(*a[:5], jnp.int32(layer), *a[5:], rows, pos, zeros, **kw))(*args)
    want, want_k, want_v = jax.jit(lambda *a: two_kernels(*a[:5], jnp.int32(layer), *a[5:], rows, pos, **kw))(*args)
    np.testing.assert_array_equal(np.asarray(kc, np.float32), np.asarray(want_k, np.float32))
    np.testing.assert_array_equal(np.asarray(vc, np.float32), np.asarray(want_v, np.float32))
    live = np.asarray(pos) < s
    assert not np.array_equal(np.asarray(kc, np.float32), np.asarray(args[7], np.float32))   # it did write
    assert out.shape == (b, h, qd) and out.dtype == jnp.bfloat16
    assert rel(np.asarray(out, np.float32)[live], np.asarray(want, np.float32)[live]) < tol
    assert not np.any(np.asarray(out, np.float32)[~live])
    assert not np.any(np.asarray(counts))
    return np.asarray(out, np.float32)


# -- CPU: interpret mode ------------------------------------------------------------------------

@pytest.mark.parametrize("h,k", [(16, 2), (16, 4), (32, 4), (16, 1)])
@pytest.mark.parametrize("slotted", [False, True])
def test_fused_equals_the_prologue_then_attention(h, k, slotted):
    """Row 0 at position 0 (the new key alone), rows 1-2 with keys in several splits (a 256-key
    cache: 4 splits of 64), row 3 idle at the cache end. (16, 4): kv head 3's query heads sit at
    rows 12-15 of its 16-row tile (the tile starts at H - 16), not rows 0-3."""
    b, qd, s = 4, 32, 256
    rows = (2, 4, 0, 1) if slotted else None
    check_against_two_kernels(b, h, k, qd, s, 5 if slotted else b, rows, jnp.array([0, 200, 77, s], jnp.int32),
                              layer=1, seed=h + k)


def test_fused_with_a_kv_window():
    """The grid over the first 128 keys of a 256-key cache (the engine's window): same answer."""
    check_against_two_kernels(3, 16, 2, 32, 256, 3, None, jnp.array([5, 127, 64], jnp.int32), layer=2, seed=3,
                              kv_window=128)


def test_counters_carry_from_layer_to_layer():
    """The counters one call returns (zeroed by each merge) serve the next layer's call: two
    layers chained on one counter array give what each gives on fresh zeros."""
    b, h, k, qd, s = 2, 16, 2, 32, 256
    pos = jnp.array([100, 30], jnp.int32)
    qp, kp, vp, qn, kn, cos, sin, kc, vc = step_inputs(9, b, h, k, qd, s, 3, b, pos)
    kw = dict(heads=h, scale=qd ** -0.5)
    zeros = jnp.zeros((b, k), jnp.int32)

    @jax.jit
    def chained(kc, vc):
        out0, kc, vc, counts = fused(qp, kp, vp, qn, kn, jnp.int32(0), cos, sin, kc, vc, None, pos, zeros, **kw)
        out1, kc, vc, counts = fused(qp * 0.5, kp, vp, qn, kn, jnp.int32(1), cos, sin, kc, vc, None, pos, counts, **kw)
        return out0, out1, counts

    @jax.jit
    def fresh(kc, vc):
        out0, kc, vc, _ = fused(qp, kp, vp, qn, kn, jnp.int32(0), cos, sin, kc, vc, None, pos, zeros, **kw)
        out1, _, _, _ = fused(qp * 0.5, kp, vp, qn, kn, jnp.int32(1), cos, sin, kc, vc, None, pos, zeros, **kw)
        return out0, out1

    out0, out1, counts = chained(kc, vc)
    want0, want1 = fresh(kc, vc)
    np.testing.assert_array_equal(np.asarray(out0, np.float32), np.asarray(want0, np.float32))
    np.testing.assert_array_equal(np.asarray(out1, np.float32), np.asarray(want1, np.float32))
    assert not np.any(np.asarray(counts))


def test_uncovered_shapes_return_none():
    """Fewer than 16 query heads, G = 3, a float32 cache: None (the model keeps the two kernels)."""
    b, qd, s = 2, 32, 64
    pos = jnp.array([3, 4], jnp.int32)

    def call(h, k, cache_dtype=jnp.bfloat16):
        qp, kp, vp, qn, kn, cos, sin, kc, vc = step_inputs(1, b, h, k, qd, s, 2, b, pos)
        return decode_attention_rope(qp, kp, vp, qn, kn, 0, cos, sin, EPS, kc.astype(cache_dtype),
                                     vc.astype(cache_dtype), None, pos, jnp.zeros((b, k), jnp.int32), heads=h,
                                     scale=1.0)
    assert call(8, 2) is None and call(24, 8) is None and call(16, 2, jnp.float32) is None
    assert call(16, 2) is not None


def test_the_model_runs_the_fused_kernel_and_keeps_its_answer(monkeypatch):
    """A 16-head model (kernels forced on, interpret mode), prefill then a decode step on chosen
    slots with an idle row: PROLOGUE "fused" runs decode_attention_rope and no prologue kernel,
    "separate" the two kernels. The live rows' logits match plain XLA, both ways; the layer-0
    cache (written before any attention output differs) is the same bits both ways."""
    from flax import nnx

    from qwen3_jax import model as model_mod

    monkeypatch.setattr(model_mod, "DECODE_UNROLL", 1)   # a layer loop: traced layer indices, carried counters
    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=3, head_dim=32,
                                        num_attention_heads=16, num_key_value_heads=2, num_experts=16))
    m = with_distinct_norms(random_model(cfg, seed=4))
    tok = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (3, 6)), jnp.int32)
    pos, slots = jnp.asarray([[5], [5], [128]], jnp.int32), jnp.asarray([2, 0, 1], jnp.int32)

    def run(st, tok):
        model = nnx.merge(m.graphdef, st)
        _, cache = model(tok[:, :5], None, m.init_cache(3, 128))
        return model(tok[:, 5:], pos, cache, slots)

    res = {}
    for name, on, prologue in (("xla", False, "fused"), ("separate", True, "separate"), ("fused", True, "fused")):
        monkeypatch.setattr(da, "PROLOGUE", prologue)
        with kernels.kernels_enabled(on):
            fn = jax.jit(lambda st, tok: run(st, tok))   # a new function: traces are cached per function
            text = str(jax.make_jaxpr(fn)(m.state, tok))
            res[name] = fn(m.state, tok)
        if on:
            assert ("qwen3_decode_attention_rope" in text) == (prologue == "fused")
            assert ("qwen3_qk_norm_rope_kv" in text) == (prologue == "separate")
    for name in ("separate", "fused"):
        assert rel(np.asarray(res[name][0], np.float32)[:2], np.asarray(res["xla"][0], np.float32)[:2]) < TOL_BF16_MODEL
    for a, b in zip(jax.tree.leaves(res["fused"][1]), jax.tree.leaves(res["separate"][1])):
        np.testing.assert_array_equal(np.asarray(a[0], np.float32), np.asarray(b[0], np.float32))
    assert np.isfinite(np.asarray(res["fused"][0], np.float32)[2]).all()   # the idle row


# -- CPU: Triton lowering of the 30B-A3B shapes (no GPU needed, nothing allocated) --------------

@pytest.mark.parametrize("b", [1, 64])
def test_lowers_to_one_triton_call_for_30b_shapes(b):
    """One Triton call: no pad of q, no scatter for the cache write, no zeros for the counters."""
    h, k, qd, n_layers = 32, 4, 128, 48
    sds = jax.ShapeDtypeStruct
    bf, f32 = jnp.bfloat16, jnp.float32
    cache = sds((n_layers, b, 8192, k, qd), bf)

    def fn(qp, kp, vp, qn, kn, cos, sin, kc, vc, pos, counts):
        return decode_attention_rope(qp, kp, vp, qn, kn, jnp.int32(3), cos, sin, EPS, kc, vc, None, pos, counts,
                                     heads=h, scale=qd ** -0.5, kv_window=1024, interpret=False)
    text = jax.jit(fn).trace(sds((8, b, h * qd), f32), sds((8, b, k * qd), f32), sds((8, b, k * qd), f32),
                             sds((n_layers, qd), bf), sds((n_layers, qd), bf), sds((b, qd), bf), sds((b, qd), bf),
                             cache, cache, sds((b,), jnp.int32), sds((b, k), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1
    assert not {"stablehlo.pad", "stablehlo.scatter", "stablehlo.broadcast_in_dim"} & set(re.findall(r"stablehlo\.\w+", text))


# -- GPU: compiled, at 30B-A3B shapes ------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 8, 64])
def test_gpu_fused_matches_the_two_kernels_and_repeats_bit_for_bit(b):
    """Layer 17 of a 24-layer 1024-key cache, slots permuted, one row at position 0 and (b > 1) one idle
    row: the same checks as on the CPU, then 20 repeats giving the same bits (the merge's order is
    fixed; a race between the writing program and the readers would not)."""
    h, k, qd, s = 32, 4, 128, 1024
    rng = np.random.default_rng(b)
    pos = rng.integers(1, s, b)
    pos[0] = 0
    if b > 1:
        pos[-1] = s
    pos = jnp.asarray(pos, jnp.int32)
    rows = rng.permutation(b + 2)[:b]
    first = check_against_two_kernels(b, h, k, qd, s, b + 2, rows, pos, layer=17, seed=b, layers=24)
    args = step_inputs(b, b, h, k, qd, s, 24, b + 2, pos)
    fn = jax.jit(lambda *a: fused(*a[:5], jnp.int32(17), *a[5:], jnp.asarray(rows, jnp.int32), pos,
                                  jnp.zeros((b, k), jnp.int32), heads=h, scale=qd ** -0.5)[0])
    for _ in range(20):
        np.testing.assert_array_equal(np.asarray(fn(*args), np.float32), first)


@pytest.mark.parametrize("mesh,fp8", [("tp=2", False), ("ep=2", False), ("tp=2", True)])
def test_on_a_mesh_the_fused_kernel_runs_per_device(mesh, fp8, monkeypatch, fp8_w8a16):
    """A 32-head model on a mesh (kernels forced on, interpret mode): decode attention with its
    prologue runs per device on its local heads (tp=2: 16 of 32, G = 8) or rows (ep=2: the
    attention batch split over data-parallel groups), where the mesh ran XLA's norms, RoPE and
    cache scatter before. As on one device, q/k/v go in one gemv launch side by side and the
    input norm in its x load. Prefill + decode logits equal one device's plain XLA to bf16
    precision (FP8 in W8A16: the prefill's 10 rows take the projections' grouped matmul), and
    PROLOGUE "separate" keeps the XLA path on the mesh (q, k, v one launch each)."""
    from qwen3_jax import model as model_mod
    from qwen3_jax.kernels import gemv as gemv_mod
    from qwen3_jax.kernels.gemv_inputs import RmsNormX
    from reference import prefill_then_decode

    launches = []   # (weights per launch, side by side, x is a norm source) of every gemv traced
    traced = gemv_mod._gemv

    def spy(x, rows, groups, weights, *a, **kw):
        launches.append((len(weights), bool(kw.get("concat")), isinstance(x, RmsNormX)))
        return traced(x, rows, groups, weights, *a, **kw)

    monkeypatch.setattr(gemv_mod, "_gemv", spy)

    monkeypatch.setattr(model_mod, "DECODE_UNROLL", 1)
    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2, head_dim=32,
                                        num_attention_heads=32, num_key_value_heads=4, num_experts=16))
    if fp8:   # the projections' weights and block scales go into the per-device kernel side by side
        cfg = dataclasses.replace(cfg, fp8=Fp8Config())
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 5)), jnp.int32)
    one = with_distinct_norms(random_model(cfg, seed=3))
    with kernels.kernels_enabled(False):
        ref = [np.asarray(a, np.float32) for a in jax.jit(prefill_then_decode(one, tokens, 16))(one.state, tokens)]
    sharded = with_distinct_norms(random_model(cfg, mesh=mesh, seed=3))
    for prologue in ("fused", "separate"):
        monkeypatch.setattr(da, "PROLOGUE", prologue)
        launches.clear()
        with kernels.kernels_enabled(True):
            fn = prefill_then_decode(sharded, tokens, 16)   # a new function per setting
            text = str(jax.make_jaxpr(fn)(sharded.state, tokens))
            out = [np.asarray(a, np.float32) for a in jax.jit(fn)(sharded.state, tokens)]
        assert ("qwen3_decode_attention_rope" in text) == (prologue == "fused"), prologue
        assert ("qwen3_gemv_dot_fp8" in text) == fp8
        qkv = [lz for lz in launches if lz[:2] == (3, True)]
        assert qkv == ([(3, True, True)] if prologue == "fused" else []), (prologue, launches)
        for a, b in zip(out, ref):
            assert rel(a, b) < TOL_BF16_MODEL, (prologue, rel(a, b))


def test_on_data_parallel_groups_chosen_slots_keep_the_xla_path():
    """ep=2 splits the attention batch over data-parallel groups: the kernel would take device d's
    rows as its own slots, which a step on chosen slots (slots_b) breaks. Such a step keeps XLA's
    path on the mesh, with one device's answer, where the same step without slots_b runs the
    kernel."""
    from flax import nnx

    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2, head_dim=32,
                                        num_attention_heads=32, num_key_value_heads=4, num_experts=16))
    tok = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 6)), jnp.int32)
    pos, slots = jnp.full((2, 1), 5, jnp.int32), jnp.asarray([1, 0], jnp.int32)

    def step(m, slotted):
        def run(st, tok):
            model = nnx.merge(m.graphdef, st)
            _, cache = model(tok[:, :5], None, m.init_cache(2, 16))
            return model(tok[slots, 5:] if slotted else tok[:, 5:], pos, cache, slots if slotted else None)[0]
        return run

    one = with_distinct_norms(random_model(cfg, seed=7))
    sharded = with_distinct_norms(random_model(cfg, mesh="ep=2", seed=7))
    with kernels.kernels_enabled(True):
        for slotted in (True, False):
            want = np.asarray(jax.jit(step(one, slotted))(one.state, tok), np.float32)
            fn = step(sharded, slotted)
            text = str(jax.make_jaxpr(fn)(sharded.state, tok))
            got = np.asarray(jax.jit(fn)(sharded.state, tok), np.float32)
            assert ("qwen3_decode_attention_rope" in text) == (not slotted)
            assert rel(got, want) < TOL_BF16_MODEL
