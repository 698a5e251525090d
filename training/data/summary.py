"""Totals an admin checks before training: what was read, what was dropped and why."""

from collections import Counter
from collections.abc import Iterable
from typing import Any

from training.data.conversation import ReadResult, reason_category

TOP_REASONS = 5
WHOLE_FILE = "file"


def summarize(results: ReadResult | Iterable[ReadResult]) -> dict[str, Any]:
    """Counts over one or many ReadResults.

    "skipped" counts records that will not be trained on: deliberate skips
    (service messages, stickers, ...) plus bad records, grouped by the
    reason's category. Whole-file problems (unreadable file, missing
    --persona) are not records; they show up in "problems" only.
    """
    batch = [results] if isinstance(results, ReadResult) else list(results)
    roles: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    speakers: Counter[str] = Counter()
    conversations = 0
    for result in batch:
        conversations += len(result.conversations)
        for conversation in result.conversations:
            roles.update(turn.role for turn in conversation.turns)
        for problem in result.problems:
            category = reason_category(problem.reason)
            problems[category] += 1
            if problem.position != WHOLE_FILE:
                skipped[category] += 1
        skipped.update(result.skipped)
        speakers.update(result.speakers)
    summary: dict[str, Any] = {
        "conversations": conversations,
        "turns": sum(roles.values()),
        "turns_by_role": dict(roles),
        "problems": sum(problems.values()),
        "problems_by_reason": dict(problems.most_common()),
        "skipped": {
            "total": sum(skipped.values()),
            "by_reason": dict(skipped.most_common()),
            "top_reasons": skipped.most_common(TOP_REASONS),
        },
    }
    if speakers:
        summary["speakers"] = dict(speakers.most_common())
    return summary
