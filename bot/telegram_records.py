"""What lorabot keeps about Telegram users, and their say over it: 👍/👎 under each
answer, /forget (after a confirmation) and /stats for admins."""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.constants import ChatType
from telegram.ext import BaseHandler, CallbackQueryHandler, CommandHandler, ContextTypes, filters

from bot.service import ADMIN_ONLY, REFUSED, Incoming
from bot.telegram_reply import RATE, TelegramReply

if TYPE_CHECKING:
    from bot.telegram_handlers import TelegramHandlers

log = logging.getLogger(__name__)

PLATFORM = "telegram"
FORGET = "forget"  # callback data: forget:<yes|no>:<user id>
FORGET_PROMPT = (
    "This deletes everything stored about you here: your messages, my answers to them "
    "and your ratings. It cannot be undone. Delete it all?"
)
Context = ContextTypes.DEFAULT_TYPE


class TelegramRecords:
    def __init__(self, chats: TelegramHandlers) -> None:
        self.chats = chats  # access, sinks and jobs are shared with the conversation
        self.store = chats.service.store

    def handlers(self) -> list[BaseHandler[Any, Any, Any]]:
        new = filters.UpdateType.MESSAGE
        return [
            CommandHandler("forget", self.on_forget, filters=new),
            CommandHandler("stats", self.on_stats, filters=new),
            CallbackQueryHandler(self.on_rate, pattern=rf"^{RATE}:"),
            CallbackQueryHandler(self.on_forget_answer, pattern=rf"^{FORGET}:"),
        ]

    async def on_stats(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or message.from_user is None or not self.chats.admit(message):
            return
        if not self.chats.access.is_admin(self.chats.who(message)):
            self.chats.notice(message, ADMIN_ONLY)
            return
        sink = self.chats.sink(message)
        self.chats.jobs.now(lambda: self._stats(sink))

    async def on_forget(self, update: Update, context: Context) -> None:
        message = update.message
        if message is None or message.from_user is None or not self.chats.admit(message):
            return
        uid = message.from_user.id
        sink = self.chats.sink(message)
        if [arg.lower() for arg in context.args or []] in (["yes"], ["confirm"]):  # at once
            self.chats.jobs.now(lambda: self._forget(sink, uid))
            return
        keyboard = InlineKeyboardMarkup(
            [
                [
                    InlineKeyboardButton("Delete everything", callback_data=f"{FORGET}:yes:{uid}"),
                    InlineKeyboardButton("Cancel", callback_data=f"{FORGET}:no:{uid}"),
                ]
            ]
        )
        self.chats.jobs.now(lambda: sink.notice(FORGET_PROMPT, keyboard))

    async def on_rate(self, update: Update, context: Context) -> None:
        query = update.callback_query
        if query is None or query.data is None:
            return
        match = re.fullmatch(rf"{RATE}:(\d+):(-?1)", query.data)
        chat_id = str(query.message.chat.id) if query.message else ""
        who = Incoming(PLATFORM, chat_id, str(query.from_user.id), "")
        if match is None or not self.chats.access.allows(who):
            self.chats.jobs.now(lambda: query.answer(REFUSED if match else "Unknown button."))
            return
        reply_id, rating = int(match.group(1)), int(match.group(2))

        async def rate() -> None:
            stored = await self.store.rate(reply_id, who.user_id, rating)
            thanks = "Thanks for the feedback!" if stored else "That answer is no longer stored."
            await query.answer(f"{'👍' if rating > 0 else '👎'} {thanks}")

        self.chats.jobs.now(rate)

    async def on_forget_answer(self, update: Update, context: Context) -> None:
        query = update.callback_query
        if query is None or query.data is None:
            return
        match = re.fullmatch(rf"{FORGET}:(yes|no):(\d+)", query.data)
        if match is None or int(match.group(2)) != query.from_user.id:
            self.chats.jobs.now(lambda: query.answer("Only the person who asked can answer this."))
            return
        confirmed = match.group(1) == "yes"
        chat = query.message.chat if query.message else None
        group = chat is not None and chat.type != ChatType.PRIVATE
        pacer = self.chats.pacer.chat(chat.id, is_group=group) if chat else None

        async def answer() -> None:
            if confirmed:
                text = await self._forgotten(query.from_user.id)
            else:
                text = "Cancelled: nothing was deleted."
            await query.answer(text)
            if pacer is not None:
                await pacer.acquire()
            await query.edit_message_text(text)  # also removes the buttons

        self.chats.jobs.now(answer)

    async def _forgotten(self, user_id: int) -> str:
        deleted = await self.store.forget_user(PLATFORM, str(user_id))
        log.info("telegram: forgot user %s (%d messages)", user_id, deleted)
        return f"Done: deleted {deleted} stored messages. I no longer remember you."

    async def _forget(self, sink: TelegramReply, user_id: int) -> None:
        await sink.notice(await self._forgotten(user_id))

    async def _stats(self, sink: TelegramReply) -> None:
        store = self.store
        counts = await store.stats(PLATFORM)
        replies, tokens, seconds = await store.reply_speed(PLATFORM, since=time.time() - 86400)
        speed = (
            f"{tokens / seconds:.1f} tokens/s ({replies} replies in the last 24 h)"
            if seconds > 0
            else "no replies in the last 24 h"
        )
        await sink.notice(
            f"Users: {counts['users']}\n"
            f"Conversations: {counts['conversations']}\n"
            f"Messages: {counts['messages']}\n"
            f"Queue: {self.chats.service.engine.queue_depth} (waiting + generating)\n"
            f"Speed: {speed}"
        )
