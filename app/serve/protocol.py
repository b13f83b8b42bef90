"""The OpenAI API's shapes: request schemas (pydantic), checks with OpenAI-style errors, response objects.

A body that does not fit the schema (a missing field, a wrong type) is a 422; a value the server cannot honour
(out of range, over a limit, a feature it does not have) is a 400 naming the parameter, as OpenAI does.
Unknown fields are accepted and ignored, as OpenAI's API does; known fields this server cannot honour
(logprobs, echo, penalties, tools, ...) are refused when set, never silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from app.serve.config import LimitsConfig
from app.serve.generate import SamplingParams

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class APIError(Exception):
    """An error the API returns as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    ignore_eos: Optional[bool] = False  # vLLM's extension: generate max_tokens whatever comes (benchmarks)


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None


# ------------------------------------------------------------------------------------------- checks


def _refuse_unsupported(req: _Request, checks: dict[str, bool]) -> None:
    for param, bad in checks.items():
        if bad:
            raise APIError(400, f"'{param}' is not supported by this server", param=param, code="unsupported_parameter")


def sampling(req: _Request, limits: LimitsConfig, default_max_tokens: int, max_tokens: Optional[int]) -> SamplingParams:
    """The request's sampling parameters, checked against the limits (APIError 400 naming the parameter)."""
    _refuse_unsupported(req, {
        "presence_penalty": bool(req.presence_penalty), "frequency_penalty": bool(req.frequency_penalty),
        "logit_bias": bool(req.logit_bias)})
    mt = default_max_tokens if max_tokens is None else max_tokens
    if not 1 <= mt <= limits.max_tokens:
        raise APIError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {mt}", param="max_tokens")
    t = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= t <= 2.0:  # NaN fails this too; below generate.MIN_TEMPERATURE the row is greedy
        raise APIError(400, f"temperature must be between 0 and 2, got {t}", param="temperature")
    p = 1.0 if req.top_p is None else req.top_p
    if not 0.0 <= p <= 1.0:
        raise APIError(400, f"top_p must be between 0 and 1, got {p}", param="top_p")
    if p == 0.0:  # OpenAI takes 0: a nucleus of the one most likely token, which is greedy decoding
        t, p = 0.0, 1.0
    n = 1 if req.n is None else req.n
    if not 1 <= n <= limits.max_n:
        raise APIError(400, f"n must be between 1 and {limits.max_n}, got {n}", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise APIError(400, f"a stop string is longer than this server's limit of {limits.max_stop_chars} characters",
                       param="stop")
    if req.seed is not None and not INT64_MIN <= req.seed <= INT64_MAX:
        raise APIError(400, f"seed must be a 64-bit signed integer ({INT64_MIN}..{INT64_MAX})", param="seed")
    return SamplingParams(max_tokens=mt, temperature=t, top_p=p, stop=tuple(stop), seed=req.seed,
                          ignore_eos=bool(req.ignore_eos))


def fit_context(prompt_tokens: int, max_tokens: int, *, explicit: bool, context: Optional[int],
                param: str = "prompt") -> int:
    """``max_tokens`` for a request whose longest prompt has ``prompt_tokens`` tokens, in a model of ``context``
    positions (None: no limit, a pure SSM). Each sequence (prompt + completion) must fit: an explicit
    ``max_tokens`` that does not is a 400, as vLLM and OpenAI answer; a default one (the request left it out) is
    cut to what the context has left. A prompt that leaves no room for one token is a 400 either way."""
    if context is None:
        return max_tokens
    if prompt_tokens >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, your request has "
                       f"{prompt_tokens} prompt tokens, which leaves no room for a completion. Please reduce the "
                       "length of the prompt.", param=param, code="context_length_exceeded")
    if prompt_tokens + max_tokens <= context:
        return max_tokens
    if not explicit:
        return context - prompt_tokens
    raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                   f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
                   "completion). Please reduce the length of the prompt or max_tokens.", param="max_tokens",
                   code="context_length_exceeded")


def choices_per_prompt(req: _Request) -> int:
    return 1 if req.n is None else req.n


def check_completion(req: CompletionRequest) -> None:
    _refuse_unsupported(req, {"echo": bool(req.echo), "logprobs": req.logprobs is not None,
                              "suffix": req.suffix is not None,
                              "best_of": req.best_of is not None and req.best_of != choices_per_prompt(req)})


def check_chat(req: ChatCompletionRequest) -> None:
    fmt = (req.response_format or {}).get("type", "text")
    _refuse_unsupported(req, {"logprobs": bool(req.logprobs) or req.top_logprobs is not None,
                              "tools": bool(req.tools), "response_format": fmt != "text"})
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ; give one", param="max_completion_tokens")


def completion_prompts(req: CompletionRequest) -> list[Union[str, list[int]]]:
    """The prompts of a completion request: strings, or token-id lists."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template takes them (text parts joined)."""
    out = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(x.text for x in m.content)
        out.append({"role": m.role, "content": content or ""})
    return out


# ------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": use}


def completion_choice(index: int, text: str, finish: Optional[str]) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def chat_completion(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": use}


def chat_choice(index: int, text: str, finish: Optional[str]) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish: Optional[str],
                     include_usage: bool = False) -> dict:
    """One streamed piece of a completion; with ``include_usage`` it says ``"usage": null`` (the last chunk,
    ``usage_chunk``, carries the usage), as OpenAI's stream does."""
    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "choices": [completion_choice(index, text, finish)]}
    return {**out, "usage": None} if include_usage else out


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish: Optional[str],
               include_usage: bool = False) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return {**out, "usage": None} if include_usage else out


def model_card(name: str, created: int, context: Optional[int], max_prompt_tokens: int) -> dict:
    """One entry of /v1/models (and /v1/models/{id}): the served name only, never where the weights are;
    ``max_model_len`` as vLLM gives it (null: no limit of the model's own)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "distillery", "root": name,
            "parent": None, "max_model_len": context, "max_prompt_tokens": max_prompt_tokens}


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def now() -> int:
    return int(time.time())
