"""OpenAI request bodies -> validated engine inputs, and OpenAI's error envelope.

Every refusal is an ApiError rendered as {"error": {"message", "type", "param", "code"}} with
the HTTP status OpenAI uses: 400 for a bad body, 401 bad key, 404 unknown model, 503 busy.
Fields this server does not implement are refused by name rather than silently ignored when
ignoring them would change the answer (best_of, suffix, UNSUPPORTED_SAMPLING: logit_bias, min_p,
bad_words, ...), unless they carry the value that changes nothing.
`response_format` json_object / json_schema (chat and completions), SGLang's `regex` and
`json_schema`, vLLM's `guided_json` / `guided_regex` / `guided_choice`, and a forced `tool_choice`
("required" or a named function) constrain the output (serve/structured.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from .sampling import LOGPROBS_MAX, SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e}); send a JSON object", code="invalid_json")
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


# -- field types -----------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int_list(v) -> bool:
    return isinstance(v, list) and all(_is_int(i) for i in v)


KINDS = {
    "string": lambda v: isinstance(v, str),
    "integer": _is_int,
    "number": _is_num,
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string or array of strings": lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
    "array of integers": _is_int_list,
    "string or object": lambda v: isinstance(v, (str, dict)),
}

COMMON_FIELDS = {
    "model": "string", "max_tokens": "integer", "temperature": "number", "top_p": "number", "top_k": "integer",
    "n": "integer", "stream": "boolean", "stream_options": "object", "stop": "string or array of strings",
    "seed": "integer", "stop_token_ids": "array of integers", "ignore_eos": "boolean", "user": "string",
    "presence_penalty": "number", "frequency_penalty": "number", "repetition_penalty": "number",
    "skip_special_tokens": "boolean", "response_format": "object", "regex": "string", "json_schema": "string or object",
    "guided_json": "string or object", "guided_regex": "string", "guided_choice": "array",
    "min_tokens": "integer",
    # refused unless inert (UNSUPPORTED_SAMPLING)
    "logit_bias": "object", "min_p": "number", "bad_words": "array",
    "use_beam_search": "boolean", "include_stop_str_in_output": "boolean", "no_stop_trim": "boolean",
}
# Sampling fields of OpenAI, vLLM or SGLang this server does not implement: -> (their values that
# change nothing, which some clients send explicitly; what to use instead). Any other value is a
# 400 naming the field: ignoring it would change the answer.
UNSUPPORTED_SAMPLING = {
    "logit_bias": (({},), "rule tokens out with a structured output (regex, guided_choice) or stop at them "
                          "with stop_token_ids"),
    "min_p": ((0, 0.0), "use top_p or top_k (Qwen3's model card recommends min_p 0)"),
    "bad_words": (([],), "rule words out with a structured output (regex)"),
    "use_beam_search": ((False,), "sample n choices instead"),
    "include_stop_str_in_output": ((False,), "the stop string is always left out (OpenAI's behaviour)"),
    "no_stop_trim": ((False,), "the stop string is always left out (OpenAI's behaviour)"),
}
COMPLETION_FIELDS = {**COMMON_FIELDS, "echo": "boolean", "logprobs": "integer", "best_of": "integer",
                     "suffix": "string"}
CHAT_FIELDS = {**COMMON_FIELDS, "messages": "array", "max_completion_tokens": "integer", "tools": "array",
               "chat_template_kwargs": "object", "logprobs": "boolean", "top_logprobs": "integer",
               "reasoning_effort": "string", "parallel_tool_calls": "boolean",
               "tool_choice": "string or object"}


def check_types(body: dict, fields: dict[str, str]):
    """A known field with a value of the wrong JSON type is a 400 that names the field (null = unset)."""
    for name, kind in fields.items():
        v = body.get(name)
        if v is not None and not KINDS[kind](v):
            raise bad(f"'{name}' must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {json.dumps(v)[:80]} "
                      f"({_json_type(v)})", param=name, code="invalid_type")


def _json_type(v) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


@dataclasses.dataclass
class GenerationRequest:
    """What the HTTP layer hands the engine for one endpoint call."""

    prompts: list  # each a string or a list of token ids
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo: bool = False
    tools: bool = False   # chat: the request offers tools (tool_choice "auto"), so calls are parsed
    forced_tools: bool = False   # chat: tool_choice "required" or a named function: the reply is calls
    constraint_param: str | None = None   # the field that constrains the output (named in its errors)
    max_calls: int | None = None   # chat: parallel_tool_calls false -> 1 (later calls are dropped)

    @property
    def logprobs(self) -> bool:
        return self.params.logprobs is not None


def _logprobs(n, param: str) -> int | None:
    if n is not None and not 0 <= n <= LOGPROBS_MAX:
        raise bad(f"'{param}' must be between 0 and {LOGPROBS_MAX} (alternatives per token), got {n}", param=param)
    return n


# The other servers' names for a constraint, beside OpenAI's response_format: SGLang's regex and
# json_schema, vLLM's guided_json / guided_regex / guided_choice.
CONSTRAINT_FIELDS = ("regex", "json_schema", "guided_json", "guided_regex", "guided_choice")


def _constraint(body: dict) -> dict:
    """response_format (OpenAI's: text, json_object, json_schema) or one of CONSTRAINT_FIELDS ->
    SamplingParams' json_schema / regex fields; a malformed one is a 400 naming its part."""
    fmt = body.get("response_format") or {}
    kind = fmt.get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise bad(f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'",
                  param="response_format.type", code="unsupported")
    given = [f for f in CONSTRAINT_FIELDS if body.get(f) is not None] + (["response_format"] if kind != "text" else [])
    if len(given) > 1:
        raise bad(f"{' and '.join(given)} each constrain the output; give one of them", param=given[-1])
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad("response_format json_schema needs 'json_schema': {'name': ..., 'schema': {a JSON schema "
                      "object}}", param="response_format.json_schema.schema")
        return {"json_schema": schema}
    if not given:
        return {}
    field, value = given[0], body[given[0]]
    if field in ("json_schema", "guided_json"):
        return {"json_schema": value}
    if field == "guided_choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise bad("guided_choice must be a non-empty array of non-empty strings", param="guided_choice")
        return {"regex": "(" + "|".join(re.escape(c) for c in value) + ")"}
    return {"regex": value}


def _constraint_param(body: dict) -> str | None:
    """The body's field that constrains the output, if any (after _constraint accepted it)."""
    if (body.get("response_format") or {}).get("type", "text") != "text":
        return "response_format"
    return next((f for f in CONSTRAINT_FIELDS if body.get(f) is not None), None)


def _sampling(body: dict, max_tokens, logprobs: int | None = None) -> SamplingParams:
    """The body's sampling fields -> SamplingParams, checked by its own validate(): a value out of
    range is a 400 naming the field (each of validate's messages starts with its name)."""
    for field, (inert, instead) in UNSUPPORTED_SAMPLING.items():
        if body.get(field) is not None and body[field] not in inert:
            raise bad(f"'{field}' is not supported by this server (got {json.dumps(body[field])[:60]}); {instead}",
                      param=field, code="unsupported")
    penalties = {k: float(body[k]) for k in ("presence_penalty", "frequency_penalty", "repetition_penalty")
                 if body.get(k) is not None}
    stop = body.get("stop") or []
    params = SamplingParams(max_tokens=max_tokens, temperature=body.get("temperature"), top_p=body.get("top_p"),
                            top_k=body.get("top_k"), seed=body.get("seed"),
                            stop=[stop] if isinstance(stop, str) else list(stop),
                            stop_token_ids=list(body.get("stop_token_ids") or []),
                            ignore_eos=bool(body.get("ignore_eos", False)),
                            skip_special_tokens=body.get("skip_special_tokens", True), logprobs=logprobs,
                            min_tokens=body.get("min_tokens") or 0, **penalties,
                            **_constraint(body))
    try:
        return params.validate()
    except ValueError as e:
        param = str(e).split()[0]
        if param in ("json_schema", "regex"):   # SamplingParams' names for the field the body used
            param = _constraint_param(body) or param
        raise bad(str(e), param=param) from None


def _n_and_stream(body: dict) -> tuple[int, bool, bool]:
    n = body.get("n") or 1
    if not 1 <= n <= 16:
        raise bad(f"n must be between 1 and 16, got {n}", param="n")
    stream = bool(body.get("stream", False))
    opts = body.get("stream_options") or {}
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("'stream_options.include_usage' must be a boolean", param="stream_options.include_usage",
                  code="invalid_type")
    if opts and not stream:
        raise bad("stream_options is only allowed with stream: true", param="stream_options")
    return n, stream, include


def completion_request(body: dict) -> GenerationRequest:
    check_types(body, COMPLETION_FIELDS)
    if "prompt" not in body or body["prompt"] is None:
        raise bad("'prompt' is required: a string, an array of strings, or token ids", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str) or _is_int_list(prompt) and prompt:
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or (_is_int_list(p) and p) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad(f"'prompt' must be a string, an array of strings, an array of token ids or an array of "
                  f"token-id arrays (non-empty), got {json.dumps(prompt)[:80]}", param="prompt", code="invalid_type")
    logprobs = _logprobs(body.get("logprobs"), "logprobs")
    if body.get("suffix"):
        raise bad("'suffix' is not supported by this server", param="suffix", code="unsupported")
    if body.get("best_of") not in (None, 1):
        raise bad("'best_of' other than 1 is not supported; use n", param="best_of", code="unsupported")
    n, stream, include = _n_and_stream(body)
    max_tokens = body.get("max_tokens", 16)  # OpenAI's default for completions
    params = _sampling(body, max_tokens, logprobs)
    echo = bool(body.get("echo"))
    if echo and logprobs is not None:   # the echoed prompt's tokens come with their logprobs too
        params = dataclasses.replace(params, prompt_logprobs=logprobs)
    return GenerationRequest(prompts, params, n, stream, include, echo, constraint_param=_constraint_param(body))


def chat_request(body: dict) -> tuple[GenerationRequest, list[dict], dict]:
    """-> (request with prompts unset, messages, chat template kwargs incl. tools)."""
    check_types(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not messages:
        raise bad("'messages' is required: a non-empty array of {role, content} objects", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]",
                      code="invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"messages[{i}].role must be one of system, user, assistant, tool; got {json.dumps(role)}",
                      param=f"messages[{i}].role")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise bad(f"messages[{i}].content must be a string or an array of content parts, got {_json_type(c)}",
                      param=f"messages[{i}].content", code="invalid_type")
    msgs = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
    top = _logprobs(body.get("top_logprobs"), "top_logprobs")
    if top is not None and not body.get("logprobs"):
        raise bad("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    logprobs = (top or 0) if body.get("logprobs") else None
    n, stream, include = _n_and_stream(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    kwargs = dict(body.get("chat_template_kwargs") or {})
    choice = body.get("tool_choice")
    offered = bool(body.get("tools")) and choice != "none"   # "none": the tools are neither shown nor parsed
    if offered:
        kwargs["tools"] = body["tools"]
    params = _sampling(body, max_tokens, logprobs)
    forced = _forced_tool_call(body, choice)
    if forced is not None:
        if params.constraint is not None:
            raise bad("a forced tool_choice and response_format / regex both constrain the reply; give one",
                      param="tool_choice")
        params = dataclasses.replace(params, regex=forced)
    req = GenerationRequest([], params, n, stream, include, tools=offered, forced_tools=forced is not None,
                            constraint_param="tool_choice" if forced is not None else _constraint_param(body),
                            max_calls=1 if body.get("parallel_tool_calls") is False else None)
    return req, msgs, kwargs


def _forced_tool_call(body: dict, choice) -> str | None:
    """tool_choice "required" or {"type": "function", "function": {"name": ...}} -> the regex the
    reply must match (structured.tool_call_regex), else None ("auto", "none", unset)."""
    from .structured import StructuredOutputError, tool_call_regex

    if choice in (None, "auto", "none"):
        return None
    tools = body.get("tools") or []
    if choice == "required":
        name = None
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str) or not any((t.get("function") or {}).get("name") == name for t in tools):
            raise bad(f"tool_choice names the function {json.dumps(name)}, which is not among 'tools'",
                      param="tool_choice.function.name")
    else:
        raise bad(f"tool_choice must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", "
                  f"\"function\": {{\"name\": ...}}}}, got {json.dumps(choice)[:80]}", param="tool_choice")
    if not tools:
        raise bad("tool_choice forces a tool call, but the request offers no 'tools'", param="tool_choice")
    try:
        return tool_call_regex(tools, name, parallel=body.get("parallel_tool_calls") is not False)
    except StructuredOutputError as e:
        raise bad(str(e), param="tools") from None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens: prompt tokens found in the
    prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
