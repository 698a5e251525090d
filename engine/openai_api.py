"""The OpenAI chat-completions wire format: request checks, the error object, and the
shapes of answers and streamed chunks (engine/server.py serves them over HTTP)."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine.types import ChatMessage, Completion, Role, SamplingParams

COMPACT: dict[str, Any] = {"ensure_ascii": False, "separators": (",", ":")}
ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


class ApiError(Exception):
    """A request the API refuses, as the OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=headers)


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[ChatMessage]
    params: SamplingParams
    stream: bool
    include_usage: bool


# Request checks ----------------------------------------------------------------------
def _typed(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        value_kind = "a boolean"
    elif isinstance(value, kind):
        return value
    else:
        value_kind = f"a {type(value).__name__}"
    raise ApiError(
        400,
        f"Invalid type for '{key}': expected {what}, but got {value_kind} instead.",
        param=key,
        code="invalid_type",
    )


def _number(
    body: dict[str, Any], key: str, low: float, high: float, *, integer: bool = False
) -> Any:
    kind: type | tuple[type, ...] = int if integer else (int, float)
    value = _typed(body, key, kind, "an integer" if integer else "a decimal")
    if value is not None and not low <= value <= high:
        raise ApiError(
            400,
            f"Invalid '{key}': expected a value in [{low:g}, {high:g}], but got {value} instead.",
            param=key,
            code="invalid_value",
        )
    return value


def _unsupported(key: str, what: str) -> ApiError:
    return ApiError(400, f"'{key}': {what} is not supported by this server.", param=key)


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(
                    400, f"'{where}[{i}]': only text content parts are supported.", param=where
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ApiError(400, f"'{where}[{i}].text' must be a string.", param=where)
            parts.append(text)
        return "".join(parts)
    raise ApiError(400, f"'{where}' must be a string or a list of text parts.", param=where)


def parse_messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty array.", param="messages")
    messages = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"'{where}' must be an object.", param=where)
        role = item.get("role")
        if role not in ROLES:
            raise ApiError(
                400,
                f"'{where}.role' = {role!r}: must be one of system, developer, user, assistant "
                "(tool messages are not supported).",
                param=f"{where}.role",
            )
        if role == "assistant" and item.get("tool_calls"):
            raise _unsupported(f"{where}.tool_calls", "tool calling")
        content = item.get("content")
        if content is None and role == "assistant":
            content = ""
        messages.append(ChatMessage(ROLES[role], _content(content, f"{where}.content")))
    return messages


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or an array of them.", param="stop")
    return tuple(stop)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    n = _number(body, "n", 1, 128, integer=True)
    if n not in (None, 1):
        raise ApiError(400, "'n': only 1 choice per request is supported.", param="n")
    if _typed(body, "logprobs", bool, "a boolean"):
        raise _unsupported("logprobs", "returning log probabilities")
    for key in ("tools", "functions", "logit_bias"):
        if body.get(key):
            raise _unsupported(key, key.replace("_", " "))
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        raise _unsupported("response_format", f"response_format {response_format.get('type')!r}")
    # Accepted for compatibility, without effect: OpenAI's additive penalties are not
    # the engine's multiplicative repetition_penalty (which may be sent as an extra).
    _number(body, "frequency_penalty", -2.0, 2.0)
    _number(body, "presence_penalty", -2.0, 2.0)


def parse_chat_request(body: Any, models: list[str], defaults: SamplingParams) -> ChatRequest:
    """Check a /v1/chat/completions body; ApiError names the first bad parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "You must provide a model parameter.", param="model")
    messages = parse_messages(body.get("messages"))
    _refuse_unsupported(body)
    stream = bool(_typed(body, "stream", bool, "a boolean"))
    options = _typed(body, "stream_options", dict, "an object")
    if options is not None and not stream:
        raise ApiError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    include_usage = bool(_typed(options or {}, "include_usage", bool, "a boolean"))
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0:  # the smallest nucleus: only the likeliest token
        temperature = 0.0
    max_tokens = _number(body, "max_completion_tokens", 1, 2**31, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 2**31, integer=True)
    seed = _number(body, "seed", -(2**63), 2**64 - 1, integer=True)
    # vLLM's extra sampling parameters, which the engine has too.
    top_k = _number(body, "top_k", -1, 2**31, integer=True)
    repetition_penalty = _number(body, "repetition_penalty", 0.01, 5.0)
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens or defaults.max_new_tokens,
            temperature=defaults.temperature if temperature is None else temperature,
            top_p=defaults.top_p if not top_p else top_p,
            top_k=defaults.top_k if top_k is None else max(top_k, 0),
            repetition_penalty=repetition_penalty or defaults.repetition_penalty,
            seed=seed,
            stop=_stop(body),
        )
    except ValueError as exc:
        raise ApiError(400, f"Invalid sampling parameters: {exc}.") from None
    if model not in models:
        raise ApiError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )
    return ChatRequest(model, messages, params, stream, include_usage)


# Response shapes -----------------------------------------------------------------------
def usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def finish_reason(completion: Completion) -> str:
    return "length" if completion.finish_reason == "length" else "stop"


class ChunkWriter:
    """Writes one streamed answer as `chat.completion.chunk` server-sent events."""

    def __init__(self, response: web.StreamResponse, model: str, include_usage: bool) -> None:
        self.response = response
        self.include_usage = include_usage
        self.head = {
            "id": "chatcmpl-" + secrets.token_hex(12),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

    async def event(self, data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data, **COMPACT)
        await self.response.write(f"data: {text}\n\n".encode())

    async def chunk(self, delta: dict[str, str], reason: str | None = None) -> None:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        extra = {"usage": None} if self.include_usage else {}
        await self.event({**self.head, "choices": [choice], **extra})

    async def end(self, completion: Completion) -> None:
        await self.chunk({}, finish_reason(completion))
        if self.include_usage:
            await self.event({**self.head, "choices": [], "usage": usage(completion)})
        await self.event("[DONE]")
