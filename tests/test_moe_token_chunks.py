"""The plain-XLA expert FFN in token chunks (qwen3_jax/moe.py: token_chunk, RAGGED_BLOCK_BYTES)
against all tokens at once: the same answers, less compiled memory, and the model unchanged with
chunks forced on one device and under expert parallelism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwen3_jax
from qwen3_jax import moe as moe_mod
from qwen3_jax.config import Qwen3MoeConfig
from qwen3_jax.moe import expert_ffn, token_chunk
from jaxpr_walk import equations
from reference import TINY, rel_err

MiB, GiB = 1 << 20, 1 << 30


def test_chunk_rule():
    # Qwen3-30B-A3B on one device: 8 MiB of dense ragged_dot buffer per token (128 experts x 8
    # assignments x 2048 x 4 B). The server's default 512-token chunk fits 4 GiB: one piece.
    assert moe_mod.RAGGED_BLOCK_BYTES == 4 * GiB
    assert token_chunk(512, 8, 128, 2048) is None
    assert token_chunk(4096, 8, 128, 2048) == 512
    assert token_chunk(4096, 8, 16, 2048) is None          # ep=8: 16 local experts, 4 GiB
    assert token_chunk(1, 8, 128, 2048, budget=1) is None  # one token is never split
    for n, budget in [(1000, 64 * MiB), (4097, GiB), (7, 1)]:
        c = token_chunk(n, 8, 128, 2048, budget=budget)
        chunks = -(-n // c)
        assert c < n and chunks * c - n < chunks           # equal chunks, padding under one per chunk
        assert c == 1 or c * 8 * MiB <= budget


def _inputs(dtype, n=300, d=64, f=32, e=8, k=2, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, d)), dtype)
    experts = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    w = jnp.asarray(rng.uniform(0.1, 1.0, (n, k)), jnp.float32)
    mats = [jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[1]), dtype)
            for shape in ((e, d, f), (e, d, f), (e, f, d))]
    return x, w, experts, mats


def _run(x, w, experts, mats, first_expert):
    """-> (expert_ffn's output, number of while loops in its jaxpr). A fresh function each call:
    jax.jit caches a trace per function, and token_chunk reads the budget at trace time."""
    def fn(*a):
        return expert_ffn(*a, first_expert=first_expert)
    args = (x, w, experts, *mats)
    return np.asarray(jax.jit(fn)(*args)), _loops(jax.make_jaxpr(fn)(*args).jaxpr)


def _loops(jaxpr) -> int:
    """Loops (scan or while: a fori_loop is either) in a jaxpr, nested ones included."""
    return sum(eqn.primitive.name in ("scan", "while") for eqn in equations(jaxpr))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("first_expert,e_local", [(0, 8), (2, 4)])
def test_chunks_equal_all_tokens_at_once(monkeypatch, dtype, first_expert, e_local):
    """301 tokens under budgets of 60 and 100 tokens' buffers: 6 chunks of 51 (5 padded tokens)
    and 4 of 76 (3 padded), on all 8 experts and on a device holding experts 2-5 (the other
    assignments contribute nothing there)."""
    x, w, experts, mats = _inputs(dtype, n=301)
    mats = [m[first_expert:first_expert + e_local] for m in mats]
    want, loops = _run(x, w, experts, mats, first_expert)
    assert loops == 0
    per_token = 4 * e_local * 2 * 64
    for tokens, chunk in ((60, 51), (100, 76)):
        monkeypatch.setattr(moe_mod, "RAGGED_BLOCK_BYTES", tokens * per_token)
        assert token_chunk(301, 2, e_local, 64) == chunk
        got, loops = _run(x, w, experts, mats, first_expert)
        assert loops == 1 and got.shape == want.shape == (301, 64)
        # each token's rows are the same dots in the same order; XLA's CPU dot may still round a
        # row differently by its place in the operand (the attention blocks saw that)
        assert rel_err(got, want) <= (1e-6 if dtype == jnp.float32 else 1e-2), tokens


def test_chunks_cut_compiled_temp_memory(monkeypatch):
    """2048 tokens, 2 of 64 experts each, D = 512: ragged_dot's dense buffers for all tokens are
    up to 4 B x 64 x 4096 x 512 = 512 MiB (XLA's CPU program held 308 MiB of temp). A 64 MiB
    budget gives 8 chunks of 256 tokens; what does not shrink with the chunk (x, the output,
    the sort) keeps the cut under 8x: at least 3x (measured 308 -> 85.5 MiB)."""
    n, d, f, e, k = 2048, 512, 256, 64, 2
    full_bytes = 4 * e * n * k * d
    args = [jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), jnp.float32),
            jax.ShapeDtypeStruct((n, k), jnp.int32)]
    args += [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((e, d, f), (e, d, f), (e, f, d))]
    temp = {}
    for budget in (None, 64 * MiB):
        if budget is not None:
            monkeypatch.setattr(moe_mod, "RAGGED_BLOCK_BYTES", budget)
            assert token_chunk(n, k, e, d) == 256
        fn = jax.jit(lambda *a: expert_ffn(*a))   # fresh: the budget is read at trace time
        temp[budget] = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
    print(f"temp all at once {temp[None] / MiB:.1f} MiB, in 8 chunks {temp[64 * MiB] / MiB:.1f} MiB")
    assert temp[None] >= full_bytes / 2, "ragged_dot no longer materializes its dense buffers: resize this test"
    assert temp[64 * MiB] <= temp[None] / 3


@pytest.mark.parametrize("mesh", [None, "ep=2"])
def test_model_with_tiny_budget_gives_the_same_logits(monkeypatch, mesh):
    """A 40-token prompt, float32: the MoE in chunks of one token against all at once, on one
    device and with the experts split over 2 (each device chunks its own share)."""
    cfg = Qwen3MoeConfig.from_dict({**TINY, "model_type": "qwen3_moe"})
    model = qwen3_jax.random_model(cfg, dtype="float32", mesh=mesh, seed=3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20)), jnp.int32)

    def logits():   # a fresh function each call: token_chunk runs at trace time
        def fn(s, t):
            return nnx.merge(model.graphdef, s)(t)[0]
        return np.asarray(jax.jit(fn)(model.state, tokens)), _loops(jax.make_jaxpr(fn)(model.state, tokens).jaxpr)

    want, loops = logits()
    monkeypatch.setattr(moe_mod, "RAGGED_BLOCK_BYTES", 1)
    got, chunked_loops = logits()
    assert chunked_loops > loops   # the chunk loop is there (the layers' scan was already)
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("mesh", [None, "ep=2"])
def test_rows_marked_not_live_route_nowhere(mesh):
    """MoE(live_n=): a decode row past the cache (an engine's padding row or idle slot) gets
    expert -1, held by no device, so the plain-XLA FFN (one device, and the experts split over 2)
    gives it exactly zeros and the live rows exactly what they get without the mask."""
    cfg = Qwen3MoeConfig.from_dict({**TINY, "model_type": "qwen3_moe"})
    model = qwen3_jax.random_model(cfg, dtype="float32", mesh=mesh, seed=4)
    graphdef, params = nnx.split(nnx.merge(model.graphdef, model.state).segments[0].block)
    blk = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], params))   # layer 0
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, 1, cfg.hidden_size)), jnp.float32)
    live = np.array([True, False, True, True, False, True])
    with qwen3_jax.kernels.kernels_enabled(False):
        masked = np.asarray(blk.mlp(x, model.ctx, live_n=jnp.asarray(live)))
        whole = np.asarray(blk.mlp(x, model.ctx))
    assert np.all(masked[~live] == 0) and np.all(whole[~live] != 0)
    np.testing.assert_array_equal(masked[live], whole[live])
