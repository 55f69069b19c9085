"""Serving Qwen3-MoE: the engine (continuous batching, sampling), tokenizer, HTTP API, `python -m serve`."""
