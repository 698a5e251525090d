"""The engine over HTTP, in the shape of the OpenAI API (aiohttp).

`POST /v1/chat/completions` (server-sent events or one JSON answer), `GET /v1/models`,
`GET /health`, `GET /metrics` (Prometheus), and the chat page at `/`. Every bad request
gets the OpenAI error object `{"error": {"message", "type", "param", "code"}}` with a 4xx
status; an unexpected failure is a 500 with that object, logged here, never a traceback
sent to the client. `python -m engine serve` runs it; the bot mounts its own chat
routes on the same app (bot/web_chat.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from engine import metrics as metrics_mod
from engine.config import ConfigError
from engine.metrics import Metrics
from engine.openai_api import (
    ApiError,
    ChatRequest,
    ChunkWriter,
    finish_reason,
    parse_chat_request,
    usage,
)
from engine.serve_config import ServeConfig
from engine.types import (
    Completion,
    Engine,
    EngineBusy,
    EngineError,
    PromptTooLong,
    SamplingParams,
    TextStreamLike,
    UnknownModel,
)

log = logging.getLogger(__name__)

CHAT_PAGE = Path(__file__).with_name("static") / "chat.html"
PageMode = Literal["browser", "stored"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Paths that need the bearer token when one is configured (the page's info is public:
# it tells the page to ask for the key).
PROTECTED = ("/v1/", "/chat/api/")
PUBLIC = ("/chat/api/info",)


# The server ----------------------------------------------------------------------------
class OpenAIServer:
    def __init__(
        self,
        engine: Engine,
        defaults: SamplingParams,
        *,
        api_key: str = "",
        page_mode: PageMode = "browser",
        chat_page: bool = True,
    ) -> None:
        self.engine = engine
        self.defaults = defaults
        self.api_key = api_key
        self.page_mode = page_mode
        self.chat_page = chat_page
        self.metrics = Metrics(lambda: engine.queue_depth)
        self.created = int(time.time())

    def routes(self) -> list[web.RouteDef]:
        routes = [
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{model}", self.get_model),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics_text),
        ]
        if self.chat_page:
            routes += [web.get("/", self.page), web.get("/chat/api/info", self.page_info)]
        return routes

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """OpenAI-style JSON for every API error; the page's paths keep aiohttp's own."""
        api = request.path.startswith(PROTECTED)
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if not api or exc.status < 400:
                raise
            message = {
                404: f"Unknown request URL: {request.method} {request.path}.",
                405: f"Method {request.method} is not allowed for {request.path}.",
            }.get(exc.status, exc.reason)
            code = "unknown_url" if exc.status == 404 else None
            return ApiError(exc.status, message, code=code).response()
        except Exception:  # noqa: BLE001 - logged here; the client gets no traceback
            log.exception("%s %s failed", request.method, request.path)
            if not api:
                raise web.HTTPInternalServerError() from None
            return ApiError(
                500, "The server had an error processing your request.", type_="server_error"
            ).response()

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.api_key or not request.path.startswith(PROTECTED) or request.path in PUBLIC:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.metrics.count_request("unauthorized")
            raise ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            self.metrics.count_request("unauthorized")
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return await handler(request)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.metrics.count_request("invalid")
            raise ApiError(400, f"The request body is not valid JSON: {exc}.") from None
        try:
            chat = parse_chat_request(body, self.engine.models(), self.defaults)
            stream = self._start(chat)
        except ApiError as exc:
            outcome = {404: "unknown_model", 429: "busy"}.get(exc.status, "invalid")
            self.metrics.count_request(outcome)
            headers = {"Retry-After": "1"} if exc.status == 429 else None
            return exc.response(headers)
        self.metrics.active_requests += 1
        try:
            if chat.stream:
                return await self._stream(request, chat, stream)
            return await self._answer(chat, stream)
        except asyncio.CancelledError:
            # The client went away; the engine must not keep generating for nobody
            # (leaving the stream's iteration cancels too; this covers before it).
            stream.cancel()
            self.metrics.count_request("cancelled")
            raise
        finally:
            self.metrics.active_requests -= 1

    def _start(self, chat: ChatRequest) -> TextStreamLike:
        try:
            return self.engine.stream(chat.messages, chat.params, adapter=chat.model)
        except EngineBusy as exc:
            raise ApiError(
                429,
                f"The server is busy ({exc}); try again in a moment.",
                type_="rate_limit_error",
                code="rate_limit_exceeded",
            ) from None
        except PromptTooLong as exc:
            raise ApiError(
                400, f"{exc}.", param="messages", code="context_length_exceeded"
            ) from None
        except UnknownModel as exc:
            raise ApiError(404, str(exc), code="model_not_found") from None
        except EngineError as exc:
            raise ApiError(503, str(exc), type_="server_error") from None
        except Exception as exc:  # noqa: BLE001 - e.g. a chat template refusing the roles
            log.info("the chat format rejected a request: %r", exc)
            raise ApiError(
                400, f"The model's chat format rejected these messages: {exc}", param="messages"
            ) from None

    async def _answer(self, chat: ChatRequest, stream: TextStreamLike) -> web.Response:
        try:
            text = "".join([delta async for delta in stream])
        except EngineError as exc:
            self.metrics.count_request("error")
            raise ApiError(500, f"Generation failed: {exc}", type_="server_error") from None
        completion = stream.completion
        assert completion is not None, "a finished stream has its completion"
        self._done(completion)
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason(completion),
        }
        return web.json_response(
            {
                "id": "chatcmpl-" + secrets.token_hex(12),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": chat.model,
                "choices": [choice],
                "usage": usage(completion),
            }
        )

    async def _stream(
        self, request: web.Request, chat: ChatRequest, stream: TextStreamLike
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx: pass each event on at once
            }
        )
        out = ChunkWriter(response, chat.model, chat.include_usage)
        try:
            await response.prepare(request)
            await out.chunk({"role": "assistant", "content": ""})
            async for delta in stream:
                await out.chunk({"content": delta})
        except ConnectionResetError:
            stream.cancel()  # the client went away
            self.metrics.count_request("cancelled")
            return response
        except EngineError as exc:
            # Headers are gone: the error travels as an event (the openai client raises it).
            self.metrics.count_request("error")
            error = ApiError(500, f"Generation failed: {exc}", type_="server_error")
            await out.event(error.body)
            await out.event("[DONE]")
            return response
        completion = stream.completion
        assert completion is not None, "a finished stream has its completion"
        self._done(completion)
        await out.end(completion)
        await response.write_eof()
        return response

    def _done(self, completion: Completion) -> None:
        self.metrics.count_request("ok")
        self.metrics.observe(completion)

    def _model_card(self, name: str) -> dict[str, Any]:
        base = self.engine.models()[0]
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "lorabot",
            "root": base,
            "parent": None if name == base else base,
            # vLLM's name for it, which the remote client reads from any server.
            "max_model_len": self.engine.context_window,
        }

    async def list_models(self, request: web.Request) -> web.Response:
        data = [self._model_card(name) for name in self.engine.models()]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.engine.models():
            raise ApiError(
                404,
                f"The model `{name}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        return web.json_response(self._model_card(name))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "models": self.engine.models(), "queue_depth": self.engine.queue_depth}
        )

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render().encode(),
            headers={"Content-Type": metrics_mod.CONTENT_TYPE},
        )

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=CHAT_PAGE.read_bytes(),
            headers={"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache"},
        )

    async def page_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"mode": self.page_mode, "auth": bool(self.api_key), "models": self.engine.models()}
        )


SERVER_KEY = web.AppKey("lorabot_openai_server", OpenAIServer)


def create_app(
    engine: Engine,
    config: ServeConfig,
    defaults: SamplingParams,
    *,
    page_mode: PageMode = "browser",
) -> web.Application:
    """The API (and the chat page) over `engine`; the caller may add routes before it
    starts (the bot adds its stored chat). Raises ConfigError for a missing API key."""
    server = OpenAIServer(
        engine,
        defaults,
        api_key=config.api_key(),
        page_mode=page_mode,
        chat_page=config.chat_page,
    )
    app = web.Application(middlewares=[server.errors, server.auth])
    app[SERVER_KEY] = server
    app.add_routes(server.routes())
    return app


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0 = any free port); returns the runner and the bound port
    (ConfigError when the address is taken or not ours). Handlers are cancelled when
    their client disconnects, which aborts the request in the engine."""
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=3.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"[serve] cannot listen on {host}:{port}: {exc.strerror}") from None
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    return runner, int(bound)
