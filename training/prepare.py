"""`python -m training prepare`: what a run would train on, without training.

Reads the files, tokenizes with the model's chat format, prints the statistics
(conversations, turns, tokens, truncated, skipped with reasons) and, with --out, writes
the normalised conversations as chat JSONL.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from engine.chat_format import make_chat_format
from engine.config import ModelConfig
from training.corpus import (
    Corpus,
    data_hash,
    describe_problems,
    read_corpus,
    write_conversations,
)
from training.data import summarize
from training.examples import build_examples
from training.model import load_tokenizer


class NothingToTrain(ValueError):
    """No usable conversation is left in the input."""


def require_conversations(corpus: Corpus, paths: list[str]) -> None:
    if not corpus.conversations:
        problems = len(corpus.problems)
        raise NothingToTrain(
            f"no usable conversation in {', '.join(paths)} "
            f"({problems} problem{'s' if problems != 1 else ''}, listed above)"
        )


def prepare(
    paths: list[str],
    *,
    fmt: str | None,
    persona: str | None,
    gap_minutes: float,
    model_cfg: ModelConfig,
    max_len: int,
    train_on_inputs: bool,
    out: Path | None,
    as_json: bool,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    stream = stream or sys.stdout
    started = time.perf_counter()
    corpus = read_corpus(paths, fmt, persona, gap_minutes)
    if corpus.problems:
        print(f"{len(corpus.problems)} problem(s) in the input:", file=sys.stderr)
        describe_problems(corpus, sys.stderr, totals=False)
    require_conversations(corpus, paths)
    tokenizer, base_name, _folder = load_tokenizer(model_cfg)
    chat_format = make_chat_format(model_cfg.chat_format, tokenizer)
    _examples, stats = build_examples(
        corpus.conversations, chat_format, max_len, train_on_inputs=train_on_inputs
    )
    print_example_problems(stats.problems, sys.stderr)
    if out is not None:
        write_conversations(out, corpus.conversations)
    report = {
        "files": paths,
        "base": base_name,
        "chat_format": chat_format.name,
        "max_len": max_len,
        "data_sha256": data_hash(corpus.conversations),
        "read": summarize(corpus.results),
        "tokens": stats.as_dict(),
        "written": str(out) if out is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if as_json:
        print(json.dumps(report, ensure_ascii=False, indent=1), file=stream)
    else:
        print_report(report, stream)
    return report


def print_example_problems(problems: list[str], out: TextIO, limit: int = 20) -> None:
    """Conversations read fine but left out at tokenization (too long, template error)."""
    if problems:
        print(f"{len(problems)} conversation(s) left out at tokenization:", file=out)
    for line in problems[:limit]:
        print(f"  {line}", file=out)
    if len(problems) > limit:
        print(f"  ... and {len(problems) - limit} more", file=out)


def print_report(report: dict[str, Any], out: TextIO) -> None:
    read, tokens = report["read"], report["tokens"]
    roles = ", ".join(f"{role} {count:,}" for role, count in read["turns_by_role"].items())
    print(f"read {len(report['files'])} file(s) in {report['seconds']} s", file=out)
    print(f"  conversations: {read['conversations']:,}", file=out)
    print(f"  turns: {read['turns']:,} ({roles})", file=out)
    print(f"  records skipped: {read['skipped']['total']:,}", file=out)
    for reason, count in read["skipped"]["by_reason"].items():
        print(f"    {reason}: {count:,}", file=out)
    if "speakers" in read:
        top = list(read["speakers"].items())[:5]
        print("  speakers: " + ", ".join(f"{name} {count}" for name, count in top), file=out)
    print(
        f"tokens ({report['base']}, {report['chat_format']} format, --max-len {report['max_len']}):",
        file=out,
    )
    print(
        f"  examples: {tokens['examples']:,} of {tokens['conversations']:,} conversations", file=out
    )
    print(f"  tokens: {tokens['tokens']:,} ({tokens['trained_tokens']:,} trained)", file=out)
    print(
        f"  length: median {tokens['length_median']}, p95 {tokens['length_p95']}, "
        f"max {tokens['length_max']}",
        file=out,
    )
    print(
        f"  truncated: {tokens['truncated']:,} conversations lost their oldest turns "
        f"({tokens['dropped_turns']:,} turns)",
        file=out,
    )
    for reason, count in tokens["skipped"].items():
        print(f"  skipped: {reason}: {count:,}", file=out)
    print(f"data sha256: {report['data_sha256']}", file=out)
    if report["written"]:
        print(f"wrote {read['conversations']:,} conversations to {report['written']}", file=out)
