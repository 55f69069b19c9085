"""One request's life on the host: its prompt, sampling settings, generated ids, text and stop rules.

The scheduler feeds each sampled id to `Request.accept`, which decides whether generation ends
(EOS / stop id, stop string, max_tokens) and what text to release. Text that might be the start
of a stop string is held back until it is clear it is not, so a streamed client never sees part
of a stop string.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Callable

import numpy as np

from .sampling import SamplingParams
from .tokenizer import DetokenizeStream

_ids = itertools.count()


@dataclasses.dataclass
class TokenLogprob:
    """One token's log-probability under the model (before penalties, temperature, top-k and
    top-p) and the most likely tokens' at that position, best first (`SamplingParams.logprobs`
    of them for a generated token, `prompt_logprobs` for a prompt token)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class RequestOutput:
    """What one step released for one request (a delta; `finished` on the last one)."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    stop_reason: str | int | None = None  # the stop string or stop id that ended it
    error: str | None = None  # why an aborted request ended
    logprobs: list[TokenLogprob] | None = None  # one per id in token_ids, when the request asked
    cached_tokens: int = 0  # prompt tokens the prefix cache held (not prefilled)
    # On a request's first output, when it asked: one per prompt token, None for the first
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclasses.dataclass
class CompletionOutput:
    """A finished request, as `Engine.generate` returns it."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    stop_reason: str | int | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per id in token_ids, when the request asked
    cached_tokens: int = 0  # prompt tokens the prefix cache held (not prefilled)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None first), when asked


class Request:
    """Host state of one request. `on_output(RequestOutput)` is called from the scheduler thread."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, seed: int,
                 stop_ids: set[int], detok: DetokenizeStream | None,
                 on_output: Callable[[RequestOutput], None], request_id: str | None = None):
        self.id = request_id or f"req-{next(_ids)}"
        self.prompt_ids, self.params, self.max_tokens, self.seed = prompt_ids, params, max_tokens, seed
        self.prompt_array = np.asarray(prompt_ids, np.int32)   # for prefix matching, made once
        self.stop_ids, self.detok, self.on_output = stop_ids, detok, on_output
        self.stops = list(params.stop)
        self.output_ids: list[int] = []
        self.text = ""  # decoded text so far (cut at a stop string once one matches)
        self.sent = 0   # chars of self.text already released
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.finished = False
        self.finish_reason: str | None = None
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already written to the cache
        self.cached_tokens = 0  # of those, found in the slot's cache (prefix caching), not prefilled
        self.launched = 0   # generated tokens whose step was launched (ahead of output_ids while in flight)
        # filled chunk by chunk as the prefill's results arrive; released with the first output
        self.prompt_logprobs: list[TokenLogprob | None] | None = None if params.prompt_logprobs is None else [None]
        self.cancelled = threading.Event()
        # structured outputs: the outlines-core Guide of its constraint (the engine's), and whether
        # it constrains the tokens yet (not before params.constraint_after has been generated)
        self.guide = None
        self.guide_on = params.constraint_after is None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def masked(self) -> bool:
        """Its next launched token needs a logits mask: a structured output in force, or
        min_tokens not reached yet (no EOS or stop id)."""
        return (self.guide is not None and self.guide_on) or self.launched < self.params.min_tokens

    # -- per token ---------------------------------------------------------------------------
    def accept(self, token_id: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        """Take one sampled id (and its logprobs, when asked for); returns what to release
        (finished=True ends the request)."""
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.output_ids.append(token_id)
        reason, stop_reason = None, None
        if token_id in self.stop_ids:
            reason, stop_reason = "stop", token_id
            text, matched = self._scan(self.detok.flush() if self.detok else "", final=True)
            stop_reason = matched if matched is not None else token_id
        else:
            delta = self.detok.push(token_id) if self.detok else ""
            text, matched = self._scan(delta, looking=len(self.output_ids) > self.params.min_tokens)
            if matched is not None:
                reason, stop_reason = "stop", matched
            elif len(self.output_ids) >= self.max_tokens:
                reason = "length"
                tail, matched = self._scan(self.detok.flush() if self.detok else "", final=True)
                text += tail
                if matched is not None:
                    reason, stop_reason = "stop", matched
        if reason:
            self.finished, self.finish_reason, self.finish_time = True, reason, now
        out = self._output(text, [token_id], reason, stop_reason)
        if logprob is not None:
            out.logprobs = [logprob]
        if len(self.output_ids) == 1:
            out.prompt_logprobs = self.prompt_logprobs
        return out

    def abort(self, error: str) -> RequestOutput:
        self.finished, self.finish_reason = True, "abort"
        self.finish_time = time.perf_counter()
        return self._output("", [], "abort", None, error)

    def _output(self, text, ids, reason, stop_reason, error=None) -> RequestOutput:
        return RequestOutput(self.id, text, ids, reason is not None, reason, self.prompt_len,
                             len(self.output_ids), stop_reason, error, cached_tokens=self.cached_tokens)

    # -- text and stop strings ---------------------------------------------------------------
    def _scan(self, delta: str, final: bool = False, looking: bool = True) -> tuple[str, str | None]:
        """Append decoded text; -> (text to release now, the stop string that matched or None).
        looking=False (within min_tokens): no stop string is looked for, and the text is released
        whole, so none can match in it later (vLLM's rule)."""
        self.text += delta
        if not self.stops or not looking:
            return self._release("", final=True), None
        # A match cannot start before `sent`: anything that could have begun one was held back.
        best, which = -1, None
        for s in self.stops:
            i = self.text.find(s, self.sent)
            if i >= 0 and (best < 0 or i < best):
                best, which = i, s
        if which is not None:
            self.text = self.text[:best]
            return self._release("", final=True), which
        return self._release("", final=final), None

    def _release(self, extra: str, final: bool) -> str:
        """Release text up to the end, or (not final) up to a tail that could start a stop string."""
        self.text += extra
        end = len(self.text)
        if not final and self.stops:
            longest = max(len(s) for s in self.stops) - 1
            for k in range(min(longest, end - self.sent), 0, -1):
                tail = self.text[end - k:]
                if any(s.startswith(tail) for s in self.stops):
                    end -= k
                    break
        out = self.text[self.sent:end]
        self.sent = end
        return out
