"""A prefill chunk's attention over the KV cache it continues (kernels/prefill_attention.py,
chunk_attention_cached): the Pallas kernel against the plain-XLA masked attention.

CPU: Pallas interpret mode, and the Triton lowering at 30B-A3B shapes. GPU (marked): compiled at
30B-A3B shapes; on the device machine
`QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_kernels_chunk_attention.py`.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import Qwen3MoeConfig, kernels, random_model
from qwen3_jax.attention import attention
from qwen3_jax.kernels import prefill_attention as pa
from reference import TINY

TOL_BF16 = 2e-2   # two bf16 attention paths: scores and probabilities rounded at different points


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def worst_token(a, b) -> float:
    """The largest relative error of one token's output [H, Q]: a key missed by one row shows."""
    return float(np.max([rel(a[:, i], b[:, i]) for i in range(a.shape[1])]))   # NaN (a zero reference) fails


def chunk_inputs(seed, t, h, k, qd, s, layers=2, slots=3):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((1, t, h, qd)), jnp.bfloat16)
    kc = jnp.asarray(rng.standard_normal((layers, slots, s, k, qd)), jnp.bfloat16)
    vc = jnp.asarray(rng.standard_normal((layers, slots, s, k, qd)), jnp.bfloat16)
    return q, kc, vc


def positions(t, start, valid, s):
    """The engine's chunk positions: start.. for `valid` tokens, then padding at the cache length."""
    p = np.full((1, t), s, np.int32)
    p[0, :valid] = np.arange(start, start + valid)
    return jnp.asarray(p)


def reference(q, kc, vc, layer, slot, pos, scale):
    """Masked attention over the cache row (keys 0..position), zeros on padding rows, float32."""
    s = kc.shape[2]
    keys, values = kc[layer, slot][None].astype(jnp.float32), vc[layer, slot][None].astype(jnp.float32)
    mask = jnp.arange(s)[None, None, :] <= pos[:, :, None]
    out = attention(q.astype(jnp.float32), keys, values, mask, scale)
    return np.where(np.asarray(pos < s)[:, :, None, None], np.asarray(out), 0.0)


@pytest.mark.parametrize("t,h,k,start,valid", [
    (32, 8, 2, 70, 27),     # G = 4: two programs a kv head, one holding the padding
    (32, 8, 2, 0, 32),      # the prompt's first chunk
    (16, 16, 2, 240, 16),   # G = 8, the chunk ending at the cache's last key
    (64, 4, 4, 33, 40),     # G = 1, a key block split by the start
    (32, 8, 2, pa.CHUNK_KEYS - 15, 32),   # program 0's last key alone in its key block
])
def test_kernel_matches_masked_attention(t, h, k, start, valid):
    qd, s = 32, 256
    q, kc, vc = chunk_inputs(start + valid, t, h, k, qd, s)
    pos = positions(t, start, valid, s)
    with kernels.kernels_enabled(True):
        out = jax.jit(lambda q, kc, vc, p: pa.chunk_attention_cached(q, kc, vc, jnp.int32(1), jnp.asarray([2]), p,
                                                                    qd ** -0.5))(q, kc, vc, pos)
    want = reference(q, kc, vc, 1, 2, pos, qd ** -0.5)
    out = np.asarray(out, np.float32)
    assert worst_token(out[:, :valid], want[:, :valid]) < TOL_BF16
    np.testing.assert_array_equal(out[:, valid:], 0.0)   # padding rows


def test_key_splits_fill_the_grid_up_to_the_target():
    assert pa.key_splits(8, 128, None) == 1
    assert pa.key_splits(8, 128, 256) == 32        # 8 programs x 32 = the target
    assert pa.key_splits(8, 128, 200) == 16        # the power of two below it
    assert pa.key_splits(8, 4, 256) == 4           # at most one key block a split
    assert pa.key_splits(512, 128, 256) == 1       # the grid is full already


@pytest.mark.parametrize("start,valid,target", [
    (200, 20, 64),    # 8 splits of one block (16 capped at 8): the program's keys in several
    (70, 32, 16),     # 4 splits of two blocks, a start inside a block
    (0, 17, 64),      # a first chunk: every key in split 0, padding rows
    (224, 32, 8),     # 2 splits, the chunk ending at the cache's last key
])
def test_kernel_key_splits_match_masked_attention(monkeypatch, start, valid, target):
    """CHUNK_SPLIT_PROGRAMS: the chunk kernel over key ranges on a fourth grid axis, merged after
    it, equals the masked attention (rows whose keys lie in one range, ranges a row saw none of,
    padding rows zero)."""
    monkeypatch.setattr(pa, "CHUNK_KEYS", 32)
    monkeypatch.setattr(pa, "CHUNK_SPLIT_PROGRAMS", target)
    t, h, k, qd, s = 32, 8, 2, 32, 256
    q, kc, vc = chunk_inputs(start + valid + target, t, h, k, qd, s)
    pos = positions(t, start, valid, s)
    seen, real = [], pa.chunk_attention
    monkeypatch.setattr(pa, "chunk_attention", lambda *a, **kw: seen.append(kw["splits"]) or real(*a, **kw))
    with kernels.kernels_enabled(True):
        out = pa.chunk_attention_cached(q, kc, vc, jnp.int32(1), jnp.asarray([2]), pos, qd ** -0.5)
    assert seen == [min(target // 4, s // 32)]     # 4 programs (2 kv heads x 128 rows / 64), 8 key blocks
    want = reference(q, kc, vc, 1, 2, pos, qd ** -0.5)
    out = np.asarray(out, np.float32)
    assert worst_token(out[:, :valid], want[:, :valid]) < TOL_BF16
    np.testing.assert_array_equal(out[:, valid:], 0.0)


def test_positions_out_of_order_take_the_xla_math():
    """Positions that are not start, start+1, ... (here: reversed) run the XLA branch, which keeps
    the model's mask exactly."""
    t, h, k, qd, s = 32, 8, 2, 32, 128
    q, kc, vc = chunk_inputs(5, t, h, k, qd, s)
    pos = jnp.asarray(np.arange(40, 40 + t)[::-1][None].copy(), jnp.int32)
    out = pa.chunk_attention_cached(q, kc, vc, jnp.int32(0), jnp.asarray([1]), pos, qd ** -0.5)
    assert rel(np.asarray(out, np.float32), reference(q, kc, vc, 0, 1, pos, qd ** -0.5)) < TOL_BF16


def test_promised_order_drops_the_check_and_keeps_the_numbers():
    """in_order (the engine's promise) traces the kernel with no conditional (its predicate costs a
    host round trip a layer on XLA:GPU), gives the checked call's output exactly, and that is the
    masked attention."""
    t, h, k, qd, s = 32, 8, 2, 32, 128
    q, kc, vc = chunk_inputs(7, t, h, k, qd, s)
    pos = positions(t, 40, 20, s)
    with kernels.kernels_enabled(True):
        fns = {o: functools.partial(pa.chunk_attention_cached, layer=jnp.int32(0), rows_b=jnp.asarray([1]), scale=qd ** -0.5,
                                    in_order=o) for o in (False, True)}
        texts = {o: str(jax.make_jaxpr(fn)(q, kc, vc, positions_bt=pos)) for o, fn in fns.items()}
        outs = {o: np.asarray(fn(q, kc, vc, positions_bt=pos), np.float32) for o, fn in fns.items()}
    assert texts[False].count("cond[") == texts[True].count("cond[") + 1   # (interpret mode has conds of its own)
    assert "qwen3_chunk_attention" in texts[True]
    np.testing.assert_array_equal(outs[True], outs[False])
    want = reference(q, kc, vc, 0, 1, pos, qd ** -0.5)
    assert worst_token(outs[True][:, :20], want[:, :20]) < TOL_BF16
    np.testing.assert_array_equal(outs[True][:, 20:], 0.0)


def test_kv_window_bounds_the_keys_visited(monkeypatch):
    """A window below the cache length (the positions under it) plans the kernel's key loop over
    the window only, and gives the same answer."""
    t, h, k, qd, s = 32, 8, 2, 32, 512
    q, kc, vc = chunk_inputs(6, t, h, k, qd, s)
    pos = positions(t, 90, 30, s)
    keys, real = [], pa.chunk_attention
    monkeypatch.setattr(pa, "chunk_attention", lambda *a, **kw: keys.append(kw["bs"] * kw["steps"]) or real(*a, **kw))
    full = pa.chunk_attention_cached(q, kc, vc, jnp.int32(1), jnp.asarray([0]), pos, qd ** -0.5)
    windowed = pa.chunk_attention_cached(q, kc, vc, jnp.int32(1), jnp.asarray([0]), pos, qd ** -0.5, kv_window=128)
    assert keys == [s, 128]
    np.testing.assert_array_equal(np.asarray(windowed, np.float32), np.asarray(full, np.float32))


def test_uncovered_shapes():
    sds = jax.ShapeDtypeStruct
    cache = sds((2, 1, 256, 2, 32), jnp.bfloat16)
    assert pa.chunk_covered(sds((1, 32, 8, 32), jnp.bfloat16), cache)
    assert not pa.chunk_covered(sds((1, 1, 8, 32), jnp.bfloat16), cache)           # decode: one token
    assert not pa.chunk_covered(sds((1, 32, 8, 32), jnp.float32), cache)            # dtypes differ
    assert not pa.chunk_covered(sds((1, 32, 6, 32), jnp.bfloat16), cache)           # G = 3
    assert not pa.chunk_covered(sds((1, 8, 4, 32), jnp.bfloat16), cache)            # T*G = 16 rows
    assert not pa.chunk_covered(sds((1, 32, 8, 32), jnp.bfloat16), sds((2, 1, 250, 2, 32), jnp.bfloat16))


def three_chunks(mesh):
    """A tiny model: a 90-token prompt written into cache row 1 in three 32-token chunks, the last
    one padded. -> (plain XLA's last logits on one device, the jaxpr text and the logits of the
    same with kernels forced on (interpret mode) on `mesh`, the config)."""
    from flax import nnx

    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2))
    one = random_model(cfg, seed=3)
    m = one if mesh is None else random_model(cfg, mesh=mesh, seed=3)
    s, prompt = 128, np.random.default_rng(1).integers(0, cfg.vocab_size, 90)

    def run(st, m):
        model, cache = nnx.merge(m.graphdef, st), m.init_cache(2, s)
        for c0 in range(0, 90, 32):
            n = min(32, 90 - c0)
            tok = np.zeros((1, 32), np.int32)
            tok[0, :n] = prompt[c0:c0 + n]
            logits, cache = model(jnp.asarray(tok), positions(32, c0, n, s), cache, jnp.asarray([1], jnp.int32),
                                  jnp.asarray([n - 1], jnp.int32))
        return logits

    with kernels.kernels_enabled(False):
        want = np.asarray(jax.jit(lambda st: run(st, one))(one.state), np.float32)
    with kernels.kernels_enabled(True):
        fn = jax.jit(lambda st: run(st, m))
        text = str(jax.make_jaxpr(fn)(m.state))
        got = np.asarray(fn(m.state), np.float32)
    return want, text, got, cfg


@pytest.mark.parametrize("mesh", [None, "tp=2"])
def test_the_model_prefills_chunks_through_the_kernel(mesh):
    """three_chunks: the chunks run the chunk kernel (in the traced program) and give plain XLA's
    logits. On tp=2 it runs per device on the local heads (4 of 8, G = 4)."""
    want, text, got, _ = three_chunks(mesh)
    assert "qwen3_chunk_attention" in text
    assert rel(got, want) < TOL_BF16


# -- CPU: Triton lowering of the 30B-A3B shapes (no GPU needed, nothing allocated) --------------

@pytest.mark.parametrize("t,splits", [(512, 1), (16, 32)])
def test_lowers_to_one_triton_call_for_30b_shapes(t, splits):
    h, k, qd, s = 32, 4, 128, 16384
    sds = jax.ShapeDtypeStruct
    cache = sds((48, 4, s, k, qd), jnp.bfloat16)

    def fn(q, kc, vc, pos):
        qt = q.reshape(1, t, k, h // k, qd).transpose(0, 2, 1, 3, 4).reshape(1, k, t * h // k, qd)
        return pa.chunk_attention(qt, kc, vc, jnp.int32(3), jnp.asarray([2], jnp.int32), pos[:, 0],
                                  jnp.sum(pos < s, axis=1), scale=qd ** -0.5, group=h // k, rows=pa.CHUNK_ROWS,
                                  bs=pa.CHUNK_KEYS, steps=s // pa.CHUNK_KEYS, splits=splits, interpret=False)
    text = jax.jit(fn).trace(sds((1, t, h, qd), jnp.bfloat16), cache, cache, sds((1, t), jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1
    assert "stablehlo.gather" not in set(re.findall(r"stablehlo\.\w+", text))   # the cache is read in place


# -- GPU: compiled, at 30B-A3B shapes ------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("start,valid,t,target", [(0, 512, 512, None), (1500, 400, 512, None), (3584, 512, 512, None),
                                                  (3000, 16, 16, 256), (100, 30, 32, 256)])
def test_gpu_chunk_kernel_matches_masked_attention_at_30b_shapes(monkeypatch, start, valid, t, target):
    """Compiled at 30B-A3B attention shapes; small chunks also over key splits (CHUNK_SPLIT_PROGRAMS)."""
    monkeypatch.setattr(pa, "CHUNK_SPLIT_PROGRAMS", target)
    h, k, qd, s = 32, 4, 128, 4096
    q, kc, vc = chunk_inputs(start, t, h, k, qd, s, layers=3, slots=2)
    pos = positions(t, start, valid, s)
    out = jax.jit(lambda q, kc, vc, p: pa.chunk_attention_cached(q, kc, vc, jnp.int32(2), jnp.asarray([1]), p,
                                                                qd ** -0.5))(q, kc, vc, pos)
    want = reference(q, kc, vc, 2, 1, pos, qd ** -0.5)
    out = np.asarray(out, np.float32)
    assert worst_token(out[:, :valid], want[:, :valid]) < TOL_BF16
    np.testing.assert_array_equal(out[:, valid:], 0.0)


def _fresh_then_next_chunk(m, prompt, s, t, fresh, chunks=2, first=40, in_order=False):
    """A prompt into cache row 1 of `s` positions: its first `first` tokens as a `t`-token chunk
    (padded at position s) with Qwen3Moe's `fresh`, the rest as one continuing chunk (chunks=1:
    not), each with Qwen3Moe's `in_order`. -> (first chunk's logits [1, first, V], the last
    token's logits [1, 1, V], the cache)."""
    from flax import nnx

    def run(st):
        model = nnx.merge(m.graphdef, st)
        n, rest = first, len(prompt) - first
        tok = np.zeros((1, t), np.int32)
        tok[0, :n] = prompt[:n]
        head, cache = model(jnp.asarray(tok), positions(t, 0, n, s), m.init_cache(2, s), jnp.asarray([1]),
                            None, fresh=fresh, in_order=in_order)
        if chunks == 1:
            return head[:, :n], None, cache
        tok = np.zeros((1, t), np.int32)
        tok[0, :rest] = prompt[n:]
        last, cache = model(jnp.asarray(tok), positions(t, n, rest, s), cache, jnp.asarray([1]),
                            jnp.asarray([rest - 1], jnp.int32), in_order=in_order)
        return head[:, :n], last, cache
    return run


@pytest.mark.parametrize("fresh_prefill", [True, False])
def test_a_fresh_first_chunk_attends_over_its_own_keys(monkeypatch, fresh_prefill):
    """Kernels forced on (interpret mode): a prompt's first chunk with `fresh` (padded, as the
    engine pads it) attends over its own K/V, not through the chunk kernel (FRESH_PREFILL on),
    and writes the same cache: its logits, the next chunk's (which reads that cache back) and the
    cache rows equal plain XLA's on the same prompt without `fresh`. FRESH_PREFILL off: the
    chunk kernel, the same numbers."""
    from qwen3_jax import model as model_mod

    monkeypatch.setattr(model_mod, "FRESH_PREFILL", fresh_prefill)
    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2))
    m = random_model(cfg, seed=4)
    s, t = 128, 64
    prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, 90)
    with kernels.kernels_enabled(False):
        want = jax.jit(_fresh_then_next_chunk(m, prompt, s, t, False))(m.state)
    with kernels.kernels_enabled(True):
        first_only = jax.make_jaxpr(_fresh_then_next_chunk(m, prompt, s, t, True, chunks=1))(m.state)
        got = jax.jit(_fresh_then_next_chunk(m, prompt, s, t, True))(m.state)
    assert ("qwen3_chunk_attention" in str(first_only)) != fresh_prefill
    for a, b in zip(got[:2], want[:2]):
        assert rel(np.asarray(a, np.float32), np.asarray(b, np.float32)) < TOL_BF16
    for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):   # slot 1's 90 positions
        assert rel(np.asarray(a[:, 1, :90], np.float32), np.asarray(b[:, 1, :90], np.float32)) < TOL_BF16
        assert not np.asarray(a[:, 0], np.float32).any() and not np.asarray(a[:, 1, 90:], np.float32).any()


@pytest.mark.gpu
def test_gpu_fresh_first_chunk_matches_the_chunk_kernel(monkeypatch):
    """Compiled, 30B-A3B's attention shapes (32 heads, 4 kv heads, head_dim 128), 2 layers: a
    1000-token first chunk padded to 1024 through cuDNN over its own K/V (FRESH_PREFILL on)
    against the chunk kernel reading them from the cache (off): the chunk's logits, the next
    chunk's and the cache rows agree."""
    from qwen3_jax import model as model_mod

    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2, hidden_size=512,
                                        num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                        vocab_size=1024, max_position_embeddings=4096))
    m = random_model(cfg, seed=5)
    s, t = 2048, 1024
    prompt = np.random.default_rng(3).integers(0, cfg.vocab_size, 1050)
    outs = {}
    for on in (True, False):
        monkeypatch.setattr(model_mod, "FRESH_PREFILL", on)
        with kernels.kernels_enabled(True):
            outs[on] = jax.jit(_fresh_then_next_chunk(m, prompt, s, t, True, first=1000))(m.state)
    for a, b in zip(outs[True][:2], outs[False][:2]):
        assert rel(np.asarray(a, np.float32), np.asarray(b, np.float32)) < TOL_BF16
    for a, b in zip(jax.tree.leaves(outs[True][2]), jax.tree.leaves(outs[False][2])):
        assert rel(np.asarray(a, np.float32), np.asarray(b, np.float32)) < TOL_BF16


# -- A continuing chunk split into two flash-attention calls merged by log-sum-exp ---------------

def xla_partial(q, k, v, scale, kv_len=None):
    """_cudnn_partial's contract in float32 XLA: kv_len None, causal (query t sees keys s <= t);
    else query t sees keys s < kv_len[b]. -> (out [B, T, H, Q], lse [B, T, H])."""
    b, t, h, qd = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    scores = jnp.einsum("btkgq,bskq->bkgts", q.reshape(b, t, kh, g, qd).astype(jnp.float32),
                        k.astype(jnp.float32)) * scale
    if kv_len is None:
        mask = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None, None, None]
    else:
        mask = (jnp.arange(s)[None, :] < kv_len[:, None])[:, None, None, None, :]
    scores = jnp.where(mask, scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)                                      # [B, K, G, T]
    out = jnp.einsum("bkgts,bskq->btkgq", jnp.exp(scores - lse[..., None]), v.astype(jnp.float32))
    return out.reshape(b, t, h, qd), lse.transpose(0, 3, 1, 2).reshape(b, t, h)


def own_kv(kc, vc, layer, slot, start, t):
    """The chunk's own K/V as the model holds them when it attends: the cache rows it just wrote."""
    return kc[layer, slot, start:start + t][None], vc[layer, slot, start:start + t][None]


@pytest.mark.parametrize("start,valid", [(70, 27), (0, 32), (128, 32), (96, 20)])
def test_split_chunk_matches_masked_attention(start, valid):
    """chunk_attention_split with the plain-XLA partial: cached keys 0..start-1 and the chunk's own
    keys merged by their log-sum-exps equal one masked attention over the cache row (a first chunk,
    start 0, has no cached part; padding rows give zeros)."""
    t, h, k, qd, s, window = 32, 8, 2, 32, 256, 160
    q, kc, vc = chunk_inputs(start + 3 * valid, t, h, k, qd, s)
    pos = positions(t, start, valid, s)
    ko, vo = own_kv(kc, vc, 1, 2, start, t)
    out = pa.chunk_attention_split(q, ko, vo, kc, vc, jnp.int32(1), jnp.asarray([2]), jnp.asarray([start]),
                                   jnp.asarray([valid]), qd ** -0.5, window, partial=xla_partial)
    want = reference(q, kc, vc, 1, 2, pos, qd ** -0.5)
    out = np.asarray(out, np.float32)
    assert worst_token(out[:, :valid], want[:, :valid]) < TOL_BF16
    np.testing.assert_array_equal(out[:, valid:], 0.0)


def test_merged_partials_equal_one_softmax():
    """merge_partials over a key set cut in two at every point equals the attention over all of it
    to float32 precision, and a part with no keys (lse -inf) leaves the other unchanged."""
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((1, 4, 2, 8), (1, 12, 1, 8), (1, 12, 1, 8)))
    whole, _ = xla_partial(q, k, v, 0.5, jnp.asarray([12]))
    for cut in (1, 5, 11):
        a, la = xla_partial(q, k[:, :cut], v[:, :cut], 0.5, jnp.asarray([cut]))
        b, lb = xla_partial(q, k[:, cut:], v[:, cut:], 0.5, jnp.asarray([12 - cut]))
        np.testing.assert_allclose(pa.merge_partials(a, la, b, lb), whole, rtol=1e-5, atol=1e-6)
    none = jnp.full(whole.shape[:3], -jnp.inf)
    np.testing.assert_allclose(pa.merge_partials(jnp.zeros_like(whole), none, whole, _), whole, rtol=1e-6)


@pytest.mark.parametrize("rows", [[2], [0, 2]])
def test_page_table_names_each_rows_layer_in_order(rows):
    """The cache seen as pages, read through page_table: row b's first S/page pages are slot
    rows[b]'s positions 0..S-1 at the layer, the rest of its table within bounds (cuDNN's
    paged call wants B x table entries = all pages)."""
    layers, slots, s, k, qd, page = 3, 4, 256, 2, 8, 64
    cache = jnp.arange(layers * slots * s * k * qd, dtype=jnp.float32).reshape(layers, slots, s, k, qd)
    rows_b = jnp.asarray(rows, jnp.int32)
    table = pa.page_table(cache.shape, jnp.int32(1), rows_b, page)
    pages = cache.reshape(-1, page, k, qd)
    assert table.shape == (len(rows), 1, layers * slots * s // page // len(rows), 1) and table.dtype == jnp.int32
    assert int(table.min()) >= 0 and int(table.max()) < pages.shape[0]
    seen = pages[table[:, 0, : s // page, 0]].reshape(len(rows), s, k, qd)
    np.testing.assert_array_equal(seen, cache[1, rows_b])


def test_split_needs_its_own_kv_and_the_bucket(monkeypatch):
    """chunk_attention_cached takes the split only with the chunk's own K/V, a bucket of
    SPLIT_MIN_TOKENS or more and cuDNN tracing (here forced: the CPU has no cuDNN); else the kernel."""
    t, h, k, qd, s = 32, 8, 2, 32, 128
    q, kc, vc = chunk_inputs(8, t, h, k, qd, s)
    pos = positions(t, 40, t, s)
    own = own_kv(kc, vc, 0, 1, 40, t)
    taken = []
    monkeypatch.setattr(pa, "_split_traces", lambda *a: True)
    monkeypatch.setattr(pa, "chunk_attention_split", lambda *a, **kw: taken.append("split") or jnp.zeros_like(q))
    for min_tokens, kv, want in [(32, own, "split"), (64, own, "kernel"), (None, own, "kernel"), (32, None, "kernel")]:
        monkeypatch.setattr(pa, "SPLIT_MIN_TOKENS", min_tokens)
        taken.clear()
        text = str(jax.make_jaxpr(lambda q: pa.chunk_attention_cached(q, kc, vc, jnp.int32(0), jnp.asarray([1]), pos,
                                                                      qd ** -0.5, own=kv))(q))
        assert (taken == ["split"]) == (want == "split")
        assert ("qwen3_chunk_attention" in text) == (want == "kernel")


@pytest.mark.parametrize("mesh", [None, "tp=2"])
def test_the_model_splits_long_chunks(monkeypatch, mesh):
    """three_chunks with SPLIT_MIN_TOKENS 32 and the split's cuDNN calls replaced by the float32
    XLA partial (the CPU has no cuDNN): every chunk takes the split, per device on tp=2 (the
    chunk's own K/V sharded as its cache), and gives plain XLA's logits."""
    monkeypatch.setattr(pa, "SPLIT_MIN_TOKENS", 32)
    monkeypatch.setattr(pa, "SPLIT_PAGE", None)   # the cached keys gathered, as the XLA partial takes them
    monkeypatch.setattr(pa, "_split_traces", lambda *a: True)
    calls = []
    monkeypatch.setattr(pa, "_cudnn_partial", lambda *a: calls.append(a[0].shape) or xla_partial(*a))
    want, text, got, cfg = three_chunks(mesh)
    heads = cfg.num_attention_heads // (1 if mesh is None else 2)
    assert "qwen3_chunk_attention" not in text
    assert calls and set(calls) == {(1, 32, heads, cfg.head_dim)}   # local heads per device
    assert rel(got, want) < TOL_BF16


def test_the_split_is_only_taken_on_a_gpu_backend(monkeypatch):
    """Where the split's calls would trace (here a stand-in that does) but the backend is the CPU
    (jax's CUDA plugin installed, JAX_PLATFORMS=cpu: run 150), cuDNN would fail to lower: the
    split is not taken; on a GPU backend it is."""
    sds = jax.ShapeDtypeStruct
    q, kv, cache = sds((1, 32, 8, 32), jnp.bfloat16), sds((1, 32, 2, 32), jnp.bfloat16), sds((2, 3, 256, 2, 32),
                                                                                              jnp.bfloat16)
    monkeypatch.setattr(pa, "chunk_attention_split", lambda q, *a, **kw: jnp.zeros(q.shape, q.dtype))
    for gpu in (False, True):
        monkeypatch.setattr(pa, "on_gpu", lambda: gpu)
        assert pa._split_traces(q, (kv, kv), cache, 256) == gpu


def test_a_gpu_without_the_split_says_so_once(monkeypatch, caplog):
    """On a GPU backend whose cuDNN or jax refuses the split's calls (here: the CPU's, no cuDNN),
    the chunk kernel runs and one warning names why, however many layers and shapes trace."""
    import logging

    sds = jax.ShapeDtypeStruct
    q, kv, cache = sds((1, 32, 8, 32), jnp.bfloat16), sds((1, 32, 2, 32), jnp.bfloat16), sds((2, 3, 256, 2, 32),
                                                                                              jnp.bfloat16)
    monkeypatch.setattr(pa, "on_gpu", lambda: True)
    monkeypatch.setattr(pa, "_split_refusals", set())
    monkeypatch.setattr(pa, "_cudnn_partial", lambda *a: (_ for _ in ()).throw(RuntimeError("cuDNN is not detected.")))
    monkeypatch.setattr(pa, "SPLIT_PAGE", None)
    caplog.set_level(logging.WARNING, logger=pa.__name__)
    assert not any(pa._split_traces(q, (kv, kv), cache, 256) for _ in range(3))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "not the cuDNN split (RuntimeError: cuDNN is not detected.)" in said[0]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_cudnn_partial_matches_xla(causal):
    """cuDNN's output and log-sum-exp (the merge's weights) against float32 XLA at 30B shapes: the
    causal call over a 512-token chunk's own keys, the padded call over 1500 of 2048 cached keys."""
    h, k, qd, t = 32, 4, 128, 512
    rng = np.random.default_rng(11)
    s = t if causal else 2048
    q = jnp.asarray(rng.standard_normal((1, t, h, qd)), jnp.bfloat16)
    kk, vv = (jnp.asarray(rng.standard_normal((1, s, k, qd)), jnp.bfloat16) for _ in range(2))
    kv_len = None if causal else jnp.asarray([1500], jnp.int32)
    out, lse = jax.jit(lambda *a: pa._cudnn_partial(*a, qd ** -0.5, kv_len))(q, kk, vv)
    want, want_lse = xla_partial(q, kk, vv, qd ** -0.5, kv_len)
    assert rel(np.asarray(out, np.float32), want) < TOL_BF16
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [64, None], ids=["paged", "gathered"])
@pytest.mark.parametrize("start,valid", [(1500, 400), (3584, 512), (0, 512)])
def test_gpu_split_chunk_matches_the_kernel_at_30b_shapes(monkeypatch, start, valid, page):
    """Compiled at 30B-A3B attention shapes: chunk_attention_cached with the chunk's own K/V takes
    the cuDNN split (two cuDNN calls, no chunk kernel, in the program), its cached keys read in
    place through the page table (the order promised, as the engine's) or gathered (checked), and
    agrees with the masked reference."""
    monkeypatch.setattr(pa, "SPLIT_PAGE", page)
    h, k, qd, t, s = 32, 4, 128, 512, 4096
    q, kc, vc = chunk_inputs(start + 1, t, h, k, qd, s, layers=3, slots=2)
    pos = positions(t, start, valid, s)
    ko, vo = own_kv(kc, vc, 2, 1, start, t)
    fn = jax.jit(lambda q, kc, vc, p, ko, vo: pa.chunk_attention_cached(q, kc, vc, jnp.int32(2), jnp.asarray([1]), p,
                                                                       qd ** -0.5, own=(ko, vo),
                                                                       in_order=page is not None))
    hlo = fn.lower(q, kc, vc, pos, ko, vo).compile().as_text()
    assert hlo.count("__cudnn$fmha") >= 2 and "qwen3_chunk_attention" not in hlo
    out = np.asarray(fn(q, kc, vc, pos, ko, vo), np.float32)
    want = reference(q, kc, vc, 2, 1, pos, qd ** -0.5)
    assert worst_token(out[:, :valid], want[:, :valid]) < TOL_BF16
    np.testing.assert_array_equal(out[:, valid:], 0.0)


@pytest.mark.gpu
def test_gpu_split_on_a_mesh_matches_one_card():
    """Two cards, tp=2 (16 query heads and 2 kv heads a device): a 1000-token prompt in two
    512-token chunks, their order promised as the engine's, takes the cuDNN split per device
    inside shard_map (the cache and the chunk's own K/V split by kv head), and its logits and
    cache rows agree with one card's."""
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 GPUs")
    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2, hidden_size=512,
                                        num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                        vocab_size=1024, max_position_embeddings=4096))
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, 1000)
    outs = []
    with kernels.kernels_enabled(True):
        for mesh in (None, "tp=2"):
            m = random_model(cfg, mesh=mesh, seed=6)
            fn = jax.jit(_fresh_then_next_chunk(m, prompt, 2048, 512, False, first=512, in_order=True))
            hlo = fn.lower(m.state).compile().as_text()
            assert "__cudnn$fmha" in hlo and "qwen3_chunk_attention" not in hlo, mesh
            outs.append(fn(m.state))
    for a, b in zip(outs[0][:2], outs[1][:2]):
        assert rel(np.asarray(b, np.float32), np.asarray(a, np.float32)) < TOL_BF16
    for a, b in zip(jax.tree.leaves(outs[0][2]), jax.tree.leaves(outs[1][2])):
        assert rel(np.asarray(b[:, 1, :1000], np.float32), np.asarray(a[:, 1, :1000], np.float32)) < TOL_BF16


@pytest.mark.gpu
def test_gpu_paged_split_reads_a_cache_past_2_32_elements(monkeypatch):
    """A cache of 5.4e9 elements a side (8 layers, 20 slots, 65536 positions; 10.7 GB each of K and
    V): the last slot of the last layer starts past 2**32 elements. The split reading it in place
    must agree with the gathered form (XLA's own indexing): a 32-bit page offset (signed or not)
    would read another row (run 152: agrees)."""
    layers, slots, s, k, h, qd, t, start = 8, 20, 65536, 4, 32, 128, 128, 4096
    rng = np.random.default_rng(12)
    row_k, row_v = (jnp.asarray(rng.standard_normal((start + t, k, qd)), jnp.bfloat16) for _ in range(2))

    @jax.jit
    def cache_with(row):   # zeros but for the last layer's last slot
        return jnp.zeros((layers, slots, s, k, qd), jnp.bfloat16).at[-1, -1, :start + t].set(row)
    kc, vc = cache_with(row_k), cache_with(row_v)
    assert (layers * slots - 1) * s * k * qd > 2**32
    q = jnp.asarray(rng.standard_normal((1, t, h, qd)), jnp.bfloat16)
    own_k, own_v = row_k[None, start:], row_v[None, start:]
    outs = {}
    for page in (64, None):
        monkeypatch.setattr(pa, "SPLIT_PAGE", page)
        fn = jax.jit(lambda q, kc, vc, ko, vo: pa.chunk_attention_split(
            q, ko, vo, kc, vc, jnp.int32(layers - 1), jnp.asarray([slots - 1]), jnp.asarray([start]), jnp.asarray([t]), qd ** -0.5,
            s))
        outs[page] = np.asarray(fn(q, kc, vc, own_k, own_v), np.float32)
    assert rel(outs[64], outs[None]) < 1e-2
