"""A decode step that reads only a window of the KV cache gives the full-cache logits."""

import numpy as np

import qwen3_jax
from qwen3_jax.config import Qwen3MoeConfig
from serve.engine import decode_windows
from reference import TINY


def test_decode_windows_cover_the_context():
    assert decode_windows(40960) == [512, 2048, 8192, 32768, 40960]
    assert decode_windows(512) == [512]
    assert decode_windows(100) == [100]


def test_windowed_decode_equals_full_cache():
    cfg = Qwen3MoeConfig.from_dict({**TINY, "model_type": "qwen3_moe"})
    model = qwen3_jax.random_model(cfg, dtype="float32", seed=1)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12))
    outs = {}
    for window in (None, 16, 64):
        cache = model.init_cache(2, 64)
        _, cache = model.forward(tokens, cache=cache)
        nxt = np.array([[3], [5]], np.int32)
        pos = np.full((2, 1), 12, np.int32)
        logits, _ = qwen3_jax.api._forward(model.graphdef, model.state, nxt, pos, cache, None, None,
                                           kv_window=window)
        outs[window] = np.asarray(logits)
    full = outs[None]
    for window in (16, 64):
        assert np.abs(outs[window] - full).max() <= 1e-6 * np.abs(full).max()


def test_in_order_cache_write_has_unique_indices_and_drops_the_padding():
    """model._write_cache with in_order (the engine's prefill chunks: positions start.., padding at
    the cache length after them): the same cache as the plain write, the chunk's rows at its
    positions and the padding dropped, but a scatter XLA may treat as unique (plain stores on a
    GPU; without the promise every bf16 element goes through an atomic loop)."""
    import jax
    import jax.numpy as jnp

    from qwen3_jax import model as model_mod

    rng = np.random.default_rng(4)
    shape = (2, 3, 16, 2, 4)   # [L, slots, S, K, Q]
    k_all, v_all = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(2))
    new_k, new_v = (jnp.asarray(rng.standard_normal((1, 6, 2, 4)), jnp.bfloat16) for _ in range(2))
    rows = jnp.array([1])
    for start, n in ((9, 4), (13, 3)):   # the second ends at the cache's last position
        positions = jnp.asarray([list(range(start, start + n)) + [16] * (6 - n)], jnp.int32)
        args = (k_all, v_all, 1, rows, positions, new_k, new_v)
        plain, fast = model_mod._write_cache(*args), model_mod._write_cache(*args, in_order=True)
        for got, want, old, new in zip(fast, plain, (k_all, v_all), (new_k, new_v)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            expect = np.asarray(old).copy()
            expect[1, 1, start:start + n] = np.asarray(new)[0, :n]
            np.testing.assert_array_equal(np.asarray(got), expect)
        for in_order in (False, True):
            scatters = [e for e in jax.make_jaxpr(lambda *a, o=in_order: model_mod._write_cache(*a, in_order=o))(
                *args).jaxpr.eqns if e.primitive.name == "scatter"]
            assert len(scatters) == 2 and all(e.params["unique_indices"] is in_order for e in scatters)
