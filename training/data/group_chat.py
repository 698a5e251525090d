"""Turning human chat logs (Telegram, Discord) into persona conversations.

One person (the persona) becomes the assistant; everyone else is the user.
The export readers parse their own JSON into ChatMessages; everything
about speakers, silences and turn building lives here so both formats
behave identically.
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from training.data.conversation import (
    Conversation,
    Problem,
    ReadResult,
    Role,
    Turn,
    find_turn_problem,
)

TOP_SPEAKERS = 10


@dataclass(frozen=True)
class ChatMessage:
    speaker_id: str  # stable key: Telegram from_id, Discord author id
    speaker_name: str  # what other people saw, used in "Name: " prefixes
    aliases: frozenset[str]  # lower-cased names and ids the persona may be given as
    text: str
    timestamp: float  # seconds since the epoch
    position: str  # "message id X"


@dataclass(frozen=True)
class Skip:
    """A message left out on purpose (service message, sticker, ...)."""

    reason: str


@dataclass(frozen=True)
class Invalid:
    """A malformed message, reported as a Problem."""

    reason: str


@dataclass
class _Block:
    """Consecutive messages of one speaker."""

    speaker_id: str
    speaker_name: str
    texts: list[str]
    position: str


def label_speaker(message: ChatMessage) -> str:
    return f"{message.speaker_name} [{message.speaker_id}]"


def count_speakers(chats: Sequence[Sequence[ChatMessage]]) -> Counter[str]:
    """Kept messages per speaker, labelled "Name [id]" so namesakes stay apart."""
    counts: Counter[str] = Counter()
    labels: dict[str, str] = {}
    for chat in chats:
        for message in chat:
            # Label by the first name seen so a renamed speaker stays one entry.
            label = labels.setdefault(message.speaker_id, label_speaker(message))
            counts[label] += 1
    return counts


def describe_top_speakers(speakers: Counter[str]) -> str:
    top = speakers.most_common(TOP_SPEAKERS)
    if not top:
        return "no speaker has any text message"
    return "most active speakers: " + ", ".join(
        f"{label}: {count} message{'' if count == 1 else 's'}" for label, count in top
    )


def resolve_persona(
    chats: Sequence[Sequence[ChatMessage]], persona: str | None, path: Path, speakers: Counter[str]
) -> str | Problem:
    """The persona's speaker id, or a Problem telling the admin what to pass."""
    if persona is None or not persona.strip():
        return Problem(
            str(path),
            "file",
            "persona required: pass --persona NAME to choose whose messages become "
            f"the assistant turns; {describe_top_speakers(speakers)}",
        )
    wanted = persona.strip().lower()
    matches: dict[str, str] = {}
    for chat in chats:
        for message in chat:
            if wanted in message.aliases or wanted.lstrip("@") in message.aliases:
                matches.setdefault(message.speaker_id, label_speaker(message))
    if not matches:
        return Problem(
            str(path),
            "file",
            f"persona not found: nobody called {persona!r} wrote a text message; "
            f"{describe_top_speakers(speakers)}",
        )
    if len(matches) > 1:
        return Problem(
            str(path),
            "file",
            f"ambiguous persona: {persona!r} matches {', '.join(sorted(matches.values()))}; "
            "pass the id in brackets instead",
        )
    return next(iter(matches))


def assemble_conversations(
    path: Path,
    chats: Sequence[Sequence[ChatMessage]],
    persona: str | None,
    gap_minutes: float,
    result: ReadResult,
) -> ReadResult:
    """Add the persona conversations of every chat of one export to `result`."""
    result.speakers.update(count_speakers(chats))
    persona_id = resolve_persona(chats, persona, path, result.speakers)
    if isinstance(persona_id, Problem):
        # Without a persona nothing can be built: one actionable Problem reads
        # better than burying it under record problems; they resurface once
        # the persona is given.
        result.problems[:] = [persona_id]
        return result
    for chat in chats:
        for segment in split_on_silence(chat, gap_minutes * 60.0):
            build_persona_conversation(segment, persona_id, path, result)
    return result


def split_on_silence(
    messages: Sequence[ChatMessage], gap_seconds: float
) -> list[list[ChatMessage]]:
    """Cut the chat wherever nobody wrote for longer than `gap_seconds`."""
    segments: list[list[ChatMessage]] = []
    previous: float | None = None
    for message in messages:
        if previous is None or message.timestamp - previous > gap_seconds:
            segments.append([])
        segments[-1].append(message)
        previous = message.timestamp
    return segments


def merge_speaker_blocks(messages: Sequence[ChatMessage]) -> list[_Block]:
    blocks: list[_Block] = []
    for message in messages:
        if blocks and blocks[-1].speaker_id == message.speaker_id:
            blocks[-1].texts.append(message.text)
        else:
            blocks.append(
                _Block(message.speaker_id, message.speaker_name, [message.text], message.position)
            )
    return blocks


def build_persona_conversation(
    segment: Sequence[ChatMessage], persona_id: str, path: Path, result: ReadResult
) -> None:
    """Turn one silence-delimited stretch of chat into a conversation, if it has one."""
    blocks = merge_speaker_blocks(segment)
    persona_turns = [index for index, block in enumerate(blocks) if block.speaker_id == persona_id]
    if not persona_turns or persona_turns == [0]:
        result.skipped["no persona reply in the conversation"] += len(segment)
        return
    if blocks[0].speaker_id == persona_id:
        # Nobody asked anything yet: the model would learn to talk unprompted.
        result.skipped["persona message before anyone else spoke"] += len(blocks[0].texts)
        blocks = blocks[1:]
        persona_turns = [index - 1 for index in persona_turns[1:]]
    trailing = blocks[persona_turns[-1] + 1 :]
    if trailing:
        # Nothing to learn from prompts that the persona never answered.
        result.skipped["messages after the persona's last reply"] += sum(
            len(block.texts) for block in trailing
        )
        blocks = blocks[: persona_turns[-1] + 1]
    others = {block.speaker_id for block in blocks if block.speaker_id != persona_id}
    turns = build_turns(blocks, persona_id, name_speakers=len(others) > 1)
    problem = find_turn_problem(turns)
    if problem is not None:
        result.problems.append(Problem(str(path), blocks[0].position, problem))
        return
    result.conversations.append(Conversation(turns, f"{path}:{blocks[0].position}"))


def build_turns(blocks: Sequence[_Block], persona_id: str, name_speakers: bool) -> tuple[Turn, ...]:
    """Map blocks to turns, merging neighbouring speakers who share a role."""
    roles: list[Role] = []
    contents: list[str] = []
    for block in blocks:
        role: Role = "assistant" if block.speaker_id == persona_id else "user"
        text = "\n".join(block.texts)
        if role == "user" and name_speakers:
            # Several people talk to the persona: the model must see who said what.
            text = f"{block.speaker_name}: {text}"
        if roles and roles[-1] == role:
            contents[-1] = f"{contents[-1]}\n{text}"
        else:
            roles.append(role)
            contents.append(text)
    return tuple(Turn(role, content) for role, content in zip(roles, contents, strict=False))
