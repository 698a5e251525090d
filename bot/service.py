"""The platform-neutral chat service: access, commands, context, streaming, storing.

Platform adapters turn their updates into `Incoming` and give a `ReplySink`; nothing
platform-specific passes this point. The user's message is stored before generation
starts, so nothing is lost if the process dies mid-reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bot.store import ReplyStats, Store, StoredMessage
from engine.types import (
    ChatMessage,
    Engine,
    EngineBusy,
    EngineError,
    PromptTooLong,
    SamplingParams,
)

log = logging.getLogger(__name__)

BUSY = "I'm busy with other chats right now — please try again in a moment."
FAILED = "Sorry, something went wrong while answering. Try /retry."
REFUSED = "Sorry, you are not allowed to use this bot."
ADMIN_ONLY = "Sorry, that command is for admins only."
TOO_LONG = "Your message is too long for me to read ({tokens} tokens; I can take {limit})."
EMPTY = "(I had nothing to say — try /retry.)"

HELP = """Commands:
/help — this help
/reset — start a new conversation (the old one stays stored)
/retry — answer your last message again"""


@dataclass(frozen=True)
class Incoming:
    """One user message, already stripped of everything platform-specific."""

    platform: str
    chat_id: str
    user_id: str
    text: str
    conv_key: str = ""  # which conversation this continues; defaults to the chat
    user_name: str = ""
    is_group: bool = False
    message_id: str = ""  # the platform's id of this message ("" where there is none)
    reply_to: str = ""  # the platform's id of the message this one replies to

    @property
    def conversation(self) -> str:
        return self.conv_key or self.chat_id


class ReplySink(Protocol):
    """How the service talks back on one platform, for one incoming message."""

    async def notice(self, text: str) -> None:
        """A complete short message: help, errors, refusals."""

    async def typing(self) -> None:
        """Show that an answer is being generated."""

    async def update(self, text: str) -> None:
        """The reply so far (it only grows). Throttling is the sink's business."""

    async def finish(self, text: str, reply_id: int) -> None:
        """The complete reply; `reply_id` is its stored id (for 👍/👎)."""


@dataclass(frozen=True)
class Access:
    """Allow-lists (empty = everyone) and admins, as platform ids in strings."""

    allowed_users: tuple[str, ...] = ()
    allowed_chats: tuple[str, ...] = ()
    admins: tuple[str, ...] = ()

    def allows(self, msg: Incoming) -> bool:
        if self.is_admin(msg):
            return True
        user_ok = not self.allowed_users or msg.user_id in self.allowed_users
        chat_ok = not self.allowed_chats or msg.chat_id in self.allowed_chats
        return user_ok and chat_ok

    def is_admin(self, msg: Incoming) -> bool:
        return msg.user_id in self.admins


def parse_command(text: str) -> tuple[str, str] | None:
    """'/Ask@bot  what?' -> ('ask', 'what?'); None when the text is not a command."""
    if not text.startswith("/") or len(text) < 2 or text[1].isspace():
        return None
    head, _, rest = text[1:].partition(" ")
    name = head.split("@", 1)[0].lower()
    return name, rest.strip()


class ChatService:
    def __init__(
        self,
        store: Store,
        engine: Engine,
        *,
        system_prompt: str,
        sampling: SamplingParams,
        access: Access | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.system_prompt = system_prompt
        self.sampling = sampling
        self.access = access or Access()
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def _lock(self, msg: Incoming) -> asyncio.Lock:
        key = (msg.platform, msg.conversation)
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    async def handle(self, msg: Incoming, sink: ReplySink) -> None:
        """Answer one message: a command or a turn of the conversation."""
        if not self.access.allows(msg):
            await sink.notice(REFUSED)
            return
        command = parse_command(msg.text.strip())
        if command is None:
            await self.reply(msg, msg.text.strip(), sink)
            return
        name, _args = command
        if name in ("help", "start"):
            await sink.notice(HELP)
        elif name == "reset":
            await self.reset(msg)
            await sink.notice("Started a new conversation.")
        elif name == "retry":
            await self.retry(msg, sink)
        else:
            await sink.notice(f"Unknown command /{name}. /help lists the commands.")

    async def reset(self, msg: Incoming) -> None:
        async with self._lock(msg):
            await self.store.close_conversation(msg.platform, msg.conversation)

    async def reply(self, msg: Incoming, text: str, sink: ReplySink) -> None:
        """Store the user's turn, then generate and store the answer.

        The turn follows the newest message of the chat's open conversation, or, when the
        user replied to a message we know, that message: the model sees the chain of
        messages leading to it (a reply chain, in a group or on Discord)."""
        if not text:
            return
        async with self._lock(msg):
            parent = None
            if msg.reply_to:
                parent = await self.store.find_platform_message(
                    msg.platform, msg.chat_id, msg.reply_to
                )
            if parent is not None:
                conv = parent.conversation_id
            else:
                conv = await self.store.open_conversation(
                    msg.platform, msg.conversation, msg.chat_id
                )
                parent = await self.store.last_message(conv)
            user_turn = await self.store.add_message(
                conv,
                platform=msg.platform,
                chat_id=msg.chat_id,
                user_id=msg.user_id,
                user_name=msg.user_name or None,
                role="user",
                text=text,
                tokens=self._cost("user", text),
                parent_id=parent.id if parent else None,
            )
            if msg.message_id:
                await self.store.link_platform_message(
                    msg.platform, msg.chat_id, msg.message_id, user_turn
                )
            await self._answer(msg, conv, user_turn, sink)

    async def retry(self, msg: Incoming, sink: ReplySink) -> None:
        async with self._lock(msg):
            conv = await self.store.open_conversation(msg.platform, msg.conversation, msg.chat_id)
            last_user = await self.store.last_user_message(conv)
            if last_user is None:
                await sink.notice("Nothing to retry yet: send me a message first.")
                return
            await self.store.supersede_replies(last_user.id)
            await self._answer(msg, conv, last_user.id, sink)

    async def remember_platform_ids(
        self, msg: Incoming, reply_id: int, platform_message_ids: Sequence[str]
    ) -> None:
        """Adapters call this with the ids their platform gave the reply's messages, so
        that a user's reply to any of them continues this conversation."""
        for platform_id in platform_message_ids:
            await self.store.link_platform_message(msg.platform, msg.chat_id, platform_id, reply_id)

    async def _answer(self, msg: Incoming, conv: int, user_turn: int, sink: ReplySink) -> None:
        history = await self.store.chain(user_turn)
        try:
            context = self.build_context(history)
            stream = self.engine.stream(context, self.sampling)
        except PromptTooLong as exc:
            log.info("prompt too long: %s", exc)
            await sink.notice(str(exc))
            return
        except EngineBusy:
            await sink.notice(BUSY)
            return
        await sink.typing()
        text = ""
        try:
            async with contextlib.aclosing(stream.__aiter__()) as deltas:
                async for delta in deltas:
                    text += delta
                    await sink.update(text)
        except EngineBusy:  # a remote server says so only once its response starts
            await sink.notice(BUSY)
            return
        except EngineError as exc:
            log.warning("generation failed in %s/%s: %s", msg.platform, msg.chat_id, exc)
            await sink.notice(FAILED)
            return
        completion = stream.completion
        if not text.strip() or completion is None:
            await sink.notice(EMPTY)
            return
        stats = ReplyStats(
            tokens=completion.completion_tokens,
            latency_ms=completion.total_s * 1000,
            ttft_ms=completion.ttft_s * 1000,
            adapter=completion.adapter,
        )
        reply_id = await self.store.add_message(
            conv,
            platform=msg.platform,
            chat_id=msg.chat_id,
            user_id=msg.user_id,
            role="assistant",
            text=text,
            stats=stats,
            parent_id=user_turn,
        )
        await sink.finish(text, reply_id)

    def _cost(self, role: str, text: str) -> int:
        """Tokens one message adds to a prompt. Measured after a system message because
        some templates insert a default system prompt when there is none."""
        anchor = [ChatMessage("system", self.system_prompt or "-")]
        message = ChatMessage(role, text)  # type: ignore[arg-type]
        return self.engine.count_tokens([*anchor, message]) - self.engine.count_tokens(anchor)

    def build_context(self, history: Sequence[StoredMessage]) -> list[ChatMessage]:
        """System prompt + the newest history that fits the context minus the reply
        budget. Raises PromptTooLong when not even the newest message fits."""
        budget = self.engine.context_window - self.sampling.max_new_tokens
        system = [ChatMessage("system", self.system_prompt)] if self.system_prompt else []
        used = self.engine.count_tokens(system) if system else 0
        chosen: list[StoredMessage] = []
        for message in reversed(history):
            cost = message.tokens or self._cost(message.role, message.text)
            if used + cost > budget:
                break
            chosen.append(message)
            used += cost
        chosen.reverse()
        turns = _merge_roles(chosen)
        while len(turns) > 1 and self.engine.count_tokens(system + turns) > budget:
            turns = _merge_roles_from(turns[1:])
        if not turns:
            newest = history[-1] if history else None
            tokens = self._cost("user", newest.text) if newest else 0
            raise PromptTooLong(TOO_LONG.format(tokens=tokens, limit=max(budget - used, 0)))
        return system + turns


def _merge_roles(messages: Sequence[StoredMessage]) -> list[ChatMessage]:
    return _merge_roles_from([ChatMessage(m.role, m.text) for m in messages])


def _merge_roles_from(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """Start with a user turn and alternate roles (strict templates such as Llama 2's
    reject anything else); consecutive turns of one role are joined."""
    turns: list[ChatMessage] = []
    for message in messages:
        if not turns and message.role != "user":
            continue
        if turns and turns[-1].role == message.role:
            turns[-1] = ChatMessage(message.role, turns[-1].content + "\n\n" + message.content)
        else:
            turns.append(message)
    return turns
