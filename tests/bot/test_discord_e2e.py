"""Whole-process runs: Telegram and Discord served by one process (as bot.app does),
and the real embedded model answering a Discord DM."""

from __future__ import annotations

import asyncio
import importlib.util
import sqlite3
from typing import Any

import pytest

from bot.config import DEFAULT_SYSTEM_PROMPT
from bot.discord_bot import run_discord
from bot.service import ChatService
from bot.store import Store
from bot.telegram_config import TelegramConfig
from engine.config import EngineConfig, ModelConfig
from engine.types import SamplingParams
from tests.bot.test_discord_bot import ANSWER, World, answered
from tests.bot.test_discord_bot import world as world  # noqa: F401 - the fixture
from tests.fakes.telegram_server import FakeTelegram

pytestmark = pytest.mark.filterwarnings("error")

TELEGRAM_USER = 4242


@pytest.mark.skipif(
    importlib.util.find_spec("bot.telegram_bot") is None,
    reason="bot/telegram_bot.py (the Telegram adapter, run_telegram) does not exist yet",
)
async def test_telegram_and_discord_in_one_process(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.telegram_bot import run_telegram

    engine, _model = world.make_engine(ANSWER)
    store = await Store.open(world.tmp_path / "both.db")
    world.stores.append(store)
    service = ChatService(
        store,
        engine,
        system_prompt="You are a test bot.",
        sampling=SamplingParams(max_new_tokens=100, temperature=0),
    )
    async with FakeTelegram() as telegram:
        monkeypatch.setenv("LORABOT_TEST_TELEGRAM_TOKEN", telegram.token)
        tg_config = TelegramConfig(
            enabled=True, token_env="LORABOT_TEST_TELEGRAM_TOKEN", base_url=telegram.base_url
        )
        # As bot.app runs the enabled platforms: one gather, one event loop.
        platforms = [
            asyncio.create_task(run_telegram(service, tg_config)),
            asyncio.create_task(run_discord(service, world.config())),
        ]
        both = asyncio.gather(*platforms)
        try:
            dm = world.fake.open_dm("carol")
            await world.fake.wait_for(lambda: world.fake.connected_sessions == 1)
            telegram.send_text(TELEGRAM_USER, "hello from Telegram", user_id=TELEGRAM_USER)
            await world.fake.user_message(dm, "carol", "hello from Discord")
            await answered(world.fake, dm)
            await world.fake.wait_for(
                lambda: [m.text for m in telegram.bot_messages(TELEGRAM_USER)] == [ANSWER]
            )
        finally:
            both.cancel()
            # gather returns when the first platform has stopped; wait for both.
            await asyncio.wait(platforms, timeout=15)
            assert all(p.cancelled() for p in platforms)
    with sqlite3.connect(world.tmp_path / "both.db") as conn:
        asked = conn.execute(
            "SELECT platform, text FROM messages WHERE role='user' ORDER BY platform"
        ).fetchall()
    assert asked == [("discord", "hello from Discord"), ("telegram", "hello from Telegram")]


@pytest.mark.slow
async def test_real_model_answers_a_dm(world: World) -> None:
    from engine.worker import LocalEngine

    engine_config = EngineConfig(temperature=0, max_new_tokens=48)
    engine: Any = await asyncio.to_thread(LocalEngine.from_config, ModelConfig(), engine_config)
    try:
        bot = await world.start(
            engine=engine, max_new_tokens=48, system_prompt=DEFAULT_SYSTEM_PROMPT
        )
        dm = world.fake.open_dm("carol")
        await world.fake.user_message(dm, "carol", "What is the capital of France?")
        await world.fake.wait_for(lambda: len(bot.rows()) == 2, timeout=120)
        [reply] = world.fake.bot_messages(dm)
        await bot.chain_of(dm, reply.id)  # finished: shown in full and linked
        assert "Paris" in world.fake.message(reply.id).content
        assert world.fake.message(reply.id).content == bot.rows()[1][1].strip()
        await bot.stop()
    finally:
        engine.close()
