"""The asyncio side of a request: a stream of text deltas fed from the worker thread.

The worker calls `push`/`finish`/`fail` from its own thread; they hop onto the event
loop with `call_soon_threadsafe` (the aiosqlite design). Deltas that arrive while the
consumer is busy are merged, so a slow consumer (a throttled chat platform) never makes
the worker wait (vLLM's RequestOutputCollector).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable

from engine.types import Completion, EngineError, EngineStalled


class TextStream:
    """Async iterator of text deltas; `completion` is set once it is exhausted."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stall_timeout_s: float) -> None:
        self._loop = loop
        self._stall_timeout_s = stall_timeout_s
        self._pending = ""
        self._done = False
        self._error: BaseException | None = None
        self._wakeup = asyncio.Event()
        self._cancel = threading.Event()
        self._on_cancel: Callable[[], None] | None = None
        self.completion: Completion | None = None

    # Worker side (any thread) -------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def push(self, text: str) -> None:
        if text:
            self._call(self._push, text)

    def finish(self, completion: Completion) -> None:
        self._call(self._finish, completion)

    def fail(self, error: BaseException) -> None:
        self._call(self._fail, error)

    def _call(self, fn: Callable[..., None], arg: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            # The event loop is closed: nobody is listening any more.
            self._cancel.set()

    # Event-loop side ----------------------------------------------------------------
    def _push(self, text: str) -> None:
        self._pending += text
        self._wakeup.set()

    def _finish(self, completion: Completion) -> None:
        self.completion = completion
        self._done = True
        self._wakeup.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._done = True
        self._wakeup.set()

    def cancel(self) -> None:
        """Abort the request in the engine (safe to call more than once)."""
        if not self._cancel.is_set():
            self._cancel.set()
            if self._on_cancel is not None:
                self._on_cancel()

    def set_cancel_callback(self, callback: Callable[[], None]) -> None:
        self._on_cancel = callback

    def __aiter__(self) -> AsyncGenerator[str, None]:
        return self._iterate()

    async def _iterate(self) -> AsyncGenerator[str, None]:
        finished = False
        try:
            while True:
                if not self._pending and not self._done:
                    try:
                        # asyncio.timeout, not wait_for: no extra task per delta, which
                        # matters with dozens of streams each getting a delta per step.
                        async with asyncio.timeout(self._stall_timeout_s):
                            await self._wakeup.wait()
                    except TimeoutError:
                        raise EngineStalled(
                            f"no output from the engine for {self._stall_timeout_s:.0f} s"
                        ) from None
                self._wakeup.clear()
                if self._pending:
                    text, self._pending = self._pending, ""
                    yield text
                    continue
                if self._error is not None:
                    raise self._error
                if self._done:
                    finished = True
                    return
        finally:
            # Consumer left early (break, CancelledError, GeneratorExit) or failed.
            if not finished:
                self.cancel()

    async def collect(self) -> str:
        """The whole text (for callers that do not stream)."""
        parts = [delta async for delta in self]
        if self.completion is None:
            raise EngineError("stream ended without a completion")
        return "".join(parts)
