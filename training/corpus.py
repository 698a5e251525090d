"""Every input file read into one list of conversations, with what was dropped and why.

Also: the normalised form (chat JSONL, the bot's export format) an admin can inspect,
its hash (recorded with the adapter), and the validation split by conversation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from training.data import Conversation, Problem, ReadResult, read_dataset, summarize

SHOWN_PROBLEMS = 20


@dataclass
class Corpus:
    conversations: list[Conversation]
    results: list[ReadResult]

    @property
    def problems(self) -> list[Problem]:
        return [problem for result in self.results for problem in result.problems]


def read_corpus(
    paths: Sequence[str], fmt: str | None, persona: str | None, gap_minutes: float
) -> Corpus:
    results = [
        read_dataset(Path(path), fmt, persona=persona, gap_minutes=gap_minutes) for path in paths
    ]
    conversations = [c for result in results for c in result.conversations]
    return Corpus(conversations, results)


def describe_problems(
    corpus: Corpus, out: TextIO, limit: int = SHOWN_PROBLEMS, totals: bool = True
) -> None:
    """Each bad record with its file and position (the first `limit`), then totals."""
    problems = corpus.problems
    for problem in problems[:limit]:
        print(f"  {problem.file} ({problem.position}): {problem.reason}", file=out)
    if len(problems) > limit:
        print(f"  ... and {len(problems) - limit} more", file=out)
    summary = summarize(corpus.results)
    if totals and summary["skipped"]["total"]:
        reasons = ", ".join(
            f"{reason} {count}" for reason, count in summary["skipped"]["by_reason"].items()
        )
        print(f"  skipped records by reason: {reasons}", file=out)


def conversation_line(conversation: Conversation) -> str:
    record = {
        "messages": [{"role": t.role, "content": t.content} for t in conversation.turns],
        "source": conversation.source,
    }
    return json.dumps(record, ensure_ascii=False)


def conversation_lines(conversations: Sequence[Conversation]) -> Iterator[str]:
    for conversation in conversations:
        yield conversation_line(conversation)


def write_conversations(path: Path, conversations: Sequence[Conversation]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for line in conversation_lines(conversations):
            handle.write(line + "\n")


def content_key(conversation: Conversation) -> str:
    turns = [[t.role, t.content] for t in conversation.turns]
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode()).hexdigest()


def data_hash(conversations: Sequence[Conversation]) -> str:
    """sha256 over the conversations' contents in order (sources do not count)."""
    digest = hashlib.sha256()
    for conversation in conversations:
        digest.update(content_key(conversation).encode())
    return digest.hexdigest()


def split_validation(
    conversations: Sequence[Conversation], fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation), split by conversation content: duplicates of a held-out
    conversation are held out too, so the validation loss is never on seen text."""
    keys = [content_key(c) for c in conversations]
    unique = sorted(set(keys), key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    if fraction <= 0 or len(unique) < 2:
        return list(conversations), []
    count = min(max(1, round(fraction * len(unique))), len(unique) - 1)
    held = set(unique[:count])
    train = [c for c, k in zip(conversations, keys, strict=True) if k not in held]
    val = [c for c, k in zip(conversations, keys, strict=True) if k in held]
    return train, val
