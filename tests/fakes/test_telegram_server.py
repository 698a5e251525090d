"""The fake Bot API driven by the real python-telegram-bot (Bot and Application)."""

from __future__ import annotations

import asyncio
import datetime as dtm
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.constants import ParseMode
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Conflict,
    InvalidToken,
    NetworkError,
    RetryAfter,
)
from telegram.ext import (
    Application,
    ApplicationBuilder,
    BaseHandler,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from tests.fakes.telegram_server import FakeTelegram

pytestmark = pytest.mark.asyncio

USER_ID = 4242
GROUP_ID = -1001234567890


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


@pytest_asyncio.fixture
async def bot(fake: FakeTelegram) -> AsyncIterator[Bot]:
    async with Bot(fake.token, base_url=fake.base_url) as client:
        yield client


@asynccontextmanager
async def running_app(
    fake: FakeTelegram, handlers: Sequence[BaseHandler[Any, Any, Any]]
) -> AsyncIterator[Application[Any, Any, Any, Any, Any, Any]]:
    """A real Application polling the fake; stopped in PTB's documented order."""
    app = ApplicationBuilder().token(fake.token).base_url(fake.base_url).build()
    for handler in handlers:
        app.add_handler(handler)
    async with app:  # initialize() ... shutdown()
        await app.start()
        assert app.updater is not None
        await app.updater.start_polling(
            poll_interval=0.0, timeout=1, allowed_updates=Update.ALL_TYPES
        )
        try:
            yield app
        finally:
            await app.updater.stop()
            await app.stop()


async def test_get_me_returns_the_bot_user(fake: FakeTelegram, bot: Bot) -> None:
    me = await bot.get_me()

    assert me.username == "lorabot_test_bot"
    assert me.is_bot and me.id == 123456
    assert [call.status for call in fake.calls_of("getMe")] == [200, 200]  # initialize + ours


async def test_wrong_token_is_unauthorized(fake: FakeTelegram) -> None:
    with pytest.raises(InvalidToken):
        async with Bot("123456:WRONG-token", base_url=fake.base_url):
            pass
    assert fake.calls_of("getMe")[-1].status == 401


async def test_unknown_method_is_404_not_found(fake: FakeTelegram) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{fake.base_url}{fake.token}/fooBar", data={"x": "1"}) as response:
            body = await response.json()
    assert response.status == 404
    assert body == {"ok": False, "error_code": 404, "description": "Not Found"}


async def test_private_message_reaches_handler_and_reply_is_recorded(fake: FakeTelegram) -> None:
    async def echo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.effective_message is not None
        await update.effective_message.reply_text(f"echo: {update.effective_message.text}")

    async with running_app(fake, [MessageHandler(filters.TEXT & ~filters.COMMAND, echo)]):
        sent = fake.send_text(USER_ID, "hello there", user_id=USER_ID, first_name="Ann")
        replies = await fake.wait_for(lambda: fake.bot_messages(USER_ID))

    assert [reply.text for reply in replies] == ["echo: hello there"]
    assert replies[0].message_id == sent["message_id"] + 1  # one id sequence per chat
    params = fake.calls_of("sendMessage")[0].params
    assert params["chat_id"] == USER_ID and params["text"] == "echo: hello there"
    assert fake.pending_updates() == []  # confirmed by the next getUpdates offset


async def test_editing_with_identical_content_is_not_modified(fake: FakeTelegram, bot: Bot) -> None:
    fake.add_chat(USER_ID)
    message = await bot.send_message(USER_ID, "draft")
    await bot.edit_message_text("final", chat_id=USER_ID, message_id=message.message_id)

    with pytest.raises(BadRequest, match="not modified"):
        await bot.edit_message_text("final", chat_id=USER_ID, message_id=message.message_id)
    with pytest.raises(BadRequest, match="Message to edit not found"):
        await bot.edit_message_text("x", chat_id=USER_ID, message_id=999)

    [shown] = fake.bot_messages(USER_ID)
    assert (shown.text, shown.edit_count, shown.history) == ("final", 1, ("draft", "final"))


async def test_removing_the_keyboard_counts_as_a_modification(fake: FakeTelegram, bot: Bot) -> None:
    fake.add_chat(USER_ID)
    keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("Go", callback_data="go")]])
    message = await bot.send_message(USER_ID, "pick", reply_markup=keyboard)

    await bot.edit_message_text("pick", chat_id=USER_ID, message_id=message.message_id)

    assert fake.bot_messages(USER_ID)[0].reply_markup is None
    assert fake.calls_of("sendMessage")[0].params["reply_markup"] == keyboard.to_dict()


async def test_message_length_counts_code_points(fake: FakeTelegram, bot: Bot) -> None:
    fake.add_chat(USER_ID)
    with pytest.raises(BadRequest, match="Message is too long"):
        await bot.send_message(USER_ID, "a" * 4097)
    with pytest.raises(BadRequest, match="Message text is empty"):
        await bot.send_message(USER_ID, "")
    with pytest.raises(BadRequest, match="Message must be non-empty"):
        await bot.send_message(USER_ID, "<b> </b>", parse_mode=ParseMode.HTML)

    await bot.send_message(USER_ID, "a" * 4096)
    await bot.send_message(USER_ID, "\N{GRINNING FACE}" * 4096)  # 8192 UTF-16 units, accepted
    assert [len(message.text) for message in fake.bot_messages(USER_ID)] == [4096, 4096]


async def test_injected_429_surfaces_as_retry_after(
    fake: FakeTelegram, bot: Bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PTB_TIMEDELTA", "true")  # PTB 22 warns about int retry_after otherwise
    fake.add_chat(USER_ID)
    fake.inject_error("sendMessage", status=429, retry_after=3)

    with pytest.raises(RetryAfter) as caught:
        await bot.send_message(USER_ID, "hi")
    await bot.send_message(USER_ID, "hi again")  # the fault was used up

    assert caught.value.retry_after == dtm.timedelta(seconds=3)
    assert [call.status for call in fake.calls_of("sendMessage")] == [429, 200]
    assert [message.text for message in fake.bot_messages(USER_ID)] == ["hi again"]


async def test_a_group_upgraded_to_a_supergroup_answers_with_its_new_id(
    fake: FakeTelegram, bot: Bot
) -> None:
    old, new = -4242, -1004242
    fake.add_chat(old, chat_type="group", title="Lab")
    await bot.send_message(old, "before")
    fake.migrate_chat(old, new)

    with pytest.raises(ChatMigrated) as caught:
        await bot.send_message(old, "after")
    with pytest.raises(ChatMigrated):
        await bot.send_chat_action(old, "typing")
    sent = await bot.send_message(caught.value.new_chat_id, "after")

    assert caught.value.new_chat_id == new
    assert sent.chat.type == "supergroup" and sent.chat.title == "Lab"
    assert [m.text for m in fake.bot_messages(new)] == ["after"]
    assert [c.status for c in fake.calls_of("sendMessage")] == [200, 400, 200]


async def test_injected_502_surfaces_as_network_error(fake: FakeTelegram, bot: Bot) -> None:
    fake.add_chat(USER_ID)
    fake.inject_error("editMessageText", status=502, times=2)
    message = await bot.send_message(USER_ID, "v1")

    for _ in range(2):
        with pytest.raises(NetworkError) as caught:
            await bot.edit_message_text("v2", chat_id=USER_ID, message_id=message.message_id)
        assert not isinstance(caught.value, BadRequest)
    await bot.edit_message_text("v2", chat_id=USER_ID, message_id=message.message_id)

    assert fake.bot_messages(USER_ID)[0].text == "v2"


async def test_markdown_v2_must_be_escaped(fake: FakeTelegram, bot: Bot) -> None:
    fake.add_chat(USER_ID)
    with pytest.raises(BadRequest, match="Can't parse entities: character '.' is reserved"):
        await bot.send_message(USER_ID, "Version 1.0 is *out*", parse_mode=ParseMode.MARKDOWN_V2)
    # PTB capitalize()s descriptions, so tdlib's "Bold" reads "bold" in the exception.
    with pytest.raises(BadRequest, match="can't find end of bold entity at byte offset 0"):
        await bot.send_message(USER_ID, "*bold", parse_mode=ParseMode.MARKDOWN_V2)

    escaped = "Version 1\\.0 is *out*"
    sent = await bot.send_message(USER_ID, escaped, parse_mode=ParseMode.MARKDOWN_V2)

    [shown] = fake.bot_messages(USER_ID)
    assert shown.text == sent.text == "Version 1.0 is out"
    assert shown.entities == ({"offset": 15, "length": 3, "type": "bold"},)


async def test_html_and_legacy_markdown(fake: FakeTelegram, bot: Bot) -> None:
    fake.add_chat(USER_ID)
    with pytest.raises(BadRequest, match="Can't parse entities: unsupported start tag"):
        await bot.send_message(USER_ID, "1 < 2", parse_mode=ParseMode.HTML)
    with pytest.raises(BadRequest, match='corresponding to start tag "b"'):
        await bot.send_message(USER_ID, "<b>open", parse_mode=ParseMode.HTML)
    with pytest.raises(BadRequest, match="can't find end of the entity starting at byte offset 11"):
        await bot.send_message(USER_ID, "_snake_case_", parse_mode=ParseMode.MARKDOWN)

    html = '<b>hi</b> &lt;3 > <a href="https://x.org">x</a>'
    await bot.send_message(USER_ID, html, parse_mode="html")  # parse_mode is case-insensitive

    [shown] = fake.bot_messages(USER_ID)
    assert shown.text == "hi <3 > x"
    assert [entity["type"] for entity in shown.entities] == ["bold", "text_link"]


async def test_group_command_addressed_to_the_bot(fake: FakeTelegram) -> None:
    seen: list[tuple[str, list[str]]] = []

    async def ask(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.effective_message is not None and update.effective_message.text
        seen.append((update.effective_message.text, list(context.args or [])))

    async with running_app(fake, [CommandHandler("ask", ask)]):
        fake.send_text(GROUP_ID, "/ask@other_bot ignored", user_id=7, chat_type="supergroup")
        sent = fake.send_text(
            GROUP_ID,
            "/ask@lorabot_test_bot hi",
            user_id=7,
            chat_type="supergroup",
            chat_title="Lab",
        )
        await fake.wait_for(lambda: seen)
        await fake.wait_for(lambda: not fake.pending_updates())

    assert seen == [("/ask@lorabot_test_bot hi", ["hi"])]
    assert sent["entities"] == [{"offset": 0, "length": 21, "type": "bot_command"}]
    assert sent["chat"] == {"id": GROUP_ID, "title": "Lab", "type": "supergroup"}


async def test_callback_query_round_trip(fake: FakeTelegram) -> None:
    async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.effective_message is not None
        keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("Yes", callback_data="vote:yes")]])
        await update.effective_message.reply_text("Vote?", reply_markup=keyboard)

    async def vote(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        assert query is not None
        await query.answer("Thanks!")
        await query.edit_message_text(f"You chose {query.data}")

    handlers = [CommandHandler("start", start), CallbackQueryHandler(vote)]
    async with running_app(fake, handlers):
        fake.send_text(USER_ID, "/start", user_id=USER_ID)
        [prompt] = await fake.wait_for(lambda: fake.bot_messages(USER_ID))
        with pytest.raises(ValueError, match="no button"):
            fake.press_button(USER_ID, prompt.message_id, "vote:no", user_id=USER_ID)
        query = fake.press_button(USER_ID, prompt.message_id, "vote:yes", user_id=USER_ID)
        await fake.wait_for(lambda: fake.bot_messages(USER_ID)[0].edit_count == 1)

    assert fake.callback_answer(query["id"]) == {"text": "Thanks!"}
    [shown] = fake.bot_messages(USER_ID)
    assert (shown.text, shown.reply_markup) == ("You chose vote:yes", None)


async def test_long_poll_returns_as_soon_as_an_update_arrives(fake: FakeTelegram, bot: Bot) -> None:
    fake.add_chat(USER_ID)
    started = time.monotonic()
    poll = asyncio.create_task(bot.get_updates(timeout=5))
    await fake.wait_for(lambda: fake.calls_of("getUpdates"))
    fake.send_text(USER_ID, "ping", user_id=USER_ID)

    [update] = await poll

    assert time.monotonic() - started < 2
    assert update.message is not None and update.message.text == "ping"
    assert fake.calls_of("getUpdates")[0].params["timeout"] == 5


async def test_get_updates_offset_limit_and_allowed_updates(fake: FakeTelegram, bot: Bot) -> None:
    first = fake.send_text(USER_ID, "one", user_id=USER_ID)
    fake.send_text(USER_ID, "two", user_id=USER_ID)

    assert [u.message.text for u in await bot.get_updates(limit=1) if u.message] == ["one"]
    updates = await bot.get_updates(offset=2)  # confirms update 1
    assert [u.update_id for u in updates] == [2]

    await bot.get_updates(offset=3, allowed_updates=["callback_query"])
    fake.send_text(USER_ID, "dropped: not an allowed update type", user_id=USER_ID)
    assert fake.pending_updates() == []
    assert first["text"] == "one"


async def test_a_newer_get_updates_terminates_the_older_one(fake: FakeTelegram, bot: Bot) -> None:
    older = asyncio.create_task(bot.get_updates(timeout=5))
    await fake.wait_for(lambda: fake.calls_of("getUpdates"))

    async with Bot(fake.token, base_url=fake.base_url) as second_instance:
        await second_instance.get_updates(timeout=0)

    with pytest.raises(Conflict, match="terminated by other getUpdates request"):
        await older


async def test_user_reply_to_a_bot_message_carries_the_original(
    fake: FakeTelegram, bot: Bot
) -> None:
    fake.send_text(GROUP_ID, "hi bot", user_id=7, chat_type="group")
    question = await bot.send_message(GROUP_ID, "What is your name?")

    answer = fake.send_text(
        GROUP_ID,
        "Ann @lorabot_test_bot",
        user_id=7,
        chat_type="group",
        reply_to_message_id=question.message_id,
    )

    assert answer["message_id"] == question.message_id + 1
    assert answer["reply_to_message"]["text"] == "What is your name?"
    assert answer["reply_to_message"]["from"]["is_bot"] is True
    assert answer["entities"] == [{"offset": 4, "length": 17, "type": "mention"}]
    updates = await bot.get_updates()
    reply = updates[-1].message
    assert reply is not None and reply.reply_to_message is not None
    assert reply.reply_to_message.message_id == question.message_id


async def test_other_methods(fake: FakeTelegram, bot: Bot) -> None:
    with pytest.raises(BadRequest, match="Chat not found"):
        await bot.send_message(999, "nobody there")
    fake.add_chat(USER_ID)
    await bot.set_my_commands([("ask", "Ask the model"), ("help", "Show help")])
    await bot.send_chat_action(USER_ID, "typing")
    message = await bot.send_message(USER_ID, "bye")
    await bot.set_message_reaction(USER_ID, message.message_id, "👍")
    await bot.delete_message(USER_ID, message.message_id)

    assert [command.command for command in await bot.get_my_commands()] == ["ask", "help"]
    assert fake.bot_messages(USER_ID) == []
    with pytest.raises(BadRequest, match="Message to delete not found"):
        await bot.delete_message(USER_ID, message.message_id)
    with pytest.raises(BadRequest, match="Button_data_invalid"):
        markup = InlineKeyboardMarkup([[InlineKeyboardButton("x", callback_data="x" * 65)]])
        await bot.send_message(USER_ID, "too much data", reply_markup=markup)
