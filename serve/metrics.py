"""Prometheus metrics for /metrics, in a registry of their own (no process-global state).

Names follow the vLLM/SGLang convention with our prefix, e.g. qwen3_jax_num_requests_running.
Gauges read the engine when scraped, so /metrics shows a freed slot the moment it is freed.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily

from .request import Request

PREFIX = "qwen3_jax_"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine, model_name: str):
        r = self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        self.requests = Counter(PREFIX + "requests", "Generation requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter(PREFIX + "request_finished", "Finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.prefix_queries = Counter(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter(PREFIX + "prefix_cache_hits", "Prompt tokens the prefix cache held (not prefilled)",
                                   registry=r)
        running = Gauge(PREFIX + "num_requests_running", "Requests holding a KV-cache slot", registry=r)
        running.set_function(lambda: engine.num_running)
        waiting = Gauge(PREFIX + "num_requests_waiting", "Requests queued for a slot", registry=r)
        waiting.set_function(lambda: engine.num_queued)
        slots = Gauge(PREFIX + "num_slots", "KV-cache request slots", registry=r)
        slots.set(engine.num_slots)
        info = Gauge(PREFIX + "model_info", "Served model (value 1)", list(labels), registry=r)
        info.labels(**labels).set(1)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Mean time per token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to last token",
                             buckets=E2E_BUCKETS, registry=r)
        r.register(_DecodeSteps(engine))
        engine.finish_hooks.append(self.request_done)

    def request_done(self, req: Request):
        """Record one engine request once it has finished (any reason, disconnects included)."""
        self.prompt_tokens.inc(req.prompt_len)
        if req.slot is not None:   # it reached a slot, so the cache was looked up
            self.prefix_queries.inc(req.prompt_len)
            self.prefix_hits.inc(req.cached_tokens)
        n = len(req.output_ids)
        self.generation_tokens.inc(n)
        self.finished.labels(req.finish_reason or "abort").inc()
        if req.first_token_time is not None:
            self.ttft.observe(req.first_token_time - req.arrival)
            end = req.finish_time or req.first_token_time
            if n > 1:
                self.tpot.observe((end - req.first_token_time) / (n - 1))
            self.e2e.observe(end - req.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DecodeSteps:
    """qwen3_jax_decode_steps_total{batch_size}: decode steps run at each of the engine's decode
    batch sizes (serve/engine.py), read from the engine when scraped: how often the load let a
    step run smaller than every slot."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        family = CounterMetricFamily(PREFIX + "decode_steps", "Decode steps by the batch size they ran at",
                                     labels=["batch_size"])
        for size, steps in sorted(dict(self.engine.decode_batches).items()):
            family.add_metric([str(size)], steps)
        yield family
