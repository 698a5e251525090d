"""The client for a remote OpenAI-compatible server, as an Engine: `python -m engine
serve` on a GPU box, vLLM (`--enable-lora`), llama.cpp's server or Ollama.

It behaves like LocalEngine so the bot cannot tell them apart except by speed: the same
`TextStream` (deltas merged for a slow consumer, the stall timeout, cancellation that
closes the HTTP request so the server aborts the generation), `EngineBusy` at once when
`max_queue` requests are already in flight here, and `EngineBusy` from the stream's first
step when the server answers 429 or 503 (a remote server only says so once the response
starts). Token counts are estimated locally (`count_tokens` must be synchronous) and
calibrated against the `usage` the server reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from engine.config import ConfigError, EngineConfig, ModelConfig
from engine.stream import TextStream
from engine.types import (
    ChatMessage,
    Completion,
    EngineBusy,
    EngineError,
    EngineStalled,
    PromptTooLong,
    SamplingParams,
    UnknownModel,
)

log = logging.getLogger(__name__)

FALLBACK_CONTEXT = 2048  # when neither [model] context_window nor the server says
CONTEXT_KEYS = ("max_model_len", "context_window", "context_length")
OPENAI_MAX_TEMPERATURE = 2.0


def estimate_tokens(messages: Sequence[ChatMessage]) -> int:
    """A deliberately high guess: a token per 3 UTF-8 bytes (English runs ~4 characters a
    token; a CJK character is 3 bytes and 1-2 tokens) plus the template's markers."""
    return 3 + sum(4 + math.ceil(len(m.content.encode("utf-8")) / 3) for m in messages)


@dataclass
class _Reply:
    """What one streamed answer has told us so far."""

    model: str
    started: float
    text: str = ""
    chunks: int = 0
    first_at: float = 0.0
    finish: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False


class OpenAIEngine:
    """An Engine whose answers come from `base_url` (the API root, e.g.
    "http://gpu-box:8000/v1"). Create it with `await OpenAIEngine.open(...)`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        model: str,
        models: list[str],
        context_window: int,
        max_queue: int = 32,
        stall_timeout_s: float = 120.0,
        request_timeout_s: float = 60.0,
    ) -> None:
        self._session = session
        self.base_url = base_url
        self.adapter_name = model
        self.context_window = context_window
        self._models = models
        self._max_queue = max_queue
        self._stall_timeout_s = stall_timeout_s
        self._request_timeout_s = request_timeout_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._ratios: deque[float] = deque(maxlen=32)
        self._closed = False

    @classmethod
    async def open(cls, model_cfg: ModelConfig, engine_cfg: EngineConfig) -> OpenAIEngine:
        """Connect to the configured server (waiting up to request_timeout_s for it to
        come up), check the model and learn its context window."""
        headers = {"User-Agent": "lorabot"}
        if engine_cfg.api_key_env:
            key = os.environ.get(engine_cfg.api_key_env, "").strip()
            if not key:
                raise ConfigError(
                    f"[engine] api_key_env = {engine_cfg.api_key_env!r} but that environment "
                    "variable is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=engine_cfg.request_timeout_s)
        session = aiohttp.ClientSession(headers=headers, timeout=timeout)
        try:
            base_url, cards = await _discover(session, engine_cfg)
        except BaseException:
            await session.close()
            raise
        names = [str(card.get("id")) for card in cards]
        model = engine_cfg.remote_model or (names[0] if names else "")
        if not model or (names and model not in names):
            await session.close()
            raise ConfigError(
                f"[engine] remote_model = {engine_cfg.remote_model!r}: the server at "
                f"{base_url} serves {names or 'no models'}"
            )
        card = next((c for c in cards if c.get("id") == model), {})
        served = next((card[k] for k in CONTEXT_KEYS if isinstance(card.get(k), int)), 0)
        context_window = model_cfg.context_window or served
        if not context_window:
            log.warning(
                "the server does not say %s's context window; assuming %d tokens "
                "(set [model] context_window)",
                model,
                FALLBACK_CONTEXT,
            )
            context_window = FALLBACK_CONTEXT
        log.info("answers come from %s at %s (%d tokens)", model, base_url, context_window)
        return cls(
            session,
            base_url,
            model=model,
            models=names or [model],
            context_window=context_window,
            max_queue=engine_cfg.max_queue,
            stall_timeout_s=engine_cfg.stall_timeout_s,
            request_timeout_s=engine_cfg.request_timeout_s,
        )

    # The Engine protocol ---------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests of this process in flight at the server."""
        return len(self._tasks)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """An estimate, scaled by the largest ratio of the server's reported prompt
        tokens to the estimate over recent requests (never fewer than the raw guess
        until the server has told us otherwise)."""
        ratio = max(self._ratios) if self._ratios else 1.0
        return math.ceil(estimate_tokens(messages) * ratio)

    def models(self) -> list[str]:
        return list(self._models)

    def stream(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        adapter: str | None = None,
    ) -> TextStream:
        if self._closed:
            raise EngineError("the engine is shutting down")
        if adapter is not None and adapter not in self._models:
            raise UnknownModel(f"model {adapter!r} is not served here; try {self._models}")
        if len(self._tasks) >= self._max_queue:
            raise EngineBusy(f"{self._max_queue} requests are already waiting for the server")
        loop = asyncio.get_running_loop()
        stream = TextStream(loop, self._stall_timeout_s)
        task = loop.create_task(self._request(stream, list(messages), params, adapter))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def abort() -> None:  # the consumer left: drop the connection, the server stops
            task.cancel()

        stream.set_cancel_callback(abort)
        return stream

    def close(self) -> None:
        """Abort the requests in flight; `aclose` also closes the connections."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self) -> None:
        self.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._session.close()

    # One request -----------------------------------------------------------------------
    def _body(
        self, messages: list[ChatMessage], params: SamplingParams, model: str
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": min(params.temperature, OPENAI_MAX_TEMPERATURE),
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        # Not in OpenAI's API, but vLLM, llama.cpp and our server take them (Ollama
        # ignores them).
        if params.top_k:
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        return body

    async def _request(
        self,
        stream: TextStream,
        messages: list[ChatMessage],
        params: SamplingParams,
        adapter: str | None,
    ) -> None:
        try:
            await self._exchange(stream, messages, params, adapter)
        except asyncio.CancelledError:
            # The consumer left (nobody reads this) or the engine is closing (the
            # consumer learns it now, not after the stall timeout).
            stream.fail(EngineError("the engine is shutting down"))
            raise

    async def _exchange(
        self,
        stream: TextStream,
        messages: list[ChatMessage],
        params: SamplingParams,
        adapter: str | None,
    ) -> None:
        reply = _Reply(model=adapter or self.adapter_name, started=time.perf_counter())
        url = f"{self.base_url}/chat/completions"
        try:
            async with asyncio.timeout(self._request_timeout_s):
                response = await self._session.post(
                    url, json=self._body(messages, params, reply.model)
                )
        except TimeoutError:
            stream.fail(
                EngineStalled(f"no answer from {url} within {self._request_timeout_s:.0f} s")
            )
            return
        except aiohttp.ClientError as exc:
            stream.fail(EngineError(f"cannot reach {self.base_url}: {exc}"))
            return
        try:
            if response.status != 200:
                stream.fail(await _http_error(response))
                return
            await self._read_events(response, stream, reply)
            if not (reply.done or reply.finish):
                raise EngineError("the server ended the answer without finishing it")
            stream.finish(self._completion(messages, reply))
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                async with asyncio.timeout(1.0):  # read to the end: the connection is reused
                    await response.content.read()
        except EngineError as exc:
            stream.fail(exc)
        except aiohttp.ClientError as exc:
            stream.fail(EngineError(f"the connection to {self.base_url} broke: {exc}"))
        finally:
            # Cancelled (the consumer left) or not read to the end: dropping the
            # connection is how the server learns to abort the generation.
            if not response.content.at_eof():
                response.close()
            response.release()

    async def _read_events(
        self, response: aiohttp.ClientResponse, stream: TextStream, reply: _Reply
    ) -> None:
        """Server-sent events: `data:` lines up to a blank line make one event."""
        data: list[str] = []
        async for raw in response.content:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif not line and data:
                self._event("\n".join(data), stream, reply)
                data = []
                if reply.done:
                    return
        if data:
            self._event("\n".join(data), stream, reply)

    def _event(self, data: str, stream: TextStream, reply: _Reply) -> None:
        if data.strip() == "[DONE]":
            reply.done = True
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            raise EngineError(
                f"the server sent an event that is not JSON: {data[:200]!r}"
            ) from None
        if not isinstance(event, dict):
            return
        error = event.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else error
            raise EngineError(f"the server failed: {message}")
        reply.model = event.get("model") or reply.model
        if event.get("usage"):
            reply.usage = event["usage"]
        for choice in event.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            content = (choice.get("delta") or {}).get("content")
            if content:
                if not reply.first_at:
                    reply.first_at = time.perf_counter()
                reply.text += content
                reply.chunks += 1
                stream.push(content)
            if choice.get("finish_reason"):
                reply.finish = choice["finish_reason"]

    def _completion(self, messages: list[ChatMessage], reply: _Reply) -> Completion:
        usage = reply.usage or {}
        estimate = estimate_tokens(messages)
        prompt_tokens = usage.get("prompt_tokens")
        if isinstance(prompt_tokens, int) and prompt_tokens > 0:
            self._ratios.append(prompt_tokens / estimate)
        else:
            prompt_tokens = self.count_tokens(messages)
        completion_tokens = usage.get("completion_tokens")
        if not isinstance(completion_tokens, int):
            completion_tokens = reply.chunks  # servers send about one token per chunk
        now = time.perf_counter()
        return Completion(
            text=reply.text,
            finish_reason="length" if reply.finish == "length" else "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            ttft_s=(reply.first_at or now) - reply.started,
            total_s=now - reply.started,
            adapter=reply.model,
        )


async def _http_error(response: aiohttp.ClientResponse) -> EngineError:
    """The engine error a refused request means (OpenAI, vLLM, llama.cpp, Ollama bodies)."""
    text = await response.text(errors="replace")
    message, code = text[:500], None
    try:
        error = json.loads(text).get("error")
    except (json.JSONDecodeError, AttributeError):
        error = None
    if isinstance(error, dict):
        message, code = str(error.get("message", message)), error.get("code")
    elif isinstance(error, str):
        message = error
    status = response.status
    lowered = message.lower()
    if status in (429, 503):
        return EngineBusy(f"the server is busy ({status}): {message}")
    if status == 404 and (code == "model_not_found" or "model" in lowered):
        return UnknownModel(message)
    if status == 400 and (code == "context_length_exceeded" or "context length" in lowered):
        return PromptTooLong(message)
    if status in (401, 403):
        return EngineError(f"the server refused our API key ({status}): {message}")
    return EngineError(f"the server answered {status}: {message}")


async def _discover(
    session: aiohttp.ClientSession, cfg: EngineConfig
) -> tuple[str, list[dict[str, Any]]]:
    """(the API root, its model cards). Retries refused connections until
    request_timeout_s has passed (the server may be starting next to us); tries
    `<base_url>/v1` when the URL was given without it."""
    base = cfg.base_url.rstrip("/")
    candidates = [base] if base.endswith("/v1") else [base, base + "/v1"]
    deadline = time.monotonic() + cfg.request_timeout_s
    while True:
        try:
            for root in candidates:
                async with session.get(f"{root}/models") as response:
                    if response.status == 404 and root != candidates[-1]:
                        continue
                    if response.status in (401, 403):
                        raise ConfigError(
                            f"[engine] api_key_env = {cfg.api_key_env!r}: the server at "
                            f"{root} refused the key ({response.status})"
                        )
                    if response.status != 200:
                        raise ConfigError(
                            f"[engine] base_url = {cfg.base_url!r}: GET {root}/models "
                            f"answered {response.status}"
                        )
                    try:
                        listing = await response.json(content_type=None)
                    except ValueError:
                        listing = None
                    cards = listing.get("data") if isinstance(listing, dict) else None
                    if not isinstance(cards, list):
                        raise ConfigError(
                            f"[engine] base_url = {cfg.base_url!r}: GET {root}/models is not "
                            "an OpenAI model list"
                        )
                    return root, [c for c in cards if isinstance(c, dict)]
        except aiohttp.ClientConnectionError as exc:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"[engine] base_url = {cfg.base_url!r}: cannot reach the server ({exc})"
                ) from None
            await asyncio.sleep(0.5)
