"""A checkpoint's tokenizer: `tokenizer.json` through the `tokenizers` library, the chat template
from `tokenizer_config.json` (or `chat_template.jinja`) rendered with jinja2 the way transformers
renders it, stop ids from `generation_config.json`, and streaming detokenization.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any


class TemplateError(ValueError):
    """The chat template refused the conversation (its raise_exception) or failed to render."""


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token_text(value) -> str | None:
    """tokenizer_config tokens are a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _template_env():
    """A sandboxed jinja2 environment with transformers' settings, filters and globals."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: keeps non-ASCII text and does not HTML-escape, unlike jinja's own.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols],
                                        undefined=jinja2.Undefined)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def message_text(content) -> str | None:
    """OpenAI message content (a string, None, or a list of parts) -> the text the template sees."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise TemplateError(f"message content part of type {kind!r} is not supported; this model "
                                    "reads text only (parts of type 'text')")
        return "".join(texts)
    raise TemplateError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


class Tokenizer:
    """Encode, decode, chat-template and stop ids of one checkpoint directory."""

    def __init__(self, directory: str):
        from tokenizers import Tokenizer as HfTokenizer

        path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: serving text needs the checkpoint's tokenizer.json "
                                    "(or send token ids as the prompt)")
        self.directory = directory
        self.tok = HfTokenizer.from_file(path)
        self.config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        self.generation_config = _read_json(os.path.join(directory, "generation_config.json"))
        model_config = _read_json(os.path.join(directory, "config.json"))
        self.chat_template = self._find_template(directory)
        self._compiled = None
        self.special_tokens = {k: _token_text(self.config.get(k)) for k in
                               ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.eos_token_ids = self._eos_ids(model_config)
        self.special_ids = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    # -- ids ---------------------------------------------------------------------------------
    def _eos_ids(self, model_config: dict) -> tuple[int, ...]:
        """EOS ids: generation_config.json's, then config.json's, then tokenizer_config's eos_token."""
        ids: list[int] = []
        for value in (self.generation_config.get("eos_token_id"), model_config.get("eos_token_id")):
            for i in (value if isinstance(value, list) else [value]):
                if isinstance(i, int) and i not in ids:
                    ids.append(i)
        eos_text = self.special_tokens.get("eos_token")
        if eos_text:
            i = self.tok.token_to_id(eos_text)
            if i is not None and i not in ids:
                ids.append(i)
        return tuple(ids)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------
    def _find_template(self, directory: str) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None:
            jinja_path = os.path.join(directory, "chat_template.jinja")
            if os.path.exists(jinja_path):
                with open(jinja_path) as f:
                    template = f.read()
        return template

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tools: list | None = None, **template_kwargs: Any) -> str:
        """Render a conversation to the prompt text (special tokens included as text)."""
        if not self.chat_template:
            raise TemplateError(f"{self.directory} has no chat template (tokenizer_config.json 'chat_template' "
                                "or chat_template.jinja); use /v1/completions with a raw prompt instead")
        if self._compiled is None:
            self._compiled = _template_env().from_string(self.chat_template)
        msgs = []
        for m in messages:
            m = dict(m)
            m["content"] = message_text(m.get("content"))
            msgs.append(m)
        context = {**{k: v for k, v in self.special_tokens.items() if v is not None},
                   **template_kwargs, "messages": msgs, "tools": tools or None,
                   "add_generation_prompt": add_generation_prompt}
        try:
            return self._compiled.render(**context)
        except TemplateError:
            raise
        except Exception as e:  # a template bug or a message shape it cannot read
            raise TemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e


class DetokenizeStream:
    """Turns generated ids into text deltas, never splitting a multi-byte UTF-8 character.

    Byte-level BPE tokens can end inside a character; decoding then yields U+FFFD. Text is
    emitted only once the decoded tail no longer ends in U+FFFD, so every delta is whole
    characters and the concatenated deltas equal decoding all ids at once.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded and emitted last time (context for the next)
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        dec = self.tokenizer.decode
        before = dec(self.ids[self.prefix:self.read], self.skip)
        now = dec(self.ids[self.prefix:], self.skip)
        # A UTF-8 character spans at most 4 byte tokens: a tail still broken after more than that is
        # invalid bytes (random or truncated output), released as U+FFFD rather than held forever.
        if len(now) > len(before) and (not now.endswith("\ufffd") or len(self.ids) - self.read > 4):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a character cut by the end of generation)."""
        dec = self.tokenizer.decode
        before = dec(self.ids[self.prefix:self.read], self.skip)
        now = dec(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
