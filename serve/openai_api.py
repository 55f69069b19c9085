"""The OpenAI-compatible HTTP API over an Engine (FastAPI).

    POST /v1/completions         text or token-id prompts; stream: true sends server-sent events
    POST /v1/chat/completions    messages through the checkpoint's chat template
    GET  /v1/models              the served model
    GET  /health                 200 while the engine runs, 503 once it stops
    GET  /metrics                Prometheus text

A streamed response ends with `data: [DONE]`; with stream_options.include_usage a last chunk
carries usage and no choices. A client that goes away (mid-stream or while waiting for a
non-streamed answer) has its requests cancelled, which frees their slots before the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat_parsers import MessageParser, parse_message, prompt_opens_thinking
from .engine import Engine, EngineClosed, QueueFull
from .metrics import Metrics
from .protocol import ApiError, GenerationRequest, bad, chat_request, completion_request, parse_json, usage
from .request import RequestOutput, TokenLogprob
from .structured import StructuredOutputError
from .tokenizer import TemplateError

log = logging.getLogger("serve.http")


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class Fanout:
    """The engine requests behind one HTTP call (prompts x n), their outputs merged in one queue."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests = []
        self.open = 0

    def submit(self, index: int, prompt_ids: list[int], params):
        loop = asyncio.get_running_loop()

        def put(out: RequestOutput, index=index):
            loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

        self.requests.append(self.engine.submit(prompt_ids, params, put))
        self.open += 1

    async def outputs(self):
        """(choice index, RequestOutput) until every request has finished."""
        while self.open:
            index, out = await self.queue.get()
            if out.finished:
                self.open -= 1
            yield index, out

    def cancel(self):
        for r in self.requests:
            if not r.finished:
                self.engine.cancel(r)


class CancellableStream(StreamingResponse):
    """SSE response that cancels its engine requests when the client disconnects or the send fails.

    It watches `receive` for http.disconnect itself, so a client that leaves while its request is
    still queued (nothing being sent) is noticed at once too.
    """

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        async def watch():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.on_close()
                    return

        watcher = asyncio.create_task(watch())
        try:
            await self.stream_response(send)
        except OSError:  # the client is gone; its requests are cancelled below
            pass
        finally:
            watcher.cancel()
            self.on_close()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, served_model_name: str, api_key: str | None = None,
               reasoning_parser: str | None = None, tool_call_parser: str | None = None) -> FastAPI:
    """The API over `engine`. reasoning_parser / tool_call_parser: chat_parsers' names (None: off)."""
    app = FastAPI(title="qwen3-jax", description="OpenAI-compatible server for Qwen3-MoE in JAX")
    metrics = Metrics(engine, served_model_name)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       "invalid_request_error", None, kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return error_response(bad(str(exc)))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(ApiError(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error"))

    def check_auth(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise ApiError(401, "missing API key: send it as the header 'Authorization: Bearer <key>'",
                           "invalid_request_error", None, "invalid_api_key")
        if not hmac.compare_digest(header[7:].strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key provided", "invalid_request_error", None, "invalid_api_key")

    def check_model(body: dict):
        name = body.get("model")
        if name is not None and name != served_model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{served_model_name}'",
                           "invalid_request_error", "model", "model_not_found")

    def submit_all(g: GenerationRequest, prompt_ids: list[list[int]]) -> Fanout:
        """Check every prompt's length first, then submit prompts x n; a refusal cancels what was sent."""
        for ids in prompt_ids:
            try:
                engine.check_lengths(len(ids), g.params.max_tokens)
            except ValueError as e:
                raise bad(str(e), param="max_tokens" if ids else "prompt", code="context_length_exceeded")
        fan = Fanout(engine)
        try:
            for p, ids in enumerate(prompt_ids):
                for j in range(g.n):
                    params = g.params
                    if g.n > 1 and params.seed is not None:  # n choices from one seed must still differ
                        params = dataclasses.replace(params, seed=params.seed + j)
                    fan.submit(p * g.n + j, ids, params)
        except QueueFull as e:
            fan.cancel()
            raise ApiError(503, str(e), "server_error", None, "queue_full")
        except EngineClosed as e:
            fan.cancel()
            raise ApiError(503, str(e), "server_error", None, "shutting_down")
        except StructuredOutputError as e:
            fan.cancel()
            raise bad(str(e), param=g.constraint_param)
        except ValueError as e:
            fan.cancel()
            raise bad(str(e))
        return fan

    async def compiled(g: GenerationRequest):
        """Compile the request's structured-output constraint off the event loop (seconds for a
        new schema over a 150k vocabulary; cached after), so submit() finds it ready."""
        if g.params.constraint is not None:
            try:
                await asyncio.to_thread(engine.prepare_constraint, g.params)
            except StructuredOutputError as e:
                raise bad(str(e), param=g.constraint_param)

    async def collect(request: Request, fan: Fanout) -> dict[int, dict]:
        """Wait for every choice, cancelling everything if the client disconnects meanwhile."""
        results: dict[int, dict] = {}

        async def run():
            async for i, out in fan.outputs():
                r = results.setdefault(i, {"text": "", "ids": [], "logprobs": [], "prompt_logprobs": None})
                if out.prompt_logprobs is not None:
                    r["prompt_logprobs"] = out.prompt_logprobs
                r["text"] += out.text
                r["ids"] += out.token_ids
                r["logprobs"] += out.logprobs or []
                if out.finished:
                    r.update(finish_reason=out.finish_reason, stop_reason=out.stop_reason, error=out.error,
                             prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                             cached_tokens=out.cached_tokens)

        task = asyncio.create_task(run())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    fan.cancel()
                    await task
                    return {}
            task.result()
        finally:
            fan.cancel()
        errors = [r["error"] for r in results.values() if r.get("finish_reason") == "abort"]
        if errors:
            raise ApiError(503, f"the request was aborted: {errors[0]}", "server_error", None, "aborted")
        return results

    def count(endpoint: str, status: int):
        metrics.requests.labels(endpoint, str(status)).inc()

    # -- endpoints ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine.accepting:
            return JSONResponse({"status": "unavailable", "reason": engine._closed_message()}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": int(app.state.started), "owned_by": "qwen3-jax",
            "root": engine.path or served_model_name, "max_model_len": engine.context_length}]}

    app.state.started = time.time()

    async def checked_body(request: Request) -> dict:
        """API key, then JSON, then the model name: the checks every generation route starts with."""
        check_auth(request)
        body = parse_json(await request.body())
        check_model(body)
        return body

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            g = completion_request(await checked_body(request))
            prompt_ids = [_encode(engine, p) for p in g.prompts]
            await compiled(g)
            fan = submit_all(g, prompt_ids)
        except ApiError as e:
            count("completions", e.status)
            raise
        count("completions", 200)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = {i: (_prompt_text(engine, g.prompts[i // g.n]) if g.echo else "") for i in range(len(prompt_ids) * g.n)}
        first_ids = {i: prompt_ids[i // g.n][0] for i in echo}
        if g.stream:
            return CancellableStream(_completion_events(fan, g, rid, created, served_model_name, echo,
                                                        engine.tokenizer, first_ids), fan.cancel)
        results = await collect(request, fan)
        choices = [{"index": i, "text": echo[i] + r["text"],
                    "logprobs": completion_logprobs(
                        engine.tokenizer, _echoed(first_ids[i], r["prompt_logprobs"]) + r["logprobs"])[0]
                    if g.logprobs else None,
                    "finish_reason": r["finish_reason"], "stop_reason": r["stop_reason"]}
                   for i, r in sorted(results.items())]
        return {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                "choices": choices, "usage": _usage(results, g.n)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            g, messages, kwargs = chat_request(await checked_body(request))
            try:
                ids = engine.chat_prompt_ids(messages, **kwargs)
            except (TemplateError, ValueError) as e:
                raise bad(str(e), param="messages")
            await compiled(g)
            tail = engine.tokenizer.decode(ids[-32:], skip_special_tokens=False)   # the generation prompt
            if reasoning_parser is not None and g.params.constraint is not None:
                g.params = _after_thinking(engine, g.params, tail)
            fan = submit_all(g, [ids])
        except ApiError as e:
            count("chat_completions", e.status)
            raise
        count("chat_completions", 200)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        opened = reasoning_parser is not None and prompt_opens_thinking(tail)
        # a forced tool_choice's reply is calls (after any thinking), in Qwen3's (hermes) format
        tools = (tool_call_parser or "hermes") if g.forced_tools else (tool_call_parser if g.tools else None)
        parsers = (reasoning_parser, tools, opened, g.max_calls)
        if g.stream:
            return CancellableStream(_chat_events(fan, g, rid, created, served_model_name, engine.tokenizer, parsers),
                                     fan.cancel)
        results = await collect(request, fan)
        choices = []
        for i, r in sorted(results.items()):
            msg = parse_message(r["text"], *parsers)
            finish = "tool_calls" if msg.get("tool_calls") and r["finish_reason"] == "stop" else r["finish_reason"]
            choices.append({"index": i, "message": {"role": "assistant", **msg},
                            "logprobs": chat_logprobs(engine.tokenizer, r["logprobs"]) if g.logprobs else None,
                            "finish_reason": finish, "stop_reason": r["stop_reason"]})
        return {"id": rid, "object": "chat.completion", "created": created, "model": served_model_name,
                "choices": choices, "usage": _usage(results, g.n)}

    return app


def _after_thinking(engine: Engine, params, prompt_tail: str):
    """With a reasoning parser, a constraint (response_format, a forced tool_choice) starts after
    the model's </think>, as vLLM's reasoning-aware structured outputs do: the thinking stays free.
    Not where the prompt already closed it (enable_thinking false), nor without a </think> token."""
    think_end = engine.tokenizer.tok.token_to_id("</think>")
    if think_end is None or "</think>" in prompt_tail.split("<|im_start|>assistant")[-1]:
        return params
    return dataclasses.replace(params, constraint_after=think_end)


def _encode(engine: Engine, prompt) -> list[int]:
    try:
        return engine.prompt_ids(prompt)
    except ValueError as e:
        raise bad(str(e), param="prompt")


def _prompt_text(engine: Engine, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return engine.tokenizer.decode(prompt, skip_special_tokens=False) if engine.tokenizer else ""


def _usage(results: dict[int, dict], n: int) -> dict:
    """Prompt tokens (and those of them the prefix cache held) count once per prompt, from its
    first choice; completion tokens for every choice."""
    first = [r for i, r in results.items() if i % n == 0]
    return usage(sum(r.get("prompt_tokens", 0) for r in first),
                 sum(r.get("completion_tokens", 0) for r in results.values()),
                 sum(r.get("cached_tokens", 0) for r in first))


def _error_event(out: RequestOutput) -> str:
    return sse(ApiError(503, f"the request was aborted: {out.error}", "server_error", None, "aborted").body())


def _echoed(first_id: int, prompt_logprobs) -> list:
    """An echoed prompt's logprobs entries: its first token with none (nothing precedes it), then
    the engine's; [] when the prompt is not echoed with logprobs."""
    if prompt_logprobs is None:
        return []
    return [TokenLogprob(first_id, None, None), *prompt_logprobs[1:]]


async def _completion_events(fan: Fanout, g: GenerationRequest, rid, created, model, echo, tok, first_ids):
    base = {"id": rid, "object": "text_completion", "created": created, "model": model}
    totals: dict[int, tuple[int, int, int]] = {}
    offsets: dict[int, int] = {}  # each choice's text_offset so far
    extra = {"usage": None} if g.include_usage else {}
    # With logprobs the echo waits for the first output, which carries the prompt's logprobs.
    pending = {i: text for i, text in echo.items() if text}
    try:
        if not g.logprobs:
            for i, text in pending.items():
                yield sse({**base, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}],
                           **extra})
            pending = {}
        async for i, out in fan.outputs():
            if out.finish_reason == "abort":
                yield _error_event(out)
                break
            echoed = pending.pop(i, "")
            if out.text or out.finished or out.logprobs or echoed:
                lp = None
                if g.logprobs:
                    lp, offsets[i] = completion_logprobs(
                        tok, _echoed(first_ids[i], out.prompt_logprobs) + (out.logprobs or []), offsets.get(i, 0))
                choice = {"index": i, "text": echoed + out.text, "logprobs": lp, "finish_reason": out.finish_reason}
                if out.finished:
                    choice["stop_reason"] = out.stop_reason
                    totals[i] = (out.prompt_tokens, out.completion_tokens, out.cached_tokens)
                yield sse({**base, "choices": [choice], **extra})
        for line in _stream_end(base, g, totals):
            yield line
    finally:
        fan.cancel()


def _stream_end(base, g: GenerationRequest, totals: dict[int, tuple[int, int, int]]) -> list[str]:
    """The last SSE lines of a stream: the usage chunk (when asked for), then [DONE]."""
    lines = []
    if g.include_usage:
        results = {i: {"prompt_tokens": p, "completion_tokens": c, "cached_tokens": k}
                   for i, (p, c, k) in totals.items()}
        lines.append(sse({**base, "choices": [], "usage": _usage(results, g.n)}))
    return lines + ["data: [DONE]\n\n"]


async def _chat_events(fan: Fanout, g: GenerationRequest, rid, created, model, tok, parsers):
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    extra = {"usage": None} if g.include_usage else {}
    totals: dict[int, tuple[int, int, int]] = {}
    split = {i: MessageParser(*parsers) for i in range(g.n)}   # each choice's reasoning / tool calls

    def chunk(i, delta, finish=None, stop_reason=None, logprobs=None):
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish:
            choice["stop_reason"] = stop_reason
        return sse({**base, "choices": [choice], **extra})

    try:
        for i in range(g.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, out in fan.outputs():
            if out.finish_reason == "abort":
                yield _error_event(out)
                break
            reasoning, content, calls = split[i].push(out.text, final=out.finished)
            delta = {"reasoning_content": reasoning} if reasoning else {}
            if content or (g.logprobs and out.logprobs):
                delta["content"] = content
            if calls:
                done = len(split[i].calls) - len(calls)
                delta["tool_calls"] = [c.to_json(done + k) for k, c in enumerate(calls)]
            if delta:
                yield chunk(i, delta, logprobs=chat_logprobs(tok, out.logprobs) if g.logprobs else None)
            if out.finished:
                totals[i] = (out.prompt_tokens, out.completion_tokens, out.cached_tokens)
                finish = "tool_calls" if split[i].calls and out.finish_reason == "stop" else out.finish_reason
                yield chunk(i, {}, finish, out.stop_reason)
        for line in _stream_end(base, g, totals):
            yield line
    finally:
        fan.cancel()


# -- logprobs in OpenAI's two shapes -----------------------------------------------------------
def _token_text(tok, token_id: int) -> str:
    """One token as text (a piece of a multi-byte character decodes to U+FFFD, as in vLLM); with
    no tokenizer, vLLM's "token_id:N"."""
    return tok.decode([token_id], skip_special_tokens=False) if tok is not None else f"token_id:{token_id}"


def completion_logprobs(tok, entries: list[TokenLogprob], offset: int = 0) -> tuple[dict, int]:
    """/v1/completions' logprobs object for these tokens, text offsets counted from `offset`.
    top_logprobs holds the asked-for alternatives and, as in vLLM, the sampled token too (a dict
    by text: two tokens of one text are one entry, the likelier). An entry with logprob None (an
    echoed prompt's first token) gets null for both.
    -> (object, the offset after them)."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(_token_text(tok, e.token_id))
        offset += len(tokens[-1])
    top = []
    for e in entries:   # tokens of one text (byte pieces) share a key: the likelier one keeps it
        if e.logprob is None:   # an echoed prompt's first token: null, as OpenAI and vLLM give it
            top.append(None)
            continue
        top.append({})
        for t, x in [*e.top, (e.token_id, e.logprob)]:
            top[-1].setdefault(_token_text(tok, t), x)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
            "text_offset": offsets}, offset


def chat_logprobs(tok, entries: list[TokenLogprob]) -> dict:
    """/v1/chat/completions' logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(token_id, logprob):
        text = _token_text(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, x) for t, x in e.top]}
                        for e in entries]}
