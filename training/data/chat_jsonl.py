"""Chat JSONL, the bot's own export: {"messages": [{"role", "content"}, ...]} a line.

Extra keys ("id", "meta", per-message "name", ...) are ignored. A JSON array
of such objects is accepted as well, positioned as "record N".
"""

from pathlib import Path
from typing import Any

from training.data.conversation import (
    ROLES,
    Conversation,
    Problem,
    ReadResult,
    Turn,
    find_turn_problem,
)
from training.data.records import iter_records


def read_chat(path: Path) -> ReadResult:
    """Read every conversation line of `path`; bad lines become Problems."""
    result = ReadResult(conversations=[], problems=[])
    for item in iter_records(path):
        if isinstance(item, Problem):
            result.problems.append(item)
            continue
        turns = build_chat_turns(item.value)
        if isinstance(turns, str):
            result.problems.append(Problem(str(path), item.position, turns))
            continue
        result.conversations.append(Conversation(turns, f"{path}:{item.position}"))
    return result


def build_chat_turns(value: Any) -> tuple[Turn, ...] | str:
    """The turns of one chat record, or the reason it is unusable.

    Consecutive same-role turns are reported rather than merged: in the
    bot's own logs they mean a logging bug, not a group conversation.
    """
    if not isinstance(value, dict):
        return f'not an object: expected {{"messages": [...]}}, got {type(value).__name__}'
    messages = value.get("messages")
    if messages is None:
        return "missing field: no 'messages'"
    if not isinstance(messages, list):
        return f"wrong type: 'messages' is {type(messages).__name__}, not a list"
    turns: list[Turn] = []
    for index, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return f"not an object: message {index} is {type(message).__name__}"
        role = message.get("role")
        if role not in ROLES:
            return f"unknown role: message {index} has role {role!r}, expected one of {', '.join(ROLES)}"
        content = message.get("content")
        if not isinstance(content, str):
            return f"non-string content: message {index} content is {type(content).__name__}"
        turns.append(Turn(role, content))
    problem = find_turn_problem(tuple(turns))
    return problem if problem is not None else tuple(turns)
