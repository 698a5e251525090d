"""End to end: `python -m bot` in a terminal, on the real embedded SmolLM2 model."""

from __future__ import annotations

import os
import pty
import select
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.terminal_checks import check_france_turns

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "bot.toml"
    config.write_text(
        '[storage]\npath = "chat.db"\n[engine]\ntemperature = 0.0\nmax_new_tokens = 64\n'
        '[bot]\nlog_level = "WARNING"\n',
        encoding="utf-8",
    )
    return config


def run_piped(config: Path, lines: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", "--config", str(config)],
        input=lines,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )


def test_piped_turns_are_answered_in_order_and_stored(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_piped(config, "What is the capital of France?\n/help\n/retry\n")
    stored = check_france_turns(result, tmp_path / "chat.db")
    assert stored[0][2] == "What is the capital of France?"


class Terminal:
    """`python -m bot` on a pseudo-terminal, as a person would run it."""

    def __init__(self, config: Path) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.chdir(ROOT)
            os.execv(sys.executable, [sys.executable, "-m", "bot", "--config", str(config)])
        self.screen = ""

    def read_until(self, marker: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        start = len(self.screen)
        while marker not in self.screen[start:]:
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw {marker!r}; screen:\n{self.screen[-2000:]}")
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.screen += os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:
                    break
        return self.screen[start:]

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_interactive_chat_survives_a_restart(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    term = Terminal(config)
    term.read_until("you> ")
    term.type("What is the capital of France?")
    answer = term.read_until("you> ")
    assert "Paris" in answer
    term.type("/exit")
    term.read_until("kept")
    assert term.wait() == 0

    again = Terminal(config)
    greeting = again.read_until("you> ")
    assert "Continuing your conversation (2 messages)" in greeting
    again.type("/reset")
    assert "new conversation" in again.read_until("you> ")
    again.type("/exit")
    assert again.wait() == 0
    with sqlite3.connect(tmp_path / "chat.db") as db:
        conversations = db.execute("SELECT closed_at IS NULL FROM conversations").fetchall()
    assert conversations == [(0,)]  # one conversation, closed by /reset, still stored
