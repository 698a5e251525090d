"""What the bot does with each Telegram update: thin PTB handlers that decide at once
(access, addressed or not, which command) and hand the work to a job, so that PTB keeps
reading updates while answers stream.

Private chat: every text message is a turn. Groups: `/ask`, a mention of the bot and a
reply to one of its messages are turns; everything else is ignored and never stored.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Any

from telegram import BotCommand, Message, MessageEntity, Update
from telegram.constants import ChatType
from telegram.error import Forbidden, TelegramError
from telegram.ext import BaseHandler, CommandHandler, ContextTypes, MessageHandler, filters

from bot.service import FAILED, HELP, REFUSED, Access, ChatService, Incoming
from bot.telegram_config import TelegramConfig
from bot.telegram_jobs import ChatJobs
from bot.telegram_pacing import Pacer
from bot.telegram_records import TelegramRecords
from bot.telegram_reply import TelegramReply

log = logging.getLogger(__name__)

PLATFORM = "telegram"
Context = ContextTypes.DEFAULT_TYPE
REFUSE_AGAIN_S = 3600.0  # a refused user hears it once an hour, however often they write
TELEGRAM_HELP = f"""{HELP}
/ask <question> — ask me in a group (or mention me, or reply to one of my messages)
/forget — delete everything stored about you (asks first)
/stats — usage figures (admins only)"""
NOT_TEXT = "I can only read text messages — please type your question."
ASK_USAGE = "Ask me something after the command, e.g. /ask What is the capital of France?"
COMMANDS = (
    BotCommand("start", "Say hello and show what I can do"),
    BotCommand("help", "List the commands"),
    BotCommand("ask", "Ask me a question (in groups)"),
    BotCommand("reset", "Start a new conversation"),
    BotCommand("retry", "Answer your last message again"),
    BotCommand("forget", "Delete everything stored about you"),
    BotCommand("stats", "Usage figures (admins only)"),
)


def _is_group(message: Message) -> bool:
    return message.chat.type in (ChatType.GROUP, ChatType.SUPERGROUP)


def _command_text(message: Message) -> str:
    """What follows the command, newlines kept ('/ask@bot  hi\\nthere' -> 'hi\\nthere')."""
    text = message.text or ""
    entity = message.entities[0] if message.entities else None
    return text[entity.length :].strip() if entity else ""


class TelegramHandlers:
    def __init__(
        self, service: ChatService, config: TelegramConfig, pacer: Pacer, jobs: ChatJobs
    ) -> None:
        self.service = service
        self.config = config
        self.pacer = pacer
        self.jobs = jobs
        self.access = Access(
            allowed_users=tuple(str(i) for i in config.allowed_users),
            allowed_chats=tuple(str(i) for i in config.allowed_chats),
            admins=tuple(str(i) for i in config.admins),
        )
        self._refused: dict[tuple[int, int], float] = {}
        self._upgraded: dict[int, int] = {}  # a group's id -> its supergroup's

    def handlers(self) -> list[BaseHandler[Any, Any, Any]]:
        new = filters.UpdateType.MESSAGE  # edited messages are ignored
        private = filters.ChatType.PRIVATE
        # PTB tries them in order and stops at the first match: commands first, then
        # the catch-alls (a private chat's unknown command gets the service's answer).
        return [
            MessageHandler(filters.StatusUpdate.MIGRATE, self.on_migrate),
            CommandHandler(["start", "help"], self.on_help, filters=new),
            CommandHandler("ask", self.on_ask, filters=new),
            CommandHandler(["reset", "retry"], self.on_conversation_command, filters=new),
            *TelegramRecords(self).handlers(),
            MessageHandler(new & filters.TEXT & ~filters.COMMAND, self.on_text),
            MessageHandler(new & private & filters.COMMAND, self.on_conversation_command),
            MessageHandler(new & private & ~filters.TEXT & filters.ATTACHMENT, self.on_not_text),
        ]

    # messages --------------------------------------------------------------------
    async def on_migrate(self, update: Update, context: Context) -> None:
        """A group became a supergroup, which has a new chat id: its conversations and
        messages move to the new id, so the chat goes on where it was, and its turns
        queue behind the group's. Telegram tells both chats; the second finds nothing
        left to move."""
        message = update.message
        if message is None:
            return
        if message.migrate_to_chat_id:
            old, new = message.chat.id, message.migrate_to_chat_id
        elif message.migrate_from_chat_id:
            old, new = message.migrate_from_chat_id, message.chat.id
        else:
            return
        self._upgraded[old] = new
        self.jobs.same_chat(new, old)
        moved = await self.service.store.move_chat(PLATFORM, str(old), str(new))
        if moved:
            log.info("telegram: chat %s is now %s; %d conversation(s) moved", old, new, moved)
        chats = self.access.allowed_chats
        if chats and str(old) in chats and str(new) not in chats:
            log.warning(
                "telegram: group %s became supergroup %s: add %s to [telegram] allowed_chats"
                " to keep answering there",
                old, new, new,
            )  # fmt: skip

    async def on_text(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or message.from_user is None or message.text is None:
            return
        text = message.text
        if _is_group(message):
            addressed, text = self._addressed(message, context)
            if not addressed:
                return  # group chatter: not for us, not stored
        if not self.admit(message):
            return
        if not text.strip():
            self.notice(message, ASK_USAGE)
            return
        self._turn(message, self._with_quote(message, text))

    async def on_ask(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or message.from_user is None or not self.admit(message):
            return
        question = self._with_quote(message, _command_text(message))
        if not question:
            self.notice(message, ASK_USAGE)
            return
        self._turn(message, question)

    async def on_conversation_command(self, update: Update, context: Context) -> None:
        """/reset, /retry and (in private chats) unknown commands: the service's own."""
        message = update.message
        if message is None or message.from_user is None or not self.admit(message):
            return
        self._turn(message, message.text or "", command=True)

    async def on_not_text(self, update: Update, context: Context) -> None:
        message = update.message
        if message is not None and message.from_user is not None and self.admit(message):
            self.notice(message, NOT_TEXT)

    async def on_help(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or message.from_user is None or not self.admit(message):
            return
        name = context.bot.first_name
        if _is_group(message):
            hello = (
                f"Hi! I'm {name}. In this group I answer /ask questions, messages that "
                f"mention @{context.bot.username} and replies to my messages; everything "
                "else I ignore and never store."
            )
        else:
            hello = (
                f"Hi {message.from_user.first_name}! I'm {name}, an assistant running on a "
                "self-hosted language model. Send me a message and I'll answer; I remember "
                "our conversation until you /reset it."
            )
        self.notice(message, f"{hello}\n\n{TELEGRAM_HELP}")

    # helpers ---------------------------------------------------------------------
    def who(self, message: Message) -> Incoming:
        assert message.from_user is not None
        return Incoming(PLATFORM, str(message.chat.id), str(message.from_user.id), "")

    def admit(self, message: Message) -> bool:
        """Allowed users pass; anyone else hears one polite refusal (an hour apart) and
        nothing of theirs is stored."""
        if self.access.allows(self.who(message)):
            return True
        assert message.from_user is not None
        key = (message.chat.id, message.from_user.id)
        now = time.monotonic()
        if now - self._refused.get(key, -REFUSE_AGAIN_S) >= REFUSE_AGAIN_S:
            if len(self._refused) > 10_000:  # strangers come and go; keep the map small
                self._refused = {k: t for k, t in self._refused.items() if now - t < REFUSE_AGAIN_S}
            self._refused[key] = now
            self.notice(message, REFUSED)
        log.info("telegram: refused user %s in chat %s", key[1], key[0])
        return False

    def _addressed(self, message: Message, context: Context) -> tuple[bool, str]:
        """Is this group message for us (a mention or a reply to us)? And its text with
        the mention taken out."""
        text = message.text or ""
        username = (context.bot.username or "").lower()
        mentioned = False
        found = message.parse_entities([MessageEntity.MENTION, MessageEntity.TEXT_MENTION])
        for entity, shown in found.items():
            ours = (entity.type == MessageEntity.MENTION and shown[1:].lower() == username) or (
                entity.user is not None and entity.user.id == context.bot.id
            )
            if ours:
                mentioned = True
                text = text.replace(shown, " ", 1)
        text = re.sub(r"^[\s,:;]+|\s+$", "", re.sub(r"[ \t]{2,}", " ", text))
        return mentioned or self._replies_to_us(message), text

    @staticmethod
    def _replies_to_us(message: Message) -> bool:
        replied = message.reply_to_message
        bot_id = message.get_bot().id
        return bool(replied and replied.from_user and replied.from_user.id == bot_id)

    def _with_quote(self, message: Message, text: str) -> str:
        """A question asked in reply to someone else's message is about that message."""
        replied = message.reply_to_message
        if replied is None or self._replies_to_us(message) or not replied.text:
            return text
        author = replied.from_user.first_name if replied.from_user else "Someone"
        return f"{author} wrote:\n{replied.text}\n\n{text}".strip()

    def _incoming(self, message: Message, text: str) -> Incoming:
        user = message.from_user
        assert user is not None
        group = _is_group(message)
        replied = message.reply_to_message
        per_user = group and self.config.group_context == "per_user"
        return Incoming(
            platform=PLATFORM,
            chat_id=str(message.chat.id),
            user_id=str(user.id),
            text=text,
            conv_key=f"{message.chat.id}:{user.id}" if per_user else "",
            user_name=user.full_name,
            is_group=group,
            message_id=str(message.message_id),
            reply_to=str(replied.message_id) if replied and self._replies_to_us(message) else "",
        )

    def sink(self, message: Message) -> TelegramReply:
        group = _is_group(message)
        return TelegramReply(
            message.get_bot(),
            message.chat.id,
            self.pacer.chat(message.chat.id, is_group=group),
            may_type=self.pacer.may_type,
            typing_every_s=self.pacer.pacing.typing_every_s,
            reply_to=message.message_id if group else None,
            thread_id=message.message_thread_id if message.is_topic_message else None,
        )

    def notice(self, message: Message, text: str) -> None:
        sink = self.sink(message)
        self.jobs.now(lambda: sink.notice(text))

    def _turn(self, message: Message, text: str, *, command: bool = False) -> None:
        """A turn of the conversation, in order with the chat's other turns."""
        incoming = self._incoming(message, text)
        sink = self.sink(message)

        async def run() -> None:
            turn = incoming
            upgraded = self._upgraded.get(message.chat.id)
            if upgraded is not None:  # the group became a supergroup while this waited
                sink.move_to(upgraded)
                turn = _in_chat(incoming, upgraded)
            try:
                if command:
                    await self.service.handle(turn, sink)
                else:
                    await self.service.reply(turn, text, sink)
                if sink.chat_id != int(turn.chat_id):  # ... or while it was answered
                    moved = _in_chat(turn, sink.chat_id)
                    await self.service.store.move_chat(PLATFORM, turn.chat_id, moved.chat_id)
                    turn = moved
                if sink.reply_id is not None:
                    ids = [str(i) for i in sink.message_ids]
                    await self.service.remember_platform_ids(turn, sink.reply_id, ids)
            except Forbidden as exc:  # blocked by the user, or removed from the group
                log.info("telegram: chat %s is closed to us: %s", incoming.chat_id, exc)
            except Exception:  # noqa: BLE001 - one turn failing must not stop the bot
                log.exception("telegram: answering in chat %s failed", incoming.chat_id)
                await _apologise(sink)
            finally:
                sink.close()

        self.jobs.ordered(message.chat.id, run, lambda started: sink.interrupted(started=started))


def _in_chat(incoming: Incoming, chat_id: int) -> Incoming:
    """The same turn in the supergroup its group became (a member's own conversation
    key, "<chat>:<user>", follows the chat)."""
    old = incoming.chat_id
    key = incoming.conv_key
    if key.startswith(f"{old}:"):
        key = f"{chat_id}:{key[len(old) + 1 :]}"
    return dataclasses.replace(incoming, chat_id=str(chat_id), conv_key=key)


async def _apologise(sink: TelegramReply) -> None:
    try:
        await sink.notice(FAILED)
    except TelegramError as exc:
        log.warning("telegram: could not send the error message: %s", exc)
