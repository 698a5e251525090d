"""The Telegram adapter end to end: the real python-telegram-bot polling the fake Bot
API (tests/fakes/telegram_server.py), a real SQLite store, and the real worker on a
scripted model. Every assertion is on what the fake server saw or what was stored."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from telegram import Bot

from bot.service import ADMIN_ONLY, BUSY, FAILED, REFUSED, ChatService
from bot.store import Store
from bot.telegram_bot import run_telegram
from bot.telegram_config import TelegramConfig
from bot.telegram_handlers import NOT_TEXT
from bot.telegram_pacing import Pacer, Pacing
from bot.telegram_reply import INTERRUPTED, RATE_MOVED, TelegramReply
from engine.config import ConfigError
from engine.types import SamplingParams
from tests.fakes.telegram_server import ApiCall, BotMessage, FakeTelegram

ANSWER = "Paris is the capital of France."
USER = 4242
GROUP = -1001234567890
BOT_NAME = "lorabot_test_bot"
TOKEN_ENV = "LORABOT_TEST_TELEGRAM_TOKEN"
# Fast enough for tests, slow enough to see pacing: 0.15 s per chat, 20 per 2 s in groups.
FAST = Pacing(chat_gap_s=0.15, group_window_s=2.0, typing_every_s=0.3)
CHAT_METHODS = ("sendMessage", "editMessageText", "editMessageReplyMarkup")


@dataclass
class Running:
    service: ChatService
    model: Any
    task: asyncio.Task[None]
    db: Path

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.service.store.close()

    def rows(self, sql: str = "SELECT role, text FROM messages ORDER BY id") -> list[Any]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql).fetchall()


@dataclass
class Bots:
    fake: FakeTelegram
    started: list[Running] = field(default_factory=list)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(bot_username=BOT_NAME) as server:
        yield server


@pytest.fixture
async def start_bot(
    fake: FakeTelegram, tmp_path: Path, scripted_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Any]]:
    monkeypatch.setenv("PTB_TIMEDELTA", "true")
    monkeypatch.setenv(TOKEN_ENV, fake.token)
    started: list[Running] = []

    async def start(
        answer: str = ANSWER,
        *,
        engine: dict[str, Any] | None = None,
        pacing: Pacing = FAST,
        grace_s: float = 2.0,
        max_new_tokens: int = 200,
        **config: Any,
    ) -> Running:
        llm_engine, model = scripted_engine(answer, **(engine or {}))
        store = await Store.open(tmp_path / "bot.db")
        service = ChatService(
            store,
            llm_engine,
            system_prompt="You are a test bot.",
            sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=0),
        )
        settings = TelegramConfig(
            enabled=True, token_env=TOKEN_ENV, base_url=fake.base_url, **config
        )
        polls = len(fake.calls_of("getUpdates"))
        task = asyncio.create_task(
            run_telegram(
                service,
                settings,
                pacing=pacing,
                grace_s=grace_s,
                poll_timeout_s=1,
                handle_sigterm=False,
            )
        )
        await fake.wait_for(lambda: len(fake.calls_of("getUpdates")) > polls or task.done())
        if task.done():
            task.result()
        running = Running(service, model, task, tmp_path / "bot.db")
        started.append(running)
        return running

    yield start
    for running in started:
        if not running.task.done():
            await running.stop()


def rated(message: BotMessage) -> bool:
    """A finished answer carries the 👍/👎 buttons."""
    rows = (message.reply_markup or {}).get("inline_keyboard", [])
    return any(b.get("callback_data", "").startswith("rate:") for row in rows for b in row)


async def answers(fake: FakeTelegram, chat: int, count: int = 1) -> list[BotMessage]:
    """The bot's messages in `chat` once `count` answers are finished."""
    await fake.wait_for(
        lambda: sum(rated(m) for m in fake.bot_messages(chat)) >= count,
        timeout=20,
        message=f"{count} finished answer(s) in chat {chat}",
    )
    return fake.bot_messages(chat)


async def texts(fake: FakeTelegram, chat: int, count: int) -> list[str]:
    await fake.wait_for(lambda: len(fake.bot_messages(chat)) >= count, message="messages")
    return [m.text for m in fake.bot_messages(chat)]


def chat_calls(fake: FakeTelegram, chat: int) -> list[ApiCall]:
    return [c for c in fake.calls if c.method in CHAT_METHODS and c.params.get("chat_id") == chat]


async def stored(fake: FakeTelegram, bot: Any, query: str, expected: list[tuple]) -> None:
    """Asserts `query`'s rows, once they are there: a turn whose answer followed its
    group into the supergroup moves its rows to the new id just after the answer's
    rating buttons show (the chat's next turn waits for it; a test does not)."""
    with contextlib.suppress(AssertionError):
        await fake.wait_for(lambda: bot.rows(query) == expected, timeout=5)
    assert bot.rows(query) == expected


async def settle(fake: FakeTelegram, seconds: float = 0.4) -> None:
    """Give the bot time to (not) react, with every update consumed."""
    await fake.wait_for(lambda: not fake.pending_updates())
    await asyncio.sleep(seconds)


# --- private chat ------------------------------------------------------------------


async def test_private_chat_streams_paced_edits_and_ends_with_rating_buttons(
    fake: FakeTelegram, start_bot: Any
) -> None:
    answer = "The capital of France is Paris. " * 6
    bot = await start_bot(answer, engine={"delay_s": 0.02}, pacing=FAST)
    sent = fake.send_text(USER, "What is the capital of France?", user_id=USER)

    [message] = await answers(fake, USER)

    assert message.text == answer.strip()
    calls = chat_calls(fake, USER)
    typing = fake.calls_of("sendChatAction")
    assert typing and typing[0].timestamp < calls[0].timestamp  # "typing…" while waiting
    assert calls[0].method == "sendMessage" and len(calls[0].params["text"]) < len(answer)
    assert message.edit_count >= 3  # it grew in place...
    history = message.history
    assert all(a != b for a, b in zip(history, history[1:], strict=False))  # ...never the same
    assert all(answer.startswith(h) for h in history)
    gaps = [b.timestamp - a.timestamp for a, b in zip(calls, calls[1:], strict=False)]
    assert min(gaps) >= FAST.chat_gap_s - 0.05  # paced per chat (tokens come every 0.02 s)
    assert "reply_parameters" not in calls[0].params  # private chats need no quoting
    assert bot.rows() == [("user", sent["text"]), ("assistant", answer)]

    query = fake.press_button(USER, message.message_id, message.reply_markup["inline_keyboard"][0][0]["callback_data"], user_id=USER)  # fmt: skip
    await fake.wait_for(lambda: fake.callback_answer(query["id"]))
    assert "Thanks" in fake.callback_answer(query["id"])["text"]
    assert bot.rows("SELECT rating, user_id FROM feedback") == [(1, str(USER))]


async def test_markdown_is_formatted_at_the_end_and_plain_when_refused(
    fake: FakeTelegram, start_bot: Any
) -> None:
    answer = "**Paris** is the capital; try `print(1 < 2)`."
    # A gap longer than the whole answer takes: the only edit is the final one.
    await start_bot(answer, pacing=Pacing(chat_gap_s=0.5))
    fake.send_text(USER, "capital?", user_id=USER)
    [first] = await answers(fake, USER)
    assert first.text == "Paris is the capital; try print(1 < 2)."
    assert [e["type"] for e in first.entities] == ["bold", "code"]

    # Telegram refusing the formatting costs the formatting, never the answer.
    fake.inject_error(
        "editMessageText",
        status=400,
        description='Bad Request: can\'t parse entities: Unsupported start tag "x"',
    )
    fake.send_text(USER, "again?", user_id=USER)
    second = (await answers(fake, USER, 2))[-1]
    assert second.text == answer and second.entities == ()


async def test_long_answer_continues_in_new_messages_and_replies_to_any_part_continue(
    fake: FakeTelegram, start_bot: Any
) -> None:
    paragraph = "Internationalization and standardization considerations. " * 12  # few tokens
    answer = "\n\n".join([paragraph.strip()] * 7)  # about 4,800 characters
    bot = await start_bot(answer, max_new_tokens=1000)
    fake.send_text(USER, "Tell me about Paris", user_id=USER)

    messages = await answers(fake, USER)

    assert len(messages) == 2
    assert all(len(m.text) <= 4096 for m in messages)
    assert " ".join(m.text for m in messages).split() == answer.split()  # nothing lost
    assert messages[0].text == "\n\n".join([paragraph.strip()] * 5)  # between paragraphs
    assert [rated(m) for m in messages] == [False, True]
    store = bot.service.store

    async def linked() -> bool:
        found = [
            await store.find_platform_message("telegram", str(USER), str(m.message_id))
            for m in messages
        ]
        return all(f is not None and f.role == "assistant" for f in found)

    await fake.wait_for(linked, message="every part linked to the stored answer")


async def test_code_block_cut_by_a_split_is_reopened_in_the_next_message(
    fake: FakeTelegram, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PTB_TIMEDELTA", "true")
    fake.add_chat(USER)
    code = "\n".join(f"    total = total + value_{i}  # step {i}" for i in range(150))
    answer = f"Here is the code:\n\n```python\n{code}\n```\nDone."
    async with Bot(fake.token, base_url=fake.base_url) as bot:
        pacer = Pacer(FAST)
        sink = TelegramReply(bot, USER, pacer.chat(USER, is_group=False), may_type=lambda: True)
        for end in range(0, len(answer), 700):  # the answer streams in, chunk by chunk
            await sink.update(answer[: end + 700])
        await sink.finish(answer, reply_id=1)
    first, second = fake.bot_messages(USER)
    assert [e["type"] for e in first.entities] == ["pre"]
    assert [(e["type"], e.get("language")) for e in second.entities] == [("pre", "python")]
    assert second.text.startswith("    total = total + value_") and second.text.endswith("Done.")
    assert "```" not in first.text + second.text
    assert rated(second) and not rated(first)
    assert sink.message_ids == [first.message_id, second.message_id]


async def test_group_upgraded_after_the_last_message_gets_the_buttons_under_its_new_id(
    fake: FakeTelegram, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer filled its messages exactly, so only the rating buttons are left to
    add, and the group is upgraded just then: its last message cannot be edited any
    more, so the buttons come in the supergroup, under a line of their own."""
    monkeypatch.setenv("PTB_TIMEDELTA", "true")
    old, new = -4009, -1004009
    fake.add_chat(old, chat_type="group")
    answer = "a" * 4095 + "\n" + " " * 10  # one full message, then only whitespace
    async with Bot(fake.token, base_url=fake.base_url) as bot:
        sink = TelegramReply(bot, old, Pacer(FAST).chat(old, is_group=True), may_type=lambda: False)
        await sink.update(answer)
        fake.migrate_chat(old, new)
        await sink.finish(answer, reply_id=1)
    [full] = fake.bot_messages(old)
    [buttons] = fake.bot_messages(new)
    assert full.text == "a" * 4095 and not rated(full)
    assert buttons.text == RATE_MOVED and rated(buttons)
    assert sink.chat_id == new and sink.message_ids == [buttons.message_id]


async def test_unicode_round_trips(fake: FakeTelegram, start_bot: Any) -> None:
    answer = "巴黎是法国的首都。🇫🇷 👨‍👩‍👧 مرحبا بالعالم — עברית 😀"
    bot = await start_bot(answer)
    fake.send_text(USER, "用中文回答 🙏 مرحبا", user_id=USER)
    [message] = await answers(fake, USER)
    assert message.text == answer
    assert bot.rows() == [("user", "用中文回答 🙏 مرحبا"), ("assistant", answer)]


# --- groups ----------------------------------------------------------------------


async def test_group_answers_ask_and_ask_at_name_and_ignores_the_rest(
    fake: FakeTelegram, start_bot: Any
) -> None:
    bot = await start_bot()
    group: dict[str, Any] = {"chat_type": "supergroup", "user_id": 7, "first_name": "Ann"}
    chatter = fake.send_text(GROUP, "lunch anyone?", **group)
    fake.send_text(GROUP, "/ask@other_bot what time is it?", **group)
    fake.send_text(GROUP, "/stats@other_bot", **group)
    first = fake.send_text(GROUP, "/ask What is the capital of France?", **group)
    second = fake.send_text(GROUP, f"/ask@{BOT_NAME} And of Italy?", **group)

    messages = await answers(fake, GROUP, 2)
    await settle(fake)

    assert len(fake.bot_messages(GROUP)) == 2
    assert [m.reply_to_message_id for m in messages] == [first["message_id"], second["message_id"]]
    assert bot.rows() == [
        ("user", "What is the capital of France?"),
        ("assistant", ANSWER),
        ("user", "And of Italy?"),
        ("assistant", ANSWER),
    ]
    assert chatter["text"] not in str(bot.rows())


async def test_group_mentions_and_replies_to_the_bot_continue_its_thread(
    fake: FakeTelegram, start_bot: Any
) -> None:
    bot = await start_bot()
    ann: dict[str, Any] = {"chat_type": "supergroup", "user_id": 7}
    fake.send_text(GROUP, f"@{BOT_NAME} what is the capital of France?", **ann)
    [first] = await answers(fake, GROUP)
    fake.send_text(GROUP, "/ask something else entirely", **ann)
    await answers(fake, GROUP, 2)
    fake.send_text(GROUP, "not for the bot", reply_to_message_id=first.message_id - 1, **ann)
    fake.send_text(GROUP, "and its population?", reply_to_message_id=first.message_id, **ann)
    await answers(fake, GROUP, 3)

    store = bot.service.store
    conv = await store.open_conversation("telegram", str(GROUP), str(GROUP))
    newest = await store.last_message(conv)
    assert newest is not None
    chain = [m.text for m in await store.chain(newest.id)]
    assert chain == ["what is the capital of France?", ANSWER, "and its population?", ANSWER]
    assert "not for the bot" not in str(bot.rows())


async def test_group_context_per_user_keeps_one_conversation_per_member(
    fake: FakeTelegram, start_bot: Any
) -> None:
    bot = await start_bot(group_context="per_user")
    fake.send_text(GROUP, "/ask one", chat_type="group", user_id=7)
    await answers(fake, GROUP)
    fake.send_text(GROUP, "/ask two", chat_type="group", user_id=8)
    await answers(fake, GROUP, 2)
    keys = bot.rows("SELECT conv_key FROM conversations ORDER BY id")
    assert keys == [(f"{GROUP}:7",), (f"{GROUP}:8",)]


async def upgrade_group(fake: FakeTelegram, old: int, new: int, after_message: int) -> None:
    """What Telegram does when a group becomes a supergroup (a new chat id): the old id
    stops working, and a service message goes to each chat, migrate_to_chat_id in the
    old, migrate_from_chat_id in the new."""
    fake.migrate_chat(old, new)
    ann = {"id": 7, "is_bot": False, "first_name": "Ann"}
    for chat, kind, key, other, message_id in (
        (old, "group", "migrate_to_chat_id", new, after_message + 1),
        (new, "supergroup", "migrate_from_chat_id", old, 1),
    ):
        chat_obj = {"id": chat, "type": kind, "title": "Lab"}
        message = {"message_id": message_id, "date": 1_764_400_000, "chat": chat_obj}
        fake.queue_update({"message": {**message, "from": ann, key: other}})
    await settle(fake)


async def test_group_upgraded_to_a_supergroup_keeps_its_conversation(
    fake: FakeTelegram, start_bot: Any
) -> None:
    old, new = -4005, -1004005
    bot = await start_bot()
    fake.send_text(old, "/ask first question", chat_type="group", user_id=7, first_name="Ann")
    [first] = await answers(fake, old)
    await upgrade_group(fake, old, new, first.message_id)
    fake.send_text(new, "/ask second question", chat_type="supergroup", user_id=7)
    await answers(fake, new)
    assert bot.rows("SELECT conv_key, chat_id FROM conversations") == [(str(new), str(new))]
    store = bot.service.store
    conversation = await store.open_conversation("telegram", str(new), str(new))
    history = [m.text for m in await store.history(conversation)]
    assert history == ["first question", ANSWER, "second question", ANSWER]


async def test_group_upgraded_mid_answer_gets_the_whole_answer_under_its_new_id(
    fake: FakeTelegram, start_bot: Any
) -> None:
    """The upgrade lands while the answer streams: Telegram refuses the old id
    (ChatMigrated), the answer goes on in the supergroup in a new message with all its
    text and the rating buttons, and is stored there, so replying to it continues the
    conversation."""
    old, new = -4007, -1004007
    answer = "Upgrades happen while we talk. " * 12
    bot = await start_bot(answer, engine={"delay_s": 0.03}, group_context="per_user")
    fake.send_text(old, "/ask first question", chat_type="group", user_id=7, first_name="Ann")
    await fake.wait_for(lambda: fake.bot_messages(old), message="the answer started")
    [started] = fake.bot_messages(old)
    await upgrade_group(fake, old, new, started.message_id)

    [moved] = await answers(fake, new)
    assert moved.text == answer.strip()
    assert len(fake.bot_messages(old)) == 1 and rated(moved)
    await stored(fake, bot, "SELECT DISTINCT chat_id FROM messages", [(str(new),)])
    assert bot.rows("SELECT conv_key, chat_id FROM conversations") == [(f"{new}:7", str(new))]
    # Bob replies to the answer in the supergroup: Ann's conversation goes on.
    fake.send_text(
        new, "/ask and then?", chat_type="supergroup", user_id=8,
        reply_to_message_id=moved.message_id,
    )  # fmt: skip
    await answers(fake, new, 2)
    store = bot.service.store
    conversation = await store.open_conversation("telegram", f"{new}:7", str(new))
    history = [m.text for m in await store.history(conversation)]
    assert history == ["first question", answer, "and then?", answer]


async def test_group_upgraded_before_the_first_message_gets_it_under_its_new_id(
    fake: FakeTelegram, start_bot: Any
) -> None:
    """Upgraded while the bot was still typing: its first message is refused under the
    old id (ChatMigrated) and sent again under the new one."""
    old, new = -4008, -1004008
    bot = await start_bot(pacing=dataclasses.replace(FAST, typing_every_s=30.0))  # typing once
    bot.model.gate.clear()  # the answer waits until the group has been upgraded
    fake.send_text(old, "/ask first question", chat_type="group", user_id=7, first_name="Ann")
    await fake.wait_for(lambda: fake.calls_of("sendChatAction"), message="typing")
    await upgrade_group(fake, old, new, 1)
    bot.model.gate.set()

    [message] = await answers(fake, new)
    assert message.text == ANSWER and not fake.bot_messages(old)
    sends = [
        (c.params["chat_id"], "reply_parameters" in c.params) for c in fake.calls_of("sendMessage")
    ]
    # Refused once, as an answer to the question; then sent where the group is now, as a
    # message of its own (the question's id means nothing in the supergroup).
    assert sends == [(old, True), (new, False)]
    await stored(fake, bot, "SELECT DISTINCT chat_id FROM messages", [(str(new),)])
    assert bot.rows("SELECT conv_key, chat_id FROM conversations") == [(str(new), str(new))]


async def test_turns_waiting_when_a_group_is_upgraded_are_answered_in_order_there(
    fake: FakeTelegram, start_bot: Any
) -> None:
    """Two questions wait in the group (one being answered, one queued) when it becomes a
    supergroup, and a third comes in the supergroup: all three are answered there, in
    the order they were asked, in the one conversation the group had."""
    old, new = -4010, -1004010
    bot = await start_bot()
    bot.model.gate.clear()  # nothing is answered until the group has been upgraded
    ann: dict[str, Any] = {"user_id": 7, "first_name": "Ann"}
    fake.send_text(old, "/ask one", chat_type="group", **ann)
    fake.send_text(old, "/ask two", chat_type="group", **ann)
    await settle(fake)
    await upgrade_group(fake, old, new, 2)
    fake.send_text(new, "/ask three", chat_type="supergroup", **ann)
    await settle(fake)
    bot.model.gate.set()

    await answers(fake, new, 3)
    assert not fake.bot_messages(old)
    assert bot.rows("SELECT conv_key, chat_id FROM conversations") == [(str(new), str(new))]
    assert bot.rows("SELECT DISTINCT chat_id FROM messages") == [(str(new),)]
    store = bot.service.store
    conversation = await store.open_conversation("telegram", str(new), str(new))
    history = [m.text for m in await store.history(conversation)]
    assert history == ["one", ANSWER, "two", ANSWER, "three", ANSWER]


async def test_upgraded_group_on_the_allow_list_tells_the_admin_its_new_id(
    fake: FakeTelegram, start_bot: Any, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = -4006, -1004006
    bot = await start_bot(allowed_chats=(old,))
    fake.send_text(old, "/ask first question", chat_type="group", user_id=7, first_name="Ann")
    [first] = await answers(fake, old)
    with caplog.at_level(logging.WARNING, logger="bot.telegram_handlers"):
        await upgrade_group(fake, old, new, first.message_id)
    assert f"add {new} to [telegram] allowed_chats" in caplog.text
    assert bot.rows("SELECT conv_key, chat_id FROM conversations") == [(str(new), str(new))]


async def test_group_keeps_its_budget_while_streaming(fake: FakeTelegram, start_bot: Any) -> None:
    pacing = Pacing(chat_gap_s=0.05, group_budget=6, group_window_s=1.5, group_headroom=2)
    await start_bot("word " * 60, engine={"delay_s": 0.02}, pacing=pacing)
    fake.send_text(GROUP, "/ask stream please", chat_type="group", user_id=7)
    await answers(fake, GROUP)
    times = [c.timestamp for c in chat_calls(fake, GROUP)]
    assert len(times) >= 4  # it did stream
    for i, start in enumerate(times):
        in_window = [t for t in times[i:] if t < start + pacing.group_window_s - 0.05]
        assert len(in_window) <= pacing.group_budget


# --- flood control, errors, access ------------------------------------------------


async def test_429_mid_stream_is_honoured_and_the_answer_completes(
    fake: FakeTelegram, start_bot: Any
) -> None:
    answer = "Slow and steady wins the race. " * 8
    await start_bot(answer, engine={"delay_s": 0.03})
    fake.send_text(USER, "go", user_id=USER)
    await fake.wait_for(lambda: fake.calls_of("sendMessage"))
    fake.inject_error("editMessageText", status=429, retry_after=1)

    [message] = await answers(fake, USER)

    assert message.text == answer.strip()
    calls = chat_calls(fake, USER)
    [flooded] = [i for i, c in enumerate(calls) if c.status == 429]
    assert calls[flooded + 1].timestamp - calls[flooded].timestamp >= 1.0


async def test_429_on_the_first_message_waits_and_sends(fake: FakeTelegram, start_bot: Any) -> None:
    await start_bot()
    fake.inject_error("sendMessage", status=429, retry_after=1)
    fake.send_text(USER, "hi", user_id=USER)
    [message] = await answers(fake, USER)
    assert message.text == ANSWER
    statuses = [c.status for c in fake.calls_of("sendMessage")]
    assert statuses == [429, 200]


async def test_busy_engine_and_failed_generation_are_told_not_silent(
    fake: FakeTelegram, start_bot: Any
) -> None:
    bot = await start_bot(engine={"max_queue": 1})
    bot.model.gate.clear()  # generation hangs: one runs, one waits, the third is refused
    engine = bot.service.engine
    fake.send_text(1, "question", user_id=1)
    await fake.wait_for(lambda: engine.queue_depth == 1 and engine._queue.qsize() == 0)
    fake.send_text(2, "question", user_id=2)
    fake.send_text(3, "question", user_id=3)
    assert await texts(fake, 3, 1) == [BUSY]
    bot.model.gate.set()
    for user in (1, 2):
        assert [m.text for m in await answers(fake, user)] == [ANSWER]
    bot.model.fail_at = bot.model.steps  # the next step raises
    fake.send_text(USER, "and now?", user_id=USER)
    assert await texts(fake, USER, 1) == [FAILED]


async def test_allow_list_refuses_once_and_stores_nothing(
    fake: FakeTelegram, start_bot: Any
) -> None:
    bot = await start_bot(allowed_users=(USER,))
    stranger = 999
    fake.send_text(stranger, "let me in", user_id=stranger)
    fake.send_text(stranger, "please?", user_id=stranger)
    fake.send_text(GROUP, f"@{BOT_NAME} hi", chat_type="group", user_id=stranger)
    fake.send_text(USER, "hello", user_id=USER)
    await answers(fake, USER)
    await settle(fake)
    assert [m.text for m in fake.bot_messages(stranger)] == [REFUSED]
    assert [m.text for m in fake.bot_messages(GROUP)] == [REFUSED]
    assert bot.rows() == [("user", "hello"), ("assistant", ANSWER)]


async def test_admin_only_stats(fake: FakeTelegram, start_bot: Any) -> None:
    await start_bot(admins=(1,))
    fake.send_text(USER, "hello", user_id=USER)
    await answers(fake, USER)
    fake.send_text(USER, "/stats", user_id=USER)
    fake.send_text(1, "/stats", user_id=1)
    assert (await texts(fake, USER, 2))[-1] == ADMIN_ONLY
    [stats] = await texts(fake, 1, 1)
    assert "Users: 1" in stats and "Messages: 2" in stats and "Queue: 0" in stats
    assert "tokens/s" in stats


async def test_forget_deletes_everything_after_confirmation(
    fake: FakeTelegram, start_bot: Any
) -> None:
    bot = await start_bot()
    fake.send_text(USER, "remember this", user_id=USER)
    await answers(fake, USER)
    fake.send_text(2, "someone else", user_id=2)
    await answers(fake, 2)
    fake.send_text(USER, "/forget", user_id=USER)
    prompt = (await texts(fake, USER, 2))[-1]
    assert "cannot be undone" in prompt
    assert len(bot.rows()) == 4  # nothing deleted before the confirmation
    confirm = fake.bot_messages(USER)[-1]
    other = fake.press_button(USER, confirm.message_id, f"forget:yes:{USER}", user_id=2)
    await fake.wait_for(lambda: fake.callback_answer(other["id"]))
    assert "Only the person who asked" in fake.callback_answer(other["id"])["text"]
    assert len(bot.rows()) == 4
    fake.press_button(USER, confirm.message_id, f"forget:yes:{USER}", user_id=USER)
    await fake.wait_for(lambda: fake.bot_messages(USER)[-1].text.startswith("Done"))
    assert fake.bot_messages(USER)[-1].reply_markup is None
    assert bot.rows() == [("user", "someone else"), ("assistant", ANSWER)]
    fake.send_text(2, "/forget yes", user_id=2)  # confirmed in the command itself
    await fake.wait_for(lambda: fake.bot_messages(2)[-1].text.startswith("Done"))
    assert bot.rows() == []


# --- lifecycle ---------------------------------------------------------------------


async def test_start_registers_commands_and_greets(fake: FakeTelegram, start_bot: Any) -> None:
    await start_bot()
    fake.send_text(USER, "/start", user_id=USER, first_name="Ann")
    [greeting] = await texts(fake, USER, 1)
    assert greeting.startswith("Hi Ann!") and "/ask" in greeting and "/forget" in greeting
    commands = fake.calls_of("setMyCommands")[0].params["commands"]
    names = [c["command"] for c in commands]
    assert names == ["start", "help", "ask", "reset", "retry", "forget", "stats"]
    order = [c.method for c in fake.calls]
    assert order.index("deleteWebhook") < order.index("getUpdates")


async def test_stickers_edits_and_odd_updates_never_break_the_bot(
    fake: FakeTelegram, start_bot: Any
) -> None:
    bot = await start_bot()
    user = {"id": USER, "is_bot": False, "first_name": "Ann"}
    chat = {"id": USER, "type": "private", "first_name": "Ann"}
    sticker = {"file_id": "s", "file_unique_id": "s", "type": "regular", "width": 1, "height": 1, "is_animated": False, "is_video": False}  # fmt: skip
    fake.add_chat(USER)
    fake.queue_update({"message": {"message_id": 50, "date": 1, "chat": chat, "from": user, "sticker": sticker}})  # fmt: skip
    fake.queue_update({"edited_message": {"message_id": 51, "date": 1, "edit_date": 2, "chat": chat, "from": user, "text": "edited"}})  # fmt: skip
    group_chat = {"id": GROUP, "type": "group", "title": "G"}
    fake.queue_update({"message": {"message_id": 52, "date": 1, "chat": group_chat, "from": user, "new_chat_members": [user]}})  # fmt: skip
    fake.queue_update({"message": {"message_id": 53, "date": 1, "chat": group_chat, "from": user, "sticker": sticker}})  # fmt: skip
    fake.send_text(USER, "still there?", user_id=USER)
    await answers(fake, USER)
    assert fake.bot_messages(USER)[0].text == NOT_TEXT
    assert fake.bot_messages(GROUP) == []
    assert bot.rows() == [("user", "still there?"), ("assistant", ANSWER)]


async def test_turns_of_one_chat_stay_in_order(fake: FakeTelegram, start_bot: Any) -> None:
    bot = await start_bot(engine={"delay_s": 0.002})
    for text in ("one", "two", "three"):
        fake.send_text(USER, text, user_id=USER)
    await answers(fake, USER, 3)
    assert [r[1] for r in bot.rows()] == ["one", ANSWER, "two", ANSWER, "three", ANSWER]


async def test_ten_users_at_once_are_answered_concurrently(
    fake: FakeTelegram, start_bot: Any
) -> None:
    bot = await start_bot(engine={"delay_s": 0.005, "max_queue": 16})
    users = list(range(101, 111))
    for user in users:
        fake.send_text(user, f"question from {user}", user_id=user)
    for user in users:
        await answers(fake, user)
    typing = fake.calls_of("sendChatAction")
    first_done = min(c.timestamp for c in fake.calls if c.params.get("reply_markup"))
    waiting = {c.params.get("chat_id") for c in typing if c.timestamp < first_done}
    assert {c.params.get("chat_id") for c in typing} == set(users)
    assert len(waiting) >= 5  # all in flight at once, not one by one
    stored = bot.rows("SELECT chat_id, role FROM messages ORDER BY chat_id, id")
    assert stored == [(str(u), role) for u in users for role in ("user", "assistant")]


async def test_restart_keeps_history_and_answers_what_came_meanwhile(
    fake: FakeTelegram, start_bot: Any
) -> None:
    first = await start_bot()
    fake.send_text(USER, "my name is Ann", user_id=USER)
    await answers(fake, USER)
    await first.stop()
    fake.send_text(USER, "what is my name?", user_id=USER)  # while the bot is down
    second = await start_bot()
    await answers(fake, USER, 2)
    store = second.service.store
    conv = await store.open_conversation("telegram", str(USER), str(USER))
    assert [m.text for m in await store.history(conv)] == [
        "my name is Ann",
        ANSWER,
        "what is my name?",
        ANSWER,
    ]


async def test_shutdown_mid_answer_tells_the_user(fake: FakeTelegram, start_bot: Any) -> None:
    bot = await start_bot(grace_s=0.3)
    bot.model.gate.clear()  # the answer never comes
    fake.send_text(USER, "long question", user_id=USER)
    await fake.wait_for(lambda: fake.calls_of("sendChatAction"))
    await asyncio.wait_for(bot.stop(), timeout=10)
    bot.model.gate.set()
    assert [m.text for m in fake.bot_messages(USER)] == [INTERRUPTED]
    assert bot.rows() == [("user", "long question")]  # /retry can answer it


async def test_token_never_reaches_the_logs(
    fake: FakeTelegram, start_bot: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await start_bot()
    fake.inject_error("sendMessage", status=502)
    fake.send_text(USER, "hi", user_id=USER)
    await answers(fake, USER)
    assert "getUpdates" in caplog.text  # PTB did log its requests...
    logged = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    assert fake.token not in logged  # ...without the token


async def test_rejected_token_is_a_clear_error_without_the_token(
    fake: FakeTelegram, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "654321:WRONG-secret")
    store = await Store.open(tmp_path / "bot.db")
    try:
        service = ChatService(store, None, system_prompt="", sampling=SamplingParams())  # type: ignore[arg-type]
        settings = TelegramConfig(enabled=True, token_env=TOKEN_ENV, base_url=fake.base_url)
        with pytest.raises(ConfigError) as caught:
            await run_telegram(service, settings, handle_sigterm=False)
    finally:
        await store.close()
    assert "rejected the token" in str(caught.value) and TOKEN_ENV in str(caught.value)
    assert "WRONG-secret" not in str(caught.value)
