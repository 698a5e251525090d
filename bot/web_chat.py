"""The web adapter: the chat page's conversations, stored like any platform's.

With [serve] enabled the bot runs the engine's OpenAI-compatible server in its own
process and adds these routes to it, so `/` is the chat page, `/v1/...` the API and
`/chat/api/...` the page's stored conversation, all on one port. Each browser keeps a
random conversation id (the page's localStorage); messages go through the ChatService
(commands, context, storage) with platform "web" and that id as chat and user.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from aiohttp import web

from bot.service import ChatService, Incoming
from engine.openai_api import ApiError
from engine.serve_config import ServeConfig
from engine.server import create_app, start_server
from engine.types import Engine, SamplingParams

log = logging.getLogger(__name__)

PLATFORM = "web"
MAX_TEXT = 16_000  # characters of one message
CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")
SERVICE_KEY = web.AppKey("lorabot_chat_service", ChatService)


class WebSink:
    """One reply as server-sent events: typing, delta (the new text), notice, done."""

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response
        self._shown = 0

    async def _send(self, event: dict[str, Any]) -> None:
        data = json.dumps(event, ensure_ascii=False)
        await self._response.write(f"data: {data}\n\n".encode())

    async def notice(self, text: str) -> None:
        await self._send({"type": "notice", "text": text})

    async def typing(self) -> None:
        await self._send({"type": "typing"})

    async def update(self, text: str) -> None:
        if len(text) > self._shown:
            await self._send({"type": "delta", "text": text[self._shown :]})
            self._shown = len(text)

    async def finish(self, text: str, reply_id: int) -> None:
        await self.update(text)
        await self._send({"type": "done", "reply_id": reply_id})


def _conversation(value: Any) -> str:
    if not isinstance(value, str) or not CONVERSATION_ID.fullmatch(value):
        raise ApiError(
            400,
            "'cid' must be the page's conversation id (16-128 letters, digits, - or _).",
            param="cid",
        )
    return value


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def _incoming(cid: str, text: str) -> Incoming:
    return Incoming(platform=PLATFORM, chat_id=cid, user_id=cid, text=text, user_name="web")


async def history(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    cid = _conversation(request.query.get("cid"))
    conversation = await service.store.open_conversation(PLATFORM, cid, cid)
    messages = await service.store.history(conversation)
    return web.json_response(
        {"messages": [{"id": m.id, "role": m.role, "text": m.text} for m in messages]}
    )


async def send(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    body = await _body(request)
    cid = _conversation(body.get("cid"))
    text = body.get("text")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        raise ApiError(400, f"'text' must be 1 to {MAX_TEXT} characters.", param="text")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    try:
        await service.handle(_incoming(cid, text), WebSink(response))
        await response.write_eof()
    except ConnectionResetError:
        # The page went away (reload, Stop): leaving the stream aborted the generation;
        # the user's message stays stored, as on every platform.
        log.info("web chat %s… left before the answer was complete", cid[:8])
    return response


async def reset(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    cid = _conversation((await _body(request)).get("cid"))
    await service.reset(_incoming(cid, "/reset"))
    return web.json_response({"ok": True})


def add_routes(app: web.Application, service: ChatService) -> None:
    """Mount the stored chat on an app made by engine.server.create_app(page_mode="stored")."""
    app[SERVICE_KEY] = service
    app.add_routes(
        [
            web.get("/chat/api/history", history),
            web.post("/chat/api/send", send),
            web.post("/chat/api/reset", reset),
        ]
    )


def make_app(
    service: ChatService, engine: Engine, config: ServeConfig, defaults: SamplingParams
) -> web.Application:
    app = create_app(engine, config, defaults, page_mode="stored")
    add_routes(app, service)
    return app


async def run_web(
    service: ChatService, engine: Engine, config: ServeConfig, defaults: SamplingParams
) -> None:
    """Serve the page, its stored chat and the OpenAI API until cancelled."""
    runner, port = await start_server(
        make_app(service, engine, config, defaults), config.host, config.port
    )
    log.info("chat page and OpenAI API on http://%s:%d", config.host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
