"""The terminal adapter: chat with the bot in a shell, or pipe lines through it.

Interactive: a `you>` prompt, answers streamed as they are generated. Piped: each line
of stdin is a turn, answered in order; `/exit` or the end of input quits after the last
answer. Stdin is read on a daemon thread so the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
import threading
from typing import TextIO

from bot.service import HELP, ChatService, Incoming

PLATFORM = "terminal"
TERMINAL_HELP = "/exit — quit (the conversation is kept for next time)"


class TerminalSink:
    """Writes one reply to the terminal as it streams."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._shown = 0
        self._prefixed = False  # "bot> " already on the line (typing() was shown)

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()

    async def notice(self, text: str) -> None:
        if self._prefixed and not self._shown:
            self._write(f"{text}\n")  # e.g. busy or failed right after typing()
        else:
            newline = "\n" if self._shown else ""  # after a partial reply: own line
            self._write(f"{newline}bot> {text}\n")
        self._prefixed = False

    async def typing(self) -> None:
        self._write("bot> ")
        self._prefixed = True

    async def update(self, text: str) -> None:
        self._write(text[self._shown :])
        self._shown = len(text)

    async def finish(self, text: str, reply_id: int) -> None:
        self._write(text[self._shown :] + "\n")
        self._shown = len(text)


def _read_lines(
    loop: asyncio.AbstractEventLoop,
    queue: asyncio.Queue[str | None],
    prompt_ready: threading.Event | None,
) -> None:
    """Feed stdin lines to the loop. Interactively, input() gives line editing, and the
    prompt waits until the previous answer is finished."""
    while True:
        if prompt_ready is not None:
            prompt_ready.wait()
            prompt_ready.clear()
            try:
                line: str | None = input("you> ")
            except EOFError:
                line = None
        else:
            raw = sys.stdin.readline()
            line = raw.rstrip("\r\n") if raw else None
        loop.call_soon_threadsafe(queue.put_nowait, line)
        if line is None:
            return


async def run_terminal(service: ChatService, out: TextIO = sys.stdout) -> None:
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()

    user = getpass.getuser()
    conv = await service.store.open_conversation(PLATFORM, user, user)
    earlier = len(await service.store.history(conv))
    if interactive:
        note = f" Continuing your conversation ({earlier} messages)." if earlier else ""
        out.write(f"lorabot is ready.{note} /help for commands, /exit to quit.\n")
        out.flush()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    prompt_ready = threading.Event() if interactive else None
    reader = threading.Thread(
        target=_read_lines,
        args=(asyncio.get_running_loop(), queue, prompt_ready),
        daemon=True,
    )
    reader.start()
    while True:
        if prompt_ready is not None:
            prompt_ready.set()
        line = await queue.get()
        if line is None or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        sink = TerminalSink(out)
        if line.strip().lower() in ("/help", "/start"):
            await sink.notice(f"{HELP}\n{TERMINAL_HELP}")
            continue
        incoming = Incoming(platform=PLATFORM, chat_id=user, user_id=user, text=line)
        await service.handle(incoming, sink)
    if interactive:
        out.write("\nbye — your conversation is kept.\n")
        out.flush()
