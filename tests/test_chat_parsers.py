"""serve.chat_parsers: Qwen3's <think> reasoning and <tool_call> blocks -> OpenAI message fields.

References: each reply's expected fields written out by hand, and the project's Qwen3-style chat
template, which renders a parsed assistant message back to the text the model produced. Every
case also streams in random pieces (down to single characters) and must concatenate to the
whole-reply result."""

from __future__ import annotations

import json
import random

import pytest

from serve.chat_parsers import MessageParser, parse_message, prompt_opens_thinking
from serve.chat_template import QWEN3_STYLE_TEMPLATE
from serve.tokenizer import _template_env

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'

# (reply text, prompt opened <think>, reasoning parser on, tool parser on, expected message fields)
CASES = [
    ("<think>\nThe user greets.\n\nI greet back.\n</think>\n\nHello!", False, True, False,
     {"content": "Hello!", "reasoning_content": "The user greets.\n\nI greet back."}),
    ("The user greets.\n</think>\n\nHello!", True, True, False,     # the template opened <think>
     {"content": "Hello!", "reasoning_content": "The user greets."}),
    ("  Hello, no thinking here.", False, True, False, {"content": "  Hello, no thinking here.",
                                                        "reasoning_content": None}),
    ("<think>\nStill thinking when max_tokens", False, True, False,
     {"content": "", "reasoning_content": "Still thinking when max_tokens"}),
    ("<thinking is a word>", False, True, False, {"content": "<thinking is a word>", "reasoning_content": None}),
    ("I will look both up.\n" + WEATHER + "\n" + TIME, False, False, True,
     {"content": "I will look both up.", "tool_calls": [("get_weather", {"city": "Paris", "unit": "C"}),
                                                       ("get_time", {})]}),
    (WEATHER, False, False, True, {"content": None, "tool_calls": [("get_weather", {"city": "Paris", "unit": "C"})]}),
    ("<think>\nMaybe <tool_call> later.\n</think>\n\n" + WEATHER, False, True, True,
     {"content": None, "reasoning_content": "Maybe <tool_call> later.",
      "tool_calls": [("get_weather", {"city": "Paris", "unit": "C"})]}),
    ("Broken: <tool_call>\n{not json}\n</tool_call> end", False, False, True,
     {"content": "Broken: <tool_call>\n{not json}\n</tool_call> end"}),
    ("Cut off " + WEATHER[:-len("</tool_call>")], False, False, True,    # max_tokens before the close
     {"content": "Cut off", "tool_calls": [("get_weather", {"city": "Paris", "unit": "C"})]}),
    ("No calls <tool_ here", False, False, True, {"content": "No calls <tool_ here"}),
    ("<think>\nA\n</think>\n\nB " + WEATHER, False, False, False,      # parsers off: the text as it came
     {"content": "<think>\nA\n</think>\n\nB " + WEATHER}),
]


def _fields(msg: dict) -> dict:
    """Tool calls as (name, parsed arguments); their ids are random."""
    out = dict(msg)
    if "tool_calls" in out:
        assert all(c["type"] == "function" and c["id"].startswith("call_") for c in out["tool_calls"])
        out["tool_calls"] = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                             for c in out["tool_calls"]]
    return out


@pytest.mark.parametrize("text, opened, reasoning, tools, want", CASES)
def test_whole_reply(text, opened, reasoning, tools, want):
    msg = parse_message(text, "qwen3" if reasoning else None, "hermes" if tools else None, opened)
    assert _fields(msg) == want


@pytest.mark.parametrize("text, opened, reasoning, tools, want", CASES)
def test_streamed_in_pieces_equals_the_whole_reply(text, opened, reasoning, tools, want):
    rng = random.Random(len(text))
    for trial in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) if trial else []
        if trial == 1:
            cuts = list(range(1, len(text)))   # one character at a time
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        p = MessageParser("qwen3" if reasoning else None, "hermes" if tools else None, opened)
        r = c = ""
        calls = []
        for k, piece in enumerate(pieces):
            dr, dc, dcalls = p.push(piece, final=k == len(pieces) - 1)
            r, c, calls = r + dr, c + dc, calls + dcalls
        assert (r or None) == want.get("reasoning_content"), pieces
        assert (c or None) == (want["content"] or None), pieces
        assert [(x.name, json.loads(x.arguments)) for x in calls] == want.get("tool_calls", [])


def test_parsed_message_renders_back_to_the_reply():
    """The chat template turns the parsed fields (reasoning_content, content, tool_calls) back into
    the text the model wrote, so a multi-turn client that sends the message back gives the model
    its own words."""
    reply = "<think>\nCheck the weather.\n</think>\n\nLet me look.\n" + WEATHER
    msg = parse_message(reply, "qwen3", "hermes")
    msgs = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", **msg}]
    text = _template_env().from_string(QWEN3_STYLE_TEMPLATE).render(messages=msgs, add_generation_prompt=False,
                                                                     tools=None)
    assert text.endswith("<|im_start|>assistant\n" + reply + "<|im_end|>\n"), text


@pytest.mark.parametrize("prompt, opened", [
    ("<|im_start|>assistant\n", False),
    ("<|im_start|>assistant\n<think>\n", True),
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),   # enable_thinking=false
    ("<|im_start|>user\nWhat does <think> do?<|im_end|>\n<|im_start|>assistant\n", False),   # a user's tag
    ("Explain <think>", False),   # no assistant turn in sight
])
def test_prompt_opens_thinking(prompt, opened):
    assert prompt_opens_thinking(prompt) is opened


def test_server_reply_of_an_opened_think_block_is_reasoning(tmp_path):
    """The API's wiring, in process: under a template whose generation prompt opens <think> (as
    thinking-only models' do), --reasoning-parser qwen3 puts the built-in model's reply in
    reasoning_content, whole and streamed, as parse_message of the raw reply with the block open;
    without the parser the reply stays in content."""
    from fastapi.testclient import TestClient

    from serve import SamplingParams
    from serve.builtin import builtin_checkpoint
    from serve.engine import Engine
    from serve.openai_api import create_app

    engine = Engine(builtin_checkpoint(str(tmp_path / "builtin")), dtype="float32", context_length=128,
                    max_running_requests=2, chunked_prefill_size=32, progress=False)
    try:
        engine.tokenizer.chat_template = QWEN3_STYLE_TEMPLATE + "{{- '<think>\\n' if add_generation_prompt else '' -}}"
        engine.tokenizer._compiled = None
        msgs = [{"role": "user", "content": "What does <think> do?"}]
        raw = engine.generate(engine.chat_prompt_ids(msgs), SamplingParams(max_tokens=12, temperature=0,
                                                                           ignore_eos=True))[0].text
        want = parse_message(raw, "qwen3", None, opened=True)
        assert want["reasoning_content"] and want != parse_message(raw, "qwen3", None, opened=False)
        body = {"model": "m", "messages": msgs, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        for parser in ("qwen3", None):
            with TestClient(create_app(engine, "m", reasoning_parser=parser)) as client:
                msg = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
                with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                    deltas = [json.loads(ln[6:])["choices"][0]["delta"] for ln in r.iter_lines()
                              if ln.startswith("data: {")]
            if parser:
                assert (msg["reasoning_content"], msg["content"]) == (want["reasoning_content"], want["content"])
            else:
                assert "reasoning_content" not in msg and msg["content"] == raw
            assert "".join(d.get("reasoning_content", "") for d in deltas) == (msg.get("reasoning_content") or "")
            assert "".join(d.get("content") or "" for d in deltas) == msg["content"]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("text", ["I will look both up.\n" + WEATHER + "\n" + TIME,
                                  WEATHER + "\n" + TIME[:-len("</tool_call>")]])   # the second cut off
def test_one_call_with_parallel_tool_calls_false(text):
    """max_calls=1 (parallel_tool_calls false): the first call only, whole and streamed one
    character at a time; the dropped call's text does not become content."""
    msg = parse_message(text, None, "hermes", max_calls=1)
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]
    assert msg["content"] in (None, "I will look both up.")
    p = MessageParser(None, "hermes", max_calls=1)
    got = [call for k, ch in enumerate(text) for call in p.push(ch, final=k == len(text) - 1)[2]]
    assert [c.name for c in got] == ["get_weather"] and [c.name for c in p.calls] == ["get_weather"]
