"""Structured outputs: a request's JSON schema or regular expression as a mask over the next token.

outlines-core compiles the constraint against the tokenizer's vocabulary into an automaton
(`Index`: for each state the tokens that keep the text a prefix of a match); each request walks
it with a `Guide`. Before a constrained row's step the host writes the guide's allowed tokens as
a bitmask, [ceil(V / 32)] int32 words (bit i % 32 of word i // 32: token i), which the sampler
applies on the device (`sampling.mask_logits`); after the token comes back the guide advances.
At a final state the EOS id is allowed, so a finished match can end the request.

A JSON schema becomes a regular expression first (outlines-core's json_schema module: objects
with the listed properties in order, bounded whitespace); {"type": "json_object"} is the schema
{"type": "object"}. A forced tool_choice is a regex over Qwen3's tool-call format
(tool_call_regex). Compiled indexes are cached by constraint, so a repeated schema costs nothing
after its first request.
"""

from __future__ import annotations

import functools
import json
import re
import threading

import numpy as np

from .sampling import mask_words

# Indexes kept (by kind and text): a server sees a few schemas again and again.
INDEX_CACHE_SIZE = 64


class StructuredOutputError(ValueError):
    """A constraint that cannot be compiled (bad JSON schema or regex), or no library for it."""


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE (GPT-2, Qwen): the printable character standing for each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_bytes(tokenizer) -> dict[bytes, list[int]]:
    """The bytes each regular token id stands for (special tokens left out): -> {bytes: [ids]}.
    Byte-level BPE vocabularies map through the GPT-2 byte alphabet; others (SentencePiece-style
    '▁' for a space, <0xNN> byte tokens) through their own conventions."""
    decoder = _byte_decoder()
    special = set(tokenizer.special_ids)
    out: dict[bytes, list[int]] = {}
    for text, i in tokenizer.tok.get_vocab().items():
        if i in special:
            continue
        if all(ch in decoder for ch in text):
            raw = bytes(decoder[ch] for ch in text)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            raw = bytes([int(text[3:5], 16)])
        else:
            raw = text.replace("\u2581", " ").encode()
        out.setdefault(raw, []).append(i)
    return out


class TokenMasks:
    """One engine's constraints: the vocabulary built once (on first use), indexes cached.

    vocab_size: the model's V (the logits' width; ids past the tokenizer's are never allowed)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, int(vocab_size)
        self.words = mask_words(self.vocab_size)
        # the EOS id a finished match allows (the first of the checkpoint's)
        self.eos = int(tokenizer.eos_token_ids[0]) if tokenizer.eos_token_ids else None
        self._lock = threading.Lock()   # submit() runs on callers' threads
        self._vocabulary = None
        self._index = functools.lru_cache(INDEX_CACHE_SIZE)(self._compile)

    def _vocab(self):
        from outlines_core import Vocabulary

        if self._vocabulary is None:
            if self.eos is None:
                raise StructuredOutputError("structured output needs an EOS token id in the checkpoint's "
                                            "generation_config.json or tokenizer_config.json, and this one has none")
            self._vocabulary = Vocabulary(self.eos, token_bytes(self.tokenizer))
        return self._vocabulary

    def _compile(self, kind: str, text: str):
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        if kind == "json_schema":
            try:
                pattern = build_regex_from_schema(text)
            except Exception as e:   # noqa: BLE001 - the library's errors name the schema's problem
                raise StructuredOutputError(f"the JSON schema cannot be used: {e}") from None
        else:
            pattern = text
        try:
            return Index(pattern, self._vocab())
        except StructuredOutputError:
            raise
        except Exception as e:   # noqa: BLE001
            what = "JSON schema" if kind == "json_schema" else "regex"
            raise StructuredOutputError(f"the {what} cannot be compiled to a token automaton: {e}") from None

    def guide(self, kind: str, text: str):
        """A fresh Guide for this constraint (its index compiled, or from the cache)."""
        try:
            from outlines_core import Guide
        except ImportError:
            raise StructuredOutputError("structured output (response_format json_schema / json_object, regex) "
                                        "needs outlines-core: pip install outlines-core") from None
        with self._lock:
            return Guide(self._index(kind, text))

    def advance(self, guide, token: int) -> None:
        """The guide takes a sampled token. The EOS a finished match allows ends the text, so the
        guide stays where it is (with ignore_eos the row keeps being offered EOS alone)."""
        if token != self.eos:
            guide.advance(token)

    def write(self, guide, out_w: np.ndarray) -> None:
        """The guide's allowed tokens into one row of words [W] int32 (C-contiguous)."""
        out_w[:] = 0
        guide.write_mask_into(out_w.ctypes.data, out_w.size, 4)


def tool_call_regex(tools: list[dict], name: str | None = None, parallel: bool = True) -> str:
    """A forced tool_choice as a regex over Qwen3's tool-call format (its chat template's, the
    hermes parser's): <tool_call>\n{"name": "<name>", "arguments": <JSON per the function's
    parameters schema>}\n</tool_call>. name: that function only (else any of `tools`, OpenAI's
    "required"); parallel: more calls may follow, one per line."""
    from outlines_core.json_schema import build_regex_from_schema

    calls = []
    for tool in tools:
        fn = tool.get("function") or {}
        if name is not None and fn.get("name") != name:
            continue
        params = fn.get("parameters") or {"type": "object"}
        try:
            args = build_regex_from_schema(json.dumps(params))
        except Exception as e:   # noqa: BLE001 - the library's message names the schema's problem
            raise StructuredOutputError(f"function {fn.get('name')!r}: its parameters schema cannot be used: {e}") from None
        calls.append(r'<tool_call>\n\{"name": "' + re.escape(str(fn.get("name"))) + r'", "arguments": ' + args
                     + r'\}\n</tool_call>')
    if not calls:
        raise StructuredOutputError(f"no function named {name!r} among the request's tools")
    one = "(" + "|".join(calls) + ")"
    return one + (r"(\n" + one + ")*" if parallel else "")


def json_schema_text(schema) -> str:
    """A response_format schema (a dict, or its JSON text) -> compact JSON text (the cache key)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise StructuredOutputError(f"json_schema must be a JSON object (a schema), got {type(schema).__name__}")
    return json.dumps(schema, separators=(",", ":"))   # key order kept: properties come out in it
