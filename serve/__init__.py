"""Serving Qwen3-MoE: the engine (continuous batching, sampling), tokenizer, HTTP API, `python -m serve`.

Offline use (notebooks):

    from serve import Engine, SamplingParams
    engine = Engine()                       # the built-in model; or Engine("/path/to/ckpt", mesh="tp=2")
    engine.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0))
"""

from .request import CompletionOutput, RequestOutput
from .sampling import SamplingParams


def __getattr__(name):
    # The engine imports JAX; load it on first use so `python -m serve` can set up devices first.
    if name in ("Engine", "QueueFull", "EngineClosed"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'serve' has no attribute {name!r}")


__all__ = ["Engine", "SamplingParams", "CompletionOutput", "RequestOutput", "QueueFull", "EngineClosed"]
