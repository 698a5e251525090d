"""Pacing Discord writes: one channel's edits and follow-ups `interval` apart, all of
the bot's writes under Discord's global rate limit, and 429s that reach us.

Discord allows about 5 message writes per 5 s per channel and 50 requests/s per bot;
discord.py reads the rate-limit headers and waits when a bucket is empty, but a
streaming reply would empty its channel's bucket in a second and then stall. Writing at
a steady pace never empties it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import discord

GLOBAL_WRITES_PER_S = 40.0  # under Discord's 50 requests/s per bot


class Throttle:
    """One channel's turn-taking: writes one at a time, `interval` apart (measured from
    the end of the previous write, so a rate-limited retry is never followed at once)."""

    def __init__(self, interval: float, spacing: GlobalSpacing) -> None:
        self.interval = interval
        self._spacing = spacing
        self._lock = asyncio.Lock()
        self._next = 0.0

    @contextlib.asynccontextmanager
    async def turn(self, *, wait: bool = True) -> AsyncIterator[None]:
        async with self._lock:
            delay = self._next - time.monotonic()
            if wait and delay > 0:
                await asyncio.sleep(delay)
            await self._spacing.wait()
            try:
                yield
            finally:
                self._next = time.monotonic() + self.interval

    async def spaced(self) -> None:
        """Wait for a slot of the bot-wide budget only (requests outside the turn)."""
        await self._spacing.wait()

    @property
    def idle(self) -> bool:
        return not self._lock.locked() and time.monotonic() >= self._next


class GlobalSpacing:
    """Spaces all writes of the bot so they stay under Discord's global rate limit."""

    def __init__(self, per_second: float = GLOBAL_WRITES_PER_S) -> None:
        self._gap = 1.0 / per_second
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        at = max(now, self._next)
        self._next = at + self._gap
        if at > now:
            await asyncio.sleep(at - now)


class Throttles:
    """The throttle of each channel (idle ones are forgotten)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._spacing = GlobalSpacing()
        self._by_channel: dict[int, Throttle] = {}

    def of(self, channel_id: int) -> Throttle:
        throttle = self._by_channel.get(channel_id)
        if throttle is None:
            if len(self._by_channel) > 1000:
                self._by_channel = {k: t for k, t in self._by_channel.items() if not t.idle}
            throttle = self._by_channel[channel_id] = Throttle(self.interval, self._spacing)
        return throttle


def retry_after(exc: discord.HTTPException) -> float | None:
    """Seconds to wait after a 429 that reached us. discord.py retries 429s itself,
    except those it takes for a Cloudflare ban (no Via header), which a proxy or a
    self-hosted server may send."""
    if exc.status != 429:
        return None
    headers = getattr(exc.response, "headers", None) or {}
    try:
        return min(float(headers.get("Retry-After", 1.0)), 60.0)
    except ValueError:
        return 1.0
