"""Telegram's flood limits, kept by the bot instead of discovered through bans.

Telegram allows about one message per second in a chat, 20 per minute in a group (edits
count) and about 30 per second for the whole bot; beyond that it answers 429 with a
`retry_after`, and bots that keep pushing get longer and longer bans. Every send and
edit therefore takes a slot from its chat's window and from the bot's window first.
Two kinds of request:

* required (a first message, a continuation, the final edit, a notice) waits for a
  slot;
* optional (an intermediate streaming edit) only goes if a slot is free now, keeps to
  the slower streaming cadence, and leaves headroom for required ones; otherwise it is
  skipped and the next edit carries the newer text.

A 429 closes the chat for the time Telegram names; `ChatPacer.call` waits it out (and
network errors) for required requests, up to MAX_TRIES.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import logging
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from telegram.error import BadRequest, NetworkError, RetryAfter, TelegramError
from telegram.warnings import PTBDeprecationWarning

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_TRIES = 5  # per required request, counting 429s and network errors


def retry_seconds(error: RetryAfter) -> float:
    """`retry_after` is an int, or a timedelta with PTB_TIMEDELTA=true (PTB 22 warns
    about the int form; the value is the same)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value: Any = error.retry_after
    return value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)


@dataclass(frozen=True)
class Pacing:
    """Limits per chat and for the whole bot. Defaults follow Telegram's published
    limits; tests shrink them."""

    chat_gap_s: float = 1.0  # least time between two requests in one chat
    group_budget: int = 20  # requests per group...
    group_window_s: float = 60.0  # ...in this many seconds (edits included)
    group_headroom: int = 4  # slots streaming edits leave for required requests
    bot_budget: int = 30  # requests per second for the whole bot
    bot_headroom: int = 6  # slots of it streaming edits and typing leave free
    typing_every_s: float = 4.0  # a typing action lasts 5 s on clients

    def __post_init__(self) -> None:
        problems = [
            f"{name}={value!r}: must be > 0"
            for name, value in (
                ("group_budget", self.group_budget),
                ("group_window_s", self.group_window_s),
                ("bot_budget", self.bot_budget),
                ("typing_every_s", self.typing_every_s),
            )
            if value <= 0
        ]
        if self.chat_gap_s < 0:
            problems.append(f"chat_gap_s={self.chat_gap_s!r}: must be >= 0")
        if not 0 <= self.group_headroom < self.group_budget:
            problems.append(f"group_headroom={self.group_headroom}: must be in [0, group_budget)")
        if not 0 <= self.bot_headroom < self.bot_budget:
            problems.append(f"bot_headroom={self.bot_headroom}: must be in [0, bot_budget)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def group_edit_gap_s(self) -> float:
        """Streaming edits in a group spread the budget evenly (3 s for 20 a minute)."""
        return max(self.chat_gap_s, self.group_window_s / self.group_budget)


class RateWindow:
    """At most `limit` events per `window_s` seconds, `gap` apart, none before a hold
    (a 429) ends. `limit` None: only the gap and holds apply."""

    def __init__(self, limit: int | None, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._held_until = 0.0

    def wait(self, now: float, *, gap: float, headroom: int = 0) -> float:
        """Seconds until one more event may happen while `headroom` slots stay free."""
        delay = self._held_until - now
        if self._times:
            delay = max(delay, self._times[-1] + gap - now)
        if self.limit is not None:
            while self._times and self._times[0] <= now - self.window_s:
                self._times.popleft()
            excess = len(self._times) - (self.limit - 1 - headroom)
            if excess > 0:
                delay = max(delay, self._times[excess - 1] + self.window_s - now)
        return max(delay, 0.0)

    def record(self, now: float) -> None:
        self._times.append(now)

    def hold(self, until: float) -> None:
        self._held_until = max(self._held_until, until)


class Pacer:
    """The bot's window and one per chat (created on first use)."""

    def __init__(self, pacing: Pacing, clock: Callable[[], float] = time.monotonic) -> None:
        self.pacing = pacing
        self.clock = clock
        self.bot = RateWindow(pacing.bot_budget, 1.0)
        self._chats: dict[int, ChatPacer] = {}

    def chat(self, chat_id: int, *, is_group: bool) -> ChatPacer:
        pacer = self._chats.get(chat_id)
        if pacer is None:
            p = self.pacing
            if is_group:
                window = RateWindow(p.group_budget, p.group_window_s)
            else:
                window = RateWindow(None, 1.0)
            edit_gap = p.group_edit_gap_s if is_group else p.chat_gap_s
            headroom = p.group_headroom if is_group else 0
            pacer = ChatPacer(self, chat_id, window, edit_gap=edit_gap, headroom=headroom)
            self._chats[chat_id] = pacer
        return pacer

    def may_type(self) -> bool:
        """Typing actions are cosmetic: only when the bot has spare requests this second."""
        now = self.clock()
        if self.bot.wait(now, gap=0.0, headroom=self.pacing.bot_headroom) > 0:
            return False
        self.bot.record(now)
        return True


class ChatPacer:
    def __init__(
        self, pacer: Pacer, chat_id: int, window: RateWindow, *, edit_gap: float, headroom: int
    ) -> None:
        self._pacer = pacer
        self.chat_id = chat_id
        self.window = window
        self.edit_gap = edit_gap
        self.headroom = headroom

    def _wait(self, now: float, *, optional: bool) -> float:
        p = self._pacer.pacing
        gap = self.edit_gap if optional else p.chat_gap_s
        chat = self.window.wait(now, gap=gap, headroom=self.headroom if optional else 0)
        bot = self._pacer.bot.wait(now, gap=0.0, headroom=p.bot_headroom if optional else 0)
        return max(chat, bot)

    def _record(self, now: float) -> None:
        self.window.record(now)
        self._pacer.bot.record(now)

    async def acquire(self) -> None:
        """Wait for a slot (required requests)."""
        while True:
            now = self._pacer.clock()
            delay = self._wait(now, optional=False)
            if delay <= 0:
                self._record(now)
                return
            await asyncio.sleep(delay)

    def try_acquire(self) -> bool:
        """Take a slot if one is free now (optional requests)."""
        now = self._pacer.clock()
        if self._wait(now, optional=True) > 0:
            return False
        self._record(now)
        return True

    def moved(self, chat_id: int) -> ChatPacer:
        """The pacer of the supergroup this group became (a new chat, its own window)."""
        return self._pacer.chat(chat_id, is_group=True)

    def hold(self, seconds: float) -> None:
        """Telegram said 429: nothing in this chat for `seconds`."""
        self.window.hold(self._pacer.clock() + seconds)

    async def call(self, request: Callable[[], Awaitable[T]], *, required: bool) -> T | None:
        """Run one Bot API call within the chat's pace. Optional calls give up at the
        first obstacle (None); required ones wait out 429s and network errors."""
        error: TelegramError | None = None
        for attempt in range(1, MAX_TRIES + 1):
            if required:
                await self.acquire()
            elif not self.try_acquire():
                return None
            try:
                return await request()
            except RetryAfter as exc:
                seconds = retry_seconds(exc)
                self.hold(seconds)
                log.warning("telegram: 429 in chat %s; waiting %.1f s", self.chat_id, seconds)
                error = exc
            except BadRequest:
                raise
            except NetworkError as exc:  # timeouts, 5xx, connection trouble
                log.warning("telegram: network error in chat %s: %s", self.chat_id, exc)
                error = exc
                if required:
                    await asyncio.sleep(min(0.5 * 2**attempt, 8.0))
            if not required:
                return None
        assert error is not None
        raise error
