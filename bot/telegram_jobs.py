"""The bot's running work: each chat's turns one after another, different chats at once.

PTB hands over updates one at a time, in order; each handler decides at once and
submits a job. A turn takes its chat's lock as its first step, and asyncio starts tasks
in the order they were created and wakes lock waiters first come, first served, so
turns of one chat run in the order their messages arrived while other chats proceed
(the engine serialises the GPU work). Shutdown waits a grace period for running jobs,
then cancels the rest; a cancelled turn tells its user what happened.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from telegram.error import TelegramError

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[Any]]


class ChatJobs:
    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        self._tasks: set[asyncio.Task[None]] = set()
        self._same: dict[int, int] = {}  # a supergroup's id -> the group's it was

    @property
    def running(self) -> int:
        return len(self._tasks)

    def now(self, job: Job) -> None:
        """Work that needs no order (notices, buttons, /stats)."""
        self._spawn(self._guarded(job))

    def ordered(
        self, chat_id: int, job: Job, interrupted: Callable[[bool], Awaitable[None]]
    ) -> None:
        """A turn of chat `chat_id`, after the ones submitted before it. `interrupted`
        is told whether the job had started when shutdown cancelled it."""
        chat_id = self._same.get(chat_id, chat_id)
        lock = self._locks.get(chat_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[chat_id] = lock
        self._spawn(self._in_order(lock, job, interrupted))

    def same_chat(self, new: int, old: int) -> None:
        """A group became the supergroup `new`: its turns queue behind the group's own,
        so a turn of the old id still running keeps its place."""
        self._same[new] = self._same.get(old, old)

    async def drain(self, grace_s: float) -> None:
        """Let running jobs finish for up to `grace_s`, then cancel what is left."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        if pending:
            log.warning(
                "telegram: %d job(s) still running after %.0f s; stopping them",
                len(pending),
                grace_s,
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=10)

    async def _in_order(
        self, lock: asyncio.Lock, job: Job, interrupted: Callable[[bool], Awaitable[None]]
    ) -> None:
        started = False
        try:
            async with lock:
                started = True
                await job()
        except asyncio.CancelledError:
            await interrupted(started)
            raise

    async def _guarded(self, job: Job) -> None:
        try:
            await job()
        except TelegramError as exc:
            log.warning("telegram: request failed: %s", exc)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("telegram: a job failed", exc_info=task.exception())
