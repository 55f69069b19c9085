"""A chat completion's text -> OpenAI's assistant-message fields, as it streams.

  --reasoning-parser qwen3   text inside <think>...</think> goes to `reasoning_content`, the rest
                             to `content` (vLLM's and SGLang's flag of the same name)
  --tool-call-parser hermes  <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks in the
                             content become `tool_calls` (Qwen3's format; vLLM's "hermes", SGLang's
                             "qwen25")

Both parsers take text deltas as the engine releases them and hold back only a tail that could
still begin a tag, so a streamed client sees each piece once and, concatenated, exactly what the
whole-response path (`parse_message`) gives, which is the same parsers fed the text in one piece.
A tool call streams as one delta, when its closing tag arrives (OpenAI clients accumulate deltas;
a complete call is a valid one). A block whose JSON does not parse stays in the content, as vLLM does.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

REASONING_PARSERS = ("qwen3",)
TOOL_CALL_PARSERS = ("hermes", "qwen25")   # the same format under vLLM's and SGLang's names

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def _held_tail(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (it may still become one)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


ASSISTANT_TURN = "<|im_start|>assistant"


def prompt_opens_thinking(prompt_tail: str) -> bool:
    """Whether the generation prompt (the text after the prompt's last assistant-turn start; give
    at least that much of the prompt's end) leaves a <think> block open, so the output starts
    inside it (templates of thinking-only models end it with '<think>\\n'). A <think> in an
    earlier turn, a user's message say, does not count."""
    at = prompt_tail.rfind(ASSISTANT_TURN)
    turn = prompt_tail[at:] if at >= 0 else ""
    return turn.rfind(THINK_OPEN) > turn.rfind(THINK_CLOSE)


class ReasoningParser:
    """Qwen3's thinking: `<think>\\n...\\n</think>\\n\\n` then the answer. Output that does not
    start with <think> (after whitespace) is all content, unless the prompt opened the block.
    As Qwen3's chat template does when it renders a reply, the reasoning loses the newlines
    next to its tags and the content the newlines after </think>."""

    def __init__(self, opened: bool = False):
        self.state = "reasoning" if opened else "start"
        self.buf = ""
        self.reasoning_started = self.content_started = False

    def push(self, text: str) -> tuple[str, str]:
        """-> (reasoning delta, content delta) releasable now."""
        self.buf += text
        reasoning = content = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self.buf = "reasoning", head[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(head):
                return "", ""   # only whitespace, or a start of <think>, so far
            else:
                self.state = "content"
        if self.state == "reasoning":
            end = self.buf.find(THINK_CLOSE)
            if end >= 0:
                reasoning = self._reasoning(self.buf[:end].rstrip("\n"))
                self.state, self.buf = "after", self.buf[end + len(THINK_CLOSE):]
            else:
                # hold back a start of </think> and the newlines that may stand before it
                keep = _held_tail(self.buf, THINK_CLOSE)
                body = self.buf[:len(self.buf) - keep]
                cut = len(body.rstrip("\n"))
                reasoning, self.buf = self._reasoning(body[:cut]), self.buf[cut:]
        if self.state == "after":
            self.buf = self.buf.lstrip("\n")
            if self.buf:
                self.state = "content"
        if self.state == "content":
            content, self.buf = self.buf, ""
        return reasoning, content

    def _reasoning(self, text: str) -> str:
        if not self.reasoning_started:
            text = text.lstrip("\n")
            self.reasoning_started = bool(text)
        return text

    def finish(self) -> tuple[str, str]:
        """The end of the output: release what was held (an unclosed <think> is all reasoning)."""
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            return self._reasoning(rest.rstrip("\n")), ""
        if self.state == "start":
            return "", rest
        return "", rest if self.state == "content" else ""


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str   # JSON text, as OpenAI sends it
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_json(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def _parse_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """Qwen3's (Hermes') tool calls in the content: `<tool_call>\\n{json}\\n</tool_call>` blocks."""

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls   # OpenAI's parallel_tool_calls false: 1; later calls are dropped
        self.buf = ""
        self.gap = ""   # whitespace before the open block, dropped if it is a call
        self.inside = False
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """-> (content delta, tool calls completed by this text). Whitespace next to a call (before
        it, between calls, after the last) is dropped, so it is held until text follows it."""
        self.buf += text
        content, done = "", []
        while True:
            if not self.inside:
                at = self.buf.find(CALL_OPEN)
                if at < 0:
                    keep = _held_tail(self.buf, CALL_OPEN)
                    cut = len(self.buf[:len(self.buf) - keep].rstrip())
                    content, self.buf = content + self.buf[:cut], self.buf[cut:]
                    break
                text = self.buf[:at].rstrip()
                content, self.gap = content + text, self.buf[len(text):at]   # the gap goes with a call
                self.buf, self.inside = self.buf[at:], True
            end = self.buf.find(CALL_CLOSE)
            if end < 0:
                break
            block, self.buf = self.buf[:end + len(CALL_CLOSE)], self.buf[end + len(CALL_CLOSE):]
            self.inside = False
            call = _parse_call(block[len(CALL_OPEN):-len(CALL_CLOSE)])
            if call is None:
                content += self.gap + block   # not a call after all: the model's text, unchanged
            elif self._room(len(done)):
                done.append(call)
        self.calls += done
        return content, done

    def _room(self, pending: int = 0) -> bool:
        """Whether one more call may be kept (pending: calls found in this push, not yet kept)."""
        return self.max_calls is None or len(self.calls) + pending < self.max_calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the output: an unclosed block is a call if its JSON is whole, else text."""
        rest, self.buf = self.buf, ""
        if self.inside:
            self.inside = False
            call = _parse_call(rest[len(CALL_OPEN):])
            if call is not None:
                if not self._room():
                    return "", []
                self.calls.append(call)
                return "", [call]
            rest = self.gap + rest
        return ("" if self.calls and not rest.strip() else rest), []


class MessageParser:
    """Both parsers in a chain (reasoning first: a <tool_call> inside the thinking stays there).
    max_calls: see ToolCallParser."""

    def __init__(self, reasoning: str | None, tools: str | None, opened: bool = False, max_calls: int | None = None):
        self.reasoning = ReasoningParser(opened) if reasoning else None
        self.tools = ToolCallParser(max_calls) if tools else None

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self.tools is not None

    def push(self, text: str, final: bool = False) -> tuple[str, str, list[ToolCall]]:
        """A text delta (final: the last one) -> (reasoning delta, content delta, completed calls)."""
        reasoning, content = self.reasoning.push(text) if self.reasoning else ("", text)
        if final and self.reasoning:
            r, c = self.reasoning.finish()
            reasoning, content = reasoning + r, content + c
        calls = []
        if self.tools:
            content, calls = self.tools.push(content)
            if final:
                c, more = self.tools.finish()
                content, calls = content + c, calls + more
        return reasoning, content, calls

    @property
    def calls(self) -> list[ToolCall]:
        return self.tools.calls if self.tools else []


def parse_message(text: str, reasoning: str | None, tools: str | None, opened: bool = False,
                  max_calls: int | None = None) -> dict:
    """A whole reply -> {"content", "reasoning_content" (with a reasoning parser), "tool_calls"
    (when there are any)}: `content` None when only tool calls remain, as OpenAI sends it."""
    p = MessageParser(reasoning, tools, opened, max_calls)
    r, c, calls = p.push(text, final=True)
    msg = {"content": c}
    if reasoning:
        msg["reasoning_content"] = r or None
    if calls:
        msg["tool_calls"] = [call.to_json() for call in calls]
        msg["content"] = c or None
    return msg
