"""One answer in one Telegram chat, as the user watches it grow (the service's ReplySink).

* A first message as soon as there is text, then edits as it grows, paced per chat
  (telegram_pacing); an edit that would not change the text is never sent.
* Past 4096 characters the message is finished at a paragraph, line or sentence break
  and the answer continues in a new one: nothing is truncated. A code block cut by the
  break is reopened in the next message.
* Plain text while streaming (half-written Markdown is not valid anything); each
  finished message is formatted (telegram_format) and sent again as plain text if
  Telegram refuses the formatting. 👍/👎 buttons go under the last message.
* A 429 holds the chat for the time Telegram names (telegram_pacing): a streaming
  edit is skipped, a required request waits and is retried, so the answer completes.
* A group upgraded to a supergroup mid-answer (ChatMigrated) gets the part of the
  answer still being written under its new id, in a new message: the old chat takes no
  more messages, and its messages can no longer be edited.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from telegram import (
    Bot,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    LinkPreviewOptions,
    Message,
    ReplyParameters,
)
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest, ChatMigrated, RetryAfter, TelegramError

from bot.telegram_format import (
    MAX_MESSAGE,
    is_plain,
    open_fence,
    split_point,
    split_text,
    to_html,
    utf16_len,
)
from bot.telegram_pacing import ChatPacer, retry_seconds

log = logging.getLogger(__name__)

T = TypeVar("T")
NO_PREVIEW = LinkPreviewOptions(is_disabled=True)  # previews would jump around mid-stream
RATE = "rate"  # callback data: rate:<stored reply id>:<1|-1>
INTERRUPTED = "⚠️ I was restarted before I could finish this answer. Send /retry to get it."
NOT_STARTED = "⚠️ I was restarted before I could answer this. Please send it again."
RATE_MOVED = "👍 or 👎 for the answer above?"  # its last message stayed in the old group


def rating_keyboard(reply_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton("👍", callback_data=f"{RATE}:{reply_id}:1"),
                InlineKeyboardButton("👎", callback_data=f"{RATE}:{reply_id}:-1"),
            ]
        ]
    )


def _says(error: BadRequest, *phrases: str) -> bool:
    message = error.message.lower()
    return any(phrase in message for phrase in phrases)


def _not_modified(error: BadRequest) -> bool:
    return _says(error, "not modified")


def _gone(error: BadRequest) -> bool:
    """The message cannot be edited any more (deleted, or too old)."""
    return _says(error, "message to edit not found", "message can't be edited")


def _formatting_refused(error: BadRequest) -> bool:
    return _says(error, "can't parse", "parse entities", "unsupported start tag")


class _Moved(Exception):
    """An edit found the chat upgraded to a supergroup: its message stays in the old
    chat, where nothing can be edited any more (the reply itself has moved)."""


@dataclass
class _Live:
    """The message being written: its id and the text it shows (stripped, as Telegram
    keeps it)."""

    message_id: int
    text: str


class TelegramReply:
    """Streams one answer into one chat. `message_ids` lists every message it sent;
    `reply_id` is set when the answer was finished and stored."""

    def __init__(
        self,
        bot: Bot,
        chat_id: int,
        pacer: ChatPacer,
        *,
        may_type: Callable[[], bool],
        typing_every_s: float = 4.0,
        reply_to: int | None = None,
        thread_id: int | None = None,
    ) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.message_ids: list[int] = []
        self.reply_id: int | None = None
        self._pacer = pacer
        self._may_type = may_type
        self._typing_every_s = typing_every_s
        self._reply_to = reply_to
        self._thread_id = thread_id
        self._live: _Live | None = None
        self._start = 0  # where the live message's part of the answer begins
        self._carry = ""  # a code fence reopened at the top of the live message
        self._typing: asyncio.Task[None] | None = None

    # ReplySink -------------------------------------------------------------------
    async def notice(self, text: str, keyboard: InlineKeyboardMarkup | None = None) -> None:
        """A short complete message (split if it is not short); `keyboard` goes under
        its last part."""
        self._stop_typing()
        parts = split_text(text)
        for number, part in enumerate(parts, start=1):
            await self._send(part, None, keyboard if number == len(parts) else None)

    async def typing(self) -> None:
        if self._typing is None and not self.message_ids:
            self._typing = asyncio.create_task(self._keep_typing())

    async def update(self, text: str) -> None:
        await self._seal_overflow(text)
        part = self._part(text)
        if not part.strip():
            return
        if self._live is None:
            self._stop_typing()
            message = await self._send(part, None, None)
            self._live = _Live(message.message_id, part.strip())
        elif part.strip() != self._live.text:
            await self._edit_streaming(self._live, part)

    async def finish(self, text: str, reply_id: int) -> None:
        self._stop_typing()
        await self._seal_overflow(text)
        part = self._part(text)
        keyboard = rating_keyboard(reply_id)
        if part.strip():
            await self._settle(part, keyboard)
        elif self.message_ids:  # the answer ended exactly where a message did
            last = self.message_ids[-1]
            try:
                await self._required(
                    lambda: self.bot.edit_message_reply_markup(
                        self.chat_id, last, reply_markup=keyboard
                    )
                )
            except _Moved:  # the answer's last message stayed in the old chat
                await self._send(RATE_MOVED, None, keyboard)
        self.reply_id = reply_id

    # lifecycle -------------------------------------------------------------------
    async def interrupted(self, *, started: bool) -> None:
        """Shutdown cut this reply short: say so (best effort, a few seconds at most)."""
        self._stop_typing()
        try:
            await asyncio.wait_for(
                self._send(INTERRUPTED if started else NOT_STARTED, None, None), timeout=3
            )
        except (TelegramError, TimeoutError) as exc:
            log.warning("telegram: could not tell chat %s about the restart: %s", self.chat_id, exc)

    def close(self) -> None:
        self._stop_typing()

    # streaming -------------------------------------------------------------------
    def _part(self, text: str) -> str:
        """The live message's share of the answer."""
        return self._carry + text[self._start :]

    async def _seal_overflow(self, text: str) -> None:
        """While the live part is longer than a message, finish the message at the best
        break and move the rest to a new one."""
        while utf16_len(part := self._part(text)) > MAX_MESSAGE:
            cut = max(split_point(part), len(self._carry) + 1)
            chunk = part[:cut]
            await self._settle(chunk, None)
            self._start += cut - len(self._carry)
            fence = open_fence(chunk)
            self._carry = f"{fence}\n" if fence else ""

    async def _edit_streaming(self, live: _Live, part: str) -> None:
        """An intermediate edit: only if the chat has a free slot now."""

        async def edit() -> Any:
            return await self.bot.edit_message_text(
                part, self.chat_id, live.message_id, link_preview_options=NO_PREVIEW
            )

        try:
            if await self._pacer.call(edit, required=False) is not None:
                live.text = part.strip()
        except ChatMigrated as exc:  # the next update starts a message in the new chat
            self.move_to(exc.new_chat_id)
        except BadRequest as exc:
            if _not_modified(exc):
                live.text = part.strip()
            elif _gone(exc):  # deleted under us: the rest goes into a new message
                self._live = None
            else:
                log.warning("telegram: edit refused in chat %s: %s", self.chat_id, exc)

    async def _settle(self, part: str, keyboard: InlineKeyboardMarkup | None) -> None:
        """Make the live message show `part` for good, formatted (or send it as a new
        message); the next text starts a new message."""
        live, self._live = self._live, None
        if not part.strip():
            return
        html = None if is_plain(part) else to_html(part)
        if live is not None:
            try:
                await self._edit_final(live, part, html, keyboard)
                return
            except _Moved:
                pass  # the part goes out in the new chat
            except BadRequest as exc:
                if not _gone(exc):
                    raise
        await self._send(part, html, keyboard)

    async def _edit_final(
        self, live: _Live, part: str, html: str | None, keyboard: InlineKeyboardMarkup | None
    ) -> None:
        def edit(body: str, mode: str | None) -> Callable[[], Awaitable[Any]]:
            return lambda: self.bot.edit_message_text(
                body,
                self.chat_id,
                live.message_id,
                parse_mode=mode,
                reply_markup=keyboard,
                link_preview_options=NO_PREVIEW,
            )

        try:
            if html is not None:
                try:
                    await self._required(edit(html, ParseMode.HTML))
                    return
                except BadRequest as exc:
                    if not _formatting_refused(exc):
                        raise
                    log.warning("telegram: formatting refused (%s); plain text instead", exc)
            if part.strip() != live.text:
                await self._required(edit(part, None))
            elif keyboard is not None:  # same text: only the buttons are new
                await self._required(
                    lambda: self.bot.edit_message_reply_markup(
                        self.chat_id, live.message_id, reply_markup=keyboard
                    )
                )
        except BadRequest as exc:
            if not _not_modified(exc):
                raise

    # requests --------------------------------------------------------------------
    async def _send(
        self, text: str, html: str | None, keyboard: InlineKeyboardMarkup | None
    ) -> Message:
        """A new message; formatted if `html` is given and Telegram accepts it. The first
        message of a reply answers the user's message (in groups). Chat and reply target
        are read when the request runs: a retry in a new chat takes the new ones."""

        def send(body: str, mode: str | None) -> Callable[[], Awaitable[Message]]:
            async def request() -> Message:
                reply = None
                if self._reply_to is not None and not self.message_ids:
                    reply = ReplyParameters(self._reply_to, allow_sending_without_reply=True)
                return await self.bot.send_message(
                    self.chat_id,
                    body,
                    parse_mode=mode,
                    reply_markup=keyboard,
                    reply_parameters=reply,
                    message_thread_id=self._thread_id,
                    link_preview_options=NO_PREVIEW,
                )

            return request

        message = None
        if html is not None:
            try:
                message = await self._required(send(html, ParseMode.HTML), resend=True)
            except BadRequest as exc:
                if not _formatting_refused(exc):
                    raise
                log.warning("telegram: formatting refused (%s); plain text instead", exc)
        if message is None:
            message = await self._required(send(text, None), resend=True)
        self.message_ids.append(message.message_id)
        return message

    async def _required(self, call: Callable[[], Awaitable[T]], *, resend: bool = False) -> T:
        """The call, waited for. If the group has become a supergroup (ChatMigrated), the
        reply moves there; a send (`resend`) goes again in the new chat, an edit raises
        _Moved: its message stays behind in the old one."""
        try:
            result = await self._pacer.call(call, required=True)
        except ChatMigrated as exc:
            self.move_to(exc.new_chat_id)
            if not resend:
                raise _Moved from exc
            result = await self._pacer.call(call, required=True)
        assert result is not None, "a required request returns or raises"
        return result

    def move_to(self, chat_id: int) -> None:
        """The group is now the supergroup `chat_id`: write there from now on. Messages
        already sent stay in the old chat, so none of them is edited or replied to."""
        if chat_id == self.chat_id:
            return
        log.info("telegram: chat %s is now %s; the answer goes on there", self.chat_id, chat_id)
        self.chat_id = chat_id
        self._pacer = self._pacer.moved(chat_id)
        self._reply_to = None
        self._live = None
        self.message_ids = []

    async def _keep_typing(self) -> None:
        """'typing…' until the first message appears (an action shows for 5 s)."""
        while True:
            if self._may_type():
                try:
                    await self.bot.send_chat_action(
                        self.chat_id, ChatAction.TYPING, message_thread_id=self._thread_id
                    )
                except RetryAfter as exc:
                    self._pacer.hold(retry_seconds(exc))
                except ChatMigrated as exc:
                    self.move_to(exc.new_chat_id)
                except TelegramError as exc:
                    log.debug("telegram: typing action failed in chat %s: %s", self.chat_id, exc)
            await asyncio.sleep(self._typing_every_s)

    def _stop_typing(self) -> None:
        if self._typing is not None:
            self._typing.cancel()
            self._typing = None
