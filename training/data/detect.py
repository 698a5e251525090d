"""Recognising which dataset format a file holds, from its content alone.

File names are no help ("result.json", "data.json" are everywhere), so
detection looks at the JSON itself. Exports can be hundreds of megabytes,
so the first kilobytes are tried before parsing the whole file.
"""

import json
import re
from pathlib import Path
from typing import Any

from training.data.conversation import Problem
from training.data.discord_export import is_discord_export
from training.data.records import decode_json, read_bytes
from training.data.telegram_export import is_telegram_export

FORMATS = ("alpaca", "chat", "telegram", "discord")
HEAD_BYTES = 1 << 20
SCANNED_LINES = 50
FIRST_KEY = re.compile(r'^\s*\{\s*"((?:[^"\\]|\\.)*)"')
TELEGRAM_MARKERS = ('"date_unixtime"', '"from_id"', '"text_entities"')


def detect_format(path: Path) -> str:
    """One of FORMATS; ValueError naming the file when none fits."""
    found = find_format(path)
    if isinstance(found, Problem):
        raise ValueError(f"{path} ({found.position}): {found.reason}")
    return found


def find_format(path: Path) -> str | Problem:
    """One of FORMATS, or a Problem saying why the file fits none."""
    raw = read_bytes(path)
    if isinstance(raw, Problem):
        return raw
    head = raw[:HEAD_BYTES].decode("utf-8", errors="replace")
    document: Any | Problem = None
    found = detect_from_head(head)
    if found is None and raw.lstrip()[:1] in (b"{", b"["):
        document = decode_json(raw, path)
        found = None if isinstance(document, Problem) else classify(document)
    found = found or detect_from_lines(raw)
    if found is not None:
        return found
    if not isinstance(document, dict | list) and not has_json_lines(raw):
        # Nothing parsed at all: say so rather than blame the shape.
        return (
            document
            if isinstance(document, Problem)
            else Problem(
                str(path),
                "line 1",
                "invalid JSON: the file is neither a JSON document nor JSON lines",
            )
        )
    return Problem(
        str(path),
        "file",
        'unknown format: expected alpaca JSON/JSONL, chat JSONL ({"messages": [...]} a line), '
        "a Telegram Desktop result.json or a DiscordChatExporter JSON export; "
        f"name it explicitly as one of {', '.join(FORMATS)}",
    )


def classify(value: Any) -> str | None:
    """The format a parsed JSON value (document, array item or JSONL line) belongs to."""
    if isinstance(value, list):
        first = next((item for item in value if isinstance(item, dict)), None)
        return classify_record(first) if first is not None else None
    if is_discord_export(value):
        return "discord"
    if is_telegram_export(value):
        return "telegram"
    return classify_record(value) if isinstance(value, dict) else None


def classify_record(record: dict[str, Any]) -> str | None:
    """chat or alpaca, for one record of a JSONL file or JSON array."""
    if isinstance(record.get("messages"), list):
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def detect_from_head(head: str) -> str | None:
    """Cheap guesses from the first line and the first key of the file."""
    first_line = head.lstrip().split("\n", 1)[0]
    if first_line.startswith("{"):
        try:
            # JSONL (or a minified document): the first line stands alone.
            return classify(json.loads(first_line))
        except (json.JSONDecodeError, RecursionError):
            pass
    key = FIRST_KEY.match(head)
    if key is None:
        return None
    # Both exporters write their top-level keys in a fixed order.
    if key.group(1) == "guild":
        return "discord"
    account_export = key.group(1) == "about" and '"chats"' in head
    chat_export = key.group(1) in ("name", "type") and any(
        marker in head for marker in TELEGRAM_MARKERS
    )
    if account_export or chat_export:
        return "telegram"
    return None


def detect_from_lines(raw: bytes) -> str | None:
    """JSONL whose first lines are broken: the first line that parses decides."""
    for line in raw.split(b"\n", SCANNED_LINES)[:SCANNED_LINES]:
        try:
            found = classify(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            continue
        if found is not None:
            return found
    return None


def has_json_lines(raw: bytes) -> bool:
    """Whether any of the first lines is a JSON object on its own."""
    for line in raw.split(b"\n", SCANNED_LINES)[:SCANNED_LINES]:
        try:
            if isinstance(json.loads(line), dict):
                return True
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            continue
    return False
