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
