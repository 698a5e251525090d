"""The OpenAI-compatible server, driven by the official `openai` client (and raw HTTP
where the exact bytes matter), over the real worker on a scripted or tiny model."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.serve_config import ServeConfig
from engine.server import SERVER_KEY, OpenAIServer, create_app, start_server
from engine.types import SamplingParams

openai = pytest.importorskip("openai", reason="the openai client is a test extra")

ANSWER = "Paris is the capital of France."
ASK = [{"role": "user", "content": "What is the capital of France?"}]
DEFAULTS = SamplingParams(max_new_tokens=64, temperature=0.0)


class Served:
    def __init__(self, url: str, server: OpenAIServer) -> None:
        self.url = url
        self.server = server

    def client(self, api_key: str = "unused", **kw: Any) -> Any:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kw)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    """serve(engine, config=..., defaults=...) -> Served, on 127.0.0.1 and a free port."""
    runners = []

    async def start(
        engine: Any, config: ServeConfig | None = None, defaults: SamplingParams = DEFAULTS
    ) -> Served:
        app = create_app(engine, config or ServeConfig(), defaults)
        runner, port = await start_server(app, "127.0.0.1", 0)
        runners.append(runner)
        return Served(f"http://127.0.0.1:{port}", app[SERVER_KEY])

    yield start
    for runner in runners:
        await runner.cleanup()


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=data, headers=headers) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except json.JSONDecodeError:
                return response.status, text


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


async def test_non_streaming_answer_has_the_openai_shape(scripted_engine: Any, serve: Any) -> None:
    engine, _model = scripted_engine(ANSWER)
    served = await serve(engine)
    async with served.client() as client:
        reply = await client.chat.completions.create(model="model", messages=ASK)
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert abs(reply.created - time.time()) < 60
    assert reply.model == "model"
    (choice,) = reply.choices
    assert choice.index == 0 and choice.finish_reason == "stop"
    assert choice.message.role == "assistant" and choice.message.content == ANSWER
    prompt = engine.count_tokens([_msg(m) for m in ASK])
    assert reply.usage.prompt_tokens == prompt
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == prompt + reply.usage.completion_tokens


async def test_streaming_chunks_usage_and_done(scripted_engine: Any, serve: Any) -> None:
    engine, _model = scripted_engine(ANSWER, delay_s=0.01)
    served = await serve(engine)
    async with served.client() as client:
        stream = await client.chat.completions.create(
            model="scripted", messages=ASK, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.model for c in chunks} == {"scripted"}  # the adapter the request named
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


async def test_raw_event_stream_ends_with_done(scripted_engine: Any, serve: Any) -> None:
    engine, _model = scripted_engine(ANSWER)
    served = await serve(engine)
    body = {"model": "model", "messages": ASK, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(served.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = await response.text()
    events = [block for block in raw.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }


async def test_sampling_parameters_are_honoured(tiny_engine: Any, serve: Any) -> None:
    served = await serve(tiny_engine)
    async with served.client() as client:

        async def ask(**kw: Any) -> Any:
            return await client.chat.completions.create(model="model", messages=ASK, **kw)

        short = await ask(max_tokens=3, temperature=0)
        assert short.choices[0].finish_reason == "length"
        assert short.usage.completion_tokens == 3
        first = await ask(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
        again = await ask(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
        assert first.choices[0].message.content == again.choices[0].message.content
        greedy = (await ask(max_tokens=12, temperature=0)).choices[0].message.content
        stop = greedy[len(greedy) // 2 :][:3]
        if stop.strip():
            stopped = await ask(max_tokens=12, temperature=0, stop=[stop])
            assert stop not in stopped.choices[0].message.content
            assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -5}, "max_completion_tokens"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"n": 2}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"model": None}, "model"),
    ],
)
async def test_bad_requests_get_400_with_the_parameter_named(
    scripted_engine: Any, serve: Any, change: dict[str, Any], param: str
) -> None:
    engine, _model = scripted_engine(ANSWER)
    served = await serve(engine)
    status, body = await post(
        served.url + "/v1/chat/completions", {"model": "model", "messages": ASK, **change}
    )
    assert status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    assert body["error"]["message"]


async def test_openai_client_sees_bad_request_and_unknown_model(
    scripted_engine: Any, serve: Any
) -> None:
    engine, _model = scripted_engine(ANSWER)
    served = await serve(engine)
    async with served.client() as client:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="model", messages=ASK, temperature=9)
        assert bad.value.status_code == 400 and bad.value.param == "temperature"
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-4o", messages=ASK)
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-4o")


async def test_malformed_bodies_and_unknown_urls_are_json_errors(
    scripted_engine: Any, serve: Any
) -> None:
    engine, _model = scripted_engine(ANSWER)
    served = await serve(engine)
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, reply = await post(served.url + "/v1/chat/completions", body)
        assert status == 400 and reply["error"]["type"] == "invalid_request_error"
    status, reply = await post(served.url + "/v1/completions", {"model": "model"})
    assert status == 404 and reply["error"]["code"] == "unknown_url"
    async with aiohttp.ClientSession() as http:
        async with http.get(served.url + "/v1/chat/completions") as response:
            assert response.status == 405
            assert (await response.json())["error"]["message"]


async def test_models_health_and_page(scripted_engine: Any, serve: Any) -> None:
    engine, _model = scripted_engine(ANSWER)
    served = await serve(engine)
    async with served.client() as client:
        listed = await client.models.list()
        assert [m.id for m in listed.data] == ["model", "scripted"]
        assert all(m.object == "model" and m.owned_by and m.created for m in listed.data)
        card = await client.models.retrieve("scripted")
        assert card.id == "scripted"
    async with aiohttp.ClientSession() as http:
        async with http.get(served.url + "/v1/models") as response:
            assert (await response.json())["data"][0]["max_model_len"] == 2048
        async with http.get(served.url + "/health") as response:
            health = await response.json()
        assert health["status"] == "ok" and health["queue_depth"] == 0
        async with http.get(served.url + "/") as response:
            assert response.headers["Content-Type"].startswith("text/html")
            page = await response.text()
        async with http.get(served.url + "/chat/api/info") as response:
            info = await response.json()
    assert "<textarea" in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page), "an external asset"
    assert info == {"mode": "browser", "auth": False, "models": ["model", "scripted"]}


async def test_bearer_token_auth(
    scripted_engine: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORABOT_TEST_KEY", "s3cret-key")
    engine, _model = scripted_engine(ANSWER)
    served = await serve(engine, ServeConfig(api_key_env="LORABOT_TEST_KEY"))
    async with served.client(api_key="wrong") as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(model="model", messages=ASK)
        assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    status, body = await post(served.url + "/v1/chat/completions", {"model": "model"})
    assert status == 401 and "API key" in body["error"]["message"]
    async with served.client(api_key="s3cret-key") as client:
        reply = await client.chat.completions.create(model="model", messages=ASK)
        assert reply.choices[0].message.content == ANSWER
    async with aiohttp.ClientSession() as http:  # monitoring and the page stay open
        for path in ("/health", "/metrics", "/chat/api/info"):
            async with http.get(served.url + path) as response:
                assert response.status == 200, path
    assert served.server.metrics.requests["unauthorized"] == 3


def test_missing_key_variable_is_a_config_error(scripted_engine: Any) -> None:
    from engine.config import ConfigError

    engine, _model = scripted_engine(ANSWER)
    with pytest.raises(ConfigError, match="LORABOT_NO_SUCH_KEY"):
        create_app(engine, ServeConfig(api_key_env="LORABOT_NO_SUCH_KEY"), DEFAULTS)


async def test_taken_port_is_a_config_error(scripted_engine: Any, serve: Any) -> None:
    from engine.config import ConfigError

    engine, _model = scripted_engine(ANSWER)
    served = await serve(engine)
    port = int(served.url.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
        await start_server(create_app(engine, ServeConfig(), DEFAULTS), "127.0.0.1", port)


async def test_full_queue_is_a_429_at_once(scripted_engine: Any, serve: Any) -> None:
    engine, model = scripted_engine(ANSWER, max_queue=1)
    served = await serve(engine)
    model.gate.clear()  # hold the worker inside the first request
    body = {"model": "model", "messages": ASK}
    first = asyncio.create_task(post(served.url + "/v1/chat/completions", body))
    await wait_for(lambda: engine.queue_depth == 1 and engine._queue.qsize() == 0)
    second = asyncio.create_task(post(served.url + "/v1/chat/completions", body))
    await wait_for(lambda: engine._queue.qsize() == 1)
    async with served.client() as client:
        started = time.perf_counter()
        with pytest.raises(openai.RateLimitError) as busy:
            await client.chat.completions.create(model="model", messages=ASK, stream=True)
        assert time.perf_counter() - started < 1.0
        assert busy.value.status_code == 429 and busy.value.code == "rate_limit_exceeded"
        assert busy.value.response.headers["Retry-After"] == "1"
    model.gate.set()
    for task in (first, second):
        status, reply = await task
        assert status == 200 and reply["choices"][0]["message"]["content"] == ANSWER


async def test_client_disconnect_aborts_the_generation(scripted_engine: Any, serve: Any) -> None:
    engine, model = scripted_engine("word " * 300, delay_s=0.005)
    served = await serve(engine)
    body = {"model": "model", "messages": ASK, "stream": True, "max_tokens": 300}
    async with aiohttp.ClientSession() as http:
        async with http.post(served.url + "/v1/chat/completions", json=body) as response:
            async for line in response.content:
                if b'"content":"word' in line:
                    break  # leave after the first words: the connection is closed
    await asyncio.sleep(0.3)
    steps = model.steps
    await asyncio.sleep(0.3)
    assert model.steps == steps < 250, "the engine kept generating for a gone client"
    await wait_for(lambda: served.server.metrics.active_requests == 0)
    assert served.server.metrics.requests.get("cancelled") == 1
    assert engine.queue_depth == 0


async def test_generation_failure_is_a_clean_error(scripted_engine: Any, serve: Any) -> None:
    engine, _model = scripted_engine(ANSWER, fail_at=0)
    served = await serve(engine)
    status, body = await post(served.url + "/v1/chat/completions", {"model": "m", "messages": ASK})
    assert status == 404  # the model name is checked first
    status, body = await post(
        served.url + "/v1/chat/completions", {"model": "model", "messages": ASK}
    )
    assert status == 500 and body["error"]["type"] == "server_error"
    assert "Traceback" not in json.dumps(body)
    async with served.client() as client:
        stream = await client.chat.completions.create(model="model", messages=ASK, stream=True)
        with pytest.raises(openai.APIError, match="Generation failed"):
            async for _chunk in stream:
                pass


async def test_metrics_in_prometheus_text_format(scripted_engine: Any, serve: Any) -> None:
    engine, _model = scripted_engine(ANSWER)
    served = await serve(engine)
    async with served.client() as client:
        reply = await client.chat.completions.create(model="model", messages=ASK)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="model", messages=ASK, top_p=7)
    async with aiohttp.ClientSession() as http:
        async with http.get(served.url + "/metrics") as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await response.text()
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert samples["lorabot_queue_depth"] == "0"
    assert samples["lorabot_active_requests"] == "0"
    assert samples['lorabot_requests_total{outcome="ok"}'] == "1"
    assert samples['lorabot_requests_total{outcome="invalid"}'] == "1"
    tokens = reply.usage.completion_tokens
    assert samples["lorabot_generation_tokens_total"] == str(tokens)
    assert samples['lorabot_time_to_first_token_seconds_bucket{le="+Inf"}'] == "1"
    assert samples["lorabot_time_to_first_token_seconds_count"] == "1"
    assert samples["lorabot_inter_token_latency_seconds_count"] == str(tokens - 1)
    for name in ("lorabot_queue_depth", "lorabot_inter_token_latency_seconds"):
        assert f"# TYPE {name} " in text


def test_bad_config_is_reported_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[serve]\nport = -1\napi_key_env = "X"\ncolour = 1\n[bot]\nx = 1\n')
    result = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert result.returncode == 2
    assert "[serve] port = -1: must be in [0, 65535]" in result.stderr
    assert "[serve] colour: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def _msg(item: dict[str, str]) -> Any:
    from engine.types import ChatMessage

    return ChatMessage(item["role"], item["content"])  # type: ignore[arg-type]
