"""Connecting discord.py: the gateway intents lorabot needs, the endpoints of a
self-hosted Discord-compatible server, and a gateway that survives events discord.py
cannot read."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import discord
import discord.gateway
import discord.http
import yarl

log = logging.getLogger(__name__)


def intents() -> discord.Intents:
    wanted = discord.Intents.none()
    wanted.guilds = True  # channels, threads and roles in the cache
    wanted.guild_messages = wanted.dm_messages = True
    wanted.guild_reactions = wanted.dm_reactions = True  # 👍/👎 ratings
    wanted.message_content = True  # privileged: the text of messages that do not mention us
    return wanted


def guard_parsers(parsers: dict[str, Callable[[Any], None]]) -> None:
    """Make discord.py drop (and log) a gateway event it cannot read instead of letting
    the error end the connection: Discord adds fields and event shapes over time."""

    def guarded(event: str, parse: Callable[[Any], None]) -> Callable[[Any], None]:
        def run(data: Any) -> None:
            try:
                parse(data)
            except Exception:
                log.exception("discord: dropped a %s event that could not be read", event)

        return run

    for event, parse in list(parsers.items()):
        if event != "READY":  # without it nothing works: let that one fail loudly
            parsers[event] = guarded(event, parse)


@contextlib.contextmanager
def discord_endpoints(api_base: str, gateway_url: str) -> Iterator[None]:
    """Point discord.py at a Discord-compatible server (REST base and gateway) while the
    client runs; empty values keep Discord's own."""
    old_base = discord.http.Route.BASE
    old_gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    if api_base:
        discord.http.Route.BASE = api_base.rstrip("/")
    if gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
    try:
        yield
    finally:
        discord.http.Route.BASE = old_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_gateway
