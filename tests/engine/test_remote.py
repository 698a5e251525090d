"""The remote backend (OpenAIEngine) against our own server over real HTTP, and against
small stand-in servers for the failures a remote server can have."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bot.service import BUSY, ChatService, Incoming
from bot.store import Store
from engine.config import ConfigError, EngineConfig, ModelConfig, parse_sections
from engine.remote import OpenAIEngine, estimate_tokens
from engine.serve_config import ServeConfig
from engine.server import SERVER_KEY, create_app, start_server
from engine.types import (
    ChatMessage,
    EngineBusy,
    EngineError,
    EngineStalled,
    SamplingParams,
    UnknownModel,
)

ANSWER = "Paris is the capital of France."
ASK = [ChatMessage("user", "What is the capital of France?")]
GREEDY = SamplingParams(max_new_tokens=64, temperature=0.0)


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Any]]:
    """servers(app) -> base URL of the app on 127.0.0.1 (stopped after the test)."""
    runners = []

    async def start(app: web.Application) -> str:
        runner, port = await start_server(app, "127.0.0.1", 0)
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def remotes() -> AsyncIterator[Callable[..., Any]]:
    """remotes(base_url, **[engine] keys) -> an open OpenAIEngine (closed after)."""
    opened: list[OpenAIEngine] = []

    async def open_remote(base_url: str, model: ModelConfig | None = None, **kw: Any) -> Any:
        cfg = EngineConfig(backend="openai", base_url=base_url, **kw)
        remote = await OpenAIEngine.open(model or ModelConfig(), cfg)
        opened.append(remote)
        return remote

    yield open_remote
    for remote in opened:
        await remote.aclose()


async def our_server(servers: Any, engine: Any, config: ServeConfig | None = None) -> Any:
    app = create_app(engine, config or ServeConfig(), GREEDY)
    return await servers(app), app[SERVER_KEY]


async def test_answers_stream_with_the_servers_counts(
    scripted_engine: Any, servers: Any, remotes: Any
) -> None:
    engine, _model = scripted_engine(ANSWER, delay_s=0.01)
    url, _server = await our_server(servers, engine)
    remote = await remotes(url + "/v1", remote_model="scripted")
    assert remote.models() == ["model", "scripted"]
    assert remote.context_window == 2048  # from the server's /v1/models
    assert remote.adapter_name == "scripted"
    stream = remote.stream(ASK, GREEDY)
    deltas = [delta async for delta in stream]
    assert "".join(deltas) == ANSWER and len(deltas) > 1
    done = stream.completion
    assert done is not None and done.text == ANSWER and done.finish_reason == "stop"
    assert done.prompt_tokens == engine.count_tokens(ASK)
    assert done.completion_tokens == len(engine.tokenizer(ANSWER)["input_ids"])
    assert done.adapter == "scripted" and 0 < done.ttft_s <= done.total_s
    assert remote.queue_depth == 0


async def test_token_estimate_is_calibrated_by_the_servers_usage(
    tiny_engine: Any, servers: Any, remotes: Any
) -> None:
    url, _server = await our_server(servers, tiny_engine)
    remote = await remotes(url)  # without /v1: found by itself
    assert remote.base_url == url + "/v1"
    assert remote.count_tokens(ASK) == estimate_tokens(ASK)
    long = [ChatMessage("system", "Be brief."), ChatMessage("user", "名古屋の天気は？ " * 20)]
    await remote.stream(long, SamplingParams(max_new_tokens=2)).collect()
    actual = tiny_engine.count_tokens(long)
    assert remote.count_tokens(long) >= actual  # never under the server's own count
    assert remote.count_tokens(long) <= actual * 1.2


async def test_limits_length_stop_and_seed_reach_the_server(
    tiny_engine: Any, servers: Any, remotes: Any
) -> None:
    url, _server = await our_server(servers, tiny_engine)
    remote = await remotes(url + "/v1")
    short = remote.stream(ASK, SamplingParams(max_new_tokens=3, temperature=0))
    await short.collect()
    assert short.completion.finish_reason == "length"
    assert short.completion.completion_tokens == 3
    seeded = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5)
    assert (
        await remote.stream(ASK, seeded).collect()
        == await tiny_engine.stream(ASK, seeded).collect()
    )


async def test_busy_server_is_engine_busy_on_the_first_step(
    scripted_engine: Any, servers: Any, remotes: Any
) -> None:
    engine, model = scripted_engine(ANSWER, max_queue=1)
    url, _server = await our_server(servers, engine)
    remote = await remotes(url + "/v1")
    model.gate.clear()
    held = [remote.stream(ASK, GREEDY), remote.stream(ASK, GREEDY)]  # running + queued
    iterators = [s.__aiter__() for s in held]
    first = [asyncio.create_task(anext(it)) for it in iterators]
    for _ in range(200):
        if engine._queue.qsize() == 1 and engine.queue_depth == 2:
            break
        await asyncio.sleep(0.01)
    started = time.perf_counter()
    with pytest.raises(EngineBusy, match="429"):
        await remote.stream(ASK, GREEDY).collect()
    assert time.perf_counter() - started < 1.0
    model.gate.set()
    for task, iterator in zip(first, iterators, strict=True):
        text = await task + "".join([d async for d in iterator])
        assert text == ANSWER


async def test_own_limit_is_engine_busy_at_once(
    scripted_engine: Any, servers: Any, remotes: Any
) -> None:
    engine, model = scripted_engine(ANSWER)
    url, _server = await our_server(servers, engine)
    remote = await remotes(url + "/v1", max_queue=1)
    model.gate.clear()
    running = remote.stream(ASK, GREEDY)
    with pytest.raises(EngineBusy):
        remote.stream(ASK, GREEDY)
    model.gate.set()
    assert await running.collect() == ANSWER


async def test_leaving_the_stream_aborts_the_generation_on_the_server(
    scripted_engine: Any, servers: Any, remotes: Any
) -> None:
    engine, model = scripted_engine("word " * 300, delay_s=0.005)
    url, server = await our_server(servers, engine)
    remote = await remotes(url + "/v1")
    async for _delta in remote.stream(ASK, SamplingParams(max_new_tokens=300, temperature=0)):
        break
    for _ in range(200):
        if server.metrics.active_requests == 0 and remote.queue_depth == 0:
            break
        await asyncio.sleep(0.01)
    steps = model.steps
    await asyncio.sleep(0.3)
    assert model.steps == steps < 250, "the server kept generating"
    assert server.metrics.requests.get("cancelled") == 1


async def test_silent_server_is_engine_stalled(
    scripted_engine: Any, servers: Any, remotes: Any
) -> None:
    engine, model = scripted_engine(ANSWER)
    url, _server = await our_server(servers, engine)
    remote = await remotes(url + "/v1", stall_timeout_s=0.3)
    model.gate.clear()  # headers come, tokens never do
    with pytest.raises(EngineStalled):
        await remote.stream(ASK, GREEDY).collect()
    model.gate.set()


async def test_engine_serve_can_front_a_remote_server(
    scripted_engine: Any, servers: Any, remotes: Any
) -> None:
    """`python -m engine serve` with backend = "openai": auth, metrics and the page in
    front of another server; the official client cannot tell."""
    openai = pytest.importorskip("openai", reason="the openai client is a test extra")
    engine, _model = scripted_engine(ANSWER, delay_s=0.01)
    upstream, _server = await our_server(servers, engine)
    remote = await remotes(upstream + "/v1")
    front, front_server = await our_server(servers, remote)
    async with openai.AsyncOpenAI(base_url=front + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="scripted",
            messages=[{"role": "user", "content": "Capital of France?"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert chunks[-1].usage.prompt_tokens == engine.count_tokens(
        [ChatMessage("user", "Capital of France?")]
    )
    assert front_server.metrics.requests == {"ok": 1}


async def test_closing_fails_the_answers_in_flight_at_once(
    scripted_engine: Any, servers: Any, remotes: Any
) -> None:
    engine, model = scripted_engine(ANSWER)
    url, _server = await our_server(servers, engine)
    remote = await remotes(url + "/v1", stall_timeout_s=30)
    model.gate.clear()
    waiting = asyncio.create_task(remote.stream(ASK, GREEDY).collect())
    await asyncio.sleep(0.2)
    started = time.perf_counter()
    await remote.aclose()
    with pytest.raises(EngineError, match="shutting down"):
        await waiting
    assert time.perf_counter() - started < 2
    model.gate.set()


def stand_in(chat: Callable[[web.Request], Any], models: list[dict[str, Any]] | None = None) -> Any:
    """An OpenAI-compatible server that lists `models` and answers chats with `chat`."""

    async def list_models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": models or [{"id": "remote-llm"}]})

    app = web.Application()
    app.add_routes([web.get("/v1/models", list_models), web.post("/v1/chat/completions", chat)])
    return app


async def sse(request: web.Request, events: list[str]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in events:
        await response.write(f"data: {event}\n\n".encode())
    return response


CHUNK = '{"model":"remote-llm","choices":[{"index":0,"delta":{"content":"Hi"}}]}'


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (503, '{"error": {"message": "overloaded"}}', EngineBusy),
        (429, '{"error": "too many requests"}', EngineBusy),
        (404, '{"error": {"message": "no such model", "code": "model_not_found"}}', UnknownModel),
        (500, "Internal Server Error", EngineError),
    ],
)
async def test_refusals_become_engine_errors(
    servers: Any, remotes: Any, status: int, body: str, error: type
) -> None:
    async def chat(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body)

    remote = await remotes(await servers(stand_in(chat)) + "/v1")
    with pytest.raises(error):
        await remote.stream(ASK, GREEDY).collect()


@pytest.mark.parametrize(
    ("events", "match"),
    [
        ([CHUNK], "without finishing"),  # the connection ends mid-answer
        ([CHUNK, '{"error": {"message": "out of memory"}}'], "out of memory"),
        (["not json"], "not JSON"),
    ],
)
async def test_broken_streams_are_errors_never_quiet_ends(
    servers: Any, remotes: Any, events: list[str], match: str
) -> None:
    async def chat(request: web.Request) -> web.StreamResponse:
        return await sse(request, events)

    remote = await remotes(await servers(stand_in(chat)) + "/v1")
    with pytest.raises(EngineError, match=match):
        await remote.stream(ASK, GREEDY).collect()


async def test_other_servers_without_usage_still_complete(servers: Any, remotes: Any) -> None:
    finish = '{"model":"remote-llm","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'

    async def chat(request: web.Request) -> web.StreamResponse:
        return await sse(request, [CHUNK, CHUNK, finish, "[DONE]"])

    models = [{"id": "remote-llm", "context_length": 8192}]
    remote = await remotes(await servers(stand_in(chat, models)) + "/v1")
    assert remote.context_window == 8192
    stream = remote.stream(ASK, GREEDY)
    assert await stream.collect() == "HiHi"
    assert stream.completion.completion_tokens == 2  # one per chunk
    assert stream.completion.prompt_tokens == remote.count_tokens(ASK)


async def test_no_response_headers_in_time_is_engine_stalled(servers: Any, remotes: Any) -> None:
    async def chat(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    remote = await remotes(await servers(stand_in(chat)) + "/v1", request_timeout_s=0.3)
    started = time.perf_counter()
    with pytest.raises(EngineStalled):
        await remote.stream(ASK, GREEDY).collect()
    assert time.perf_counter() - started < 2


async def test_open_checks_the_server_the_model_and_the_key(
    scripted_engine: Any, servers: Any, remotes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _model = scripted_engine(ANSWER)
    monkeypatch.setenv("LORABOT_TEST_KEY", "k1")
    url, _server = await our_server(servers, engine, ServeConfig(api_key_env="LORABOT_TEST_KEY"))
    remote = await remotes(
        url + "/v1", ModelConfig(context_window=512), api_key_env="LORABOT_TEST_KEY"
    )
    assert remote.context_window == 512  # [model] context_window wins
    assert await remote.stream(ASK, GREEDY).collect() == ANSWER
    monkeypatch.setenv("LORABOT_TEST_KEY", "wrong")
    with pytest.raises(ConfigError, match="refused the key"):
        await remotes(url + "/v1", api_key_env="LORABOT_TEST_KEY")
    monkeypatch.setenv("LORABOT_TEST_KEY", "k1")
    with pytest.raises(ConfigError, match=r"serves \['model', 'scripted'\]"):
        await remotes(url + "/v1", api_key_env="LORABOT_TEST_KEY", remote_model="gpt-4o")
    with pytest.raises(ConfigError, match="cannot reach"):
        await remotes("http://127.0.0.1:9/v1", request_timeout_s=0.5)


async def test_server_gone_after_start_is_an_engine_error(remotes: Any) -> None:
    async def chat(request: web.Request) -> web.Response:
        return web.Response(status=500)

    runner, port = await start_server(stand_in(chat), "127.0.0.1", 0)
    remote = await remotes(f"http://127.0.0.1:{port}/v1")
    await runner.cleanup()
    with pytest.raises(EngineError, match="cannot reach"):
        await remote.stream(ASK, GREEDY).collect()
    await remote.aclose()
    with pytest.raises(EngineError, match="shutting down"):
        remote.stream(ASK, GREEDY)


def test_backend_keys_are_checked() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_sections(
            {"engine": {"backend": "openai", "request_timeout_s": 0}}, {"engine": EngineConfig}
        )
    assert "[engine] base_url = '': must be an http(s):// URL" in str(caught.value)
    assert "[engine] request_timeout_s = 0.0: must be > 0" in str(caught.value)
    with pytest.raises(ConfigError, match="must be one of 'local', 'openai'"):
        parse_sections({"engine": {"backend": "vllm"}}, {"engine": EngineConfig})


async def test_the_bot_tells_the_user_when_the_server_is_busy(
    tmp_path: Path, scripted_engine: Any, servers: Any, remotes: Any
) -> None:
    engine, model = scripted_engine(ANSWER, max_queue=1)
    url, _server = await our_server(servers, engine)
    remote = await remotes(url + "/v1")
    store = await Store.open(tmp_path / "bot.db")
    try:
        service = ChatService(store, remote, system_prompt="Be brief.", sampling=GREEDY)
        sink = Sink()
        await service.handle(Incoming("test", "c1", "u1", "Hello?"), sink)
        assert sink.finished == [ANSWER]
        model.gate.clear()
        held = [engine.stream(ASK, GREEDY)]
        while engine._queue.qsize():  # until the worker holds it
            await asyncio.sleep(0.01)
        held.append(engine.stream(ASK, GREEDY))  # and one waits: the queue is full
        busy = Sink()
        await service.handle(Incoming("test", "c2", "u2", "Anyone there?"), busy)
        assert busy.notices == [BUSY] and busy.finished == []
        model.gate.set()
        for stream in held:
            await stream.collect()
    finally:
        await store.close()


class Sink:
    def __init__(self) -> None:
        self.notices: list[str] = []
        self.finished: list[str] = []

    async def notice(self, text: str) -> None:
        self.notices.append(text)

    async def typing(self) -> None:
        pass

    async def update(self, text: str) -> None:
        pass

    async def finish(self, text: str, reply_id: int) -> None:
        self.finished.append(text)
