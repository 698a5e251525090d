"""Alpaca instruction data (JSON array or JSONL), LLaMA-Factory flavour.

Record fields: instruction, input (optional), output, system (optional),
history (optional list of [user, assistant] pairs from earlier rounds).
"""

from pathlib import Path
from typing import Any

from training.data.conversation import (
    Conversation,
    Problem,
    ReadResult,
    Turn,
    find_turn_problem,
)
from training.data.records import Record, iter_records


def read_alpaca(path: Path) -> ReadResult:
    """Read every alpaca record of `path`; bad records become Problems."""
    result = ReadResult(conversations=[], problems=[])
    for item in iter_records(path):
        if isinstance(item, Problem):
            result.problems.append(item)
            continue
        turns = build_alpaca_turns(item)
        if isinstance(turns, str):
            result.problems.append(Problem(str(path), item.position, turns))
            continue
        result.conversations.append(Conversation(turns, f"{path}:{item.position}"))
    return result


def build_alpaca_turns(record: Record) -> tuple[Turn, ...] | str:
    """The conversation of one alpaca record, or the reason it is unusable."""
    value = record.value
    if not isinstance(value, dict):
        return f"not an object: expected an alpaca record, got {type(value).__name__}"
    fields: dict[str, str] = {}
    for name, required in (
        ("instruction", True),
        ("input", False),
        ("output", True),
        ("system", False),
    ):
        text = value.get(name)
        if text is None:
            if required:
                return f"missing field: no {name!r}"
            text = ""  # optional fields may be absent or null
        if not isinstance(text, str):
            return f"wrong type: {name!r} is {type(text).__name__}, not a string"
        fields[name] = text
    if not fields["output"].strip():
        return "empty output: the assistant answer is empty"
    prompt = fields["instruction"]
    if fields["input"].strip():
        # Same joining as the Stanford alpaca prompt: input follows a blank line.
        prompt = f"{prompt}\n\n{fields['input']}" if prompt.strip() else fields["input"]
    if not prompt.strip():
        return "empty instruction: both 'instruction' and 'input' are empty"
    history = read_history(value.get("history"))
    if isinstance(history, str):
        return history
    turns: list[Turn] = []
    if fields["system"].strip():
        turns.append(Turn("system", fields["system"]))
    turns.extend(history)
    turns.append(Turn("user", prompt))
    turns.append(Turn("assistant", fields["output"]))
    problem = find_turn_problem(tuple(turns))
    return problem if problem is not None else tuple(turns)


def read_history(history: Any) -> list[Turn] | str:
    """LLaMA-Factory history: [[user, assistant], ...] earlier rounds."""
    if history is None:
        return []
    if not isinstance(history, list):
        return "wrong type: 'history' is not a list of [user, assistant] pairs"
    turns: list[Turn] = []
    for index, pair in enumerate(history, start=1):
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(text, str) for text in pair)
        ):
            return f"bad history: entry {index} is not a [user, assistant] pair of strings"
        if not pair[0].strip() or not pair[1].strip():
            return f"bad history: entry {index} has an empty side"
        turns.append(Turn("user", pair[0]))
        turns.append(Turn("assistant", pair[1]))
    return turns
