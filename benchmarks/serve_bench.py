"""What the HTTP server costs: the same engine called in-process and through
`POST /v1/chat/completions` (streamed), in one run, per request and per token; then
50 streaming clients at once against the embedded model.

Two engines: a null model (fixed logits, no compute) isolates the server's own work;
the embedded SmolLM2 shows it next to real generation. "in_process" is the engine's own stream consumed in the server's process; "http_streaming"
is a client in another process (parsing every event, as any client does) talking to the
server over 127.0.0.1, requests alternating with the in-process ones.

    python benchmarks/serve_bench.py [--requests 20] [--tokens 64] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.chat_format import make_chat_format  # noqa: E402
from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.loading import load_model  # noqa: E402
from engine.serve_config import ServeConfig  # noqa: E402
from engine.server import create_app, start_server  # noqa: E402
from engine.types import ChatMessage, SamplingParams  # noqa: E402
from engine.worker import LocalEngine  # noqa: E402

PROMPT = [ChatMessage("user", "Write a long story about a lighthouse keeper.")]


class NullLM(torch.nn.Module):
    """Answers every prompt with `script` and never stops early: the model costs nothing."""

    def __init__(self, vocab_size: int, script: list[int]) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size = vocab_size
        self.script = script
        self._position = 0

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        if input_ids.shape[1] > 1:
            self._position = 0
        token = self.script[self._position % len(self.script)]
        self._position += 1
        logits = torch.full((1, 1, self.vocab_size), -1e4)
        logits[0, 0, token] = 0.0
        return type("Out", (), {"logits": logits})()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def in_process(engine: LocalEngine, params: SamplingParams) -> dict[str, float]:
    started = time.perf_counter()  # the chat template and tokenizing count, as over HTTP
    stream = engine.stream(PROMPT, params)
    first = 0.0
    async for _delta in stream:
        first = first or time.perf_counter()
    done = time.perf_counter()
    assert stream.completion is not None
    return timing(started, first, done, stream.completion.completion_tokens)


async def over_http(
    http: aiohttp.ClientSession, url: str, params: SamplingParams, model: str
) -> dict[str, float]:
    body = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in PROMPT],
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    async with http.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])  # what any client does with each event
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
    return timing(started, first, time.perf_counter(), tokens)


def timing(started: float, first: float, done: float, tokens: int) -> dict[str, float]:
    return {
        "ttft_ms": 1000 * (first - started),
        "total_ms": 1000 * (done - started),
        "per_token_ms": 1000 * (done - first) / max(tokens - 1, 1),
        "tokens": tokens,
    }


class Client:
    """The HTTP client in its own process (as a real one is: no GIL shared with the
    server), doing one streamed request each time it is asked."""

    @classmethod
    async def start(cls, url: str, model: str, tokens: int) -> Client:
        client = cls()
        client.process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            url,
            model,
            str(tokens),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return client

    async def request(self) -> dict[str, float]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(b"go\n")
        await self.process.stdin.drain()
        return json.loads(await self.process.stdout.readline())

    async def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        await self.process.wait()


async def client_loop(url: str, model: str, tokens: int) -> None:
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        while await loop.run_in_executor(None, sys.stdin.readline):
            row = await over_http(http, url, params, model)
            print(json.dumps(row), flush=True)


async def compare(engine: LocalEngine, requests: int, tokens: int) -> dict[str, Any]:
    """Alternate in-process and HTTP requests so that drift (other work on the machine)
    hits both alike; the figures are medians of the pairs' differences."""
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    app = create_app(engine, ServeConfig(), params)
    runner, port = await start_server(app, "127.0.0.1", 0)
    client = await Client.start(f"http://127.0.0.1:{port}", engine.model_name, tokens)
    local: list[dict[str, float]] = []
    remote: list[dict[str, float]] = []
    try:
        await in_process(engine, params)  # warm-up
        await client.request()
        for _ in range(requests):
            local.append(await in_process(engine, params))
            remote.append(await client.request())
    finally:
        await client.stop()
        await runner.cleanup()

    def summary(rows: list[dict[str, float]]) -> dict[str, float]:
        return {key: round(median([r[key] for r in rows]), 3) for key in rows[0]}

    def overhead(key: str) -> float:
        return round(median([b[key] - a[key] for a, b in zip(local, remote, strict=True)]), 3)

    return {
        "in_process": summary(local),
        "http_streaming": summary(remote),
        "overhead_per_request_ms": overhead("ttft_ms"),
        "overhead_per_token_ms": overhead("per_token_ms"),
        "overhead_total_ms": overhead("total_ms"),
    }


async def fifty_clients(engine: LocalEngine, clients: int, tokens: int) -> dict[str, Any]:
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    runner, port = await start_server(create_app(engine, ServeConfig(), params), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    results: list[tuple[str, float, float, int]] = []

    async def one(http: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        try:
            row = await over_http(http, url, params, engine.model_name)
            results.append(("ok", row["ttft_ms"], row["total_ms"], int(row["tokens"])))
        except AssertionError:
            results.append(("refused", 0.0, 1000 * (time.perf_counter() - started), 0))

    connector = aiohttp.TCPConnector(limit=clients)
    started = time.perf_counter()
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            await asyncio.wait_for(asyncio.gather(*(one(http) for _ in range(clients))), 600)
    finally:
        await runner.cleanup()
    wall = time.perf_counter() - started
    ok = [r for r in results if r[0] == "ok"]
    ttfts = sorted(r[1] for r in ok)
    return {
        "clients": clients,
        "max_queue": engine._queue.maxsize,
        "completed": len(ok),
        "refused_429": len(results) - len(ok),
        "wall_s": round(wall, 2),
        "ttft_ms_p50": round(median(ttfts), 1),
        "ttft_ms_max": round(max(ttfts), 1) if ttfts else None,
        "slowest_refusal_ms": round(max((r[2] for r in results if r[0] != "ok"), default=0), 1),
        "aggregate_tok_s": round(sum(r[3] for r in ok) / wall, 1),
    }


async def run(requests: int, tokens: int) -> dict[str, Any]:
    loaded = load_model(ModelConfig())
    chat_format = make_chat_format("auto", loaded.tokenizer, extra_stop_ids=loaded.eos_token_ids)
    script = loaded.tokenizer(" word" * 8, add_special_tokens=False)["input_ids"]
    null = LocalEngine(
        NullLM(len(loaded.tokenizer), script),
        loaded.tokenizer,
        chat_format,
        context_window=loaded.context_window,
    )
    try:
        null_figures = await compare(null, requests, tokens)
    finally:
        null.close()
    real = LocalEngine.from_config(ModelConfig(), EngineConfig())
    try:
        real_figures = await compare(real, max(requests // 4, 3), tokens)
        load = await fifty_clients(real, 50, 16)
    finally:
        real.close()
    return {"null_model": null_figures, "embedded_model": real_figures, "fifty_clients": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--client", nargs=3, metavar=("URL", "MODEL", "TOKENS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.client:
        url, model, tokens = args.client
        asyncio.run(client_loop(url, model, int(tokens)))
        return
    figures = asyncio.run(run(args.requests, args.tokens))
    today = datetime.date.today().isoformat()
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": today,
        "requests_per_mode": args.requests,
        "tokens_per_request": args.tokens,
        **figures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve-{today}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
