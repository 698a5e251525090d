"""DiscordChatExporter JSON exports (one channel or thread a file).

Shape: {"guild": {...}, "channel": {...}, "dateRange": {...}, "exportedAt": ...,
"messages": [...], "messageCount": N}. A message looks like:

    {"id": "1100...", "type": "Default" | "Reply" | "GuildMemberJoin" | "19" ...,
     "timestamp": "2024-03-01T18:04:05.123+00:00", "content": "hi",
     "author": {"id": "8000...", "name": "alice", "nickname": "Alice", "isBot": false},
     "attachments": [], "embeds": [], "stickers": [], "mentions": [],
     "reference": {"type": "Default" | "Forward", "messageId": ..., ...},
     "forwardedMessage": {...}}

System notifications carry made-up content ("Joined the server."), so they
are filtered by type, never by emptiness.
"""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.data.conversation import Problem, ReadResult
from training.data.group_chat import ChatMessage, Invalid, Skip, assemble_conversations
from training.data.records import load_json

# Default and Reply by name, and as the numbers older exporter builds wrote
# for kinds they had no name for.
TEXT_MESSAGE_TYPES = frozenset({"Default", "Reply", "0", "19"})


def is_discord_export(document: Any) -> bool:
    """Whether a parsed JSON document is a DiscordChatExporter export."""
    return (
        isinstance(document, dict)
        and isinstance(document.get("messages"), list)
        and ("guild" in document or "channel" in document)
    )


def read_discord(path: Path, persona: str | None, gap_minutes: float) -> ReadResult:
    """Persona conversations from a DiscordChatExporter export."""
    result = ReadResult(conversations=[], problems=[])
    document = load_json(path)
    if isinstance(document, Problem):
        result.problems.append(document)
        return result
    if not isinstance(document, dict) or not isinstance(document.get("messages"), list):
        result.problems.append(
            Problem(
                str(path), "file", "not a DiscordChatExporter export: no top-level 'messages' list"
            )
        )
        return result
    kept: list[ChatMessage] = []
    for index, raw in enumerate(document["messages"], start=1):
        message_id = raw.get("id") if isinstance(raw, dict) else None
        position = f"message id {message_id}" if message_id is not None else f"record {index}"
        parsed = parse_message(raw, position)
        if isinstance(parsed, Skip):
            result.skipped[parsed.reason] += 1
        elif isinstance(parsed, Invalid):
            result.problems.append(Problem(str(path), position, parsed.reason))
        else:
            kept.append(parsed)
    return assemble_conversations(path, [kept], persona, gap_minutes, result)


def parse_message(raw: Any, position: str) -> ChatMessage | Skip | Invalid:
    if not isinstance(raw, dict):
        return Invalid(f"not an object: message is {type(raw).__name__}")
    kind = raw.get("type")
    if isinstance(kind, int) and not isinstance(kind, bool):
        kind = str(kind)
    if not isinstance(kind, str):
        return Invalid(f"wrong type: message 'type' is {type(kind).__name__}")
    if kind not in TEXT_MESSAGE_TYPES:
        return Skip(f"system message ({kind})")
    author = raw.get("author")
    if not isinstance(author, dict) or not isinstance(author.get("id"), (str, int)):
        return Invalid("missing author: no 'author' object with an 'id'")
    timestamp = read_timestamp(raw.get("timestamp"))
    if isinstance(timestamp, Invalid):
        return timestamp
    content = raw.get("content", "")
    if not isinstance(content, str):
        return Invalid(f"non-string content: 'content' is {type(content).__name__}")
    if is_forward(raw):
        # Someone else's words: they would teach the persona to sound like them.
        return Skip("forwarded message")
    if not content.strip():
        if raw.get("stickers"):
            return Skip("sticker without text")
        if raw.get("attachments") or raw.get("embeds"):
            return Skip("media without caption")
        return Skip("empty message")
    speaker_id = str(author["id"])
    names = [
        name
        for name in (author.get("nickname"), author.get("name"))
        if isinstance(name, str) and name
    ]
    display = names[0] if names else speaker_id
    aliases = frozenset(alias.lower() for alias in (speaker_id, *names))
    return ChatMessage(speaker_id, display, aliases, content, timestamp, position)


def is_forward(raw: dict[str, Any]) -> bool:
    reference = raw.get("reference")
    forward_reference = isinstance(reference, dict) and reference.get("type") == "Forward"
    return forward_reference or isinstance(raw.get("forwardedMessage"), dict)


def read_timestamp(value: Any) -> float | Invalid:
    """Seconds since the epoch from an ISO 8601 timestamp."""
    if not isinstance(value, str):
        return Invalid("missing timestamp: no 'timestamp' string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return Invalid(f"bad timestamp: {value!r} is not ISO 8601")
    if moment.tzinfo is None:
        # Exports always carry an offset; a hand-edited one without is taken as UTC.
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
