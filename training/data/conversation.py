"""The reader output types shared by every dataset format."""

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    source: str  # "file:position" of the conversation's first record


@dataclass(frozen=True)
class Problem:
    file: str
    position: str  # "line 12", "record 7", "message id 4521", or "file"
    reason: str  # "category: detail"; summaries group on the category


@dataclass
class ReadResult:
    conversations: list[Conversation]
    problems: list[Problem]
    # Records dropped on purpose (service messages, stickers, ...): too many
    # and too normal to report one by one, but an admin wants the totals.
    skipped: Counter[str] = field(default_factory=Counter)
    # Messages per speaker ("Name [id]") for group chat exports.
    speakers: Counter[str] = field(default_factory=Counter)

    def extend(self, other: "ReadResult") -> None:
        """Fold another result (e.g. another chat of the same export) into this one."""
        self.conversations.extend(other.conversations)
        self.problems.extend(other.problems)
        self.skipped.update(other.skipped)
        self.speakers.update(other.speakers)


def find_turn_problem(turns: tuple[Turn, ...]) -> str | None:
    """Return why `turns` cannot be used for training, or None when they can.

    Rules: an optional leading system turn, then user/assistant strictly
    alternating starting with user, and at least one non-empty assistant turn.
    """
    if not turns:
        return "empty conversation: no turns"
    body = turns[1:] if turns[0].role == "system" else turns
    if body is not turns and not turns[0].content.strip():
        return "empty content: turn 1 (system) is empty"
    expected: Role = "user"
    for index, turn in enumerate(body, start=len(turns) - len(body) + 1):
        if turn.role == "system":
            return f"misplaced system turn: turn {index} is a system turn after the start"
        if not turn.content.strip():
            return f"empty content: turn {index} ({turn.role}) is empty"
        if turn.role != expected:
            if index == len(turns) - len(body) + 1:
                return f"roles do not alternate: turn {index} is {turn.role}, conversations must start with user"
            return f"roles do not alternate: turns {index - 1} and {index} are both {turn.role}"
        expected = "assistant" if expected == "user" else "user"
    if not any(turn.role == "assistant" for turn in body):
        return "no assistant turn: nothing to learn from"
    return None


def reason_category(reason: str) -> str:
    """The grouping key of a problem reason: the text before the first colon."""
    return reason.split(":", 1)[0].strip()
