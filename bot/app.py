"""Wiring: config -> store, engine, chat service -> the enabled platforms (or the
terminal when none is enabled). Resources are opened here and closed in reverse."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import asdict
from typing import Any

from bot.config import Config
from bot.service import ChatService
from bot.store import Store
from bot.terminal_chat import run_terminal
from engine.remote import OpenAIEngine
from engine.types import Engine

log = logging.getLogger("bot")


async def open_engine(config: Config) -> Engine:
    """The configured backend: an OpenAI-compatible server ([engine] backend = "openai"),
    or the model loaded here, on a thread (it takes seconds and the loop may have other
    work). Only the local backend imports torch."""
    if config.engine.backend == "openai":
        return await OpenAIEngine.open(config.model, config.engine)
    from engine.worker import LocalEngine

    return await asyncio.to_thread(LocalEngine.from_config, config.model, config.engine)


async def close_engine(engine: Engine) -> None:
    if isinstance(engine, OpenAIEngine):
        await engine.aclose()  # also closes its HTTP connections
    else:
        engine.close()


async def run_platforms(platforms: list[Coroutine[Any, Any, None]]) -> None:
    """Run every platform until one fails or we are cancelled (Ctrl-C, SIGTERM); then
    cancel the others and wait until each has drained, so none still sends replies
    while the engine and store close behind it."""
    tasks = [asyncio.create_task(p) for p in platforms]
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # a platform that stopped by itself: raise its error
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("a platform failed while stopping: %r", result)


async def run(config: Config) -> None:
    log.info("config: %s", asdict(config))
    if config.serve.enabled:
        config.serve.api_key()  # a missing key is a config error before the model loads
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
            if config.serve.enabled:
                from bot.web_chat import run_web

                platforms.append(run_web(service, engine, config.serve, config.engine.sampling()))
            if platforms:
                await run_platforms(platforms)
            else:
                await run_terminal(service)
        finally:
            await close_engine(engine)
    finally:
        await store.close()
