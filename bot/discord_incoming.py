"""Reading a Discord message as the bot does: is it addressed to us, which message does
it reply to, what is the question once our mention is gone, is a reaction a rating."""

from __future__ import annotations

import re

import discord

RATINGS = {"👍": 1, "👎": -1}
QUOTE_LIMIT = 1500  # characters of someone else's message quoted into a question
SKIN_TONES = range(0x1F3FB, 0x1F400)


def mentions(message: discord.Message, me: discord.abc.User) -> bool:
    """@bot, a reply that pings the bot, or @ the bot's own role in a server."""
    if me.id in message.raw_mentions or any(u.id == me.id for u in message.mentions):
        return True
    role = message.guild.self_role if message.guild is not None else None
    return role is not None and role.id in message.raw_role_mentions


def reply_target(message: discord.Message) -> str | None:
    """The id of the message this one replies to, in the same channel (not forwards)."""
    reference = message.reference
    if reference is None or reference.message_id is None:
        return None
    if reference.type is not discord.MessageReferenceType.reply:
        return None
    if reference.channel_id != message.channel.id:
        return None
    return str(reference.message_id)


def replied_message(message: discord.Message) -> discord.Message | None:
    """The message replied to, when Discord sent it along (it does unless deleted)."""
    resolved = message.reference.resolved if message.reference is not None else None
    return resolved if isinstance(resolved, discord.Message) else None


def question_text(message: discord.Message, me: discord.abc.User) -> str:
    """The message's text without our mention (or our role's); other mentions become
    the names a reader sees (@name, #channel)."""
    text = re.sub(rf"\s*<@!?{me.id}>\s*", " ", message.content)
    role = message.guild.self_role if message.guild is not None else None
    if role is not None:
        text = re.sub(rf"\s*<@&{role.id}>\s*", " ", text)
    for user in message.mentions:
        name = f"@{user.display_name}"
        text = re.sub(rf"<@!?{user.id}>", lambda _match: name, text)  # noqa: B023 - used at once
    for mentioned_role in message.role_mentions:
        text = text.replace(f"<@&{mentioned_role.id}>", f"@{mentioned_role.name}")
    for channel in message.channel_mentions:
        name = getattr(channel, "name", None) or str(channel.id)
        text = text.replace(f"<#{channel.id}>", f"#{name}")
    return text.strip()


def with_quote(question: str, quoted: discord.Message) -> str:
    """The question with the message it replies to in front, for the model to see."""
    excerpt = quoted.content[:QUOTE_LIMIT]
    return f'(Replying to {quoted.author.display_name}: "{excerpt}")\n{question}'


def rating_of(emoji: discord.PartialEmoji) -> int | None:
    """+1 / -1 for 👍 / 👎 in any skin tone; None for anything else."""
    if emoji.id is not None or not emoji.name:
        return None
    base = "".join(c for c in emoji.name if ord(c) not in SKIN_TONES and c != "\ufe0f")
    return RATINGS.get(base)
