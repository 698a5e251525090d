"""Loading JSON documents and JSON/JSONL record files without ever raising.

Every failure becomes a Problem so one bad line cannot sink a whole dataset.
"""

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.data.conversation import Problem


@dataclass(frozen=True)
class Record:
    position: str  # "line N" for JSONL, "record N" for JSON arrays
    value: Any


def read_bytes(path: Path) -> bytes | Problem:
    """The file's bytes without a UTF-8 byte order mark, or a Problem."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        return Problem(str(path), "file", f"cannot read file: {error.strerror or error}")
    # Windows tools (and some dataset mirrors) prepend a BOM that json rejects.
    return raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw


def decode_json(text: str | bytes, path: Path, line_offset: int = 0) -> Any | Problem:
    """Parse one JSON document; the Problem points at the failing line."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as error:
        return Problem(
            str(path), f"line {line_offset + 1}", f"not UTF-8: bad byte at offset {error.start}"
        )
    except json.JSONDecodeError as error:
        return Problem(
            str(path),
            f"line {line_offset + error.lineno}",
            f"invalid JSON: {error.msg} at column {error.colno}",
        )
    except RecursionError:
        return Problem(str(path), f"line {line_offset + 1}", "invalid JSON: nested too deeply")


def load_json(path: Path) -> Any | Problem:
    """Parse a whole file as one JSON document (Telegram, Discord, alpaca arrays)."""
    raw = read_bytes(path)
    if isinstance(raw, Problem):
        return raw
    return decode_json(raw, path)


def looks_like_json_array(raw: bytes) -> bool:
    return raw.lstrip()[:1] == b"["


def iter_records(path: Path) -> Iterator[Record | Problem]:
    """Yield the records of a JSON array file or a JSONL file, in order.

    A file starting with "[" is one JSON array ("record N" positions);
    anything else is JSONL ("line N" positions, blank lines ignored).
    """
    raw = read_bytes(path)
    if isinstance(raw, Problem):
        yield raw
        return
    if looks_like_json_array(raw):
        document = decode_json(raw, path)
        if isinstance(document, Problem):
            yield document
            return
        for index, value in enumerate(document, start=1):
            yield Record(f"record {index}", value)
        return
    stripped = raw.strip()
    if stripped.startswith(b"{") and b"\n" in stripped:
        # A pretty-printed single object is one record, not a JSONL file
        # whose every line is broken.
        whole = decode_json(stripped, path)
        if not isinstance(whole, Problem):
            yield Record("line 1", whole)
            return
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        value = decode_json(line, path, line_offset=number - 1)
        yield value if isinstance(value, Problem) else Record(f"line {number}", value)
