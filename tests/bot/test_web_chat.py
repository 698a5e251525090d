"""The web adapter over real HTTP: the page's conversation goes through the ChatService
and is stored in SQLite with platform "web"; the OpenAI API shares the server."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.config import load_config
from bot.service import BUSY, ChatService
from bot.store import Store
from bot.web_chat import make_app
from engine.config import ConfigError
from engine.serve_config import ServeConfig
from engine.server import start_server
from engine.types import ChatMessage, SamplingParams

ANSWER = "Paris is the capital of France."
CID = "a" * 32
GREEDY = SamplingParams(max_new_tokens=100, temperature=0.0)


@pytest.fixture
async def web_bot(tmp_path: Path, scripted_engine: Any) -> AsyncIterator[Callable[..., Any]]:
    """web_bot(**scripted kw, config=ServeConfig) -> (base URL, engine, scripted model)."""
    stores: list[Store] = []
    runners = []

    async def start(config: ServeConfig | None = None, **kw: Any) -> Any:
        engine, model = scripted_engine(ANSWER, **kw)
        store = await Store.open(tmp_path / "bot.db")
        stores.append(store)
        service = ChatService(store, engine, system_prompt="Be brief.", sampling=GREEDY)
        app = make_app(service, engine, config or ServeConfig(), GREEDY)
        runner, port = await start_server(app, "127.0.0.1", 0)
        runners.append(runner)
        return f"http://127.0.0.1:{port}", engine, model

    yield start
    for runner in runners:
        await runner.cleanup()
    for store in stores:
        await store.close()


async def say(url: str, text: str, cid: str = CID, **headers: str) -> list[dict[str, Any]]:
    """POST one message; the page's events, parsed."""
    async with aiohttp.ClientSession() as http:
        body = {"cid": cid, "text": text}
        async with http.post(url + "/chat/api/send", json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = await response.text()
    return [json.loads(block[6:]) for block in raw.split("\n\n") if block.startswith("data: ")]


async def get_json(url: str, **headers: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers) as response:
            return response.status, await response.json()


async def test_a_page_conversation_streams_and_is_stored(web_bot: Any, tmp_path: Path) -> None:
    url, _engine, _model = await web_bot(delay_s=0.01)
    events = await say(url, "What is the capital of France?")
    assert events[0] == {"type": "typing"}
    deltas = [e["text"] for e in events if e["type"] == "delta"]
    assert "".join(deltas) == ANSWER and len(deltas) > 1
    assert events[-1]["type"] == "done" and events[-1]["reply_id"] > 0
    status, history = await get_json(f"{url}/chat/api/history?cid={CID}")
    assert status == 200
    assert [(m["role"], m["text"]) for m in history["messages"]] == [
        ("user", "What is the capital of France?"),
        ("assistant", ANSWER),
    ]
    with sqlite3.connect(tmp_path / "bot.db") as db:
        rows = db.execute("SELECT platform, chat_id, role FROM messages ORDER BY id").fetchall()
    assert rows == [("web", CID, "user"), ("web", CID, "assistant")]
    other = await get_json(f"{url}/chat/api/history?cid={'b' * 32}")
    assert other == (200, {"messages": []})  # another browser, another conversation


async def test_commands_and_reset_work_from_the_page(web_bot: Any) -> None:
    url, _engine, _model = await web_bot()
    await say(url, "first question")
    help_events = await say(url, "/help")
    assert help_events[0]["type"] == "notice" and "/reset" in help_events[0]["text"]
    retried = await say(url, "/retry")
    assert "".join(e.get("text", "") for e in retried if e["type"] == "delta") == ANSWER
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/chat/api/reset", json={"cid": CID}) as response:
            assert await response.json() == {"ok": True}
    assert await get_json(f"{url}/chat/api/history?cid={CID}") == (200, {"messages": []})


async def test_busy_engine_is_a_notice_on_the_page(web_bot: Any) -> None:
    url, engine, model = await web_bot(max_queue=1)
    model.gate.clear()
    held = [engine.stream([ChatMessage("user", "x")], GREEDY)]
    while engine._queue.qsize():
        await asyncio.sleep(0.01)
    held.append(engine.stream([ChatMessage("user", "y")], GREEDY))
    events = await say(url, "hello?")
    assert events == [{"type": "notice", "text": BUSY}]
    model.gate.set()
    for stream in held:
        await stream.collect()


async def test_leaving_mid_answer_aborts_it_and_keeps_the_question(web_bot: Any) -> None:
    url, _engine, model = await web_bot(delay_s=0.01)
    model.script = model.script * 30
    async with aiohttp.ClientSession() as http:
        body = {"cid": CID, "text": "tell me everything"}
        async with http.post(url + "/chat/api/send", json=body) as response:
            async for line in response.content:
                if b'"delta"' in line:
                    break
    await asyncio.sleep(0.3)
    steps = model.steps
    await asyncio.sleep(0.3)
    assert model.steps == steps, "the engine kept generating for a closed page"
    _status, history = await get_json(f"{url}/chat/api/history?cid={CID}")
    assert [m["role"] for m in history["messages"]] == ["user"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/api/send", {"cid": "short", "text": "hi"}),
        ("/chat/api/send", {"cid": CID, "text": "  "}),
        ("/chat/api/send", {"cid": CID}),
        ("/chat/api/reset", {"cid": "../../etc"}),
    ],
)
async def test_bad_page_requests_are_400s(web_bot: Any, path: str, body: dict[str, Any]) -> None:
    url, _engine, _model = await web_bot()
    async with aiohttp.ClientSession() as http:
        async with http.post(url + path, json=body) as response:
            assert response.status == 400
            assert (await response.json())["error"]["message"]


async def test_one_server_for_page_stored_chat_and_api_with_one_key(
    web_bot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORABOT_TEST_KEY", "k")
    url, _engine, _model = await web_bot(ServeConfig(api_key_env="LORABOT_TEST_KEY"))
    assert await get_json(url + "/chat/api/info") == (
        200,
        {"mode": "stored", "auth": True, "models": ["model", "scripted"]},
    )
    status, body = await get_json(f"{url}/chat/api/history?cid={CID}")
    assert status == 401 and body["error"]["message"]
    auth = {"Authorization": "Bearer k"}
    assert (await get_json(f"{url}/chat/api/history?cid={CID}", **auth))[0] == 200
    events = await say(url, "hi", **auth)
    assert events[-1]["type"] == "done"
    status, models = await get_json(url + "/v1/models", **auth)
    assert status == 200 and models["data"][0]["id"] == "model"


def test_serve_section_in_the_bot_config(tmp_path: Path) -> None:
    path = tmp_path / "bot.toml"
    path.write_text('[serve]\nenabled = true\nport = 8123\nhost = "0.0.0.0"\n')
    serve = load_config(path).serve
    example = Path(__file__).resolve().parents[2] / "config.example.toml"
    assert load_config(example).serve == load_config(None).serve  # documented defaults
    assert (serve.enabled, serve.host, serve.port, serve.chat_page) == (True, "0.0.0.0", 8123, True)
    path.write_text("[serve]\nport = 70000\npage = true\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "[serve] port = 70000: must be in [0, 65535]" in str(caught.value)
    assert "[serve] page: unknown key" in str(caught.value)
