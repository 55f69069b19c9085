"""How many request slots the KV cache gets: from the device's memory, or on CPU from the flags.

The cache is [L, slots, S, K, Q] per segment with slots split over the data axis and K over the
tensor axis, so one token of one slot costs every device L * 2 * K_local * Q * itemsize bytes.
With a memory budget (accelerators: `memory_stats()['bytes_limit']` x mem_fraction_static minus
what the weights already hold) the cache gets as many context-length slots as fit, capped by
max_running_requests.
"""

from __future__ import annotations

import dataclasses


DEFAULT_SLOTS_CPU = 16
DEFAULT_SLOTS_ACCELERATOR = 64


class CapacityError(ValueError):
    """The KV cache cannot hold even one request of the context length."""


@dataclasses.dataclass(frozen=True)
class CacheSize:
    num_slots: int
    context_length: int
    bytes_per_token_per_device: int
    budget_bytes_per_device: int | None  # None: no memory figure (CPU), sized from the flags
    source: str
    dp: int = 1  # data-parallel groups the slots are split over

    @property
    def kv_cache_tokens(self) -> int:
        return self.num_slots * self.context_length

    @property
    def cache_bytes_per_device(self) -> int:
        return self.bytes_per_token_per_device * self.kv_cache_tokens // self.dp

    def describe(self) -> str:
        gib = self.cache_bytes_per_device / 2 ** 30
        return (f"kv cache: {self.kv_cache_tokens} tokens = {self.num_slots} slots x {self.context_length} "
                f"context | {gib:.3f} GiB per device ({self.source})")


def device_budget(devices, mem_fraction_static: float) -> int | None:
    """Bytes each device may still give the KV cache, or None when the platform reports no memory."""
    budgets = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # some platforms raise instead of returning None
            stats = None
        if not stats or "bytes_limit" not in stats:
            return None
        budgets.append(int(stats["bytes_limit"] * mem_fraction_static) - int(stats.get("bytes_in_use", 0)))
    return min(budgets) if budgets else None


def size_cache(cfg, spec, dtype, devices, *, context_length: int,
               max_running_requests: int | None, mem_fraction_static: float,
               kv_cache_tokens: int | None = None) -> CacheSize:
    """Slots = min(max_running_requests, kv tokens that fit // context_length), a multiple of dp.

    `kv_cache_tokens` (e.g. from the memory planner) overrides the measured budget. Bytes per
    token per device are the planner's (sharding.memory.kv_bytes_per_token), so the engine and
    the start-up plan cannot disagree.
    """
    from sharding.memory import kv_bytes_per_token, sampler_bytes_per_slot, slots_that_fit

    per_token = kv_bytes_per_token(cfg, spec, dtype)
    dp = spec.dp
    budget = None
    if kv_cache_tokens is not None:
        fit, source = kv_cache_tokens // context_length, "memory plan"
        cap = max_running_requests or DEFAULT_SLOTS_ACCELERATOR
    else:
        budget = device_budget(devices, mem_fraction_static)
        if budget is None:
            cap = max_running_requests or DEFAULT_SLOTS_CPU
            fit, source = cap, "no device memory figure: sized from --max-running-requests"
        else:
            cap = max_running_requests or DEFAULT_SLOTS_ACCELERATOR
            # each slot's KV cache and sampler state (penalty counts), as the memory plan counts them
            fit = slots_that_fit(budget, context_length, per_token, sampler_bytes_per_slot(cfg, spec), dp, max(cap, dp))
            source = f"mem_fraction_static={mem_fraction_static}"
    slots = min(cap, fit)
    if slots >= dp:
        slots -= slots % dp  # the batch axis is split over dp
    if slots < 1:
        need = per_token * context_length
        have = "unknown" if budget is None else f"{max(budget, 0) / 2**30:.2f} GiB"
        raise CapacityError(
            f"the KV cache cannot hold one request of context length {context_length}: that needs "
            f"{need / 2**30:.2f} GiB per device, {have} is left after the weights; lower --context-length, "
            f"raise --mem-fraction-static, or add tensor parallelism (--mesh tp=...)")
    return CacheSize(slots, context_length, per_token, budget, source, dp)
