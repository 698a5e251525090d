"""Wiring: config -> store, engine, chat service -> the enabled platforms (or the
terminal when none is enabled). Resources are opened here and closed in reverse."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict

from bot.config import Config
from bot.service import ChatService
from bot.store import Store
from bot.terminal_chat import run_terminal
from engine.types import Engine

log = logging.getLogger("bot")


async def open_engine(config: Config) -> Engine:
    """Load the model on a thread: it takes seconds and the loop may have other work."""
    from engine.worker import LocalEngine

    return await asyncio.to_thread(LocalEngine.from_config, config.model, config.engine)


async def run(config: Config) -> None:
    log.info("config: %s", asdict(config))
    store = await Store.open(config.storage.path)
    try:
        engine = await open_engine(config)
        try:
            service = ChatService(
                store,
                engine,
                system_prompt=config.bot.system_prompt,
                sampling=config.engine.sampling(),
            )
            platforms = []
            if config.telegram.enabled:
                from bot.telegram_bot import run_telegram

                platforms.append(run_telegram(service, config.telegram))
            if config.discord.enabled:
                from bot.discord_bot import run_discord

                platforms.append(run_discord(service, config.discord))
            if platforms:
                # Each runs until cancelled (Ctrl-C); one failing stops the others.
                await asyncio.gather(*platforms)
            else:
                await run_terminal(service)
        finally:
            engine.close()
    finally:
        await store.close()
