"""The engine: continuous batching over a fixed set of KV-cache slots, one scheduler thread.

    slots      a fixed number of request slots, each a row of the KV cache [L, slots, S, K, Q]
               holding one request's context of up to S = context_length tokens
    prefill    a new request takes a free slot; its prompt is written to that row in chunks of
               at most `chunked_prefill_size` tokens, each padded to a length bucket (powers of
               two from 32), so after warm-up no prompt length compiles anything new
    decode     one jitted forward over the running requests' slots, padded to the smallest of
               `decode_batch_sizes` that holds them (each size compiled once at warm-up, cache
               donated), then a jitted sampler of the mode the rows need (greedy, top-64 or the
               full vocabulary: picked on the host, since a device conditional would block the
               launch on a GPU), so only [batch] int32 ids come back

Between two decode steps the scheduler frees cancelled slots, admits queued requests into
free slots and runs up to one chunk budget of prefill. Slots that pad a decode batch ride along
at position S, where their cache writes are dropped.

Overlap (SGLang's overlap scheduler; `overlap=False` / --disable-overlap-schedule turns it off):
each slot's last sampled id stays on the device in the steps' carry and is the next step's input,
so step t+1 is launched before step t's ids are read back; the host then delivers step t's
tokens (detokenize, stop rules, streaming) while the device runs step t+1. A request that
stops at step t (a stop id or string) has had one more token computed for it, dropped. A
request's tokens are the same either way (the same seeds and steps); with several decode batch
sizes the batch a step runs at can differ.

Decode batch sizes (SGLang's CUDA-graph batch sizes, vLLM's capture sizes): on an accelerator
with one data-parallel group and one process, powers of two below the slot count, then the
slot count, so one request decodes as a batch of 1 rather than of every slot. Elsewhere, or
with `decode_batch_sizes=[num_slots]`, every step has one shape: rows never mix and a request's
tokens do not depend on what else is running (16 concurrent greedy requests give what each
gives alone). With several sizes they can, in the last bits of a float and hence in a sampled
token, as in SGLang and vLLM: a batch of 1 and a batch of 8 may run different kernels.

What a decode step reads of the cache: with the kernels (GPU), each live row up to its own
position, and an idle slot (position S) nothing at all (qwen3_jax/kernels/decode_attention.py;
before, every idle slot read its whole row each step); on the plain-XLA path, every slot up to
a KV window just past the longest live row (decode_windows). A step's padding rows still run
through the projections but route to no expert (model.MoE: expert -1, no weight read).

`_prefill_forward`, `_decode_forward` and `sample` are also compiled by the memory planner
(serve/dry_run.py) for XLA's memory analysis: keep their signatures in step with it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
import queue
import random
import threading
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax import kernels
from qwen3_jax import model as model_mod
from qwen3_jax.progress import progress_bar
from sharding.memory import DEFAULT_MEM_FRACTION_STATIC

from .capacity import CacheSize, size_cache
from .request import CompletionOutput, Request, RequestOutput, TokenLogprob
from .sampling import (PROMPT_FLAG, SAMPLING_MODES, SamplingParams, device_seed, mask_logits, mask_words, penalize,
                       sample, sampling_mode, token_logprobs)
from .structured import TokenMasks
from .tokenizer import DetokenizeStream, Tokenizer

log = logging.getLogger("serve.engine")

MIN_BUCKET = 32
KEEPALIVE_S = 10.0  # several processes: the longest rank 0 idles before a no-op step message


class QueueFull(RuntimeError):
    """More requests are waiting for a slot than max_queued_requests allows."""


class EngineClosed(RuntimeError):
    """The engine is shutting down (or died) and takes no new requests."""


def prefill_buckets(context_length: int, chunk: int) -> list[int]:
    """Padded prefill lengths: powers of two from 32 up to min(context_length, chunk), then that."""
    top = min(context_length, chunk)
    buckets, b = [], MIN_BUCKET
    while b < top:
        buckets.append(b)
        b *= 2
    buckets.append(top)
    return buckets


def decode_windows(context_length: int) -> list[int]:
    """Cache lengths a decode step may attend over: x4 steps from 512, then the context length.

    A step reads only the smallest window holding every running sequence, so short requests do not
    pay for the whole context (at most 4x the needed KV bytes, with a handful of compiled steps).
    """
    windows, w = [], 512
    while w < context_length:
        windows.append(w)
        w *= 4
    windows.append(context_length)
    return windows


# What a step computes beyond the ids, by key suffix: nothing, the ids' logprobs (a row asked for
# logprobs), the penalties from each slot's counts (a row asked for one), a structured-output
# mask over the logits (a row has a constraint: "/masked", an extra [B, V / 32] input), or any of
# them together. A prefill chunk that also scores its prompt (prompt logprobs) adds "/prompt".
STEP_VARIANTS = tuple(a + b + c for a in ("", "/logprobs") for b in ("", "/penalties") for c in ("", "/masked"))


def step_variant(logprobs: bool, penalties: bool, masked: bool = False) -> str:
    """The STEP_VARIANTS entry for rows asking logprobs, penalties, and a structured-output mask."""
    return ("/logprobs" if logprobs else "") + ("/penalties" if penalties else "") + ("/masked" if masked else "")


def _decode_forward(graphdef, kv_window, state, cache, last, positions_b, slots_b=None):
    """One new token per row -> (logits [B, V], cache). Row b's input is its slot's last sampled
    id, read from `last` [slots] on the device (the host never sends ids back, so a step can be
    launched before the previous one's ids reach the host). Row b is slot b (slots_b None: B =
    every slot), or slot slots_b[b] (a decode batch size below the slot count)."""
    tokens_b = last if slots_b is None else last[slots_b]
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens_b[:, None], positions_b[:, None], cache, slots_b, kv_window=kv_window)
    return logits[:, 0], cache


def _prefill_forward(graphdef, state, cache, tokens_1t, positions_1t, slot_1, logits_at_1, fresh=False):
    """One prompt chunk [1, T] into cache row slot_1[0] -> (logits at logits_at [1, V], cache). Its
    positions are start.. with padding at the cache length after them (Qwen3Moe's `in_order`).
    fresh (static): the prompt's first chunk, its tokens at 0.. (qwen3_jax Qwen3Moe's `fresh`)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens_1t, positions_1t, cache, slot_1, logits_at_1, fresh=fresh, in_order=True)
    return logits[:, 0], cache


# Prompt positions a prompt-logprobs prefill turns into logits at a time (the most; a divisor of
# the chunk's bucket): its extra memory is this many rows of [V] float32, not the chunk's T rows.
PROMPT_LOGPROB_ROWS = 64


def _prefill_prompt_forward(graphdef, ctx, state, cache, tokens_1t, positions_1t, slot_1, logits_at_1, targets_1t):
    """_prefill_forward that also scores the chunk's prompt tokens: position t's log-probability of
    targets[t] (the prompt's next token) and the best LOGPROBS_MAX there, in blocks of positions
    -> (logits at logits_at [1, V], cache, (logprob [T], top ids [T, LOGPROBS_MAX], top logprobs))."""
    model = nnx.merge(graphdef, state)
    h, cache = model(tokens_1t, positions_1t, cache, slot_1, hidden=True, in_order=True)
    last = model.lm_logits(jnp.take_along_axis(h, logits_at_1[:, None, None].astype(jnp.int32), axis=1))
    t, d = h.shape[1:]
    r = math.gcd(t, PROMPT_LOGPROB_ROWS)

    def score(block):
        h_rd, targets_r = block
        return token_logprobs(model.lm_logits(h_rd[None])[0], targets_r, ctx)

    chosen, top_ids, top = jax.lax.map(score, (h[0].reshape(t // r, r, d), targets_1t[0].reshape(t // r, r)))
    return last[:, 0], cache, (chosen.reshape(t), top_ids.reshape(t, -1), top.reshape(t, -1))


def _sample_into(mode, ctx, last, logits_bv, slots_b, live_b, temperature_b, top_p_b, top_k_b, seed_b, step_b):
    """Sample one id per row ([B], sampling.sample with a static mode) and keep the live rows' ids
    as their slots' last ids -> (ids [B], last [slots]). A separate jitted call from the forward:
    the host picks the mode, so no conditional sits in a step (see sampling.sample). The logits
    arrive split over the vocab axes of `ctx`'s mesh (or whole)."""
    ids = sample(logits_bv, temperature_b, top_p_b, top_k_b, seed_b, step_b, mode, ctx)
    return ids, last.at[slots_b].set(jnp.where(live_b, ids, last[slots_b]))


def _penalized_sample_into(mode, ctx, fresh, last, counts, logits_bv, slots_b, live_b, temperature_b, top_p_b,
                           top_k_b, seed_b, step_b, presence_b, frequency_b, repetition_b, *prompt_1s):
    """_sample_into after the penalties (sampling.penalize), from each slot's counts of its
    generated tokens (counts [slots, V] int32, split over the vocab like the logits; the prompt's
    tokens flagged PROMPT_FLAG), which then count the live rows' new ids -> (ids [B], last [slots],
    counts). `fresh` (static, a prompt's last chunk, B = 1): the row starts from zero counts (a
    slot's previous request left its own) and flags the ids of prompt_1s [1, S] (padding: V,
    out of range, dropped)."""
    if fresh:
        rows = jnp.zeros((len(slots_b), counts.shape[1]), counts.dtype)
        rows = rows.at[0, prompt_1s[0][0]].set(PROMPT_FLAG, mode="drop")
    else:
        rows = counts[slots_b]
    ids, last = _sample_into(mode, ctx, last, penalize(logits_bv, rows, presence_b, frequency_b, repetition_b),
                             slots_b, live_b, temperature_b, top_p_b, top_k_b, seed_b, step_b)
    hit = (jnp.arange(counts.shape[1], dtype=jnp.int32)[None, :] == ids[:, None]) & live_b[:, None]
    return ids, last, counts.at[slots_b].set(rows + hit.astype(counts.dtype))


def _copy_row(a, src, dst):
    """a [L, slots, ...] with slot src's row copied into slot dst, one layer at a time (the
    temporary is one layer's row, not the slot's whole cache)."""
    def layer(i, a):
        row = jax.lax.dynamic_slice(a, (i, src) + (0,) * (a.ndim - 2), (1, 1, *a.shape[2:]))
        return jax.lax.dynamic_update_slice(a, row, (i, dst) + (0,) * (a.ndim - 2))
    return jax.lax.fori_loop(0, a.shape[0], layer, a)


def _copy_slot(cache, src, dst, mesh=None, specs=None):
    """Slot src's K/V row copied into slot dst of every [L, slots, S, K, Q] cache array -> (dst,
    cache). With `mesh` and the arrays' PartitionSpecs `specs` (a tree like cache), each device
    copies within its own shards: where the slots are split over data-parallel groups, the group
    holding both slots does the copy and the others keep theirs (the caller picks src and dst in
    one group; an indexed slice of the split axis under XLA's partitioner would gather the
    cache's slots instead)."""
    if mesh is None:
        return dst, jax.tree.map(lambda a: _copy_row(a, src, dst), cache)

    def local(a, spec):
        group = 0
        for ax in _slot_axes(spec):   # the shard's index along the slot axis, major to minor
            group = group * mesh.shape[ax] + jax.lax.axis_index(ax)
        n = a.shape[1]
        s_l, d_l = src - group * n, dst - group * n
        own = (s_l >= 0) & (s_l < n) & (d_l >= 0) & (d_l < n)
        return jax.lax.cond(own, lambda a: _copy_row(a, s_l, d_l), lambda a: a, a)

    leaves, tree = jax.tree.flatten(cache)
    spec_leaves = tree.flatten_up_to(specs)
    copied = jax.shard_map(lambda *ls: [local(a, sp) for a, sp in zip(ls, spec_leaves)], mesh=mesh,
                           in_specs=tuple(spec_leaves), out_specs=list(spec_leaves), check_vma=False)(*leaves)
    return dst, jax.tree.unflatten(tree, copied)


def slot_groups(cache) -> int:
    """How many data-parallel groups the cache's slot axis (axis 1) is split over: slots
    [g * n, (g + 1) * n) live on group g's devices, n = slots / groups."""
    a = jax.tree.leaves(cache)[0]
    if not isinstance(a.sharding, jax.sharding.NamedSharding):
        return 1
    return math.prod(a.sharding.mesh.shape[ax] for ax in _slot_axes(a.sharding.spec))


def _slot_axes(spec) -> tuple[str, ...]:
    """The mesh axes a cache array's PartitionSpec splits its slot axis (axis 1) over."""
    entry = spec[1] if len(spec) > 1 else None
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common start of two id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def pick_decode_batch_sizes(num_slots: int, asked: Sequence[int] | None = None, *, dp: int = 1, processes: int = 1,
                            accelerator: bool = True) -> list[int]:
    """The decode batch sizes an engine compiles, ascending, the slot count last.

    asked None: powers of two below the slot count, then it, on an accelerator with one
    data-parallel group in one process; else the slot count alone (a CPU compiles slowly; a
    batch split over dp groups, or steps announced to other processes, keep one shape).
    asked: those sizes (above the slot count: dropped), then the slot count."""
    if asked is None:
        if not accelerator or dp > 1 or processes > 1:
            return [num_slots]
        return [b for b in (1 << i for i in range(num_slots.bit_length())) if b < num_slots] + [num_slots]
    sizes = sorted({int(b) for b in asked})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"decode batch sizes must be positive integers, got {list(asked)}; e.g. 1,2,4,8 "
                         "(the slot count is always added)")
    if (dp > 1 or processes > 1) and sizes[0] < num_slots:
        why = f"the batch is split over dp={dp} groups" if dp > 1 else f"steps are announced to {processes} processes"
        raise ValueError(f"decode batch sizes below the slot count ({num_slots}) need one data-parallel group in "
                         f"one process, but {why}; leave --decode-batch-sizes unset")
    return [b for b in sizes if b < num_slots] + [num_slots]


class Engine:
    """Continuous-batching generation on one model; usable offline (notebooks) and by the server.

    `model`: None (the built-in model), a checkpoint directory, or a loaded `qwen3_jax.Model`
    (then pass `tokenizer=` a checkpoint directory for text prompts).

        engine = Engine(mesh="tp=2,ep=4", dtype="float32")
        outs = engine.generate(["Hello", "Tell me a story"], SamplingParams(max_tokens=20, temperature=0))
        for delta in engine.stream("Hello"): print(delta.text, end="")
    """

    def __init__(self, model=None, *, mesh=None, dtype="bfloat16", tokenizer=None,
                 context_length: int | None = None, max_running_requests: int | None = None,
                 mem_fraction_static: float = DEFAULT_MEM_FRACTION_STATIC, kv_cache_tokens: int | None = None,
                 max_queued_requests: int = 1024, chunked_prefill_size: int = 512,
                 decode_batch_sizes: Sequence[int] | None = None, overlap: bool = True, prefix_caching: bool = True,
                 warmup: bool = True, progress: bool = True):
        from qwen3_jax import api

        path = None
        if model is None:
            from .builtin import builtin_checkpoint
            model = path = builtin_checkpoint()
        if isinstance(model, str):
            path = model
            model = api.load(path, mesh=mesh, dtype=dtype, progress=progress)
        self.model, self.path = model, path
        cfg = model.config
        if isinstance(tokenizer, str):
            tokenizer = Tokenizer(tokenizer)
        elif tokenizer is None and path is not None:
            tokenizer = Tokenizer(path)
        self.tokenizer: Tokenizer | None = tokenizer
        self.eos_ids = set(tokenizer.eos_token_ids if tokenizer else cfg.eos_token_ids)
        gen = tokenizer.generation_config if tokenizer else {}
        self.default_sampling = {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                                 if k in gen}
        if self.default_sampling:   # as vLLM says it: these apply to every request that leaves them unset
            log.info("sampling defaults from generation_config.json: %s",
                     ", ".join(f"{k}={v}" for k, v in self.default_sampling.items()))
        # structured outputs (json_schema / regex): the vocabulary and compiled constraints
        self._masks = TokenMasks(tokenizer, cfg.vocab_size) if tokenizer is not None else None

        self.context_length = context_length or cfg.max_position_embeddings
        if self.context_length > cfg.max_position_embeddings:
            raise ValueError(f"context_length={self.context_length} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}; use --context-length {cfg.max_position_embeddings} "
                             "or less")
        devices = self._devices()
        here = [d for d in devices if d.process_index == jax.process_index()]  # the devices we can measure
        self.cache_size: CacheSize = size_cache(
            cfg, model.mesh_spec, model.dtype, here, context_length=self.context_length,
            max_running_requests=max_running_requests, mem_fraction_static=mem_fraction_static,
            kv_cache_tokens=kv_cache_tokens)
        if jax.process_count() > 1:  # several processes (serve/distributed.py) build one cache: the smallest
            from .distributed import agree_min
            self.cache_size = dataclasses.replace(self.cache_size, num_slots=agree_min(self.cache_size.num_slots))
        self.num_slots = self.cache_size.num_slots
        self.chunk = max(1, min(chunked_prefill_size, self.context_length))
        self.buckets = prefill_buckets(self.context_length, self.chunk)
        # The smallest bucket whose prompts' first chunks take the form over their own K/V
        # (FRESH_MIN_TOKENS), fixed here so the warm-up compiles exactly the forms the chunks run;
        # 0 where that form would be the other one (a mesh, kernels off: qwen3_jax.model.FRESH_PREFILL)
        fresh_on = model_mod.FRESH_PREFILL and kernels.active(model.ctx, model.dtype)
        self.fresh_min_tokens = self.FRESH_MIN_TOKENS if fresh_on else 0
        self.max_queued_requests = max_queued_requests
        # The steps' carry: the KV cache and each slot's last sampled id (its next input token),
        # committed like the step outputs, so the first real step does not recompile.
        cache = model.init_cache(self.num_slots, self.context_length)
        if model.ctx is None:
            where = devices[0]
            cache = jax.device_put(cache, where)
        else:
            where = jax.sharding.NamedSharding(model.ctx.mesh, jax.sharding.PartitionSpec())
        # counts [slots, V]: each slot's generated tokens (and its prompt's, flagged), for requests
        # with penalties (only their steps read or write it); split over the vocab like the logits.
        counts_at = where if model.ctx is None else model.ctx.sharding((None, "vocab"), (self.num_slots, cfg.vocab_size))
        self._carry = (cache, jax.device_put(np.zeros(self.num_slots, np.int32), where),
                       jax.device_put(np.zeros((self.num_slots, cfg.vocab_size), np.int32), counts_at))
        self.overlap = overlap
        self.prefix_caching = prefix_caching
        self._slot_group = self.num_slots // slot_groups(cache)   # slots a data-parallel group holds
        self.decode_batch_sizes = pick_decode_batch_sizes(
            self.num_slots, decode_batch_sizes, dp=model.mesh_spec.dp, processes=jax.process_count(),
            accelerator=devices[0].platform != "cpu")
        self._build_steps()

        n = self.num_slots
        self._pos = np.full(n, self.context_length, np.int32)  # position S: an idle slot, writes dropped
        self._temp = np.zeros(n, np.float32)
        self._top_p = np.ones(n, np.float32)
        self._top_k = np.full(n, -1, np.int32)
        self._seed = np.zeros(n, np.int32)
        self._step = np.zeros(n, np.int32)
        self._presence = np.zeros(n, np.float32)
        self._frequency = np.zeros(n, np.float32)
        self._repetition = np.ones(n, np.float32)
        self._slots: list[Request | None] = [None] * n
        # Prefix caching: the token ids whose K/V each slot's cache holds from positions 0 on (what
        # its last request wrote), and when each slot was freed (_place prefers the oldest).
        self._cached = [np.zeros(0, np.int32)] * n
        self._freed_at, self._tick = [0] * n, 0
        self._pending: collections.deque[Request] = collections.deque()
        self._prefilling: collections.deque[Request] = collections.deque()
        self._cancels: list[Request] = []
        # Launched steps whose ids the host has not read yet: (ids [rows] or (ids, logprobs...),
        # [(row, request)]), oldest first.
        self._inflight: collections.deque[tuple[object, list[tuple[int, Request]]]] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.error: BaseException | None = None
        self.steps = 0
        self.prefill_tokens = 0   # prompt tokens run through prefill (what prefix caching saves)
        self.prefix_copies = 0    # slot rows copied from a busy slot holding a longer prompt start
        self.decode_batches: dict[int, int] = {}   # decode steps run per batch size
        self.finish_hooks: list[Callable[[Request], None]] = []  # called on the scheduler thread
        self._idle_compiles = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qwen3-idle-compile")
        self._idle_compiling = 0   # prompt-logprobs forwards handed to that thread and not yet compiled
        if self._channel is not None and not self._channel.leader:
            self._thread = None  # a follower: no scheduler; follow() runs rank 0's steps, its warm-up too
            return
        if warmup:
            self.warmup(progress)
        # The step variants' extra pieces, compiled while the engine idles (see WARM_VARIANTS)
        self._idle_warmups = collections.deque(self._variant_warmups() if warmup and self.WARM_VARIANTS else ())
        self._idle_warm_s = 0.0
        self.variants_warm = threading.Event()   # set once none is left
        if not self._idle_warmups:
            self.variants_warm.set()
        self._thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)
        self._thread.start()

    @property
    def cache(self):
        """The KV cache (KVCache, [L, slots, S, K, Q] per segment)."""
        return self._carry[0]

    # -- compiled steps ----------------------------------------------------------------------
    def _devices(self):
        ctx = self.model.ctx
        return list(ctx.mesh.devices.flat) if ctx is not None else [jax.devices()[0]]

    def _build_steps(self):
        """Jit the forwards and samplers, and compose them into the steps the scheduler runs (and,
        with several processes, announces): each `step(state, carry, *host inputs) -> (ids, carry)`."""
        g = self.model.graphdef
        fwd_kw, smp_kw = {}, {}
        ctx = self.model.ctx
        if ctx is not None:
            replicated = jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec())
            # Logits stay split over the vocab axes as the LM head leaves them (whole rows would be
            # an all-gather of [B, V] float32 every step; the sampler needs [B, 64 x shards] at
            # most: sampling.top_k_over_vocab). Pin the cache's output sharding to its input's, so
            # donation reuses the same buffers.
            logits = ctx.sharding((None, "vocab"), (1, self.model.config.vocab_size))
            fwd_kw["out_shardings"] = (logits, jax.tree.map(lambda a: a.sharding, self._carry[0]))
            smp_kw["out_shardings"] = (replicated, replicated)
        self.windows = decode_windows(self.context_length)
        forwards = {w: jax.jit(functools.partial(_decode_forward, g, w), donate_argnums=(1,), **fwd_kw)
                    for w in self.windows}
        prefill_forward = jax.jit(functools.partial(_prefill_forward, g), donate_argnums=(1,),
                                  static_argnames=("fresh",), **fwd_kw)
        self._samplers = {m: jax.jit(functools.partial(_sample_into, m, ctx), donate_argnums=(0,), **smp_kw)
                          for m in SAMPLING_MODES}
        # Steps with a row that asked for logprobs or penalties run these (compiled on first use:
        # ~1 s at each batch size, where the warm-up would add them to every start).
        pen_kw, lp_kw = {}, {}
        if ctx is not None:
            pen_kw = {"out_shardings": (replicated, replicated, self._carry[2].sharding)}
            lp_kw = {"out_shardings": (replicated,) * 3}
        penalized = {(m, fresh): jax.jit(functools.partial(_penalized_sample_into, m, ctx, fresh),
                                         donate_argnums=(0, 1), **pen_kw)
                     for m in SAMPLING_MODES for fresh in (False, True)}
        logprobs = jax.jit(functools.partial(token_logprobs, ctx=ctx), **lp_kw)
        prompt_kw = {} if ctx is None else {"out_shardings": (*fwd_kw["out_shardings"], (replicated,) * 3)}
        prompt_forward = jax.jit(functools.partial(_prefill_prompt_forward, g, ctx), donate_argnums=(1,), **prompt_kw)
        s = self.context_length

        masker = jax.jit(mask_logits, **({} if ctx is None else {"out_shardings": fwd_kw["out_shardings"][0]}))

        def sampled(mode, variant, fresh, carry, logits, *sampler_inputs):
            """-> (ids [B], or (ids, logprob, top ids, top logprobs) with logprobs), carry. With
            "/masked" the last input is the rows' structured-output words [B, W]: tokens they
            leave out are never sampled (the logprobs stay the model's own, as vLLM's)."""
            cache, last, counts = carry
            choose = logits
            if "masked" in variant:
                *sampler_inputs, words = sampler_inputs
                choose = masker(logits, words)
            if "penalties" in variant:
                ids, last, counts = penalized[mode, fresh](last, counts, choose, *sampler_inputs)
            else:
                ids, last = self._samplers[mode](last, choose, *sampler_inputs)
            out = (ids, *logprobs(logits, ids)) if "logprobs" in variant else ids
            return out, (cache, last, counts)

        def decode(w, mode, variant):
            def step(state, carry, positions_b, temperature_b, top_p_b, top_k_b, seed_b, step_b, slots_b, *penalty_b):
                rows = () if len(slots_b) == self.num_slots else (slots_b,)  # every slot: row b is slot b
                logits, cache = forwards[w](state, carry[0], carry[1], positions_b, *rows)
                return sampled(mode, variant, False, (cache, *carry[1:]), logits, slots_b, positions_b < s,
                               temperature_b, top_p_b, top_k_b, seed_b, step_b, *penalty_b)
            return step

        def prefill(mode, variant, prompt=False, fresh=False):
            """prompt: the step also scores the chunk's prompt tokens (an extra input, the targets
            [1, T]) and returns (out, (logprob [T], top ids, top logprobs)). fresh: a prompt's
            first chunk (_prefill_forward's)."""
            def step(state, carry, tokens_1t, positions_1t, slot_1, logits_at_1, *rest):
                if prompt:
                    targets_1t, *sampling_1 = rest
                    logits, cache, scored = prompt_forward(state, carry[0], tokens_1t, positions_1t, slot_1,
                                                           logits_at_1, targets_1t)
                else:
                    sampling_1 = rest
                    logits, cache = prefill_forward(state, carry[0], tokens_1t, positions_1t, slot_1, logits_at_1,
                                                    fresh=fresh)
                out, carry = sampled(mode, variant, True, (cache, *carry[1:]), logits, slot_1, np.ones(1, bool),
                                     *sampling_1)
                return ((out, scored) if prompt else out), carry
            return step

        copy_kw = {}
        if ctx is not None:
            specs = jax.tree.map(lambda a: a.sharding.spec, self._carry[0])
            copy_kw = {"out_shardings": (replicated, fwd_kw["out_shardings"][1])}
        copy = jax.jit(functools.partial(_copy_slot, mesh=None if ctx is None else ctx.mesh,
                                         specs=None if ctx is None else specs), donate_argnums=(0,), **copy_kw)

        def copy_slot(state, carry, src_1, dst_1):
            """Prefix sharing: a running request's slot row into a newly placed one's."""
            dst, cache = copy(carry[0], src_1[0], dst_1[0])
            return dst, (cache, *carry[1:])

        self._forwards = (prefill_forward, forwards)   # the compiles warmup() runs side by side
        self._prompt_forward = prompt_forward
        steps = {"copy": copy_slot}
        for variant in STEP_VARIANTS:
            steps.update({f"prefill/{m}{variant}": prefill(m, variant) for m in SAMPLING_MODES})
            steps.update({f"prefill/{m}{variant}/prompt": prefill(m, variant, True) for m in SAMPLING_MODES})
            steps.update({f"prefill/{m}{variant}/fresh": prefill(m, variant, fresh=True) for m in SAMPLING_MODES})
            steps.update({f"decode/{w}/{m}{variant}": decode(w, m, variant)
                          for w in self.windows for m in SAMPLING_MODES})
        self._channel = None
        if jax.process_count() > 1:  # several processes: rank 0 announces each step, the others run it too
            from .distributed import StepChannel, engine_capacity
            self._channel = StepChannel(engine_capacity(self.num_slots, self.buckets[-1], self.context_length,
                                                        mask_words(self.model.config.vocab_size)))
            steps = self._channel.attach(steps)
        self._steps = steps

    def follow(self) -> int:
        """A follower rank (serve/distributed.py): run each step rank 0 announces until it stops. -> steps."""
        def run(step, inputs):
            ids, self._carry = step(self.model.state, self._carry, *inputs)
            return ids
        return self._channel.follow(run)

    # Threads compiling the model's forwards side by side at warm-up (1: one after another as the
    # steps first run). XLA's compile runs outside Python's lock; tracing and lowering take turns.
    # Measured (run 126, H200 host of 16 cores, 30B-A3B-FP8, context 16384, 4 slots, 17 forwards,
    # benchmarks/engine_warmup.py): 1 thread 87.2 s, 8 threads 34.9 s, and the served step after
    # either warm-up the same (4.801 / 4.805 ms: the gemm autotuning side by side picked no worse).
    # Half the cores up to 8; on 2 cores (CI) one thread, where no gain was measurable.
    COMPILE_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))

    # A prompt's first chunk of at least this many tokens (its bucket) runs the prefill forward
    # whose attention reads the chunk's own K/V through cuDNN (Qwen3Moe's `fresh`), not the
    # chunk kernel reading them back from the cache. Served time to the first token (H200, 30B,
    # benchmarks/prompt_ttft.py): 500 tokens at the 512 chunk FP8 -7.1%, bf16 -6.1% (run 144;
    # 250 tokens, bucket 256, level as the control); 1000 / 2000 tokens at the 2048 chunk FP8
    # -8.9% / -10.5%, bf16 -7.2% / -9.3% (run 143); against the cuDNN split the later chunks take,
    # 1-3% (run 154). Each such bucket compiles that form too in the warm-up (one more forward at
    # the 512 chunk); smaller buckets were not measured. 0: off.
    FRESH_MIN_TOKENS = 512

    def _prefill_forms(self) -> list[tuple[int, bool]]:
        """[(bucket, fresh)]: the prefill forwards the warm-up compiles."""
        least = self.fresh_min_tokens
        return [(t, False) for t in self.buckets] + [(t, True) for t in self.buckets if 0 < least <= t]

    def _compile_forwards(self, threads: int, bar):
        """Compile every prefill bucket's and every (KV window, decode batch size)'s forward, `threads`
        at a time, ahead of their first run: jit reuses an executable compiled from the same
        lowering, so the warm-up's runs below find them compiled."""
        prefill_forward, forwards = self._forwards
        state, (cache, last, _) = self.model.state, self._carry
        zeros = functools.partial(np.zeros, dtype=np.int32)
        jobs = [functools.partial(prefill_forward.lower, state, cache, zeros((1, t)), zeros((1, t)), zeros(1), zeros(1),
                                  fresh=fresh) for t, fresh in self._prefill_forms()]
        for b in self.decode_batch_sizes:
            rows = () if b == self.num_slots else (zeros(b),)   # as decode's step passes them
            jobs += [functools.partial(forwards[w].lower, state, cache, last, zeros(b), *rows) for w in self.windows]

        def compile_one(lower):
            lower().compile()
            bar.update(1)
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="qwen3-compile") as pool:
            for f in [pool.submit(compile_one, job) for job in jobs]:
                f.result()   # a failed compile raises here, as it would at its first run

    def warmup(self, progress: bool = True):
        """Compile every prefill bucket, each decode batch size at each KV window, and the samplers
        (SAMPLING_MODES) at each of those batch sizes now, so no request waits for XLA. The
        forwards compile COMPILE_THREADS at a time first; then each step runs once."""
        t0 = time.perf_counter()
        forwards = len(self._prefill_forms()) + len(self.windows) * len(self.decode_batch_sizes)
        threads = max(1, self.COMPILE_THREADS) if jax.process_count() == 1 else 1
        bar = progress_bar(forwards * (2 if threads > 1 else 1)
                           + (len(SAMPLING_MODES) - 1) * (1 + len(self.decode_batch_sizes)), "compiling", "step",
                           progress)
        if threads > 1:
            self._compile_forwards(threads, bar)
            log.debug("compiled %d forwards on %d threads in %.1fs", forwards, threads, time.perf_counter() - t0)
        s = self.context_length
        for t, fresh in self._prefill_forms():   # positions S: the writes are dropped
            ids = self._prefill_call(np.zeros((1, t), np.int32), np.full((1, t), s, np.int32), 0, 0, fresh=fresh)
            jax.block_until_ready(ids)
            bar.update(1)
            log.debug("compiled prefill bucket %d%s", t, " (first chunks)" if fresh else "")
        for b in self.decode_batch_sizes:
            idle = np.arange(self.num_slots - b, self.num_slots, dtype=np.int32)   # slots at position S
            for w in self.windows:
                jax.block_until_ready(self._decode_call(w, idle))
                bar.update(1)
        # The steps above ran the greedy sampler; the others compile at each batch size through
        # whole steps (with several processes every rank must run each jitted call).
        for mode in SAMPLING_MODES[1:]:
            ids = self._prefill_call(np.zeros((1, self.buckets[0]), np.int32),
                                     np.full((1, self.buckets[0]), s, np.int32), 0, 0, mode)
            jax.block_until_ready(ids)
            bar.update(1)
            for b in self.decode_batch_sizes:
                idle = np.arange(self.num_slots - b, self.num_slots, dtype=np.int32)
                jax.block_until_ready(self._decode_call(self.windows[0], idle, mode))
                bar.update(1)
        bar.close()
        log.info("compiled %d prefill buckets %s and the decode step (%d slots, batch sizes %s, KV windows %s, "
                 "samplers %s) in %.1fs (%d compile thread%s)", len(self.buckets), self.buckets, self.num_slots,
                 self.decode_batch_sizes, self.windows, "/".join(SAMPLING_MODES), time.perf_counter() - t0, threads,
                 "s" if threads > 1 else "")

    # A step whose rows ask logprobs, penalties or a structured-output mask runs jits the plain
    # step does not (token_logprobs, the penalized samplers, mask_logits), compiled at their first
    # use: ~1 s a batch size on a GPU, which every running request would wait through. The engine
    # compiles them while it idles instead, one step at a time, so a request arriving meanwhile
    # waits for one compile at most (run 133: 12 s of idle compiles for 30B at context 16k), and
    # last the prompt-logprobs forward (a whole prefill that also scores every position) per bucket.
    # In one process those go to a compile thread (lowered, not run), so a request arriving
    # meanwhile waits for none of them; with several, every rank runs them as steps.
    WARM_VARIANTS = True

    def _variant_warmups(self) -> list[tuple[str, Callable[[], object], bool]]:
        """[(what, launch, background)]: idle steps (every row past the context: nothing written)
        that compile each decode batch size's logprobs and mask (greedy) and its penalized sampler
        per mode, then the prefill's penalized samplers (fresh counts) and, without a batch size of
        1, its logprobs and mask, then each bucket's prompt-logprobs forward (background: in one
        process, launch gives a lowering for the idle-compile thread). Combined variants reuse
        these pieces."""
        s, v = self.context_length, self.model.config.vocab_size
        jobs = []
        for b in self.decode_batch_sizes:
            idle = np.arange(self.num_slots - b, self.num_slots, dtype=np.int32)
            jobs.append((f"decode {b} logprobs+mask",
                         functools.partial(self._decode_call, self.windows[0], idle, "greedy", "/logprobs/masked"),
                         False))
            jobs += [(f"decode {b} penalties {m}",
                      functools.partial(self._decode_call, self.windows[0], idle, m, "/penalties"), False)
                     for m in SAMPLING_MODES]
        t = self.buckets[0]

        def prefill(mode, variant):
            flags = np.full((1, s), v, np.int32) if "penalties" in variant else None
            return self._prefill_call(np.zeros((1, t), np.int32), np.full((1, t), s, np.int32), 0, 0, mode,
                                      variant, prompt_flags=flags)
        jobs += [(f"prefill penalties {m}", functools.partial(prefill, m, "/penalties"), False)
                 for m in SAMPLING_MODES]
        if 1 not in self.decode_batch_sizes:
            jobs.append(("prefill logprobs+mask", functools.partial(prefill, "greedy", "/logprobs/masked"), False))

        def prompt_prefill(t):
            return self._prefill_call(np.zeros((1, t), np.int32), np.full((1, t), s, np.int32), 0, 0, "greedy",
                                      prompt_targets=np.zeros((1, t), np.int32))
        background = self._channel is None
        jobs += [(f"prefill {b} prompt logprobs",
                  functools.partial(self._prompt_forward_lower if background else prompt_prefill, b), background)
                 for b in self.buckets]
        return jobs

    def _prompt_forward_lower(self, t: int):
        """-> a call lowering the prompt-logprobs forward of a T-token chunk as _prefill_call's
        step calls it, the cache given by its shapes and shardings (taken now: the scheduler
        donates it meanwhile). The idle-compile thread lowers and compiles it; the step's first
        call then finds it compiled."""
        zeros = functools.partial(np.zeros, dtype=np.int32)
        cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self._carry[0])
        return functools.partial(self._prompt_forward.lower, self.model.state, cache, zeros((1, t)), zeros((1, t)),
                                 zeros(1), zeros(1), zeros((1, t)))

    def _warm_one_variant(self, what: str, launch: Callable[[], object], background: bool):
        """Run one idle warm-up step (scheduler thread, engine idle) and log when the last is done.
        A compile that fails leaves the engine serving (a request asking for that variant meets
        the error then, as it would have without the warm-up); a step that failed after taking the
        cache (donated, now deleted) ends it, as any failed step does."""
        t0 = time.perf_counter()
        try:
            if background:   # lowered and compiled on the idle-compile thread
                lower = launch()
                with self._cv:
                    self._idle_compiling += 1
                try:
                    self._idle_compiles.submit(self._compile_while_idle, what, lower)
                except RuntimeError:   # the engine shut down meanwhile
                    with self._cv:
                        self._idle_compiling -= 1
                    raise
            else:
                jax.block_until_ready(launch())
                log.debug("compiled the %s step variant while idle", what)
        except Exception:
            if any(a.is_deleted() for a in jax.tree.leaves(self._carry)):
                raise
            log.warning("could not compile the %s step variant while idle; a request asking for it will compile "
                        "it at its first step", what, exc_info=True)
        with self._cv:
            self._idle_warm_s += time.perf_counter() - t0
        self._warmed_one()

    def _compile_while_idle(self, what: str, lower: Callable[[], object]):
        """The idle-compile thread: one forward lowered and compiled while the scheduler serves."""
        t0 = time.perf_counter()
        try:
            lower().compile()
            log.debug("compiled the %s forward on the idle-compile thread", what)
        except Exception:
            log.warning("could not compile the %s forward on the idle-compile thread; a request asking for it "
                        "will compile it at its first step", what, exc_info=True)
        with self._cv:
            self._idle_warm_s += time.perf_counter() - t0
            self._idle_compiling -= 1
            self._cv.notify_all()   # the scheduler may hand over the next one
        self._warmed_one()

    def _warmed_one(self):
        """After each idle warm-up: the last one (steps and compiles) logs and sets variants_warm."""
        with self._cv:
            if self._idle_warmups or self._idle_compiling or self.variants_warm.is_set():
                return
            self.variants_warm.set()
        log.info("compiled the step variants (logprobs, penalties, structured-output masks) at batch sizes %s "
                 "and prompt logprobs' forwards while idle, in %.1fs", self.decode_batch_sizes, self._idle_warm_s)

    # -- submission (any thread) -------------------------------------------------------------
    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer; pass token ids or Engine(tokenizer=checkpoint_dir)")
            return self.tokenizer.encode(prompt)
        ids = [int(i) for i in prompt]
        vocab = self.model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")
        return ids

    def check_lengths(self, prompt_len: int, max_tokens: int | None) -> int:
        """-> max_tokens (None: all the room left); ValueError naming both numbers if over the context."""
        c = self.context_length
        if prompt_len < 1:
            raise ValueError("the prompt is empty; give at least one token")
        if max_tokens is None:
            if prompt_len >= c:
                raise ValueError(f"the prompt has {prompt_len} tokens, which leaves no room to generate in the "
                                 f"context length of {c} tokens; shorten the prompt")
            return c - prompt_len
        if prompt_len + max_tokens > c:
            raise ValueError(f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is "
                             f"{prompt_len + max_tokens} tokens, over this server's context length of {c}; "
                             f"lower max_tokens to {max(c - prompt_len, 0)} or shorten the prompt")
        return max_tokens

    def prepare_constraint(self, params: SamplingParams) -> None:
        """Compile (and cache) params' structured-output constraint now, so a later submit() of it
        costs nothing (the HTTP server calls this off its event loop). Raises ValueError
        (StructuredOutputError) for a constraint that cannot be used."""
        constraint = params.constraint
        if constraint is not None and self._masks is not None:
            self._masks.guide(*constraint)

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               on_output: Callable[[RequestOutput], None] | None = None, request_id: str | None = None,
               block: bool = False) -> Request:
        """Queue a request; `on_output` gets each RequestOutput on the scheduler thread.

        Raises ValueError (bad prompt / params), QueueFull (unless `block`), EngineClosed.
        """
        ids = self.prompt_ids(prompt)
        params = (params or SamplingParams()).validate().resolved(self.default_sampling)
        max_tokens = self.check_lengths(len(ids), params.max_tokens)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        detok = DetokenizeStream(self.tokenizer, params.skip_special_tokens) if self.tokenizer else None
        constraint = params.constraint
        if constraint is not None and self._masks is None:
            raise ValueError("structured output (json_schema / regex) needs the tokenizer's vocabulary; this "
                             "engine has no tokenizer: pass Engine(tokenizer=checkpoint_dir)")
        guide = self._masks.guide(*constraint) if constraint is not None else None   # compiled here, cached
        req = Request(ids, params, max_tokens, seed, stop_ids, detok, on_output or (lambda out: None), request_id)
        req.guide = guide
        with self._cv:
            while True:
                if self._stopping or self.error is not None:
                    raise EngineClosed(self._closed_message())
                # Requests about to take a free slot are not waiting; only the rest count.
                waiting = len(self._pending) - self._slots.count(None)
                if waiting < self.max_queued_requests:
                    break
                if not block:
                    raise QueueFull(f"{waiting} requests are already waiting for one of "
                                    f"{self.num_slots} slots (max_queued_requests={self.max_queued_requests}); "
                                    "retry later")
                self._cv.wait(0.05)
            self._pending.append(req)
            self._cv.notify_all()
        return req

    def cancel(self, req: Request):
        """Drop a request: a queued one leaves the queue, a running one frees its slot before the next step."""
        with self._cv:
            if req.finished or req.cancelled.is_set():
                return
            req.cancelled.set()
            if req in self._pending:
                self._pending.remove(req)
                self._emit(req, req.abort("cancelled"))
            else:
                self._cancels.append(req)
            self._cv.notify_all()

    @property
    def accepting(self) -> bool:
        """False once shutdown began or the scheduler died."""
        return not self._stopping and self.error is None

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def num_queued(self) -> int:
        return len(self._pending)

    def _closed_message(self) -> str:
        if self.error is not None:
            return f"the engine stopped after an error: {self.error!r}"
        return "the engine is shutting down and takes no new requests"

    # -- offline API -------------------------------------------------------------------------
    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield RequestOutput deltas as they are generated; closing the iterator cancels the request."""
        q: queue.Queue = queue.Queue()
        req = self.submit(prompt, params, q.put, block=True)
        try:
            while True:
                out = q.get()
                yield out
                if out.finished:
                    return
        finally:
            if not req.finished:
                self.cancel(req)

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[CompletionOutput]:
        """Generate for one prompt or a list (text or token ids), all batched together. -> one output each."""
        if isinstance(prompts, str) or (len(prompts) and all(isinstance(t, (int, np.integer)) for t in prompts)):
            prompts = [prompts]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts; give one or one each")
        done = threading.Event()
        results: dict[str, list[RequestOutput]] = {}
        remaining = [len(prompts)]
        lock = threading.Lock()

        def on_output(out: RequestOutput):
            with lock:
                results.setdefault(out.request_id, []).append(out)
                if out.finished:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        reqs = [self.submit(p, sp, on_output, block=True) for p, sp in zip(prompts, plist)]
        try:
            while not done.wait(0.1):
                if self.error is not None or (self._stopping and not self._thread.is_alive()):
                    break
        finally:
            for r in reqs:
                if not r.finished:
                    self.cancel(r)
        return [_collect(r, results.get(r.id, [])) for r in reqs]

    def chat(self, messages, params: SamplingParams | None = None, **template_kwargs) -> list[CompletionOutput]:
        """Chat-template one conversation (a list of messages) or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.chat_prompt_ids(c, **template_kwargs) for c in convs]
        return self.generate(prompts, params)

    def chat_prompt_ids(self, messages, tools=None, **template_kwargs) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer; Engine(tokenizer=checkpoint_dir)")
        text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **template_kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def submit_async(self, prompt, params: SamplingParams | None = None, request_id: str | None = None
                     ) -> "AsyncStream":
        """For asyncio callers (the HTTP server): submit now (errors raise here), iterate outputs later."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def put(out):
            loop.call_soon_threadsafe(q.put_nowait, out)

        return AsyncStream(self, self.submit(prompt, params, put, request_id), q)

    # -- lifecycle ---------------------------------------------------------------------------
    def shutdown(self, reason: str = "the server is shutting down", timeout: float = 10.0):
        """Stop taking requests, end every queued and running one with an error, stop the thread."""
        with self._cv:
            self._stopping = True
            self._stop_reason = reason
            self._cv.notify_all()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._idle_compiles.shutdown(wait=True, cancel_futures=True)   # at most the one compile in flight

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # -- the scheduler thread ----------------------------------------------------------------
    def _emit(self, req: Request, out: RequestOutput):
        try:
            req.on_output(out)
        except Exception:  # a consumer gone away (closed event loop) must not stop the engine
            log.debug("dropping output for %s", req.id, exc_info=True)
        if out.finished:
            for hook in self.finish_hooks:
                try:
                    hook(req)
                except Exception:
                    log.exception("finish hook failed for %s", req.id)

    def _loop(self):
        try:
            while True:
                warm = None
                with self._cv:
                    while not (self._stopping or self._pending or self._cancels or self._prefilling
                               or self.num_running):
                        if self._idle_warmups:   # idle: one variant's compile, outside the lock
                            if self._idle_warmups[0][2] and self._idle_compiling:
                                self._cv.wait()   # one forward at a time on the idle-compile thread
                                continue
                            warm = self._idle_warmups.popleft()
                            break
                        if self._channel is None:
                            self._cv.wait()
                        elif not self._cv.wait(KEEPALIVE_S):  # idle: no follower sits in one collective for hours
                            self._channel.keepalive()
                    if self._stopping:
                        break
                if warm is not None:
                    self._warm_one_variant(*warm)
                    continue
                with self._cv:
                    cancels, self._cancels = self._cancels, []
                    for r in cancels:
                        self._free(r, "cancelled")
                    held = []
                    while self._pending and None in self._slots:
                        r = self._pending.popleft()
                        if self._waits_for_prefix(r):
                            held.append(r)
                            continue
                        self._place(r)
                        self._prefilling.append(r)
                    self._pending.extendleft(reversed(held))   # first in line again, in their order
                launched = self._run_prefills()
                launched = self._decode() or launched
                # Overlap: the step just launched runs on the device while the host reads back and
                # hands out the ones before it (detokenize, stop checks, streaming), then schedules
                # the next; the host work between two steps leaves the device's critical path. Not
                # while a step with structured-output rows is in flight: their next masks need its tokens.
                self._collect(keep=1 if self.overlap and launched and not self._constrained_in_flight() else 0)
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request below
            log.exception("engine step failed; ending all requests")
            self.error = e
        finally:
            reason = self.error and f"engine error: {self.error!r}" or getattr(self, "_stop_reason", "stopped")
            with self._cv:
                self._stopping = True
                waiting = list(self._pending) + [r for r in self._slots if r is not None]
                self._pending.clear()
                self._prefilling.clear()
                self._slots = [None] * self.num_slots
            for r in waiting:
                if not r.finished:
                    self._emit(r, r.abort(reason))
            if self._channel is not None:
                try:
                    self._channel.stop()  # the followers return from follow() and exit
                except Exception:
                    log.exception("could not tell the other ranks to stop")

    # Fewest prompt tokens worth taking from a busy slot: the copy moves the slot's whole row
    # (~1 ms for a 16k-position row of 30B-A3B on an H200, by its bytes), ~20-50 prefilled
    # tokens' time; a chat template's few shared header tokens are not worth it.
    SHARE_MIN_TOKENS = 64

    def _shares(self) -> bool:
        """Busy slots can lend their rows (prefix caching on; with the slots split over
        data-parallel groups, to free slots of their own group: _copy_slot)."""
        return self.prefix_caching

    def _group(self, slot: int) -> int:
        """The data-parallel group holding `slot` (0 with one group)."""
        return slot // self._slot_group

    def _waits_for_prefix(self, req: Request) -> bool:
        """Hold a queued request back while a slot is still prefilling the start its prompt shares
        (SHARE_MIN_TOKENS or more: n choices of one prompt, a system prompt sent by many at once):
        placed once those chunks are launched, it gets them copied (_place) instead of
        prefilling them again. This costs it no time: prefill runs oldest first, so its own
        chunks would start only after that slot's prompt is launched anyway."""
        if not self._shares() or req.params.prompt_logprobs is not None:
            return False
        prompt = req.prompt_array[:-1]
        open_groups = {self._group(s) for s, r in enumerate(self._slots) if r is None}   # a copy needs one
        for r in self._slots:
            if r is not None and r.prefilled < r.prompt_len and self._group(r.slot) in open_groups:
                common = _common_prefix(r.prompt_array, prompt)
                if common >= self.SHARE_MIN_TOKENS and r.prefilled < common:
                    return True
        return False

    def _place(self, req: Request):
        """Give a queued request a free slot. With prefix caching, the free slot whose cache holds
        the longest start of its prompt (then the one freed longest ago, to keep the others'):
        those tokens are not prefilled again. Where a busy slot's launched prompt chunks hold
        more of it (a shared system prompt, n choices of one prompt), that slot's row is copied
        into a free slot of its data-parallel group first (the slots are split over the groups'
        devices, and a copy stays on them). The last prompt token always is prefilled (its logits
        start the generation)."""
        free = [s for s, r in enumerate(self._slots) if r is None]
        slot, reuse = free[0], 0
        if self.prefix_caching and req.params.prompt_logprobs is None:   # prompt logprobs: every token scored
            prompt = req.prompt_array[:-1]
            cached = {s: _common_prefix(self._cached[s], prompt) for s in free}

            def best(slots):
                return max(slots, key=lambda s: (cached[s], -self._freed_at[s]))
            slot = best(free)
            reuse = cached[slot]
            if self._shares():   # the source: a busy slot whose group has a free slot to copy into
                open_groups = {self._group(s) for s in free}
                src, held = max(((s, _common_prefix(r.prompt_array[:r.prefilled], prompt))
                                 for s, r in enumerate(self._slots) if r is not None and self._group(s) in open_groups),
                                key=lambda sh: sh[1], default=(None, 0))
                if held >= reuse + self.SHARE_MIN_TOKENS:
                    slot = best([s for s in free if self._group(s) == self._group(src)])
                    _, self._carry = self._steps["copy"](self.model.state, self._carry, np.array([src], np.int32),
                                                         np.array([slot], np.int32))
                    reuse = held
                    self.prefix_copies += 1
        req.slot, req.prefilled, req.cached_tokens = slot, reuse, reuse
        self._slots[slot] = req

    def _free(self, req: Request, reason: str | None = None):
        """Give a request's slot back (idempotent). With `reason`, tell its consumer it was aborted.
        The slot's cache keeps the tokens whose K/V its steps wrote: the prompt chunks launched,
        then every generated token but the last (never fed back), for prefix caching."""
        slot = req.slot
        if slot is not None and self._slots[slot] is req:
            self._slots[slot] = None
            self._pos[slot], self._temp[slot] = self.context_length, 0.0
            if req in self._prefilling:
                self._prefilling.remove(req)
            done = req.prompt_ids[:req.prefilled] + (req.output_ids[:-1] if req.prefilled == req.prompt_len else [])
            self._cached[slot] = np.asarray(done, np.int32)
            self._tick += 1
            self._freed_at[slot] = self._tick
        if reason and not req.finished:
            self._emit(req, req.abort(reason))

    def _set_row(self, req: Request):
        s, p = req.slot, req.params
        self._temp[s], self._top_p[s], self._top_k[s] = p.temperature, p.top_p, p.top_k
        self._seed[s], self._step[s] = device_seed(req.seed), 0
        self._presence[s], self._frequency[s], self._repetition[s] = (p.presence_penalty, p.frequency_penalty,
                                                                      p.repetition_penalty)

    def _run_prefills(self) -> bool:
        """Launch up to one chunk budget of prompt tokens (at least one chunk), oldest request first.
        -> whether anything was launched."""
        budget, launched = self.chunk, False
        while self._prefilling and budget > 0:
            req = self._prefilling[0]
            if req.cancelled.is_set():
                with self._cv:
                    self._free(req, "cancelled")
                continue
            if req.prompt_len - req.prefilled <= self.chunk:  # its last chunk: leaves the prefill queue
                self._prefilling.popleft()
            budget -= self._prefill_one_chunk(req)
            launched = True
        return launched

    def _prefill_one_chunk(self, req: Request) -> int:
        start = req.prefilled
        n = min(self.chunk, req.prompt_len - start)
        self.prefill_tokens += n
        t = next(b for b in self.buckets if b >= n)
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :n] = req.prompt_ids[start:start + n]
        positions = np.full((1, t), self.context_length, np.int32)  # padding: writes dropped
        positions[0, :n] = np.arange(start, start + n)
        self._set_row(req)
        s = req.slot
        req.prefilled = start + n
        done = req.prefilled == req.prompt_len
        p = req.params
        variant = step_variant(done and p.logprobs is not None, done and p.penalized,
                               done and req.masked)
        flags = self._prompt_flags(req) if "penalties" in variant else None
        if p.prompt_logprobs is None:   # extras: the last chunk's id only
            fresh = start == 0 and 0 < self.fresh_min_tokens <= t
            ids = self._prefill_call(tokens, positions, s, n - 1, variant=variant, prompt_flags=flags, fresh=fresh)
        else:   # position start + i scores prompt token start + i + 1, up to the prompt's last
            targets = np.zeros((1, t), np.int32)
            scored = min(n, req.prompt_len - 1 - start)
            targets[0, :scored] = req.prompt_ids[start + 1:start + 1 + scored]
            ids, out = self._prefill_call(tokens, positions, s, n - 1, variant=variant, prompt_targets=targets,
                                          prompt_flags=flags)
            self._inflight.append((out, PromptChunk(req, start + 1, scored)))
        if done:  # the last chunk's id is the first generated token
            self._step[s], self._pos[s] = 1, req.prompt_len  # the inputs of its first decode step
            req.launched = 1
            self._inflight.append((ids, [(0, req)]))
        return t

    def _decode(self) -> bool:
        """Launch one decode step over the requests that still need tokens. -> whether it launched.

        A request is decoded from its launched count, not its delivered one: with overlap its
        previous token may still be on the device (the step reads it from the carry)."""
        # A constrained request's next mask needs its last token: it sits out while that is in flight.
        live = [s for s, req in enumerate(self._slots)
                if req is not None and req.prefilled == req.prompt_len and not req.finished
                and req.launched < req.max_tokens and (req.guide is None or req.launched == len(req.output_ids))]
        if not live:
            return False
        need = int(max(self._pos[s] for s in live)) + 1
        window = next(w for w in self.windows if w >= need)
        b = next(b for b in self.decode_batch_sizes if b >= len(live))
        taken = set(live)
        if b == self.num_slots:   # every slot, row b is slot b
            rows = np.arange(b, dtype=np.int32)
        else:   # the live slots, padded with others, all at position S (free or still prefilling)
            rows = np.asarray(live + [s for s in range(self.num_slots) if s not in taken][:b - len(live)], np.int32)
        asks = [self._slots[s].params for s in live]
        masked = any(self._slots[s].masked for s in live)
        ids = self._decode_call(window, rows, variant=step_variant(any(p.logprobs is not None for p in asks),
                                                                   any(p.penalized for p in asks), masked))
        self.steps += 1
        self.decode_batches[b] = self.decode_batches.get(b, 0) + 1
        self._pos[live] += 1
        self._step[live] += 1
        for s in live:
            self._slots[s].launched += 1
        self._inflight.append((ids, [(i, self._slots[s]) for i, s in enumerate(rows) if s in taken]))
        return True

    def _constrained_in_flight(self) -> bool:
        """A launched step holds a row with a constraint (active, or waiting for its start token)."""
        return any(isinstance(rows, list) and any(r.guide is not None for _, r in rows) for _, rows in self._inflight)

    def _prompt_flags(self, req: Request) -> np.ndarray:
        """[1, S] int32: the prompt ids a repetition penalty acts on (the penalized sampler flags
        them in the slot's counts), the rest V (dropped); all V without a repetition penalty."""
        out = np.full((1, self.context_length), self.model.config.vocab_size, np.int32)
        if req.params.repetition_penalty != 1:
            out[0, :req.prompt_len] = req.prompt_ids
        return out

    def _prefill_call(self, tokens_1t, positions_1t, slot: int, logits_at: int, mode: str | None = None,
                      variant: str = "", prompt_targets=None, prompt_flags=None, fresh: bool = False):
        """Launch one prompt chunk [1, T] into `slot`'s cache row. -> the id sampled after
        position logits_at [1] (not yet on the host), also kept as the slot's last id; with
        "/logprobs" in `variant` (STEP_VARIANTS), (ids, token_logprobs' three arrays). mode: the
        sampler's (None: the one the slot's settings need). prompt_targets [1, T]: the chunk's
        positions also score these ids; -> (that, (logprob [T], top ids, top logprobs)).
        prompt_flags [1, S]: with "/penalties", the prompt ids to flag (_prompt_flags). fresh: the
        prompt's first chunk (FRESH_MIN_TOKENS), not with prompt_targets."""
        rows = np.array([slot], np.int32)
        targets = () if prompt_targets is None else (prompt_targets,)
        flags = () if "penalties" not in variant else (prompt_flags,)
        masks = (self._mask_words(rows),) if "masked" in variant else ()
        inputs = (tokens_1t, positions_1t, rows, np.array([logits_at], np.int32), *targets,
                  *self._sampling_inputs(rows, variant), *flags, *masks)
        mode = mode or sampling_mode(self._temp[rows], self._top_k[rows])
        key = f"prefill/{mode}{variant}" + ("/prompt" if targets else "/fresh" if fresh else "")
        out, self._carry = self._steps[key](self.model.state, self._carry, *inputs)
        return out

    def _decode_call(self, window: int, rows, mode: str | None = None, variant: str = ""):
        """Launch one decode step over the slots `rows` [B] (B = the slot count: every slot, in slot
        order). -> ids [B] (not yet on the host), or with "/logprobs" in `variant` (ids,
        token_logprobs' three arrays); the carry moves on. mode: the sampler's (None: the one the
        live rows' settings need)."""
        positions = self._pos[rows]
        live = positions < self.context_length   # the sampler's mode follows the live rows alone
        mode = mode or sampling_mode(self._temp[rows][live], self._top_k[rows][live])
        inputs = self._sampling_inputs(rows, variant)
        masks = (self._mask_words(rows),) if "masked" in variant else ()
        out, self._carry = self._steps[f"decode/{window}/{mode}{variant}"](
            self.model.state, self._carry, positions, *inputs[:5], rows, *inputs[5:], *masks)
        return out

    def _mask_words(self, rows) -> np.ndarray:
        """[B, W] int32, bit t % 32 of word t // 32 set where token t may be sampled: each row's
        structured-output mask (its guide's allowed tokens), without its EOS and stop ids while
        it is within min_tokens; every token for the other rows."""
        v = self.model.config.vocab_size
        words = np.full((len(rows), mask_words(v)), -1, np.int32)
        for b, s in enumerate(rows):
            req = self._slots[s]
            if req is None or req.finished:
                continue
            if req.guide is not None and req.guide_on:
                self._masks.write(req.guide, words[b])
            if req.launched < req.params.min_tokens:
                ends = np.array([t for t in req.stop_ids if 0 <= t < v], np.int64)
                np.bitwise_and.at(words[b].view(np.uint32), ends >> 5, ~(np.uint32(1) << (ends & 31).astype(np.uint32)))
        return words

    def _sampling_inputs(self, rows, variant: str = "") -> tuple[np.ndarray, ...]:
        """temperature, top_p, top_k, seed, step of slots `rows` (and presence, frequency,
        repetition with "/penalties" in `variant`), as copies: JAX on CPU may alias a numpy
        argument instead of copying it, and these vectors change while a step is in flight."""
        out = (self._temp[rows], self._top_p[rows], self._top_k[rows], self._seed[rows], self._step[rows])
        if "penalties" not in variant:
            return out
        return out + (self._presence[rows], self._frequency[rows], self._repetition[rows])

    def _collect(self, keep: int = 0):
        """Read back launched steps' ids, oldest first, until `keep` remain in flight; hand each to
        its request. A request that finished or was cancelled meanwhile drops the extra id a later
        step already computed for it (that step's KV write lies past its end; the slot's next
        request writes each position before it reads it)."""
        while len(self._inflight) > keep:
            out, rows = self._inflight.popleft()
            if isinstance(rows, PromptChunk):
                rows.deliver(*jax.device_get(out))
                continue
            ids, *lp = jax.device_get(out) if isinstance(out, tuple) else (np.asarray(out),)
            for i, req in rows:
                if not req.finished and self._slots[req.slot] is req:
                    n = req.params.logprobs
                    self._deliver(req, int(ids[i]), None if n is None or not lp else _token_logprob(ids[i], *lp, i, n))

    def _deliver(self, req: Request, token: int, logprob: TokenLogprob | None = None):
        """Hand one sampled id (and its logprobs) to its request; free the slot when it finishes.
        A constrained request's guide takes the token (the mask allowed only tokens it takes)."""
        if req.guide is not None and not req.guide_on:   # free until its start token
            req.guide_on = token == req.params.constraint_after
        elif req.guide is not None:
            try:
                self._masks.advance(req.guide, token)
            except Exception as e:   # noqa: BLE001 - one request's guide must not stop the engine
                self._emit(req, req.abort(f"structured output: token {token} left the constraint ({e})"))
                with self._cv:
                    self._free(req)
                return
        out = req.accept(token, logprob)
        self._emit(req, out)
        if out.finished:
            with self._cv:
                self._free(req)


def _token_logprob(token_id, logprob_r, top_ids_rn, top_rn, i: int, n: int) -> TokenLogprob:
    """Row i of token_logprobs' three arrays (on the host) as a TokenLogprob with n alternatives."""
    return TokenLogprob(int(token_id), float(logprob_r[i]),
                        [(int(t), float(x)) for t, x in zip(top_ids_rn[i, :n], top_rn[i, :n])])


@dataclasses.dataclass
class PromptChunk:
    """A launched prefill chunk's prompt scores, owed to `req`: `count` prompt tokens from index
    `first` (each given the ones before it)."""

    req: Request
    first: int
    count: int

    def deliver(self, logprob_t, top_ids_tn, top_tn):
        """Keep the chunk's TokenLogprobs on the request (released with its first output)."""
        req, n = self.req, self.req.params.prompt_logprobs
        if req.finished or req.prompt_logprobs is None:
            return
        ids = req.prompt_ids[self.first:self.first + self.count]
        req.prompt_logprobs += [_token_logprob(tid, logprob_t, top_ids_tn, top_tn, i, n) for i, tid in enumerate(ids)]


class AsyncStream:
    """An async iterator over one request's outputs; `cancel()` (or leaving early) frees its slot."""

    def __init__(self, engine: Engine, req: Request, q: asyncio.Queue):
        self.engine, self.request, self._q = engine, req, q

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        try:
            while True:
                out = await self._q.get()
                yield out
                if out.finished:
                    return
        finally:
            self.cancel()

    def cancel(self):
        if not self.request.finished:
            self.engine.cancel(self.request)


def _collect(req: Request, outs: list[RequestOutput]) -> CompletionOutput:
    last = outs[-1] if outs else None
    return CompletionOutput(
        request_id=req.id, text="".join(o.text for o in outs), token_ids=[t for o in outs for t in o.token_ids],
        finish_reason=last.finish_reason if last else "abort", prompt_tokens=req.prompt_len,
        completion_tokens=len(req.output_ids), stop_reason=last.stop_reason if last else None,
        error=last.error if last else "no output",
        logprobs=[lp for o in outs for lp in o.logprobs or ()] if req.params.logprobs is not None else None,
        cached_tokens=req.cached_tokens, prompt_logprobs=req.prompt_logprobs)
