"""End to end: `python -m bot --config FILE` with [telegram] enabled, on the real
embedded SmolLM2, against the fake Bot API; SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.fakes.telegram_server import BotMessage, FakeTelegram

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
USER = 4242
TOKEN_ENV = "LORABOT_E2E_TELEGRAM_TOKEN"


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(token="987654:E2E-secret-token") as server:
        yield server


def finished(fake: FakeTelegram) -> list[BotMessage]:
    return [m for m in fake.bot_messages(USER) if m.reply_markup]


async def test_python_m_bot_answers_on_telegram_and_stops_on_sigterm(
    fake: FakeTelegram, tmp_path: Path, embedded_dir: Path
) -> None:
    config = tmp_path / "bot.toml"
    config.write_text(
        '[storage]\npath = "chat.db"\n'
        "[engine]\ntemperature = 0.0\nmax_new_tokens = 48\n"
        '[bot]\nlog_level = "DEBUG"\n'
        f'[telegram]\nenabled = true\ntoken_env = "{TOKEN_ENV}"\nbase_url = "{fake.base_url}"\n',
        encoding="utf-8",
    )
    env = {**os.environ, TOKEN_ENV: fake.token}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "--config",
        str(config),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await fake.wait_for(lambda: fake.calls_of("getUpdates"), timeout=120)
        fake.send_text(USER, "What is the capital of France?", user_id=USER)
        [answer] = await fake.wait_for(lambda: finished(fake), timeout=120)
        process.send_signal(signal.SIGTERM)
        _stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    logs = stderr.decode()
    assert "Paris" in answer.text
    assert answer.edit_count >= 1
    assert process.returncode == 0, logs[-2000:]
    assert "telegram: stopped" in logs
    assert "getUpdates" in logs  # DEBUG logging was on...
    assert fake.token not in logs and "E2E-secret-token" not in logs  # ...without the token
    with sqlite3.connect(tmp_path / "chat.db") as db:
        stored = db.execute("SELECT role, platform FROM messages ORDER BY id").fetchall()
    assert stored == [("user", "telegram"), ("assistant", "telegram")]
