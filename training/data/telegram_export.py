"""Telegram Desktop "Export chat history" JSON (result.json).

Two shapes exist: a single-chat export ({"name", "type", "id", "messages"})
and a full-account export whose chats sit in "chats": {"list": [...]} and
"left_chats": {"list": [...]}. Messages look like:

    {"id": 12, "type": "message" | "service", "date": "2024-01-05T10:00:00",
     "date_unixtime": "1704448800", "from": "Alice" | null, "from_id": "user123",
     "text": "hi" | ["plain", {"type": "bold", "text": "bold"}, ...],
     "text_entities": [...], "reply_to_message_id": 11, "forwarded_from": "Bob",
     "media_type": "sticker", "photo": "photos/...", "edited": "...", ...}
"""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.data.conversation import Problem, ReadResult
from training.data.group_chat import ChatMessage, Invalid, Skip, assemble_conversations
from training.data.records import load_json

# Keys Telegram writes for media; a message with one of these and no text is
# a sticker/photo/voice note without caption rather than a broken record.
MEDIA_KEYS = (
    "media_type",
    "photo",
    "file",
    "poll",
    "location_information",
    "contact_information",
    "place_name",
    "game_title",
    "invoice_information",
)


def is_telegram_export(document: Any) -> bool:
    """Whether a parsed JSON document has either Telegram export shape."""
    if not isinstance(document, dict):
        return False
    chats = document.get("chats")
    if isinstance(chats, dict) and isinstance(chats.get("list"), list):
        return True
    messages = document.get("messages")
    if not isinstance(messages, list) or "guild" in document:
        return False
    first = next((message for message in messages if isinstance(message, dict)), None)
    if first is None:
        return "type" in document and "id" in document
    return (
        "date_unixtime" in first
        or "from_id" in first
        or first.get("type") in ("message", "service")
    )


def read_telegram(path: Path, persona: str | None, gap_minutes: float) -> ReadResult:
    """Persona conversations from a Telegram export; bad messages become Problems."""
    result = ReadResult(conversations=[], problems=[])
    document = load_json(path)
    if isinstance(document, Problem):
        result.problems.append(document)
        return result
    chats = find_chats(document)
    if isinstance(chats, str):
        result.problems.append(Problem(str(path), "file", chats))
        return result
    parsed: list[list[ChatMessage]] = []
    in_account_export = "messages" not in document
    for chat_index, chat in enumerate(chats, start=1):
        if not isinstance(chat, dict) or not isinstance(chat.get("messages"), list):
            result.problems.append(
                Problem(
                    str(path),
                    f"chat {chat_index}",
                    "not a chat: expected an object with a 'messages' list",
                )
            )
            continue
        where = f" in chat {chat.get('name') or chat.get('id')!r}" if in_account_export else ""
        parsed.append(parse_chat(chat["messages"], where, path, result))
    return assemble_conversations(path, parsed, persona, gap_minutes, result)


def find_chats(document: Any) -> list[Any] | str:
    """The chat objects of either export shape, or why there are none."""
    if not isinstance(document, dict):
        return f"not a Telegram export: top level is {type(document).__name__}, not an object"
    if isinstance(document.get("messages"), list):
        return [document]
    chats: list[Any] = []
    for key in ("chats", "left_chats"):
        section = document.get(key)
        if isinstance(section, dict) and isinstance(section.get("list"), list):
            chats.extend(section["list"])
    if not chats and not isinstance(document.get("chats"), dict):
        return "not a Telegram export: no 'messages' and no 'chats.list'"
    return chats


def parse_chat(
    messages: list[Any], where: str, path: Path, result: ReadResult
) -> list[ChatMessage]:
    """Keep the text messages of one chat; count skips, report malformed ones."""
    kept: list[ChatMessage] = []
    for index, raw in enumerate(messages, start=1):
        message_id = raw.get("id") if isinstance(raw, dict) else None
        position = (
            f"message id {message_id}" if message_id is not None else f"record {index}"
        ) + where
        parsed = parse_message(raw, position)
        if isinstance(parsed, Skip):
            result.skipped[parsed.reason] += 1
        elif isinstance(parsed, Invalid):
            result.problems.append(Problem(str(path), position, parsed.reason))
        else:
            kept.append(parsed)
    return kept


def parse_message(raw: Any, position: str) -> ChatMessage | Skip | Invalid:
    if not isinstance(raw, dict):
        return Invalid(f"not an object: message is {type(raw).__name__}")
    kind = raw.get("type")
    if kind == "service":
        return Skip("service message")
    if kind == "unsupported":
        return Skip("unsupported message")
    if kind != "message":
        return Invalid(f"unknown message type: {kind!r}")
    timestamp = read_timestamp(raw)
    if isinstance(timestamp, Invalid):
        return timestamp
    text = read_text(raw)
    if isinstance(text, Invalid):
        return text
    if "forwarded_from" in raw:
        # Someone else's words: they would teach the persona to sound like them.
        return Skip("forwarded message")
    if not text.strip():
        if raw.get("media_type") == "sticker":
            return Skip("sticker without text")
        if any(key in raw for key in MEDIA_KEYS):
            return Skip("media without caption")
        return Skip("empty message")
    speaker_id, name = read_speaker(raw)
    aliases = frozenset(alias.lower() for alias in (speaker_id, name) if alias)
    return ChatMessage(speaker_id, name, aliases, text, timestamp, position)


def read_timestamp(raw: dict[str, Any]) -> float | Invalid:
    """Seconds since the epoch from date_unixtime (exact, timezone-free).

    "date" is local time of the exporting machine, so it is only a fallback
    for exports made before Telegram added date_unixtime.
    """
    unixtime = raw.get("date_unixtime")
    if isinstance(unixtime, (str, int)) and not isinstance(unixtime, bool):
        try:
            return float(int(unixtime))
        except (ValueError, OverflowError):
            return Invalid(f"bad timestamp: date_unixtime {unixtime!r} is not a number")
    date = raw.get("date")
    if isinstance(date, str):
        try:
            return datetime.fromisoformat(date).replace(tzinfo=UTC).timestamp()
        except ValueError:
            return Invalid(f"bad timestamp: date {date!r} is not ISO 8601")
    return Invalid("missing timestamp: no 'date_unixtime' or 'date'")


def read_text(raw: dict[str, Any]) -> str | Invalid:
    """Plain text of a message: a string, or a list of strings and entities."""
    text = raw.get("text", raw.get("text_entities", ""))
    if isinstance(text, str):
        return text
    if not isinstance(text, list):
        return Invalid(f"malformed text: 'text' is {type(text).__name__}")
    parts: list[str] = []
    for part in text:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            return Invalid("malformed text: an entity has no string 'text'")
    return "".join(parts)


def read_speaker(raw: dict[str, Any]) -> tuple[str, str]:
    """(stable id, display name); deleted accounts have from = null."""
    name = raw.get("from")
    from_id = raw.get("from_id")
    if isinstance(from_id, int) and not isinstance(from_id, bool):
        from_id = f"user{from_id}"  # exports before 2021 wrote bare user numbers
    display = name if isinstance(name, str) and name.strip() else "Unknown"
    if isinstance(from_id, str) and from_id:
        return from_id, display
    return (f"name:{display}" if display != "Unknown" else "unknown"), display
