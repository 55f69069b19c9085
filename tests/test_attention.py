"""The plain-XLA attention in blocks of queries (qwen3_jax/attention.py) against all queries at once.

Same answers, within one rounding: the blocks run the same HLO on fewer rows, and XLA's CPU
backend then mostly gives the same bits, but not always. Its YNNPACK fusions (the softmax's
exp and sums) are chosen per program, and its matmuls' summation order can depend on a row's
place in the operand (seen with 8 simulated devices: only the last 2 of 200 rows differed).
So float32 agrees to 1e-6 relative and bfloat16 to its rounding of the probabilities, not bit
for bit. (On an H200, jax 0.11.2, blocks of 256 and 1024 gave the same bits as one block for
T = S = 3000 and 32 heads, bfloat16 and float32.) Less memory: XLA's compiled temp bytes fall
with the block. Through the model: a budget small enough to tile gives the same logits, and the
budget counts one device's heads. Written for the suite's 8 simulated CPU devices; under
QWEN3_JAX_TEST_GPU=1 the mesh cases skip where fewer devices are visible, and float32 matmuls
run at full precision (a GPU's default TF32 moved float32 past 1e-6: run 65).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwen3_jax
from qwen3_jax import attention as attn_mod
from qwen3_jax.attention import MIN_QUERY_BLOCK, attention, query_block
from qwen3_jax.config import Qwen3MoeConfig
from jaxpr_walk import equations
from reference import TINY, rel_err

MiB, GiB = 1 << 20, 1 << 30


def _needs_devices(mesh):
    """Skip a mesh case that does not fit the visible devices (one GPU; CPU runs have 8)."""
    n = int(np.prod([int(axis.split("=")[1]) for axis in mesh.split(",")])) if mesh else 1
    if len(jax.devices()) < n:
        pytest.skip(f"{mesh} needs {n} devices, {len(jax.devices())} visible")


# float32 matmuls in float32 (a GPU's default is TF32; the CPU's is float32 already)
full_precision = jax.default_matmul_precision("highest")


def _inputs(dtype, b=2, t=300, s=300, h=8, kv=2, qd=64, left_pad=(0, 37), seed=0):
    """Random q/k/v and a causal mask over the last t of s positions, row b left-padded by
    left_pad[b] keys (so its first queries see no key at all: fully masked rows)."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, qd)), dtype)
    k = jnp.asarray(rng.standard_normal((b, s, kv, qd)), dtype)
    v = jnp.asarray(rng.standard_normal((b, s, kv, qd)), dtype)
    pos = np.arange(t) + (s - t)
    keys = np.arange(s)
    mask = (keys[None, None, :] <= pos[None, :, None]) & (keys[None, None, :] >= np.array(left_pad)[:, None, None])
    return q, k, v, jnp.asarray(mask)


def test_block_rule():
    # Decode and short prompts: one block, so they compile exactly as before.
    assert query_block(1, 40960, heads=32) is None
    assert query_block(2048, 2048, heads=32) is None                      # 512 MiB of scores
    assert query_block(MIN_QUERY_BLOCK, 10**6, heads=64) is None         # never below the minimum
    # Qwen3-30B-A3B, one 32k prompt on one device: 4 MiB of scores per query -> 1024 per block.
    assert attn_mod.SCORE_BLOCK_BYTES == 4 * GiB
    assert query_block(32768, 32768, heads=32) == 1024
    # A 512-token server chunk into a 40960-position cache: 2.5 GiB at 32 heads per device
    # (tp=1), one block (2 blocks were measured 12% slower per step); a 2048-token chunk, 10 GiB,
    # 3 blocks of 768 (the equal split of 2048 rounded up to 128).
    assert query_block(512, 40960, heads=32) is None
    assert query_block(2048, 40960, heads=32) == 768
    # Equal blocks, a multiple of the minimum, each within the budget where the minimum allows.
    for t, s, h, budget in [(1000, 4096, 8, 64 * MiB), (5000, 5000, 16, GiB), (129, 10**6, 64, 1)]:
        block = query_block(t, s, heads=h, budget=budget)
        assert block % MIN_QUERY_BLOCK == 0 and block < t
        assert block == MIN_QUERY_BLOCK or block * h * s * 4 <= budget
        blocks = -(-t // block)
        assert blocks * block - t < blocks * MIN_QUERY_BLOCK


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block", [128, 256])
def test_blocks_equal_all_queries_at_once(dtype, block):
    """T = 300 is no multiple of either block (84 and 212 padded rows)."""
    q, k, v, mask = _inputs(dtype)
    f = jax.jit(attention, static_argnums=(4, 5))
    with full_precision:
        want = np.asarray(f(q, k, v, mask, 0.125, None), np.float32)
        got = np.asarray(f(q, k, v, mask, 0.125, block), np.float32)
    assert got.shape == want.shape == q.shape
    assert np.isfinite(got).all()   # row 1's first 37 queries see no key: fully masked
    diff = np.abs(got - want)
    if dtype == jnp.float32:
        assert diff.max() <= 1e-6 * np.abs(want).max()
    else:
        # A probability (or a score) rounded one bf16 ulp apart moves an output, a convex
        # combination of v, by at most eps * max|v|; allow two such, and the output's own ulp.
        eps = float(jnp.finfo(jnp.bfloat16).eps)
        bound = eps * (2 * float(jnp.abs(v).max()) + np.maximum(np.abs(got), np.abs(want)))
        assert (diff <= bound).all(), f"{diff.max()} > {bound.min()}"


def test_blocks_cut_compiled_temp_memory():
    """B=1, 8 heads, T = S = 2048: 128 MiB of float32 scores at once. A 16 MiB budget gives
    blocks of 256 queries, 8 blocks. The scores and the softmax's buffers beside them shrink 8x;
    allow half of that for what does not shrink with the block (padded q, the output)."""
    b, t, s, h, kv, qd = 1, 2048, 2048, 8, 2, 64
    scores_bytes = b * h * t * s * 4
    block = query_block(t, s, heads=h, batch=b, budget=16 * MiB)
    assert block == 256
    blocks = t // block
    for dtype in (jnp.bfloat16, jnp.float32):
        args = [jax.ShapeDtypeStruct(shape, dtype) for shape in ((b, t, h, qd), (b, s, kv, qd), (b, s, kv, qd))]
        args.append(jax.ShapeDtypeStruct((b, t, s), jnp.bool_))
        temp = {}
        for blk in (None, block):
            compiled = jax.jit(attention, static_argnums=(4, 5)).lower(*args, 0.125, blk).compile()
            temp[blk] = compiled.memory_analysis().temp_size_in_bytes
        print(f"{jnp.dtype(dtype).name}: temp untiled {temp[None] / MiB:.1f} MiB, "
              f"blocks of {block} {temp[block] / MiB:.1f} MiB")
        assert temp[None] >= scores_bytes, "the untiled attention no longer holds all scores: resize this test"
        assert temp[block] <= temp[None] / (blocks / 2)


def _scan_lengths(jaxpr) -> list[int]:
    """Lengths of every lax.scan in a jaxpr (the blocks' fori_loop is one), nested ones included."""
    return [eqn.params["length"] for eqn in equations(jaxpr) if eqn.primitive.name == "scan"]


def _model_logits(model, tokens, cache_len):
    """A fresh jit each call: query_block runs at trace time, so a changed budget takes effect."""
    def forward(state, tokens):
        m = nnx.merge(model.graphdef, state)
        cache = None if cache_len is None else model.init_cache(tokens.shape[0], cache_len)
        return m(tokens, cache=cache)[0]

    jaxpr = jax.make_jaxpr(forward)(model.state, tokens).jaxpr
    with full_precision:
        return np.asarray(jax.jit(forward)(model.state, tokens)), _scan_lengths(jaxpr)


@pytest.mark.parametrize("cache_len,mesh", [(None, None), (256, None), (256, "tp=2,ep=4")])
def test_model_with_tiny_budget_gives_the_same_logits(monkeypatch, cache_len, mesh):
    """A 200-token prompt, float32: without a cache (S = 200) and into a 256-position cache, on
    one device and with batch and heads split (dp=2 x tp=2)."""
    _needs_devices(mesh)
    cfg = Qwen3MoeConfig.from_dict({**TINY, "model_type": "qwen3_moe"})
    model = qwen3_jax.random_model(cfg, dtype="float32", mesh=mesh, seed=3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 200)), jnp.int32)
    want, lengths = _model_logits(model, tokens, cache_len)
    assert 2 not in lengths   # TINY's scores fit: no blocks
    monkeypatch.setattr(attn_mod, "SCORE_BLOCK_BYTES", 1)   # every block at the 128-query minimum
    got, lengths = _model_logits(model, tokens, cache_len)
    assert 2 in lengths       # 200 queries -> 2 blocks of 128
    assert rel_err(got, want) <= 1e-6


def test_budget_counts_one_devices_heads(monkeypatch):
    """B=2, T=S=200, 8 heads: 2.4 MiB of scores on one device, half that per device at tp=2.
    A 2 MiB budget tiles the first and not the second."""
    cfg = Qwen3MoeConfig.from_dict({**TINY, "model_type": "qwen3_moe"})
    tokens = jnp.zeros((2, 200), jnp.int32)
    monkeypatch.setattr(attn_mod, "SCORE_BLOCK_BYTES", 2 * MiB)
    _needs_devices("tp=2")
    for mesh, tiles in ((None, True), ("tp=2", False)):
        model = qwen3_jax.random_model(cfg, dtype="float32", mesh=mesh, seed=3)
        jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(model.graphdef, s)(x)[0])(model.state, tokens).jaxpr
        assert (2 in _scan_lengths(jaxpr)) == tiles, mesh
