"""`python -m bot export`: the store's conversations as chat JSONL, ready for training.

One line per conversation as the model saw it: the reply chain (parent links) from its
first message to a leaf, with the bot's system prompt first, consecutive turns of one
role joined the way the chat service joins them (service._merge_roles_from), replies
superseded by /retry left out. Filters: --since, --platform, --min-rating (👍 = 1,
👎 = -1, unrated = 0), --exclude-user. User ids are pseudonymised (a keyed hash) unless
asked otherwise; e-mail addresses, phone numbers and API/bot tokens are scrubbed.

Reads the SQLite file directly (no migration, no writes): export while the bot runs.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.store import SCHEMA_VERSION, StoreError

# (placeholder, pattern): tokens before phone numbers (a bot token starts with digits).
SECRETS = (
    ("[token]", re.compile(r"\b\d{5,12}:[A-Za-z0-9_-]{30,}")),  # Telegram bot token
    ("[token]", re.compile(r"\b[A-Za-z0-9_-]{23,28}\.[A-Za-z0-9_-]{6,7}\.[A-Za-z0-9_-]{27,40}\b")),
    ("[token]", re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{20,}")),  # OpenAI-style keys
    ("[token]", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b")),  # GitHub
    ("[token]", re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}")),  # Slack
    ("[token]", re.compile(r"\bAKIA[0-9A-Z]{16}\b")),  # AWS access key id
    ("[email]", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")),
)
PHONE = re.compile(
    r"(?<![\w+.-])(?:\+\d{7,15}|(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?"
    r"\d{2,4}(?:[\s.-]\d{2,8}){1,4})(?![\w-]|\.\d)"
)
DATE = re.compile(r"^(?:\d{4}-\d{2}-\d{2}|\d{2}[./]\d{2}[./]\d{4}|\d{4}[./]\d{2}[./]\d{2})$")


def scrub(text: str) -> str:
    """Replace secrets, e-mail addresses and phone numbers with placeholders."""
    for placeholder, pattern in SECRETS:
        text = pattern.sub(placeholder, text)
    return PHONE.sub(_phone, text)


def _phone(match: re.Match[str]) -> str:
    found = match.group(0)
    digits = sum(c.isdigit() for c in found)
    separators = [c for c in found if not c.isdigit()]
    if not 7 <= digits <= 15 or DATE.match(found) or separators == ["."]:
        return found  # too short or long, a date, or a decimal number
    return "[phone]"


@dataclass(frozen=True)
class ExportOptions:
    since: float | None = None  # seconds since the epoch
    platforms: tuple[str, ...] = ()
    min_rating: int | None = None
    exclude_users: tuple[str, ...] = ()  # "platform:user_id" or "user_id"
    pseudonymise: bool = True
    salt: str = ""  # empty: a random one per export (pseudonyms not linkable across exports)
    system_prompt: str = ""

    def __post_init__(self) -> None:
        if self.min_rating is not None and self.min_rating not in (-1, 0, 1):
            raise ValueError(f"--min-rating {self.min_rating}: must be -1, 0 or 1")


@dataclass
class ExportStats:
    conversations: int = 0
    messages: int = 0
    left_out: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Row:
    id: int
    platform: str
    user_id: str
    role: str
    text: str
    created_at: float
    parent_id: int | None
    rating: int | None


def parse_since(text: str) -> float:
    """An ISO date or date-time (UTC unless it names a zone) -> seconds since the epoch."""
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: not an ISO date such as 2024-06-01") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def read_rows(db: Path, platforms: Sequence[str]) -> dict[int, Row]:
    """Every usable message (status ok) with its rating, by id."""
    if not db.is_file():
        raise StoreError(f"database {db} does not exist")
    connection = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{db} is at schema version {version}, this lorabot reads {SCHEMA_VERSION}: "
                "start the bot of this version once to migrate it"
            )
        where = "m.status = 'ok'"
        if platforms:
            where += f" AND m.platform IN ({', '.join('?' * len(platforms))})"
        rows = connection.execute(
            "SELECT m.id, m.platform, m.user_id, m.role, m.text, m.created_at, m.parent_id,"
            # Several users may rate one answer: its rating is the sign of their sum.
            " (SELECT CASE WHEN SUM(f.rating) > 0 THEN 1 WHEN SUM(f.rating) < 0 THEN -1"
            " ELSE 0 END FROM feedback f WHERE f.message_id = m.id)"
            " FROM messages m"
            f" WHERE {where} ORDER BY m.id",
            tuple(platforms),
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{db}: cannot read the database: {exc}") from None
    finally:
        connection.close()
    return {row[0]: Row(*row) for row in rows}


def chains(rows: dict[int, Row]) -> Iterator[list[Row]]:
    """Root-to-leaf reply chains, one per leaf (a message nothing usable follows)."""
    parents = {row.parent_id for row in rows.values()}
    for row in rows.values():
        if row.id in parents:
            continue
        chain = [row]
        while chain[-1].parent_id in rows and len(chain) < 10_000:
            chain.append(rows[chain[-1].parent_id])  # type: ignore[index]
        chain.reverse()
        yield chain


def is_excluded(row: Row, excluded: Sequence[str]) -> bool:
    return row.user_id in excluded or f"{row.platform}:{row.user_id}" in excluded


def apply_filters(chain: list[Row], options: ExportOptions, stats: ExportStats) -> list[Row]:
    if options.since is not None:
        kept = [row for row in chain if row.created_at >= options.since]
        stats.left_out["before --since"] += len(chain) - len(kept)
        chain = kept
    if options.exclude_users:
        dropped = {
            r.id for r in chain if r.role == "user" and is_excluded(r, options.exclude_users)
        }
        kept = [r for r in chain if r.id not in dropped and r.parent_id not in dropped]
        stats.left_out["--exclude-user"] += len(chain) - len(kept)
        chain = kept
    if options.min_rating is not None:
        for index, row in enumerate(chain):
            if row.role == "assistant" and (row.rating or 0) < options.min_rating:
                stats.left_out["below --min-rating (and what followed)"] += len(chain) - index
                chain = chain[:index]
                break
    return chain


def to_messages(chain: Sequence[Row], options: ExportOptions) -> list[dict[str, str]]:
    """Start with a user turn, alternate (joining like the chat service), end with a
    reply; system prompt first."""
    turns: list[dict[str, str]] = []
    for row in chain:
        if row.role not in ("user", "assistant") or (not turns and row.role != "user"):
            continue
        text = scrub(row.text)
        if turns and turns[-1]["role"] == row.role:
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": row.role, "content": text})
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    if turns and options.system_prompt:
        turns.insert(0, {"role": "system", "content": options.system_prompt})
    return turns


def pseudonym(row: Row, options: ExportOptions, salt: bytes) -> str:
    name = f"{row.platform}:{row.user_id}"
    if not options.pseudonymise:
        return name
    return "u_" + hmac.new(salt, name.encode(), hashlib.sha256).hexdigest()[:12]


def export_chats(db: Path, out: Path, options: ExportOptions) -> ExportStats:
    """Write the filtered conversations of `db` to `out` (chat JSONL)."""
    rows = read_rows(db, options.platforms)
    salt = (options.salt or secrets.token_hex(16)).encode()
    stats = ExportStats()
    seen: set[str] = set()
    lines: list[str] = []
    for chain in chains(rows):
        kept = apply_filters(chain, options, stats)
        messages = to_messages(kept, options)
        if not any(m["role"] == "assistant" for m in messages):
            stats.left_out["conversations with no reply left"] += 1
            continue
        key = json.dumps(messages, ensure_ascii=False)
        if key in seen:
            stats.left_out["duplicate conversations"] += 1
            continue
        seen.add(key)
        lines.append(
            json.dumps(
                {"messages": messages, "meta": meta(kept, options, salt)}, ensure_ascii=False
            )
        )
        stats.conversations += 1
        stats.messages += len(messages)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return stats


def meta(chain: Sequence[Row], options: ExportOptions, salt: bytes) -> dict[str, Any]:
    ratings = Counter(row.rating for row in chain if row.role == "assistant")
    return {
        "platform": chain[0].platform,
        "users": sorted({pseudonym(r, options, salt) for r in chain if r.role == "user"}),
        "first_at": _iso(chain[0].created_at),
        "last_at": _iso(chain[-1].created_at),
        "ratings": {"up": ratings[1], "down": ratings[-1]},
    }


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")
