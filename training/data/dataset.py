"""The one entry point: read any supported dataset file into conversations."""

from collections.abc import Callable
from pathlib import Path

from training.data.alpaca import read_alpaca
from training.data.chat_jsonl import read_chat
from training.data.conversation import Problem, ReadResult
from training.data.detect import FORMATS, find_format
from training.data.discord_export import read_discord
from training.data.telegram_export import read_telegram

GroupReader = Callable[[Path, str | None, float], ReadResult]
GROUP_READERS: dict[str, GroupReader] = {"telegram": read_telegram, "discord": read_discord}


def read_dataset(
    path: Path,
    fmt: str | None = None,
    *,
    persona: str | None = None,
    gap_minutes: float = 60.0,
) -> ReadResult:
    """Read `path` as `fmt` (detected from the content when None).

    Bad data never raises: unreadable files, undetectable formats and bad
    records all come back as Problems. Only caller mistakes raise
    ValueError: an unknown `fmt` name or a negative `gap_minutes`.
    `persona` and `gap_minutes` apply to the group chat exports only.
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if gap_minutes < 0:
        raise ValueError(f"gap_minutes must not be negative, got {gap_minutes}")
    if fmt is None:
        found = find_format(path)
        if isinstance(found, Problem):
            return ReadResult(conversations=[], problems=[found])
        fmt = found
    if fmt == "alpaca":
        return read_alpaca(path)
    if fmt == "chat":
        return read_chat(path)
    return GROUP_READERS[fmt](path, persona, gap_minutes)
