"""The engine in-process: sampler statistics, detokenization, stop strings, chat template, KV sizing,
and continuous batching checked against qwen3_jax's own greedy loop (float32, built-in model)."""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference import penalized_greedy
from serve.builtin import builtin_checkpoint
from serve.capacity import CapacityError, size_cache
from sharding.memory import kv_bytes_per_token
from serve.engine import Engine, EngineClosed, QueueFull, prefill_buckets
from serve.request import Request
from serve.sampling import SamplingParams, sample, sampling_mode
from serve.tokenizer import DetokenizeStream, Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return builtin_checkpoint(str(tmp_path_factory.mktemp("builtin")))


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer(ckpt)


# -- sampling ----------------------------------------------------------------------------------
_sample_jit = jax.jit(sample, static_argnums=6)


def _sample(logits, temperature, top_p, top_k, seed, step):
    """sample in the mode the engine would pick for these rows (sampling_mode, on the host)."""
    return _sample_jit(logits, temperature, top_p, top_k, seed, step,
                       sampling_mode(np.asarray(temperature), np.asarray(top_k)))


def _draw(probs, n, temperature=1.0, top_p=1.0, top_k=-1, step=0):
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None].repeat(n, 0)
    return np.asarray(_sample(logits, jnp.full(n, temperature, jnp.float32), jnp.full(n, top_p, jnp.float32),
                             jnp.full(n, top_k, jnp.int32), jnp.arange(n, dtype=jnp.int32), jnp.full(n, step, jnp.int32)))


def test_sampler_frequencies_follow_temperature_top_k_top_p():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    n = 4000
    freq = np.bincount(_draw(p, n), minlength=4) / n
    assert np.abs(freq - p).max() < 4 * np.sqrt(0.25 / n)
    # top_k=2 keeps the two best, renormalized: 0.5/0.8, 0.3/0.8.
    freq = np.bincount(_draw(p, n, top_k=2), minlength=4) / n
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.625) < 4 * np.sqrt(0.25 / n)
    # top_p=0.6 keeps tokens whose better-ranked mass is < 0.6: tokens 0 and 1.
    freq = np.bincount(_draw(p, n, top_p=0.6), minlength=4) / n
    assert freq[2:].sum() == 0 and abs(freq[1] - 0.375) < 4 * np.sqrt(0.25 / n)
    # temperature 0.5 squares the odds: p^2 normalized.
    q = p ** 2 / (p ** 2).sum()
    freq = np.bincount(_draw(p, n, temperature=0.5), minlength=4) / n
    assert np.abs(freq - q).max() < 4 * np.sqrt(0.25 / n)


def test_sampler_wide_vocab_paths():
    """V > 64: rows all with top_k <= 64 take the top_k(64) path, any other row the full sort."""
    p = np.full(100, 0.05 / 97)
    p[:3] = [0.5, 0.3, 0.15]
    n = 4000
    tol = 4 * np.sqrt(0.25 / n)
    narrow = np.bincount(_draw(p, n, top_k=2), minlength=100) / n
    assert narrow[2:].sum() == 0 and abs(narrow[0] - 0.625) < tol
    full = np.bincount(_draw(p, n), minlength=100) / n
    assert np.abs(full[:3] - p[:3]).max() < tol and abs(full[3:].sum() - 0.05) < tol


def test_sampler_greedy_rows_and_reproducible_keys():
    logits = jax.random.normal(jax.random.key(0), (6, 50))
    t = jnp.array([0, 1, 0, 1, 0.7, 0], jnp.float32)
    args = (jnp.ones(6, jnp.float32), jnp.full(6, -1, jnp.int32), jnp.arange(6, dtype=jnp.int32))
    a = np.asarray(_sample(logits, t, *args, jnp.zeros(6, jnp.int32)))
    b = np.asarray(_sample(logits, t, *args, jnp.zeros(6, jnp.int32)))
    greedy = np.asarray(jnp.argmax(logits, -1))
    assert (a[t == 0] == greedy[np.asarray(t) == 0]).all() and (a == b).all()
    # top_k=1 at any temperature is greedy.
    k1 = _sample(logits, jnp.full(6, 2.0, jnp.float32), jnp.ones(6, jnp.float32), jnp.ones(6, jnp.int32), jnp.arange(6, dtype=jnp.int32),
                jnp.zeros(6, jnp.int32))
    assert (np.asarray(k1) == greedy).all()


# -- text --------------------------------------------------------------------------------------
def test_sampler_modes_pick_the_cheapest_exact_path():
    """The host picks the sampler's mode from the rows' settings (the engine compiles one path per
    mode, no device conditional): greedy when no row samples, top64 when every sampling row asks
    top_k <= 64, else the full sort. In every mode greedy rows get the argmax, and each sampling
    row an id among its own top_k best (top64 is exact for such rows); a mode the sampler does not
    have is refused."""
    assert sampling_mode([0, 0], [-1, 5]) == "greedy"
    assert sampling_mode([0, 0.7, 1.0], [-1, 20, 64]) == "top64"
    assert sampling_mode([0.7, 0.7], [20, -1]) == sampling_mode([0.7], [65]) == "full"
    logits = jax.random.normal(jax.random.key(1), (6, 300)) * 3
    argmax = np.asarray(jnp.argmax(logits, -1))
    rank = np.argsort(np.argsort(-np.asarray(logits), axis=1), axis=1)   # each id's rank in its row
    t = np.asarray([0, 0.8, 0, 1.2, 0.5, 0], np.float32)
    k = np.asarray([-1, 20, 3, 64, 1, -1], np.int32)
    for step in range(4):
        args = (logits, jnp.asarray(t), jnp.full(6, 0.9, jnp.float32), jnp.asarray(k), jnp.arange(6, dtype=jnp.int32),
                jnp.full(6, step, jnp.int32))
        for mode in ("top64", "full"):
            ids = np.asarray(_sample_jit(*args, mode))
            assert (ids[t == 0] == argmax[t == 0]).all(), mode
            assert (rank[np.arange(6), ids][t > 0] < k[t > 0]).all(), mode
        assert (np.asarray(_sample_jit(*args, "greedy")) == argmax).all()
    with pytest.raises(ValueError, match="sampling mode 'beam'"):
        sample(*args, "beam")


def test_detokenize_stream_never_splits_characters(tok):
    text = "Hello 你好, robots 🤖 paint: naïve café!"
    ids = tok.encode(text)
    stream = DetokenizeStream(tok)
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == text == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some byte tokens really did end inside a character and were held back


def _feed(tok, text, stops, max_tokens=100, stop_ids=()):
    ids = tok.encode(text)
    req = Request([1], SamplingParams(stop=stops), max_tokens, 0, set(stop_ids), DetokenizeStream(tok), lambda o: None)
    outs = []
    for i in ids:
        outs.append(req.accept(i))
        if outs[-1].finished:
            break
    return outs


def test_stop_strings_cut_and_hold_back(tok):
    outs = _feed(tok, "Hello World and more words", ["o W", "zzz"])
    assert "".join(o.text for o in outs) == "Hell"
    assert (outs[-1].finish_reason, outs[-1].stop_reason) == ("stop", "o W")
    # While "o" could still start "o W", it is held back; released once it cannot.
    outs = _feed(tok, "Hello Wide", ["o Wo"])
    assert "".join(o.text for o in outs) == "Hello Wide" and outs[-1].finish_reason is None
    assert outs[0].text == "Hell"  # "Hello" is one token; its "o" waited
    # max_tokens ends with "length" and releases held text.
    outs = _feed(tok, "Hello Wo", ["o Wx"], max_tokens=len(tok.encode("Hello Wo")))
    assert "".join(o.text for o in outs) == "Hello Wo" and outs[-1].finish_reason == "length"


def test_chat_template_behaviour(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nplan\n</think>\n\nHello"},
            {"role": "user", "content": "Again"}]
    assert tok.apply_chat_template(msgs, enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"  # old thoughts dropped
        "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # The last assistant turn after the last question keeps its reasoning.
    assert tok.apply_chat_template(msgs[:2], add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\nplan\n</think>\n\nHello<|im_end|>\n")
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert "<|im_start|>user\nab<|im_end|>" in tok.apply_chat_template(parts)


def test_chat_template_renders_as_transformers_does(ckpt, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(ckpt)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter für eine Stadt",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    convs = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "w?"},
         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
             "name": "get_weather", "arguments": {"city": "Paris"}}}]},
         {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "20C"}],
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>r2</think>a2"}],
    ]
    for conv in convs:
        for kw in ({}, {"enable_thinking": False}):
            ours = tok.apply_chat_template(conv, tools=tools if conv is convs[1] else None, **kw)
            theirs = hf.apply_chat_template(conv, tools=tools if conv is convs[1] else None, tokenize=False,
                                            add_generation_prompt=True, **kw)
            assert ours == theirs
    assert hf.encode("Hello <|im_start|>user 你好") == tok.encode("Hello <|im_start|>user 你好")


# -- sizing ------------------------------------------------------------------------------------
def test_prefill_buckets():
    assert prefill_buckets(256, 512) == [32, 64, 128, 256]
    assert prefill_buckets(4096, 512) == [32, 64, 128, 256, 512]
    assert prefill_buckets(1000, 1000) == [32, 64, 128, 256, 512, 1000]
    assert prefill_buckets(20, 512) == [20]


# -- the engine --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(ckpt):
    eng = Engine(ckpt, dtype="float32", context_length=128, max_running_requests=4, max_queued_requests=2,
                 chunked_prefill_size=32, progress=False)
    yield eng
    eng.shutdown()


def test_decode_batch_sizes_rule():
    from serve.engine import pick_decode_batch_sizes as pick

    assert pick(21) == [1, 2, 4, 8, 16, 21] and pick(16) == [1, 2, 4, 8, 16] and pick(1) == [1]
    assert pick(16, accelerator=False) == [16]                  # a CPU: one shape, fast start-up
    assert pick(16, dp=2) == pick(16, processes=2) == [16]      # rows split over groups / announced steps
    assert pick(16, [8, 1, 2, 2, 64], accelerator=False) == [1, 2, 8, 16]
    with pytest.raises(ValueError, match="positive integers"):
        pick(16, [0, 4])
    with pytest.raises(ValueError, match="dp=2 groups; leave --decode-batch-sizes unset"):
        pick(16, [1, 2], dp=2)
    assert pick(16, [16], dp=2) == [16]


def test_warmup_compiles_each_forward_once_on_threads(ckpt, monkeypatch, caplog):
    """Engine.COMPILE_THREADS: the warm-up compiles the prefill buckets' and the (KV window, batch
    size) forwards side by side first; the steps' first runs then reuse those executables. Each
    forward compiles exactly once (a lowering that differed from the step's call, e.g. an input
    of another dtype, would compile it twice)."""
    import logging

    monkeypatch.setattr(Engine, "COMPILE_THREADS", 2)
    caplog.set_level(logging.WARNING, logger="jax")
    jax.config.update("jax_log_compiles", True)   # the global flag: the context manager's is per thread
    try:
        eng = Engine(ckpt, dtype="float32", context_length=512, max_running_requests=4, chunked_prefill_size=64,
                     decode_batch_sizes=[1, 2], progress=False)
    finally:
        jax.config.update("jax_log_compiles", False)
    try:
        names = [r.getMessage().split(" with ")[0] for r in caplog.records if r.getMessage().startswith("Compiling ")]
        assert names.count("Compiling jit(_prefill_forward)") == len(eng.buckets) == 2
        assert names.count("Compiling jit(_decode_forward)") == len(eng.windows) * len(eng.decode_batch_sizes) > 2
        out = eng.generate([1, 2, 3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
        assert len(out.token_ids) == 4
    finally:
        eng.shutdown()


def test_prompt_logprobs_forwards_compile_beside_the_scheduler(ckpt, monkeypatch):
    """In one process the idle warm-up hands each bucket's prompt-logprobs forward to the
    idle-compile thread: a request arriving while one compiles (held here) is served meanwhile,
    with the tokens the same prompt gets once the compiles are done, and variants_warm is set
    only then."""
    started, release = threading.Event(), threading.Event()
    compile_one = Engine._compile_while_idle

    def held(self, what, lower):
        started.set()
        release.wait(120)
        compile_one(self, what, lower)
    monkeypatch.setattr(Engine, "_compile_while_idle", held)
    eng = Engine(ckpt, dtype="float32", context_length=128, max_running_requests=2, chunked_prefill_size=32,
                 progress=False)
    try:
        assert started.wait(120)   # the warm-up reached the prompt-logprobs forwards
        greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        out = eng.generate([5, 6, 7], greedy)[0]
        assert len(out.token_ids) == 4 and not eng.variants_warm.is_set()
        release.set()
        assert eng.variants_warm.wait(120)
        assert eng.generate([5, 6, 7], greedy)[0].token_ids == out.token_ids
    finally:
        release.set()
        eng.shutdown()


@pytest.mark.parametrize("warm", [True, False])
def test_step_variants_compile_while_the_engine_idles(ckpt, monkeypatch, caplog, warm):
    """Engine.WARM_VARIANTS: after the warm-up the idle engine compiles the logprobs, penalties
    and mask pieces of its steps and the prompt-logprobs forwards, so the first request asking
    logprobs and a presence penalty (sampled: the top-64 sampler, prefill and decode) and the
    first asking prompt logprobs compile nothing while they run. Without it
    (warm=False) that request compiles them: the count the test reads does move."""
    import logging

    monkeypatch.setattr(Engine, "WARM_VARIANTS", warm)
    eng = Engine(ckpt, dtype="float32", context_length=128, max_running_requests=2, chunked_prefill_size=32,
                 progress=False)
    try:
        assert eng.variants_warm.wait(120)
        caplog.set_level(logging.WARNING, logger="jax")
        jax.config.update("jax_log_compiles", True)
        try:
            outs = eng.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=6, temperature=0.7, top_k=20, seed=1,
                                                                    logprobs=2, presence_penalty=0.5, ignore_eos=True))
            scored = eng.generate([list(range(5, 45))], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1,
                                                                       ignore_eos=True))[0]
        finally:
            jax.config.update("jax_log_compiles", False)
        assert all(len(o.token_ids) == 6 and len(o.logprobs) == 6 for o in outs)
        assert len(scored.prompt_logprobs) == 40   # two chunks, 32 + 8 tokens
        compiled = [r.getMessage().split(" with ")[0] for r in caplog.records if r.getMessage().startswith("Compiling ")]
        assert (compiled == []) if warm else len(compiled) >= 3, compiled
    finally:
        eng.shutdown()


def test_step_variants_warm_without_a_tokenizer(ckpt):
    """A model handed in without a tokenizer (the benchmarks' random weights) has no structured
    outputs but still masks logits (min_tokens' stop ids), so its idle warm-up compiles the mask
    too; the engine then serves token-id prompts, logprobs and min_tokens included."""
    import qwen3_jax

    eng = Engine(qwen3_jax.load(ckpt, dtype="float32", progress=False), context_length=128,
                 max_running_requests=2, chunked_prefill_size=32, progress=False)
    try:
        assert eng.tokenizer is None and eng.variants_warm.wait(120) and eng.error is None
        out = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, logprobs=1, ignore_eos=True))[0]
        assert len(out.token_ids) == 4 and len(out.logprobs) == 4
        held = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, min_tokens=3,
                                                        stop_token_ids=[out.token_ids[0]]))[0]
        assert out.token_ids[0] not in held.token_ids[:3] and len(held.token_ids) >= 3
    finally:
        eng.shutdown()


def test_a_variant_that_fails_to_compile_while_idle_leaves_the_engine_serving(ckpt, monkeypatch, caplog):
    """An idle warm-up step whose compile fails (its cache untouched), and a forward that fails to
    compile on the idle-compile thread, are logged as warnings and the engine goes on: the next
    warm-ups run, variants_warm is set and requests are served."""
    import logging

    real = Engine._variant_warmups

    def with_a_failure(self):
        def broken():
            raise RuntimeError("compile failed (test)")
        return [("broken", broken, False), ("broken lowering", lambda: broken, True)] + real(self)
    monkeypatch.setattr(Engine, "_variant_warmups", with_a_failure)
    caplog.set_level(logging.WARNING, logger="serve.engine")
    eng = Engine(ckpt, dtype="float32", context_length=128, max_running_requests=2, chunked_prefill_size=32,
                 progress=False)
    try:
        assert eng.variants_warm.wait(120) and eng.error is None
        assert any("could not compile the broken step variant" in r.getMessage() for r in caplog.records)
        assert any("could not compile the broken lowering forward on the idle-compile thread" in r.getMessage()
                   for r in caplog.records)
        out = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
        assert len(out.token_ids) == 4
    finally:
        eng.shutdown()


def test_min_tokens_holds_off_stop_ids_and_stop_strings(engine):
    """SamplingParams.min_tokens (vLLM's): a stop id the greedy text reaches at token i ends it
    there without min_tokens; with min_tokens = i + 3 the first i tokens are the same, that id is
    masked out of the first i + 3 (the step runs with its logits mask) and at least i + 3 come.
    A stop string found in the first tokens' text is not looked for there."""
    prompt = [11, 12, 13]
    free = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
    i = next(j for j in range(1, len(free)) if free[j] not in free[:j])
    sp = dict(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[free[i]])
    stopped = engine.generate([prompt], SamplingParams(**sp))[0]
    assert stopped.token_ids == free[:i + 1] and stopped.finish_reason == "stop"
    held = engine.generate([prompt], SamplingParams(**sp, min_tokens=i + 3))[0]
    assert held.token_ids[:i] == free[:i] and free[i] not in held.token_ids[:i + 3]
    assert len(held.token_ids) >= i + 3
    # stop strings: the text of the first tokens, which ends generation at once without min_tokens
    k = next(j for j in range(1, len(free)) if engine.tokenizer.decode(free[:j]).strip())
    stop = engine.tokenizer.decode(free[:k]).strip()
    early = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert len(early.token_ids) <= k and early.finish_reason == "stop"
    late = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop],
                                                    min_tokens=k + 2))[0]
    assert late.token_ids[:k + 2] == free[:k + 2] and len(late.token_ids) >= k + 2
    with pytest.raises(ValueError, match="min_tokens must be in"):
        SamplingParams(max_tokens=4, min_tokens=5).validate()


def test_small_decode_batches_give_the_full_batchs_tokens(ckpt, engine):
    """decode_batch_sizes [1, 2] on 4 slots: one request decodes at batch 1, two at batch 2
    (their slots handed to the step), three at the full 4; greedy tokens equal the one-shape
    engine's (the module's engine: 4 slots, one size), and the padding rows (other slots, at
    position S) leave the running requests' tokens alone."""
    assert engine.decode_batch_sizes == [4]
    small = Engine(ckpt, dtype="float32", context_length=128, max_running_requests=4, chunked_prefill_size=32,
                   decode_batch_sizes=[1, 2], progress=False)
    try:
        assert small.decode_batch_sizes == [1, 2, 4]
        rng = np.random.default_rng(7)
        prompts = [rng.integers(0, 500, size=n).tolist() for n in (45, 20, 33)]
        sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        for k, size in ((1, 1), (2, 2), (3, 4)):
            before = dict(small.decode_batches)
            got = [o.token_ids for o in small.generate(prompts[:k], sp)]
            want = [o.token_ids for o in engine.generate(prompts[:k], sp)]
            assert got == want
            ran = {b: n - before.get(b, 0) for b, n in small.decode_batches.items() if n > before.get(b, 0)}
            assert max(ran) == size, ran          # the largest batch the k requests needed
        # /metrics counts the steps by batch size, read from the engine when scraped
        from prometheus_client import generate_latest

        from serve.metrics import Metrics
        text = generate_latest(Metrics(small, "tiny").registry).decode()
        for size, steps in small.decode_batches.items():
            assert f'qwen3_jax_decode_steps_total{{batch_size="{size}"}} {float(steps)}' in text
    finally:
        small.shutdown()


def _split_vocab(mesh, shape):
    """(ShardingContext, NamedSharding of logits [B, V] split over the vocab axes as the engine keeps them)."""
    from qwen3_jax.api import build_context
    from qwen3_jax.config import load_preset

    ctx = build_context(load_preset("Qwen3-30B-A3B"), mesh, None)[1]
    return ctx, ctx.sharding((None, "vocab"), shape)


@pytest.mark.parametrize("mesh", ["tp=2", "tp=4", "tp=2,ep=4"])
def test_top_k_over_a_split_vocabulary_equals_top_k_of_the_whole_row(mesh, monkeypatch):
    """sampling.top_k_over_vocab: each device's best 64, then the best 64 of those gathered: the
    values and ids of lax.top_k on the whole row, bit for bit, with ties across shards and within
    one (70 equal logits, more than the 64 taken) going to the lower ids as lax.top_k's do.
    Each device's part is pruned by blocks (sampling.top_k_rows) as a 152k vocabulary's is."""
    from serve import sampling
    from serve.sampling import top_k_over_vocab

    monkeypatch.setattr(sampling, "TOP_K_BLOCK", 4)   # tp=2: 512 columns a device in 128 blocks
    x = np.random.default_rng(4).standard_normal((3, 1024)).astype(np.float32)
    x[0, [5, 700, 900, 1023]] = 9.0
    x[1, 10:80] = 3.0
    x[2, 250:260] = x[2, 770:780] = 4.0
    ctx, split = _split_vocab(mesh, x.shape)
    got = jax.jit(lambda a: top_k_over_vocab(a, 64, ctx))(jax.device_put(x, split))
    want = jax.lax.top_k(jnp.asarray(x), 64)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_sampling_a_split_vocabulary_moves_candidates_not_rows():
    """On tp=2 the top-64 sampler's compiled step gathers [B, 64 x 2] candidates; XLA's own
    partitioning of top_k gathered the whole [B, 151936] float32 row (seen in this compile before
    top_k_over_vocab). Greedy moves only the argmax's [B, 2]."""
    import re

    b, v = 8, 151936
    ctx, split = _split_vocab("tp=2", (b, v))
    rows = [jax.ShapeDtypeStruct((b,), dt) for dt in (jnp.float32, jnp.float32, jnp.int32, jnp.int32, jnp.int32)]
    for mode in ("greedy", "top64"):
        text = jax.jit(lambda lg, *r: sample(lg, *r, mode, ctx)).lower(
            jax.ShapeDtypeStruct((b, v), jnp.float32, sharding=split), *rows).compile().as_text()
        moved = [ln for ln in text.splitlines() if re.search(r"= \S+ all-(gather|reduce|to-all)(-start)?\(", ln)]
        assert moved and not any(str(v) in ln or str(v // 2) in ln for ln in moved), (mode, moved)


@pytest.mark.parametrize("mesh", ["tp=2", "tp=2,ep=4"])
def test_token_logprobs_over_a_split_vocabulary_equal_the_whole_rows(mesh):
    """sampling.token_logprobs on logits split over the vocab axes (as the engine keeps them) gives
    the whole row's log_softmax at the chosen ids and lax.top_k's top-20 ids and values."""
    from serve.sampling import LOGPROBS_MAX, token_logprobs

    x = 4 * np.random.default_rng(5).standard_normal((3, 1024)).astype(np.float32)
    ids = np.array([7, 1000, 513], np.int32)
    ctx, split = _split_vocab(mesh, x.shape)
    chosen, top_ids, top = jax.jit(lambda a, i: token_logprobs(a, i, ctx))(jax.device_put(x, split), ids)
    ref = jax.nn.log_softmax(jnp.asarray(x), axis=-1)
    want, want_ids = jax.lax.top_k(ref, LOGPROBS_MAX)
    np.testing.assert_allclose(np.asarray(chosen), np.asarray(ref)[np.arange(3), ids], rtol=0, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(top_ids), np.asarray(want_ids))
    np.testing.assert_allclose(np.asarray(top), np.asarray(want), rtol=0, atol=2e-6)


def test_small_decode_batches_on_a_tensor_parallel_mesh(ckpt):
    """tp=2 (one data-parallel group): sizes [1, 2] give the one-shape engine's greedy tokens,
    the rows' slots handed to the sharded step."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 500, size=n).tolist() for n in (30, 12)]
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs, used = {}, {}
    for sizes in ([4], [1, 2]):
        e = Engine(ckpt, mesh="tp=2", dtype="float32", context_length=128, max_running_requests=4,
                   chunked_prefill_size=32, decode_batch_sizes=sizes, progress=False)
        try:
            outs[len(sizes)] = [[o.token_ids for o in e.generate(prompts[:k], sp)] for k in (1, 2)]
            used[len(sizes)] = set(e.decode_batches)
        finally:
            e.shutdown()
    assert outs[1] == outs[2]
    assert used == {1: {4}, 2: {1, 2}}


def test_overlap_schedule_gives_the_same_tokens(ckpt, engine):
    """The module's engine overlaps (step t+1 launched before step t's ids are read back); one
    with overlap=False must give the same outputs for a mixed load: 6 sampled and greedy requests
    on 4 slots (slots reused), prompts 5-45 tokens (chunked), top-k 20 and the full vocabulary
    (both samplers), one ended early by a stop id and one by a stop string. And
    overlap shows in the step count: a request stopped by a stop id had one step launched past
    its end (its id dropped), which the serial engine does not run."""
    assert engine.overlap
    serial = Engine(ckpt, dtype="float32", context_length=128, max_running_requests=4, chunked_prefill_size=32,
                    overlap=False, progress=False)
    try:
        rng = np.random.default_rng(11)
        prompts = [rng.integers(0, 500, size=n).tolist() for n in (45, 5, 33, 20, 9, 40)]
        greedy = engine.generate(prompts[0], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
        stop_at = greedy.token_ids[6]
        k = greedy.token_ids.index(stop_at)   # the stop id is the (k+1)-th token
        # a stop string: the text of greedy tokens 3..4, which the request must end on
        stop_text = engine.tokenizer.decode(greedy.token_ids[3:5])
        params = [SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop_at])] + [
            SamplingParams(max_tokens=m, temperature=0.8, top_p=0.9, top_k=k_, seed=s, ignore_eos=True)
            for s, m, k_ in zip(range(5), (14, 3, 1, 9, 12), (-1, 20, -1, 20, -1))]
        params.append(SamplingParams(max_tokens=16, temperature=0, stop=[stop_text], ignore_eos=True))
        prompts.append(prompts[0])
        got, want = engine.generate(prompts, params), serial.generate(prompts, params)
        assert [(o.token_ids, o.text, o.finish_reason) for o in got] == [
            (o.token_ids, o.text, o.finish_reason) for o in want]
        assert got[0].token_ids == greedy.token_ids[:k + 1] and got[0].finish_reason == "stop"
        assert [len(o.token_ids) for o in got[1:6]] == [14, 3, 1, 9, 12]
        assert got[6].finish_reason == "stop" and stop_text not in got[6].text and len(got[6].token_ids) < 16
        # One request stopped at its (k+1)-th token: the serial engine ran k decode steps (the first
        # token comes from the prefill), the overlapping one k + 1.
        steps = []
        for e in (serial, engine):
            before = e.steps
            assert e.generate(prompts[0], params[0])[0].token_ids == got[0].token_ids
            steps.append(e.steps - before)
        assert steps == [k, k + 1]
    finally:
        serial.shutdown()


def test_engine_steps_hold_no_device_conditional(ckpt, engine, monkeypatch, cuda_lowering):
    """XLA:GPU runs a conditional by copying its branch index to the host and blocking until the
    device gets there, so a step holding one would not return from its launch until its forward
    had run, and no next step could queue behind it (what kept run 75's overlap from working).
    The engine's forwards (plain XLA, and bf16 on the kernels as a GPU compiles them: lowered
    for CUDA here) and samplers must lower without one."""
    import functools

    from qwen3_jax import api, kernels
    from serve.engine import _decode_forward
    from serve.sampling import SAMPLING_MODES

    b, v, last = engine.num_slots, engine.model.config.vocab_size, engine._carry[1]
    rows = np.arange(b, dtype=np.int32)

    def forward(m, w, platforms=None, *slots):
        n = len(slots[0]) if slots else b
        fn = jax.jit(functools.partial(_decode_forward, m.graphdef, w))
        args = (m.state, m.init_cache(b, engine.context_length), last, np.zeros(n, np.int32), *slots)
        return fn.trace(*args).lower(lowering_platforms=platforms).as_text()
    texts = [forward(engine.model, w) for w in engine.windows]
    with kernels.kernels_enabled(True):
        m16 = api.load(ckpt, dtype="bfloat16", progress=False)
        gpu = [forward(m16, engine.windows[0], ("cuda",), *slots) for slots in ((), (np.array([2, 0], np.int32),))]
    assert all("xla.gpu.triton" in t for t in gpu)
    texts += gpu + [engine._samplers[s].lower(last, jnp.zeros((b, v)), rows, np.ones(b, bool),
                                              *engine._sampling_inputs(rows)).as_text() for s in SAMPLING_MODES]
    assert not [t for t in texts if "stablehlo.case" in t or "stablehlo.if" in t]
    # a device switch (what the sampler ran before) does lower to one: the check can fail
    switch = jax.jit(lambda i, x: jax.lax.switch(i, [lambda: x, lambda: -x]))
    assert "stablehlo.case" in switch.lower(jnp.int32(0), jnp.zeros(b)).as_text()


def test_kv_bytes_formula_matches_the_cache(engine):
    m, cs = engine.model, engine.cache_size
    per = kv_bytes_per_token(m.config, m.mesh_spec, m.dtype)
    actual = sum(a.nbytes for a in jax.tree.leaves(engine.cache))
    assert actual == per * engine.num_slots * engine.context_length == cs.cache_bytes_per_device
    assert size_cache(m.config, m.mesh_spec, m.dtype, [], context_length=128, max_running_requests=8,
                      mem_fraction_static=0.9, kv_cache_tokens=128 * 5 + 7).num_slots == 5
    with pytest.raises(CapacityError, match="context length 128"):
        size_cache(m.config, m.mesh_spec, m.dtype, [], context_length=128, max_running_requests=8,
                   mem_fraction_static=0.9, kv_cache_tokens=100)


def test_engine_greedy_equals_model_greedy(engine):
    """Batched engine generation (chunked prefill: 45 = 32 + 13 tokens) = Model.generate_greedy."""
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, 500, size=(2, 45))
    ref = engine.model.generate_greedy(prompts, 20)
    outs = engine.generate([p.tolist() for p in prompts], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == ref.tolist()
    assert [o.text for o in outs] == [engine.tokenizer.decode(r) for r in ref.tolist()]
    assert all(o.finish_reason == "length" and o.prompt_tokens == 45 for o in outs)
    # A stop id ends generation at that token (counted, not shown).
    stop_at = int(ref[0, 3])
    first = ref[0].tolist().index(stop_at)
    out = engine.generate(prompts[0].tolist(), SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_at]))[0]
    assert (out.finish_reason, out.stop_reason, out.token_ids) == ("stop", stop_at, ref[0, :first + 1].tolist())


def test_sampled_requests_reproducible_and_batch_invariant(engine):
    sp = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=s, ignore_eos=True) for s in (5, 5, 6)]
    together = engine.generate(["Tell me a story"] * 3, sp)
    alone = engine.generate("Tell me a story", sp[0])[0]
    assert together[0].token_ids == together[1].token_ids == alone.token_ids != together[2].token_ids


def test_stream_cancel_and_queue_full(engine):
    deltas = list(engine.stream("Hello", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
    assert "".join(d.text for d in deltas) == engine.generate("Hello", SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True))[0].text
    assert deltas[-1].finished and sum(len(d.token_ids) for d in deltas) == 8

    long = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    reqs = [engine.submit("Hello", long) for _ in range(4)]
    deadline = time.monotonic() + 10
    while engine.num_running < 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    reqs += [engine.submit("Hello", long) for _ in range(2)]  # all 4 slots busy: these 2 fill the queue
    with pytest.raises(QueueFull, match="max_queued_requests=2"):
        engine.submit("Hello", long)
    for r in reqs:
        engine.cancel(r)
    deadline = time.monotonic() + 10
    while (engine.num_running or engine.num_queued) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 0 and engine.num_queued == 0
    assert all(r.finish_reason == "abort" for r in reqs)
    # Leaving a stream early cancels its request.
    gen = engine.stream("Hello", long)
    next(gen)
    gen.close()
    deadline = time.monotonic() + 10
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 0


def test_logprobs_are_the_models_log_softmax(engine):
    """Each generated token's logprob and top-N alternatives equal log_softmax of the model's own
    logits (Model.logits over prompt + output, no cache) at that position, for a greedy row and a
    sampled row (the raw distribution, before temperature and top-k), in one batch with a row that
    asked for none (its output carries None and its tokens are unchanged)."""
    rng = np.random.default_rng(21)
    prompts = [rng.integers(0, 500, size=n).tolist() for n in (40, 7, 12)]   # 40: two prefill chunks
    asks = [SamplingParams(max_tokens=8, temperature=0, logprobs=5, ignore_eos=True),
            SamplingParams(max_tokens=8, temperature=0.8, top_k=20, seed=3, logprobs=0, ignore_eos=True),
            SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)]
    outs = engine.generate(prompts, asks)
    assert outs[2].logprobs is None
    assert outs[2].token_ids == engine.generate(prompts[2], asks[2])[0].token_ids
    for prompt, out, sp in zip(prompts, outs[:2], asks):
        assert [e.token_id for e in out.logprobs] == out.token_ids
        ref = np.asarray(jax.nn.log_softmax(engine.model.logits(np.array([prompt + out.token_ids]))[0], axis=-1))
        for j, e in enumerate(out.logprobs):
            row = ref[len(prompt) - 1 + j]
            assert abs(e.logprob - row[e.token_id]) < 1e-4
            assert len(e.top) == sp.logprobs
            best = np.argsort(-row, kind="stable")[:sp.logprobs]
            assert [t for t, _ in e.top] == best.tolist()
            np.testing.assert_allclose([x for _, x in e.top], row[best], rtol=0, atol=1e-4)
        if sp.temperature == 0:   # greedy: the chosen token is the best one
            assert all(e.top[0] == (e.token_id, e.logprob) for e in out.logprobs)
    with pytest.raises(ValueError, match=r"logprobs must be in \[0, 20\]"):
        engine.submit([1, 2], SamplingParams(logprobs=21))


def test_prompt_logprobs_are_the_models_log_softmax(engine):
    """Each prompt token after the first comes with log_softmax of the model's own logits (no
    cache) at the position before it and the N best there, across the engine's prefill chunks (70
    tokens: three chunks of 32, the last padded), next to a request that asked for none. A prompt
    the prefix cache holds is scored whole again (nothing taken from the cache), and the
    generated tokens are those of a request without prompt logprobs."""
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 500, size=n).tolist() for n in (70, 12)]
    plain = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    asks = [dataclasses.replace(plain, prompt_logprobs=3, logprobs=1), plain]
    outs = engine.generate(prompts, asks)
    assert outs[1].prompt_logprobs is None
    ref = np.asarray(jax.nn.log_softmax(engine.model.logits(np.array([prompts[0]]))[0], axis=-1))
    got = outs[0].prompt_logprobs
    assert len(got) == 70 and got[0] is None
    for j, e in enumerate(got[1:], start=1):
        row = ref[j - 1]
        assert e.token_id == prompts[0][j]
        assert abs(e.logprob - row[e.token_id]) < 1e-4, j
        best = np.argsort(-row, kind="stable")[:3]
        assert [t for t, _ in e.top] == best.tolist(), j
        np.testing.assert_allclose([x for _, x in e.top], row[best], rtol=0, atol=1e-4)
    assert outs[0].token_ids == engine.generate(prompts[0], plain)[0].token_ids
    again = engine.generate(prompts[0], asks[0])[0]   # its slot's cache holds this prompt now
    assert again.cached_tokens == 0 and len(again.prompt_logprobs) == 70
    assert [(e.token_id, e.logprob) for e in again.prompt_logprobs[1:]] == [(e.token_id, e.logprob) for e in got[1:]]
    with pytest.raises(ValueError, match=r"prompt_logprobs must be in \[0, 20\]"):
        engine.submit([1, 2], SamplingParams(prompt_logprobs=21))


def test_presence_and_frequency_penalties_match_a_host_reference(engine):
    """Penalized greedy rows equal the host reference; a row without penalties in the same steps
    keeps its plain greedy tokens; a penalized request that reuses a slot starts from zero counts
    (the earlier request's counts are gone). The penalties really act: the tokens differ from
    plain greedy once the model repeats itself."""
    rng = np.random.default_rng(0)   # prompt 0's greedy output repeats itself from token 15
    prompts = [rng.integers(0, 500, size=n).tolist() for n in (40, 7, 12)]
    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    asks = [dataclasses.replace(plain, presence_penalty=1.5, frequency_penalty=0.5), plain,
            dataclasses.replace(plain, frequency_penalty=2.0)]
    outs = engine.generate(prompts, asks)
    want = [penalized_greedy(engine.model, p, 24, sp.presence_penalty, sp.frequency_penalty)
            for p, sp in zip(prompts, asks)]
    assert [o.token_ids for o in outs] == want
    assert outs[0].token_ids != engine.generate(prompts[0], plain)[0].token_ids
    again = engine.generate(prompts[2], asks[2])[0]   # a freed slot, counts left by a penalized request
    assert again.token_ids == want[2]
    with pytest.raises(ValueError, match=r"presence_penalty must be in \[-2, 2\]"):
        engine.submit([1, 2], SamplingParams(presence_penalty=2.5))


def test_repetition_penalty_matches_a_host_reference(engine):
    """repetition_penalty (transformers' rule, on the prompt's tokens and the generated ones) on
    its own and with a frequency penalty, next to a plain greedy row, equals the host reference
    token for token. The prompt's part matters here: the same penalty on the generated tokens
    alone gives other tokens. A slot reused by a request without it forgets the flagged prompt."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 500, size=n).tolist() for n in (40, 7, 12)]
    plain = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    asks = [dataclasses.replace(plain, repetition_penalty=1.8), plain,
            dataclasses.replace(plain, repetition_penalty=0.7, frequency_penalty=0.5)]
    outs = engine.generate(prompts, asks)
    want = [penalized_greedy(engine.model, p, 16, sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty or 1)
            for p, sp in zip(prompts, asks)]
    assert [o.token_ids for o in outs] == want
    assert any(w != penalized_greedy(engine.model, p, 16, sp.presence_penalty, sp.frequency_penalty,
                                     sp.repetition_penalty, on_prompt=False)
               for w, p, sp in zip(want, prompts, asks) if sp.repetition_penalty not in (None, 1))
    for p in prompts:   # the slots the penalized requests left, reused without a penalty
        assert engine.generate(p, plain)[0].token_ids == penalized_greedy(engine.model, p, 16, 0, 0)
    with pytest.raises(ValueError, match=r"repetition_penalty must be in \(0, 2\]"):
        engine.submit([1, 2], SamplingParams(repetition_penalty=0))


def test_generation_config_repetition_penalty_is_the_default(ckpt, tmp_path):
    """A checkpoint whose generation_config.json sets repetition_penalty (as vLLM reads it): a
    request that leaves it unset gets it (the host reference's tokens with it), one that sets
    1.0 turns it off."""
    import json
    import shutil

    ckpt2 = shutil.copytree(ckpt, tmp_path / "ckpt")
    gen_path = ckpt2 / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen_path.write_text(json.dumps({**gen, "repetition_penalty": 1.6}))
    eng = Engine(str(ckpt2), dtype="float32", context_length=128, max_running_requests=2, chunked_prefill_size=32,
                 progress=False)
    try:
        assert eng.default_sampling["repetition_penalty"] == 1.6
        prompt = np.random.default_rng(3).integers(0, 500, size=30).tolist()
        unset = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        got = eng.generate(prompt, unset)[0].token_ids
        assert got == penalized_greedy(eng.model, prompt, 16, 0, 0, 1.6)
        assert got != penalized_greedy(eng.model, prompt, 16, 0, 0)   # the default acted
        off = eng.generate(prompt, dataclasses.replace(unset, repetition_penalty=1.0))[0].token_ids
        assert off == penalized_greedy(eng.model, prompt, 16, 0, 0)
    finally:
        eng.shutdown()


def test_copy_slot_copies_within_a_data_parallel_group_only():
    """_copy_slot on a mesh whose slots are split over 2 data groups (and kv heads over 4 tensor
    devices): a copy between two slots of one group changes only the destination row; one
    across groups (which _place never asks) changes nothing rather than gathering the slots."""
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    from serve.engine import _copy_slot, slot_groups

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    spec = P(None, "data", None, "tensor", None)
    host = np.arange(2 * 4 * 3 * 4 * 2, dtype=np.float32).reshape(2, 4, 3, 4, 2)   # [L, slots, S, K, Q]
    cache = {"k": jax.device_put(host, NamedSharding(mesh, spec)), "v": jax.device_put(-host, NamedSharding(mesh, spec))}
    assert slot_groups(cache) == 2
    copy = jax.jit(lambda c, src, dst: _copy_slot(c, src, dst, mesh=mesh, specs={"k": spec, "v": spec}))
    for src, dst, changed in [(2, 3, True), (1, 0, True), (1, 2, False)]:
        _, out = copy(cache, jnp.int32(src), jnp.int32(dst))
        want = host.copy()
        if changed:
            want[:, dst] = host[:, src]
        np.testing.assert_array_equal(np.asarray(out["k"]), want)
        np.testing.assert_array_equal(np.asarray(out["v"]), -want)
        assert out["k"].sharding.spec == spec


@pytest.mark.parametrize("mesh", [None, "tp=2", "tp=2,ep=4"])
def test_a_busy_slots_prompt_is_copied_to_a_request_sharing_its_start(ckpt, engine, mesh):
    """A request whose prompt starts like a running request's (a shared system prompt) gets that
    slot's row copied into its own and prefills only the rest, while the first still decodes
    (one device; tp=2, where the rows are split over kv heads; tp=2,ep=4, where the slots are
    split over 2 data-parallel groups and the copy stays in the first's). The outputs equal an
    engine without prefix caching."""
    kw = dict(dtype="float32", context_length=128, max_running_requests=4, chunked_prefill_size=32, progress=False)
    off = Engine(ckpt, prefix_caching=False, **kw)
    on = engine if mesh is None else Engine(ckpt, mesh=mesh, **kw)
    try:
        rng = np.random.default_rng(31)
        system = rng.integers(0, 500, size=70).tolist()        # three chunks
        first_sp = SamplingParams(max_tokens=55, temperature=0, ignore_eos=True)
        sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        second = system + rng.integers(0, 500, size=9).tolist()
        for attempt in range(3):   # CI's 2 cores: `first` may finish before `second` is placed; try again
            # fill the free slots with other prompts so no free slot holds `system`
            on.generate([rng.integers(0, 500, size=20).tolist() for _ in range(4)], sp)
            first = on.submit(system + [7], first_sp)
            deadline = time.monotonic() + 10
            while first.prefilled < len(system) + 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            copies, before = on.prefix_copies, on.prefill_tokens
            out = on.generate(second, sp)[0]
            if on.prefix_copies > copies or not first.finished:
                break
        assert out.cached_tokens == len(system) and on.prefix_copies == copies + 1
        assert on.prefill_tokens - before == len(second) - len(system)
        assert out.token_ids == off.generate(second, sp)[0].token_ids
        while not first.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.output_ids == off.generate(system + [7], first_sp)[0].token_ids
    finally:
        off.shutdown()
        if on is not engine:
            on.shutdown()


def test_requests_sharing_a_prompt_start_wait_for_it_and_copy_it(ckpt):
    """Three requests sent together, two of them with one 70-token prompt (n choices) and one with
    its first 66 tokens and its own ending: the first prefills the shared start once; the others
    are held back until its chunks are launched, then copy its row and prefill only their own
    rest. A fourth sharing fewer than Engine.SHARE_MIN_TOKENS copies nothing. The outputs equal
    an engine without prefix caching."""
    kw = dict(dtype="float32", context_length=128, max_running_requests=4, chunked_prefill_size=32, progress=False)
    with Engine(ckpt, **kw) as on, Engine(ckpt, prefix_caching=False, **kw) as off:
        rng = np.random.default_rng(44)
        prompt = rng.integers(0, 500, size=70).tolist()
        prompts = [prompt, prompt, prompt[:66] + rng.integers(0, 500, size=5).tolist(),
                   prompt[:40] + rng.integers(0, 500, size=30).tolist()]
        sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        outs = on.generate(prompts, sp)
        assert [o.token_ids for o in outs] == [o.token_ids for o in off.generate(prompts, sp)]
        assert [o.cached_tokens for o in outs] == [0, 69, 66, 0] and on.prefix_copies == 2
        assert on.prefill_tokens == 70 + 1 + 5 + 70


def test_with_two_data_parallel_groups_each_group_prefills_a_shared_prompt_once(ckpt):
    """ep=2 splits 4 slots over 2 data-parallel groups, and a row is copied only within a group.
    Four requests sharing a 128-token start sent together: each group prefills it once and its
    second request copies it, the fourth from the third's slot although the first's holds as
    much (its group has no free slot). The outputs equal an engine without prefix caching."""
    kw = dict(dtype="float32", context_length=256, max_running_requests=4, chunked_prefill_size=64, progress=False)
    with Engine(ckpt, mesh="ep=2", **kw) as on, Engine(ckpt, prefix_caching=False, **kw) as off:
        rng = np.random.default_rng(8)
        system = rng.integers(0, 500, size=128).tolist()
        prompts = [system + rng.integers(0, 500, size=16).tolist() for _ in range(4)]
        sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        outs = on.generate(prompts, sp)
        assert sorted(o.cached_tokens for o in outs) == [0, 0, 128, 128] and on.prefix_copies == 2
        assert [o.token_ids for o in outs] == [o.token_ids for o in off.generate(prompts, sp)]


def test_prefix_caching_reuses_a_slots_tokens_and_changes_no_output(ckpt, engine):
    """A follow-up turn (the last prompt + its reply + new text) prefills only what its slot's
    cache lacks: cached_tokens = prompt + reply - 1 (the reply's last token was never fed back).
    A prompt that leaves the cached one midway reuses exactly the common start; a cancelled
    request leaves the prompt chunks it launched. Every output equals an engine without prefix
    caching, where nothing is reused."""
    off = Engine(ckpt, dtype="float32", context_length=128, max_running_requests=4, chunked_prefill_size=32,
                 prefix_caching=False, progress=False)
    try:
        rng = np.random.default_rng(12)
        sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        base = rng.integers(0, 500, size=45).tolist()          # two prefill chunks
        first = engine.generate(base, sp)[0]
        turn = base + first.token_ids + rng.integers(0, 500, size=8).tolist()
        fork = base[:30] + rng.integers(0, 500, size=20).tolist()
        outs = {}
        prefilled = {}
        for name, prompt in (("turn", turn), ("fork", fork)):
            before = engine.prefill_tokens
            outs[name] = engine.generate(prompt, sp)[0]
            prefilled[name] = engine.prefill_tokens - before
            assert outs[name].token_ids == off.generate(prompt, sp)[0].token_ids, name
        assert first.cached_tokens == 0
        assert outs["turn"].cached_tokens == len(base) + len(first.token_ids) - 1
        # `fork` shares 30 tokens with `base`, whose slot now holds `turn`: the same 30 first tokens
        assert outs["fork"].cached_tokens == 30
        # and only the rest was prefilled
        assert prefilled == {"turn": len(turn) - outs["turn"].cached_tokens, "fork": len(fork) - 30}

        # cancelled (during its prefill, if the cancel is quick enough): the chunks launched stay
        # in the slot; a repeat reuses them
        long = rng.integers(0, 500, size=100).tolist()
        req = engine.submit(long, sp)
        deadline = time.monotonic() + 10
        while req.prefilled < 64 and time.monotonic() < deadline:
            time.sleep(0.001)
        engine.cancel(req)
        while not req.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        again = engine.generate(long, sp)[0]
        # the chunks launched before the cancel (all of them, if the prefill outran it)
        assert again.cached_tokens == min(req.prefilled, len(long) - 1)
        assert again.token_ids == off.generate(long, sp)[0].token_ids
        assert all(o.cached_tokens == 0 for o in off.generate([base, turn], sp))
    finally:
        off.shutdown()


def test_length_errors_name_both_numbers(engine):
    with pytest.raises(ValueError, match=r"prompt \(3 tokens\) plus max_tokens \(126\) is 129 tokens.*128"):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=126))
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())


def test_shutdown_aborts_waiting_requests(ckpt, engine):
    got = []
    done = threading.Event()

    def on_output(out):
        got.append(out)
        if out.finished:
            done.set()

    engine.submit("Hello", SamplingParams(max_tokens=120, temperature=0, ignore_eos=True), on_output)
    engine.shutdown(reason="test shutdown")
    assert done.wait(10)
    assert got[-1].finish_reason == "abort" and got[-1].error == "test shutdown"
    with pytest.raises(EngineClosed):
        engine.submit("Hello")


def test_a_prompts_first_chunk_runs_the_fresh_prefill(ckpt, monkeypatch):
    """Kernels forced on (interpret mode), FRESH_MIN_TOKENS 32, chunks of 32: a 90-token prompt's
    first chunk runs the prefill form attending over its own K/V (Qwen3Moe's `fresh`), the next
    two the chunk kernel; the warm-up compiled that form for the 32-token bucket only. The first
    token and its logprob equal an engine with FRESH_MIN_TOKENS 0's, which never runs it."""
    from qwen3_jax import kernels

    calls = []
    real = Engine._prefill_call

    def spy(self, tokens, positions, *a, fresh=False, **kw):
        if positions[0, 0] < self.context_length:   # a prompt's chunk, not a warm-up's idle step
            calls.append(fresh)
        return real(self, tokens, positions, *a, fresh=fresh, **kw)
    monkeypatch.setattr(Engine, "_prefill_call", spy)
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 200, 90)]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=1)
    outs = {}
    for least in (32, 0):
        monkeypatch.setattr(Engine, "FRESH_MIN_TOKENS", least)
        with kernels.kernels_enabled(True):
            eng = Engine(ckpt, dtype="bfloat16", context_length=128, max_running_requests=2,
                         chunked_prefill_size=32, decode_batch_sizes=[2], progress=False)
            try:
                assert eng._prefill_forms() == [(t, False) for t in eng.buckets] + ([(32, True)] if least else [])
                calls.clear()
                outs[least] = eng.generate(prompt, params)[0]
            finally:
                eng.shutdown()
        assert calls == ([True, False, False] if least else [False] * 3)
    assert outs[32].token_ids == outs[0].token_ids
    assert abs(outs[32].logprobs[0].logprob - outs[0].logprobs[0].logprob) < 2e-2
