"""What a person sees after piping "What is the capital of France?", /help and /retry
into `python -m bot`, whichever backend answers (shared by the e2e tests)."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import Any


def check_france_turns(result: subprocess.CompletedProcess[str], db: Path) -> list[Any]:
    """Asserts the answers and the stored rows; returns the rows (role, status, text,
    tokens, adapter) for backend-specific checks."""
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if line.startswith("bot> ")]
    assert "Paris" in answers[0]
    assert "/reset" in result.stdout  # the help text
    assert "Paris" in answers[-1]  # /retry answered the same question again
    with sqlite3.connect(db) as conn:
        stored = conn.execute(
            "SELECT role, status, text, tokens, adapter FROM messages ORDER BY id"
        ).fetchall()
    assert [(r[0], r[1]) for r in stored] == [
        ("user", "ok"),
        ("assistant", "superseded"),
        ("assistant", "ok"),
    ]
    assert "Paris" in stored[2][2] and stored[2][3] > 0
    return stored
