"""Who may talk to the Discord bot, and where: the [discord] allow-lists.

"Where" lists (guilds, channels; `allow_dms`) and "who" lists (users, roles) are each
open when empty. A user passes the who-check by being listed or by holding a listed
role; a channel passes when it, its parent channel (for a thread) or its category is
listed. Admins pass everything. Roles exist only in servers: in a DM, a user's roles
are looked up in the servers the bot shares with them.

A refused user is told once per channel and hour, so that nobody can make the bot
flood a channel with refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import discord

from bot.discord_config import DiscordConfig

log = logging.getLogger(__name__)

REFUSE_AGAIN_AFTER_S = 3600.0
ROLE_LOOKUP_GUILDS = 10  # servers asked for a DM user's roles, at most
ROLE_LOOKUP_TIMEOUT_S = 2.0  # keeps a slash command inside Discord's 3 s deadline


@dataclass(frozen=True)
class Place:
    """Where a message was written: a DM (no guild) or a server channel or thread."""

    guild_id: int | None
    channel_ids: tuple[int, ...] = ()  # the channel or thread, its parent, its category

    @property
    def is_dm(self) -> bool:
        return self.guild_id is None


def place_of(channel: Any, guild_id: int | None) -> Place:
    """The place of a cached channel or thread (or of a bare id when uncached)."""
    if guild_id is None:
        return Place(None, (int(getattr(channel, "id", 0) or 0),))
    ids = [getattr(channel, "id", None)]
    ids.append(getattr(channel, "parent_id", None))  # threads (and forum posts)
    ids.append(getattr(channel, "category_id", None))
    parent = getattr(channel, "parent", None)
    ids.append(getattr(parent, "category_id", None))
    return Place(guild_id, tuple(dict.fromkeys(int(i) for i in ids if i)))


class AccessPolicy:
    def __init__(self, cfg: DiscordConfig) -> None:
        self.cfg = cfg

    def is_admin(self, user_id: int) -> bool:
        return user_id in self.cfg.admins

    def place_ok(self, place: Place) -> bool:
        cfg = self.cfg
        if place.is_dm:
            return cfg.allow_dms
        if cfg.allowed_guilds and place.guild_id not in cfg.allowed_guilds:
            return False
        return not cfg.allowed_channels or any(c in cfg.allowed_channels for c in place.channel_ids)

    def who_ok(self, user_id: int, role_ids: Iterable[int]) -> bool:
        cfg = self.cfg
        if not cfg.allowed_users and not cfg.allowed_roles:
            return True
        return user_id in cfg.allowed_users or any(r in cfg.allowed_roles for r in role_ids)

    def needs_role_lookup(self, user_id: int, place: Place) -> bool:
        """A DM whose sender passes only if they hold an allowed role somewhere."""
        cfg = self.cfg
        return (
            place.is_dm
            and bool(cfg.allowed_roles)
            and user_id not in cfg.allowed_users
            and not self.is_admin(user_id)
        )

    async def allows(self, client: discord.Client, user: Any, place: Place) -> bool:
        """Whether `user` (a Member in servers, a User in DMs) may use the bot here."""
        if self.is_admin(user.id):
            return True
        if not self.place_ok(place):
            return False
        if self.needs_role_lookup(user.id, place):
            roles = await roles_in_shared_guilds(client, user.id, self.cfg.allowed_guilds)
        else:
            roles = [role.id for role in getattr(user, "roles", ())]
        return self.who_ok(user.id, roles)


async def roles_in_shared_guilds(
    client: discord.Client, user_id: int, only: tuple[int, ...]
) -> list[int]:
    """The user's role ids in the servers the bot shares with them (cached members
    first, else one REST lookup per server, all within ROLE_LOOKUP_TIMEOUT_S)."""
    guilds = [g for g in client.guilds if not only or g.id in only][:ROLE_LOOKUP_GUILDS]

    async def roles_in(guild: discord.Guild) -> list[int]:
        member = guild.get_member(user_id)
        if member is None:
            try:
                member = await guild.fetch_member(user_id)
            except discord.HTTPException:  # not a member there (404), or no access
                return []
        return [role.id for role in member.roles]

    found: list[int] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(ROLE_LOOKUP_TIMEOUT_S):
            for roles in await asyncio.gather(*(roles_in(g) for g in guilds)):
                found.extend(roles)
    if not found:
        log.debug("discord: no roles found for user %s in %d servers", user_id, len(guilds))
    return found


class RefusalLimiter:
    """Remembers whom we refused where, so each is told once per window."""

    def __init__(self, window_s: float = REFUSE_AGAIN_AFTER_S) -> None:
        self._window_s = window_s
        self._told: dict[tuple[int, int], float] = {}

    def should_tell(self, user_id: int, channel_id: int) -> bool:
        now = time.monotonic()
        if len(self._told) > 10_000:
            self._told = {k: t for k, t in self._told.items() if now - t < self._window_s}
        told = self._told.get((user_id, channel_id))
        if told is not None and now - told < self._window_s:
            return False
        self._told[(user_id, channel_id)] = now
        return True
