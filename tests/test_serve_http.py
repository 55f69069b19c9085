"""The real server (`python -m serve` as a child process) driven with the official `openai` client.

Three servers start in parallel at the top of the module, all float32 so comparisons are exact:
  main   built-in model on one device, API key required, 4 slots, 16 queue places, the Qwen3
         reasoning and tool-call parsers on
  mesh   the same model under --mesh tp=2,ep=4 (4 simulated CPU devices: dp=2 x tp=2, experts over 4)
  fp8    the built-in model quantized to Qwen's block-FP8 layout, under --mesh tp=2,ep=4
Prompts longer than --chunked-prefill-size 32 are prefilled in chunks, so that path runs too.
"""

from __future__ import annotations

import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jax
import numpy as np
import pytest

openai = pytest.importorskip("openai")

from reference import penalized_greedy  # noqa: E402
from serve.builtin import CORPUS, builtin_checkpoint  # noqa: E402
from serve.process import ServerProcess  # noqa: E402
from serve.tokenizer import Tokenizer  # noqa: E402

KEY = "test-key"
NAME = "qwen3-jax-builtin"
CTX = 1024
COMMON = ["--dtype", "float32", "--context-length", str(CTX), "--chunked-prefill-size", "32",
          "--max-running-requests", "4", "--max-queued-requests", "16"]
WORDS = CORPUS.split()
# 16 prompts of different lengths: 1 to ~60 tokens (the longest take two prefill chunks).
PROMPTS = [" ".join(WORDS[i:i + 1 + 3 * i]) for i in range(16)]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from qwen3_jax.quantize import quantize_checkpoint

    xdg = tmp_path_factory.mktemp("xdg")
    ckpt = builtin_checkpoint(str(xdg / "qwen3-jax"))  # where the children look, given XDG_CACHE_HOME
    fp8_dir = str(tmp_path_factory.mktemp("fp8") / "builtin-fp8")
    quantize_checkpoint(ckpt, fp8_dir)
    # JAX_DISABLE_MOST_OPTIMIZATIONS=0: these servers run thousands of decode steps, which cost
    # more as -O0 code than their few compiles save (conftest.py)
    env = {"XDG_CACHE_HOME": str(xdg), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"}
    procs = {
        "main": ServerProcess(COMMON + ["--api-key", KEY, "--reasoning-parser", "qwen3", "--tool-call-parser",
                                        "hermes"], env),
        "mesh": ServerProcess(COMMON + ["--mesh", "tp=2,ep=4"], env),
        "fp8": ServerProcess(COMMON + ["--mesh", "tp=2,ep=4", "--model", fp8_dir, "--served-model-name", "fp8"], env),
    }
    for p in procs.values():
        p.start()
    procs["ckpt"], procs["fp8_dir"] = ckpt, fp8_dir
    yield procs
    for name in ("main", "mesh", "fp8"):
        procs[name].stop()


def client(srv: ServerProcess, key: str = KEY) -> "openai.OpenAI":
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def main(servers):
    return servers["main"].wait_ready()


@pytest.fixture(scope="module")
def tok(servers):
    return Tokenizer(servers["ckpt"])


def greedy(c, prompt, n=24, model=NAME, **extra):
    r = c.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                             extra_body={"ignore_eos": True, **extra})
    return r.choices[0].text


@pytest.fixture(scope="module")
def alone(main):
    """Each prompt's greedy text with nothing else running (the reference for invariance tests)."""
    c = client(main)
    return [greedy(c, p) for p in PROMPTS]


def metric(srv: ServerProcess, name: str) -> float:
    """One sample of /metrics, e.g. 'num_requests_running' or 'request_finished_total{finish_reason="abort"}'."""
    text = httpx.get(srv.base_url + "/metrics").text
    m = re.search(rf"^qwen3_jax_{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_until(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def wait_metric(srv, name, value, timeout=10.0) -> float:
    wait_until(lambda: metric(srv, name) == value, timeout)
    return metric(srv, name)


# -- basics ---------------------------------------------------------------------------------
def test_models_and_health(main):
    assert httpx.get(main.base_url + "/health").json() == {"status": "ok"}
    models = client(main).models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].model_extra["max_model_len"] == CTX
    # the start-up lines say whether the Pallas kernels run (on CPU: no, and why)
    assert "kernels: off (no GPU, cpu; the plain-XLA path)" in main.output()


def test_completion_usage_and_streaming(main, tok):
    c = client(main)
    prompt = PROMPTS[5]
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    n_prompt = len(tok.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)

    hits = metric(main, "prefix_cache_hits_total")
    chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    u, first = chunks[-1].usage, r.usage
    assert chunks[-1].choices == [] and (u.prompt_tokens, u.completion_tokens) == (first.prompt_tokens, 12)
    # prefix caching: the streamed repeat found all its prompt but the last token in the slot the
    # first request left
    assert u.prompt_tokens_details.cached_tokens == n_prompt - 1
    assert wait_metric(main, "prefix_cache_hits_total", hits + n_prompt - 1) == hits + n_prompt - 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"

    # The raw SSE stream ends with the literal `data: [DONE]`.
    with httpx.stream("POST", main.base_url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": NAME, "prompt": prompt, "max_tokens": 3, "stream": True}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_chat_template_usage_and_streaming(main, tok):
    c = client(main)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}]
    off = {"chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True}
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, extra_body=off)
    want = tok.encode(tok.apply_chat_template(msgs, enable_thinking=False), add_special_tokens=False)
    assert r.usage.prompt_tokens == len(want)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 10
    # enable_thinking=false pre-fills "<think>\n\n</think>\n\n": exactly that many more prompt tokens.
    r_think = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens - r_think.usage.prompt_tokens == len(tok.encode("<think>\n\n</think>\n\n"))

    chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=off))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == len(want) and chunks[-1].usage.completion_tokens == 10


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_reply_is_the_raw_completion_parsed(main, tok, thinking):
    """With --reasoning-parser qwen3 --tool-call-parser hermes, a chat reply (whole and streamed)
    is chat_parsers.parse_message of the raw text /v1/completions gives for the same rendered
    prompt (tools included); tool_choice "none" leaves the tools out of the prompt, and a choice
    (The built-in model's replies hold no tags, so the parsing itself is tested in
    test_chat_parsers.py, the reasoning path end to end there too; a forced tool_choice below.)"""
    from serve.chat_parsers import parse_message, prompt_opens_thinking

    c = client(main)
    msgs = [{"role": "user", "content": PROMPTS[9]}]
    prompt = tok.apply_chat_template(msgs, tools=TOOLS, enable_thinking=thinking)
    kw = dict(model=NAME, max_tokens=40, temperature=0)
    body = {"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": thinking}}
    raw = c.completions.create(prompt=tok.encode(prompt, add_special_tokens=False), extra_body={"ignore_eos": True},
                               **kw).choices[0].text
    want = parse_message(raw, "qwen3", "hermes", prompt_opens_thinking(prompt))
    r = c.chat.completions.create(messages=msgs, tools=TOOLS, extra_body=body, **kw)
    msg = r.choices[0].message
    assert msg.content == want["content"] and msg.model_extra.get("reasoning_content") == want["reasoning_content"]
    assert [t.function.name for t in msg.tool_calls or []] == [t["function"]["name"] for t in want.get("tool_calls", [])]
    assert r.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    chunks = [ch.choices[0].delta for ch in c.chat.completions.create(messages=msgs, tools=TOOLS, stream=True,
                                                                        extra_body=body, **kw) if ch.choices]
    assert "".join(d.content or "" for d in chunks) == (want["content"] or "")
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in chunks) == (want["reasoning_content"] or "")

    plain = c.chat.completions.create(messages=msgs, tools=TOOLS, tool_choice="none", extra_body=body, **kw)
    assert plain.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(msgs, enable_thinking=thinking),
                                                       add_special_tokens=False))


def test_forced_tool_choice_gives_calls_that_match_the_parameters(main):
    """tool_choice naming a function, and "required" with parallel_tool_calls false: the reply is
    one call in Qwen3's format (the random-weight model, constrained), parsed into tool_calls with
    arguments that follow the function's parameters schema; a name not among the tools, or a
    forced choice without tools, is a 400 naming the field."""
    c = client(main)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
                 "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}},
             {"type": "function", "function": {"name": "add", "parameters": {
                 "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                 "required": ["a", "b"]}}}]
    kw = dict(model=NAME, messages=[{"role": "user", "content": PROMPTS[4]}], tools=tools, max_tokens=120,
              temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    named = c.chat.completions.create(tool_choice={"type": "function", "function": {"name": "add"}}, **kw)
    call, = named.choices[0].message.tool_calls
    assert call.function.name == "add" and set(json.loads(call.function.arguments)) == {"a", "b"}
    assert named.choices[0].finish_reason == "tool_calls" and not named.choices[0].message.content
    required = c.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **kw)
    call, = required.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name in {"get_weather", "add"} and args and isinstance(args, dict)
    streamed = [ch.choices[0].delta for ch in c.chat.completions.create(
        tool_choice={"type": "function", "function": {"name": "add"}}, stream=True, **kw) if ch.choices]
    assert [t.function.name for d in streamed for t in d.tool_calls or [] if t.function.name] == ["add"]
    for choice, param in (({"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
                          ("sometimes", "tool_choice")):
        r = _post(main, "/v1/chat/completions", {**{k: v for k, v in kw.items() if k != "extra_body"},
                                                  "tool_choice": choice}, KEY)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = _post(main, "/v1/chat/completions", {"model": NAME, "messages": kw["messages"], "tool_choice": "required"}, KEY)
    assert r.status_code == 400 and "offers no 'tools'" in r.json()["error"]["message"]


def test_seed_reproducibility(main):
    c = client(main)

    def sample(seed, **kw):
        return c.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=16, temperature=1.0, seed=seed,
                                    extra_body={"ignore_eos": True, **kw}).choices[0].text

    a, b, other = sample(7), sample(7), sample(8)
    assert a == b and a != other
    # top_k=1 keeps only the best token: sampling collapses to greedy.
    assert sample(9, top_k=1) == greedy(c, PROMPTS[3], 16)


def test_batching_invariance(main, alone):
    """16 concurrent greedy requests of different lengths (4 slots, the rest queued) = each alone."""
    c = client(main)
    with ThreadPoolExecutor(16) as ex:
        together = list(ex.map(lambda p: greedy(c, p), PROMPTS))
    assert together == alone
    assert len(set(alone)) == len(alone)  # the prompts really differ, so the check has teeth


def test_stop_strings(main, alone):
    c = client(main)
    text = alone[4]
    stop = text[6:9]
    cut = text[:text.index(stop)]
    r = c.completions.create(model=NAME, prompt=PROMPTS[4], max_tokens=24, temperature=0, stop=[stop],
                             extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    assert r.choices[0].model_extra["stop_reason"] == stop
    streamed = c.completions.create(model=NAME, prompt=PROMPTS[4], max_tokens=24, temperature=0, stop=stop,
                                    stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == cut


# -- errors ---------------------------------------------------------------------------------
def _post(srv, path, body, key=KEY):
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    raw = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(srv.base_url + path, content=raw, headers=headers, timeout=60)


def test_bad_inputs_then_still_correct(main, alone, tok):
    long_prompt = PROMPTS[10]
    n = len(tok.encode(long_prompt))
    table = [  # (path, body, key, status, words the message must contain, param)
        ("/v1/completions", '{"model": "x", "prompt": ', KEY, 400, ["not valid JSON"], None),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": "7"}, KEY, 400, ["'max_tokens'", "integer"],
         "max_tokens"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": "hot"}, KEY, 400,
         ["'temperature'", "number"], "temperature"),
        ("/v1/chat/completions", {"model": NAME, "messages": "hello"}, KEY, 400, ["'messages'", "array"], "messages"),
        ("/v1/completions", {"model": NAME, "prompt": 5}, KEY, 400, ["'prompt'"], "prompt"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, KEY, 400, ["max_tokens", "at least 1"],
         "max_tokens"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3},
         KEY, 400, ["max_tokens", "-3"], "max_tokens"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": -0.5}, KEY, 400, ["temperature", ">= 0"],
         "temperature"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "top_p": 0}, KEY, 400, ["top_p", "(0, 1]"], "top_p"),
        ("/v1/completions", {"model": NAME, "prompt": long_prompt, "max_tokens": CTX}, KEY, 400,
         [f"({n} tokens)", f"({CTX})", f"context length of {CTX}", f"{CTX - n}"], "max_tokens"),
        ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, KEY, 404, ["'gpt-4o' does not exist", NAME], "model"),
        ("/v1/completions", {"model": NAME, "prompt": "hi"}, "wrong-key", 401, ["incorrect API key"], None),
        ("/v1/completions", {"model": NAME, "prompt": "hi"}, None, 401, ["missing API key", "Bearer"], None),
        ("/v1/no-such-route", {"model": NAME}, KEY, 404, ["/v1/no-such-route"], None),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 21}, KEY, 400, ["'logprobs'", "0 and 20"],
         "logprobs"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
         KEY, 400, ["'logprobs': true"], "top_logprobs"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "presence_penalty": 2.5}, KEY, 400,
         ["presence_penalty", "[-2, 2]"], "presence_penalty"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "repetition_penalty": 0}, KEY, 400,
         ["repetition_penalty", "(0, 2]", "1 is off"], "repetition_penalty"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                  "response_format": {"type": "xml"}}, KEY, 400, ["'xml'", "json_schema"],
         "response_format.type"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                  "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, KEY, 400,
         ["'schema'"], "response_format.json_schema.schema"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "regex": "(unclosed"}, KEY, 400,
         ["regex cannot be compiled"], "regex"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "guided_regex": "(unclosed"}, KEY, 400,
         ["regex cannot be compiled"], "guided_regex"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "guided_json": "{oops"}, KEY, 400,
         ["not valid JSON"], "guided_json"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "regex": "a+", "guided_choice": ["a"]}, KEY, 400,
         ["regex and guided_choice each constrain the output"], "guided_choice"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "min_p": 0.05}, KEY, 400,
         ["'min_p' is not supported", "0.05", "top_p"], "min_p"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                  "logit_bias": {"42": -100}}, KEY, 400, ["'logit_bias' is not supported"], "logit_bias"),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 4, "min_tokens": 5}, KEY, 400,
         ["min_tokens", "max_tokens = 4", "5"], "min_tokens"),
    ]
    for path, body, key, status, words, param in table:
        r = _post(main, path, body, key)
        err = r.json()["error"]
        assert r.status_code == status, (body, r.text)
        assert set(err) == {"message", "type", "param", "code"}
        for w in words:
            assert w in err["message"], (w, err)
        assert err["param"] == param, (body, err)
    # The same refusals through the official client raise its typed errors.
    c = client(main)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=NAME, prompt="hi", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.AuthenticationError):
        client(main, key="bad").completions.create(model=NAME, prompt="hi")
    # ...and the server still answers exactly as before, also to a body with the inert values of
    # those fields (clients such as vLLM's send min_p 0 and an empty logit_bias explicitly).
    assert greedy(c, PROMPTS[2]) == alone[2]
    assert greedy(c, PROMPTS[2], min_p=0, logit_bias={}, min_tokens=0, use_beam_search=False) == alone[2]


def test_disconnect_frees_slot(main, tok):
    """A stream dropped after a few tokens frees its slot at once; a stream beside it is unaffected.

    The dropped request asks for every token the context has room for, but a busy CI machine can
    still starve this client long enough for the server to finish it before the close (CI saw it
    once). Such an attempt ends as a "length" finish, not an abort, and the test tries again (at
    most 3 times). The finish counters are checked exactly at the end: one abort, and one "length"
    finish for `other` plus one per attempt that completed, so a late or lost abort still fails."""
    c = client(main)
    ref = greedy(c, PROMPTS[7], 300)
    finished = lambda reason: metric(main, f'request_finished_total{{finish_reason="{reason}"}}')  # noqa: E731
    aborted, completed = finished("abort"), finished("length")
    other = c.completions.create(model=NAME, prompt=PROMPTS[7], max_tokens=300, temperature=0, stream=True,
                                 extra_body={"ignore_eos": True})
    parts, it = [], iter(other)
    parts.append(next(it).choices[0].text)
    room = CTX - len(tok.encode(PROMPTS[1])) - 1
    for attempt in range(3):
        dropped = c.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=room, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
        dropped_it = iter(dropped)
        for _ in range(3):
            next(dropped_it)
        t0 = time.monotonic()
        dropped.close()
        if wait_until(lambda: finished("abort") == aborted + 1, 2.0):
            break
    else:
        pytest.fail("the dropped request completed before the client could close it, 3 times")
    freed_after = time.monotonic() - t0
    assert metric(main, "num_requests_running") <= 1 and freed_after < 2.0
    parts += [ch.choices[0].text for ch in it if ch.choices]
    assert "".join(parts) == ref
    assert wait_metric(main, "num_requests_running", 0) == 0
    assert finished("abort") == aborted + 1
    assert finished("length") == completed + 1 + attempt  # `other`, and each attempt that completed


def test_queue_full_503_then_recovers(main, alone, tok):
    """4 slots busy + 16 queued: the next request gets 503; dropping the streams frees everything.

    Each request asks for all the room its context has, so the slots stay busy as long as they
    can; still, a fast machine can finish one of the 4 before the 21st request arrives (CI saw it),
    and then the 21st rightly takes its queue place. So streams are added until one is refused, and
    the number admitted is held to 20 plus the requests finished meanwhile: never more."""
    finished = lambda: metric(main, 'request_finished_total{finish_reason="length"}')  # noqa: E731
    http = httpx.Client(base_url=main.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                        limits=httpx.Limits(max_connections=80))
    held, before = [], finished()
    try:
        for i in range(60):
            req = http.build_request("POST", "/v1/completions", json={
                "model": NAME, "prompt": PROMPTS[i % 16], "max_tokens": CTX - len(tok.encode(PROMPTS[i % 16])) - 1, "stream": True,
                "ignore_eos": True})
            r = http.send(req, stream=True)
            if r.status_code != 200:
                break
            held.append(r)
        else:
            pytest.fail("60 streams admitted; none was refused")
        assert r.status_code == 503, r.read()
        error = json.loads(r.read())["error"]
        r.close()
        assert error["code"] == "queue_full" and "16 requests are already waiting for one of 4 slots" in error["message"]
        assert 20 <= len(held) <= 20 + (finished() - before)
    finally:
        for r in held:
            r.close()
        http.close()
    assert wait_metric(main, "num_requests_waiting", 0) == 0
    assert wait_metric(main, "num_requests_running", 0) == 0
    assert greedy(client(main), PROMPTS[0]) == alone[0]


# -- meshes and FP8 -------------------------------------------------------------------------
def greedy_log_softmax(servers, prompt: list[int], n: int):
    """qwen3_jax's own float32 model of the served checkpoint, its n greedy tokens after `prompt`,
    and log_softmax of its logits over prompt + those tokens [len(prompt) + n, V]
    -> (model, prompt, ids, that)."""
    from qwen3_jax import load

    model = load(servers["ckpt"], dtype="float32", progress=False)
    ids = model.generate_greedy(np.array([prompt]), n)[0].tolist()
    return model, prompt, ids, np.asarray(jax.nn.log_softmax(model.logits(np.array([prompt + ids]))[0], axis=-1))


@pytest.mark.parametrize("which", ["main", "mesh"])
def test_logprobs_are_the_models(servers, tok, which):
    """/v1/completions logprobs=3 and /v1/chat/completions top_logprobs=2, whole and streamed, on
    one device and under tp=2,ep=4 (the vocabulary split over devices): the greedy tokens'
    logprobs and alternatives equal log_softmax of qwen3_jax's own float32 logits over the prompt
    and output; the texts, offsets and byte lists agree with the tokenizer."""
    c = client(servers[which].wait_ready())
    model, prompt, ids, ref = greedy_log_softmax(servers, tok.encode(PROMPTS[4]), 6)
    ref = ref[len(prompt) - 1:-1]   # the rows that predicted each output token
    best = np.argsort(-ref, axis=-1, kind="stable")

    kw = dict(model=NAME, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    whole = c.completions.create(prompt=prompt, logprobs=3, **kw).choices[0]
    lp = whole.logprobs
    assert lp.tokens == [tok.decode([i], skip_special_tokens=False) for i in ids]
    np.testing.assert_allclose(lp.token_logprobs, ref[np.arange(6), ids], rtol=0, atol=1e-4)
    for j, top in enumerate(lp.top_logprobs):   # the 3 best (the greedy token among them)
        want = {}
        for t in best[j, :3]:   # tokens of one text share a key: the likelier keeps it
            want.setdefault(tok.decode([int(t)], skip_special_tokens=False), ref[j, t])
        assert top.keys() == want.keys()
        np.testing.assert_allclose([top[k] for k in want], list(want.values()), rtol=0, atol=1e-4)
    assert lp.text_offset == np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]).tolist()
    assert "".join(lp.tokens) == whole.text
    chunks = [ch.choices[0] for ch in c.completions.create(prompt=prompt, logprobs=3, stream=True, **kw)
              if ch.choices and ch.choices[0].logprobs]
    assert sum((ch.logprobs.tokens for ch in chunks), []) == lp.tokens
    assert sum((ch.logprobs.token_logprobs for ch in chunks), []) == lp.token_logprobs
    assert sum((ch.logprobs.text_offset for ch in chunks), []) == lp.text_offset

    msgs = [{"role": "user", "content": PROMPTS[4]}]
    chat_prompt = tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    chat_ids = model.generate_greedy(np.array([chat_prompt]), 6)[0].tolist()
    chat_ref = np.asarray(jax.nn.log_softmax(model.logits(np.array([chat_prompt + chat_ids]))[0], axis=-1))
    chat_ref = chat_ref[len(chat_prompt) - 1:-1]
    got = c.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=2, **kw).choices[0].logprobs.content
    assert [e.token for e in got] == [tok.decode([i], skip_special_tokens=False) for i in chat_ids]
    np.testing.assert_allclose([e.logprob for e in got], chat_ref[np.arange(6), chat_ids], rtol=0, atol=1e-4)
    assert all(e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 2 for e in got)
    assert all(e.top_logprobs[0].token == e.token for e in got)   # greedy: the best is the one taken
    streamed = [x for ch in c.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=2, stream=True, **kw)
                if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in got]


@pytest.mark.parametrize("which", ["main", "mesh"])
def test_echo_with_logprobs_scores_the_prompt(servers, tok, which):
    """/v1/completions echo + logprobs=2 (as lm-eval's loglikelihood asks), on one device and under
    tp=2,ep=4: the prompt's tokens come first, the first with null logprobs, each later one with
    log_softmax of qwen3_jax's float32 logits at the position before it; then the generated
    tokens'. Streamed: the same entries, the echoed text in the first chunk that carries them."""
    c = client(servers[which].wait_ready())
    _, prompt, ids, ref = greedy_log_softmax(servers, tok.encode(PROMPTS[2]), 2)
    seq = prompt + ids
    want = ref[np.arange(len(seq) - 1), seq[1:]]   # row j scores token j + 1

    kw = dict(model=NAME, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=2,
              extra_body={"ignore_eos": True})
    whole = c.completions.create(**kw).choices[0]
    lp = whole.logprobs
    assert lp.tokens == [tok.decode([i], skip_special_tokens=False) for i in seq]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], want, rtol=0, atol=1e-4)
    for j, top in enumerate(lp.top_logprobs[1:]):   # the 2 best at the row before, the token itself too
        row = ref[j]
        assert top[lp.tokens[j + 1]] == pytest.approx(want[j], abs=1e-4)
        for t in np.argsort(-row, kind="stable")[:2]:
            assert top[tok.decode([int(t)], skip_special_tokens=False)] >= row[t] - 1e-4
    assert whole.text == tok.decode(prompt, skip_special_tokens=False) + "".join(lp.tokens[len(prompt):])
    assert lp.text_offset == np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]).tolist()
    chunks = [ch.choices[0] for ch in c.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(ch.text for ch in chunks) == whole.text
    streamed = [ch.logprobs for ch in chunks if ch.logprobs]
    assert sum((x.tokens for x in streamed), []) == lp.tokens
    assert sum((x.token_logprobs for x in streamed), []) == lp.token_logprobs
    assert sum((x.text_offset for x in streamed), []) == lp.text_offset


@pytest.mark.parametrize("which", ["main", "mesh"])
@pytest.mark.parametrize("penalties", [dict(presence_penalty=1.5, frequency_penalty=0.5),
                                       dict(repetition_penalty=1.8)])
def test_penalties_are_the_host_references(servers, tok, which, penalties):
    """presence_penalty / frequency_penalty, and repetition_penalty (an extra field, as vLLM and
    SGLang take it), on /v1/completions (one device, and tp=2,ep=4 where the counts are split
    over the vocabulary like the logits) give the host reference's greedy tokens (read back
    through logprobs' per-token texts), next to an unpenalized request running in the same steps."""
    from qwen3_jax import load

    srv = servers[which].wait_ready()
    c = client(srv)
    prompt = np.random.default_rng(0).integers(0, 500, size=40).tolist()   # its greedy output repeats
    model = load(servers["ckpt"], dtype="float32", progress=False)
    want = penalized_greedy(model, prompt, 24, penalties.get("presence_penalty", 0),
                            penalties.get("frequency_penalty", 0), penalties.get("repetition_penalty", 1))
    openai_fields = {k: v for k, v in penalties.items() if k != "repetition_penalty"}
    extra = {"ignore_eos": True, **{k: v for k, v in penalties.items() if k == "repetition_penalty"}}
    kw = dict(model=NAME, max_tokens=24, temperature=0)
    with ThreadPoolExecutor(1) as ex:
        beside = ex.submit(c.completions.create, prompt=PROMPTS[6], extra_body={"ignore_eos": True}, **kw)
        got = c.completions.create(prompt=prompt, logprobs=0, extra_body=extra, **openai_fields, **kw)
    assert got.choices[0].logprobs.tokens == [tok.decode([i], skip_special_tokens=False) for i in want]
    assert want != model.generate_greedy(np.array([prompt]), 24)[0].tolist()   # the penalties acted
    assert beside.result().choices[0].text == greedy(c, PROMPTS[6], 24)


def test_response_format_and_regex_constrain_the_reply(servers):
    """response_format json_schema on /v1/chat/completions, whole and streamed, and SGLang's regex
    on /v1/completions, on the tp=2,ep=4 server (the mask acts on logits split over the vocabulary):
    the random-weight model's replies parse and match."""
    srv = servers["mesh"].wait_ready()
    c = client(srv)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"]}
    kw = dict(model=NAME, messages=[{"role": "user", "content": "A city, as JSON."}], max_tokens=200, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    whole = c.chat.completions.create(**kw)
    doc = json.loads(whole.choices[0].message.content)
    assert list(doc) == ["city", "population"] and isinstance(doc["population"], int)
    assert whole.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                       if ch.choices)
    assert streamed == whole.choices[0].message.content
    year = c.completions.create(model=NAME, prompt="The year:", max_tokens=8, temperature=0.9, seed=5,
                                extra_body={"regex": "(19|20)[0-9]{2}"})
    assert re.fullmatch("(19|20)[0-9]{2}", year.choices[0].text)
    # vLLM's names: guided_choice (one of the strings, a "." and "+" in them taken literally), guided_json
    choices = ["yes.", "no+", "maybe"]
    picked = {c.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=8, temperature=1.0, seed=i,
                                   extra_body={"guided_choice": choices}).choices[0].text for i in range(6)}
    assert picked <= set(choices) and picked
    doc = c.completions.create(model=NAME, prompt="JSON:", max_tokens=200, temperature=0,
                               extra_body={"guided_json": schema}).choices[0].text
    assert list(json.loads(doc)) == ["city", "population"]


def test_mesh_tp2_ep4_matches_one_device(servers, alone):
    mesh = servers["mesh"].wait_ready()
    c = client(mesh)
    picks = [0, 5, 9, 15]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda i: greedy(c, PROMPTS[i]), picks))
    assert got == [alone[i] for i in picks]


def test_fp8_checkpoint_served_matches_one_device(servers, tok):
    """FP8 weights served under tp=2,ep=4 (shards cut 128-blocks) = qwen3_jax's one-device greedy."""
    from qwen3_jax import load

    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 500, size=(3, 9)).tolist()
    ref = load(servers["fp8_dir"], dtype="float32", progress=False).generate_greedy(np.array(prompts), 12)
    srv = servers["fp8"].wait_ready()
    r = client(srv).completions.create(model="fp8", prompt=prompts, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == [tok.decode(row) for row in ref.tolist()]
    assert r.usage.prompt_tokens == 27 and r.usage.completion_tokens == 36


# -- shutdown (last: stops the main server) ------------------------------------------------
def test_sigterm_ends_streams_with_error_and_exits_cleanly(main):
    with httpx.stream("POST", main.base_url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": NAME, "prompt": "Hello", "max_tokens": 900, "stream": True,
                            "ignore_eos": True}, timeout=60) as resp:
        lines = resp.iter_lines()
        first = next(ln for ln in lines if ln)
        assert json.loads(first[6:])["choices"]
        t0 = time.monotonic()
        main.proc.send_signal(signal.SIGTERM)
        rest = [ln for ln in lines if ln]
    assert rest[-1] == "data: [DONE]"
    assert "shutting down" in json.loads(rest[-2][6:])["error"]["message"]
    assert main.proc.wait(30) == 0
    assert time.monotonic() - t0 < 30
