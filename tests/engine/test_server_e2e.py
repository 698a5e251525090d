"""End to end: `python -m engine serve` in its own process with the real embedded model;
the bot with `backend = "openai"` talks to it, then 50 streaming clients at once."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.terminal_checks import check_france_turns

openai = pytest.importorskip("openai", reason="the openai client is a test extra")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 50


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of `python -m engine serve` on a free port (stopped after the module)."""
    folder = tmp_path_factory.mktemp("serve")
    config = folder / "serve.toml"
    config.write_text(
        "[engine]\nmax_queue = 8\nmax_new_tokens = 64\ntemperature = 0.0\n"
        '[serve]\nhost = "127.0.0.1"\n',
        encoding="utf-8",
    )
    log = (folder / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--config", str(config), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        url = _wait_for_url(process, folder / "serve.log")
        yield url
    finally:
        process.terminate()
        try:
            assert process.wait(timeout=30) == 0, "the server did not stop cleanly on SIGTERM"
        finally:
            if process.poll() is None:
                process.kill()
            log.close()


def _wait_for_url(process: subprocess.Popen[str], log: Path) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited:\n{log.read_text()[-3000:]}")
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            if line.startswith("serving ") and " on http://" in line:
                return line.rsplit(" on ", 1)[1].strip()
    raise AssertionError(f"no 'serving' line after 240 s:\n{log.read_text()[-3000:]}")


def test_the_bot_over_the_openai_backend(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bot.toml"
    config.write_text(
        '[storage]\npath = "chat.db"\n'
        f'[engine]\nbackend = "openai"\nbase_url = "{server}/v1"\n'
        "temperature = 0.0\nmax_new_tokens = 64\n"
        '[bot]\nlog_level = "WARNING"\n',
        encoding="utf-8",
    )
    # The bot with a remote backend needs no torch: make importing it fail.
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("the bot imported torch")\n')
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "bot", "--config", str(config)],
        input="What is the capital of France?\n/help\n/retry\n",
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=env,
        check=False,
    )
    stored = check_france_turns(result, tmp_path / "chat.db")
    assert stored[2][4] == "SmolLM2-135M-Instruct"  # the served model answered
    with capsys.disabled():
        print(f"\nbot over HTTP: two answers in {time.perf_counter() - started:.1f} s")


async def test_fifty_streaming_clients_finish_or_are_refused_cleanly(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    outcomes: list[tuple[str, float]] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        try:
            stream = await client.chat.completions.create(
                model="SmolLM2-135M-Instruct",
                messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}],
                max_tokens=12,
                stream=True,
            )
            finish = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            assert finish in ("stop", "length"), f"client {i}: stream ended without a finish"
            outcomes.append(("ok", time.perf_counter() - started))
        except openai.APIStatusError as exc:
            assert exc.status_code in (429, 503), f"client {i}: {exc.status_code} {exc}"
            assert exc.body and exc.body.get("message"), "an error without the OpenAI shape"
            outcomes.append((str(exc.status_code), time.perf_counter() - started))

    ok_before = await _ok_requests(server)
    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(CLIENTS))), 150)
    finally:
        await client.close()
    elapsed = time.perf_counter() - started
    done = [t for kind, t in outcomes if kind == "ok"]
    refused = [t for kind, t in outcomes if kind != "ok"]
    assert len(outcomes) == CLIENTS
    assert done, "no client got an answer"
    assert max(refused, default=0) < 5, "a refusal was not immediate"
    async with aiohttp.ClientSession() as http:
        async with http.get(server + "/health") as response:
            assert (await response.json())["queue_depth"] == 0
    assert await _ok_requests(server) == ok_before + len(done)
    summary = {
        "clients": CLIENTS,
        "completed": len(done),
        "refused_429_or_503": len(refused),
        "wall_s": round(elapsed, 1),
        "slowest_completed_s": round(max(done), 1),
        "slowest_refusal_s": round(max(refused, default=0), 3),
    }
    with capsys.disabled():
        print(f"\n50-client load: {json.dumps(summary)}")


async def _ok_requests(server: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(server + "/metrics") as response:
            metrics = await response.text()
    for line in metrics.splitlines():
        if line.startswith('lorabot_requests_total{outcome="ok"} '):
            return int(line.split()[-1])
    return 0
