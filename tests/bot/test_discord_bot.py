"""The Discord adapter end to end: the real discord.py against the local fake Discord
(REST + gateway), a real SQLite store and the real worker on a scripted model."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import discord.gateway
import pytest
import pytest_asyncio

from bot.discord_bot import run_discord
from bot.discord_config import DiscordConfig
from bot.service import BUSY, FAILED, ChatService
from bot.store import Store
from engine.types import SamplingParams
from tests.fakes.discord_server import FakeDiscord, FakeMessage

pytestmark = pytest.mark.filterwarnings("error")

ANSWER = "Paris is the capital of France."
TOKEN_ENV = "LORABOT_TEST_DISCORD_TOKEN"


@dataclass
class Bot:
    """One running lorabot (run_discord in a task) and what it talks to."""

    fake: FakeDiscord
    service: ChatService
    model: Any
    db: Path
    task: asyncio.Task[None]

    def rows(self) -> list[tuple[str, str]]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute("SELECT role, text FROM messages ORDER BY id").fetchall()

    def ratings(self) -> list[tuple[str, int]]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute("SELECT user_id, rating FROM feedback").fetchall()

    async def chain_of(self, channel_id: str, discord_message_id: str) -> list[str]:
        """The conversation (oldest first) that ends with our message shown as this id."""
        store = self.service.store
        found = await self.fake.wait_for(
            lambda: store.find_platform_message("discord", channel_id, discord_message_id)
        )
        return [m.text for m in await store.chain(found.id)]

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@dataclass
class World:
    fake: FakeDiscord
    tmp_path: Path
    make_engine: Callable[..., Any]
    bots: list[Bot] = field(default_factory=list)
    stores: list[Store] = field(default_factory=list)

    def config(self, **overrides: Any) -> DiscordConfig:
        base = DiscordConfig(
            enabled=True,
            token_env=TOKEN_ENV,
            api_base=self.fake.api_base,
            gateway_url=self.fake.gateway_url,
            edit_interval_s=0.05,
        )
        return replace(base, **overrides)

    async def start(
        self,
        answer: str = ANSWER,
        *,
        max_new_tokens: int = 200,
        engine: Any = None,
        grace_s: float = 1.0,
        system_prompt: str = "You are a test bot.",
        **kw: Any,
    ) -> Bot:
        """Start lorabot; `kw` are [discord] keys, or ScriptedLM/engine options."""
        engine_keys = ("delay_s", "fail_at", "max_queue", "stall_timeout_s")
        engine_kw = {k: kw.pop(k) for k in engine_keys if k in kw}
        model = None
        if engine is None:
            engine, model = self.make_engine(answer, **engine_kw)
        store = await Store.open(self.tmp_path / "bot.db")
        self.stores.append(store)
        service = ChatService(
            store,
            engine,
            system_prompt=system_prompt,
            sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=0),
        )
        sessions = self.fake.identify_count
        task = asyncio.create_task(run_discord(service, self.config(**kw), grace_s=grace_s))
        await self.fake.wait_for(
            lambda: task.done() or (self.fake.identify_count > sessions and self.fake.commands())
        )
        if task.done():
            task.result()
        bot = Bot(self.fake, service, model, self.tmp_path / "bot.db", task)
        self.bots.append(bot)
        return bot


def _leftovers() -> tuple[list[asyncio.Task[Any]], list[threading.Thread]]:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    threads = [
        t
        for t in threading.enumerate()
        if isinstance(t, discord.gateway.KeepAliveHandler) and t.is_alive()
    ]
    return tasks, threads


async def assert_nothing_leaked() -> None:
    """No tasks or heartbeat threads may outlive a stopped bot."""
    deadline = time.monotonic() + 3.0
    while any(_leftovers()):
        if time.monotonic() > deadline:
            raise AssertionError(f"leaked: {_leftovers()}")
        await asyncio.sleep(0.02)


@pytest_asyncio.fixture
async def world(
    tmp_path: Path, scripted_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[World]:
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setenv(TOKEN_ENV, fake.token)
    world = World(fake, tmp_path, scripted_engine)
    try:
        yield world
    finally:
        for bot in world.bots:
            if not bot.task.done():
                await bot.stop()
        await fake.stop()
        for store in world.stores:
            await store.close()
    await assert_nothing_leaked()


async def answered(
    fake: FakeDiscord, channel_id: str, text: str = ANSWER, count: int = 1
) -> list[FakeMessage]:
    """Wait until the bot's last `count` messages in the channel read `text`."""

    def done() -> list[FakeMessage] | None:
        mine = [m for m in fake.bot_messages(channel_id) if m.content == text]
        return mine if len(mine) >= count else None

    return await fake.wait_for(done)


async def settle(bot: Bot, predicate: Callable[[], Any] | None = None) -> None:
    """Give the bot time to (wrongly) react, then check `predicate`."""
    await asyncio.sleep(0.3)
    if predicate is not None:
        assert predicate()


# -- conversations ------------------------------------------------------------------------


async def test_dm_is_answered_in_a_reply_and_stored(world: World) -> None:
    bot = await world.start()
    carol = world.fake.add_user("carol")
    dm = world.fake.open_dm(carol)
    asked = await world.fake.user_message(dm, carol, "What is the capital of France?")
    [reply] = await answered(world.fake, dm)
    assert reply.reply_to_id == asked.id
    await world.fake.wait_for(lambda: len(bot.rows()) == 2)
    assert bot.rows() == [("user", "What is the capital of France?"), ("assistant", ANSWER)]
    assert await bot.chain_of(dm, reply.id) == ["What is the capital of France?", ANSWER]


async def test_dm_messages_continue_one_conversation(world: World) -> None:
    bot = await world.start()
    dm = world.fake.open_dm("carol")
    await world.fake.user_message(dm, "carol", "first")
    await answered(world.fake, dm)
    await world.fake.user_message(dm, "carol", "second")
    [_, second] = await answered(world.fake, dm, count=2)
    await world.fake.wait_for(lambda: len(bot.rows()) == 4)
    assert await bot.chain_of(dm, second.id) == ["first", ANSWER, "second", ANSWER]


async def test_mention_is_answered_without_the_mention(world: World) -> None:
    guild = world.fake.add_guild("lab")
    bob = world.fake.add_user("bob")
    world.fake.add_member(guild.id, bob)
    bot = await world.start()
    channel = guild.text_channel_id
    asked = await world.fake.user_message(
        channel, "alice", f"what does <@{bob['id']}> think of LoRA?", mentions_bot=True
    )
    [reply] = await answered(world.fake, channel)
    assert reply.reply_to_id == asked.id and reply.channel_id == channel
    await world.fake.wait_for(lambda: len(bot.rows()) == 2)
    assert bot.rows()[0] == ("user", "what does @bob think of LoRA?")


async def test_chatter_is_ignored_and_not_stored(world: World) -> None:
    guild = world.fake.add_guild("lab")
    bot = await world.start()
    channel = guild.text_channel_id
    hello = await world.fake.user_message(channel, "alice", "hello everyone")
    await world.fake.user_message(channel, "bob", "hi alice", reply_to=hello)
    other_bot = world.fake.add_user("otherbot", bot=True)
    await world.fake.user_message(channel, other_bot, "I am a bot", mentions_bot=True)
    await world.fake.user_message(channel, "alice", "now you", mentions_bot=True)
    await answered(world.fake, channel)
    await settle(bot)
    assert len(world.fake.bot_messages(channel)) == 1
    assert bot.rows() == [("user", "now you"), ("assistant", ANSWER)]


async def test_slash_ask_defers_then_answers_in_the_channel(world: World) -> None:
    guild = world.fake.add_guild("lab")
    bot = await world.start()
    channel = guild.text_channel_id
    names = sorted(c["name"] for c in world.fake.commands())
    assert names == ["ask", "forget", "help", "reset", "retry", "stats"]
    record = await world.fake.slash_command(
        "ask", {"question": "Capital of France?"}, "dana", channel
    )
    await world.fake.wait_for(lambda: record.original and record.original.content == ANSWER)
    assert record.deferred and record.acked_in_time and not record.original.ephemeral
    assert [m.content for m in world.fake.bot_messages(channel)] == [ANSWER]
    await world.fake.wait_for(lambda: len(bot.rows()) == 2)
    # A reply to the command's answer continues its conversation.
    await world.fake.user_message(
        channel, "dana", "and Germany?", reply_to=record.original.id, ping_replied_author=False
    )
    [_, second] = await answered(world.fake, channel, count=2)
    await world.fake.wait_for(lambda: len(bot.rows()) == 4)
    chain = ["Capital of France?", ANSWER, "and Germany?", ANSWER]
    assert await bot.chain_of(channel, second.id) == chain


async def test_slash_retry_answers_the_last_message_again(world: World) -> None:
    """What the failure message suggests (/retry) is a slash command too."""
    guild = world.fake.add_guild("lab")
    bot = await world.start()
    channel = guild.text_channel_id
    await world.fake.slash_command("ask", {"question": "Capital of France?"}, "dana", channel)
    await world.fake.wait_for(lambda: len(bot.rows()) == 2)
    record = await world.fake.slash_command("retry", None, "dana", channel)
    await world.fake.wait_for(lambda: record.original and record.original.content == ANSWER)
    assert [m.content for m in world.fake.bot_messages(channel)] == [ANSWER, ANSWER]
    await world.fake.wait_for(lambda: len(bot.rows()) == 3)
    assert bot.rows() == [
        ("user", "Capital of France?"),
        ("assistant", ANSWER),
        ("assistant", ANSWER),
    ]


async def test_reply_chain_continues_from_the_store(world: World) -> None:
    guild = world.fake.add_guild("lab")
    bot = await world.start()
    channel = guild.text_channel_id
    await world.fake.user_message(channel, "alice", "q1", mentions_bot=True)
    [first] = await answered(world.fake, channel)
    await world.fake.user_message(channel, "bob", "q2", mentions_bot=True)
    await answered(world.fake, channel, count=2)
    # A reply without a ping (no mention) still addresses the bot: it is its message.
    await world.fake.user_message(
        channel, "alice", "q3", reply_to=first.id, ping_replied_author=False
    )
    replies = await answered(world.fake, channel, count=3)
    assert await bot.chain_of(channel, replies[2].id) == ["q1", ANSWER, "q3", ANSWER]
    # Our message is gone from Discord (no copy sent along): the store still knows it.
    world.fake.message(first.id).deleted = True
    await world.fake.user_message(channel, "carol", "q4", reply_to=first.id)
    replies = await answered(world.fake, channel, count=3)  # 4 answers, one deleted
    assert replies[-1].id not in {m.id for m in replies[:2]}
    assert await bot.chain_of(channel, replies[-1].id) == ["q1", ANSWER, "q4", ANSWER]


async def test_thread_works_like_a_channel(world: World) -> None:
    guild = world.fake.add_guild("lab")
    bot = await world.start()
    thread = (await world.fake.add_thread(guild.text_channel_id, "ideas", owner="alice"))["id"]
    asked = await world.fake.user_message(thread, "alice", "in a thread", mentions_bot=True)
    [reply] = await answered(world.fake, thread)
    assert reply.reply_to_id == asked.id and reply.channel_id == thread
    await world.fake.user_message(thread, "alice", "more", reply_to=reply.id)
    [_, second] = await answered(world.fake, thread, count=2)
    assert await bot.chain_of(thread, second.id) == ["in a thread", ANSWER, "more", ANSWER]
    assert world.fake.bot_messages(guild.text_channel_id) == []


async def test_reply_to_someone_else_quotes_their_message(world: World) -> None:
    guild = world.fake.add_guild("lab")
    bot = await world.start()
    channel = guild.text_channel_id
    claim = await world.fake.user_message(channel, "alice", "LoRA trains all weights")
    await world.fake.user_message(
        channel, "bob", "is that right?", reply_to=claim, mentions_bot=True
    )
    await answered(world.fake, channel)
    await world.fake.wait_for(lambda: len(bot.rows()) == 2)
    assert bot.rows()[0][1] == '(Replying to alice: "LoRA trains all weights")\nis that right?'


async def test_restart_keeps_the_conversation(world: World) -> None:
    bot = await world.start()
    carol = world.fake.add_user("carol")
    dm = world.fake.open_dm(carol)
    await world.fake.user_message(dm, "carol", "before the restart")
    [old] = await answered(world.fake, dm)
    assert await bot.chain_of(dm, old.id) == ["before the restart", ANSWER]
    await bot.stop()
    assert world.fake.connected_sessions == 0
    again = await world.start()
    await world.fake.add_reaction(dm, old.id, "carol", "👍")  # uncached after the restart
    await world.fake.user_message(dm, "carol", "after the restart")
    [_, new] = await answered(world.fake, dm, count=2)
    await world.fake.wait_for(lambda: len(again.rows()) == 4)
    chain = ["before the restart", ANSWER, "after the restart", ANSWER]
    assert await again.chain_of(dm, new.id) == chain
    assert again.ratings() == [(carol["id"], 1)]


async def test_a_reaction_taken_back_withdraws_that_rating(world: World) -> None:
    guild = world.fake.add_guild("lab")
    bot = await world.start()
    channel = guild.text_channel_id
    alice, bob = world.fake.add_user("alice"), world.fake.add_user("bob")
    await world.fake.user_message(channel, "alice", "hello", mentions_bot=True)
    [answer] = await answered(world.fake, channel)
    await bot.chain_of(channel, answer.id)  # the answer is on record (what a rating names)
    for user in ("alice", "bob"):
        await world.fake.add_reaction(channel, answer.id, user, "👍")
    await world.fake.wait_for(lambda: len(bot.ratings()) == 2)
    await world.fake.add_reaction(channel, answer.id, "bob", "👎")  # bob's latest: 👎
    await world.fake.wait_for(lambda: (bob["id"], -1) in bot.ratings())
    await world.fake.remove_reaction(channel, answer.id, "alice", "👍")
    await world.fake.remove_reaction(channel, answer.id, "bob", "👍")  # not his latest
    await world.fake.wait_for(lambda: len(bot.ratings()) == 1)
    assert bot.ratings() == [(bob["id"], -1)]
    await world.fake.remove_reaction(channel, answer.id, "bob", "👎")
    await world.fake.wait_for(lambda: bot.ratings() == [])
    assert alice["id"] != bob["id"]


# -- streaming ------------------------------------------------------------------------------

# Long texts that cost few tokens (a rule of dashes is one token): the scripted model
# then streams them in well under a second.
SENTENCE = "The quick brown fox jumps over the lazy dog while the cat watches. " + "-" * 200
LONG = "\n\n".join(f"Paragraph {i}. " + " ".join([SENTENCE] * 5) for i in range(3))


async def test_long_answer_continues_in_follow_up_messages(world: World) -> None:
    guild = world.fake.add_guild("lab")
    bot = await world.start(LONG, max_new_tokens=1000, edit_interval_s=0.25)
    channel = guild.text_channel_id
    asked = await world.fake.user_message(channel, "alice", "tell me a lot", mentions_bot=True)

    def complete() -> list[FakeMessage] | None:
        parts = world.fake.bot_messages(channel)
        return parts if "".join(m.content for m in parts) == LONG else None

    parts = await world.fake.wait_for(complete, timeout=30)
    assert len(parts) == 3 and all(len(m.content) <= 2000 for m in parts)
    assert parts[0].reply_to_id == asked.id
    assert parts[1].content.startswith("\n\nParagraph")  # cut at a paragraph break
    await world.fake.wait_for(lambda: len(bot.rows()) == 2)
    await world.fake.user_message(channel, "alice", "summarise", reply_to=parts[1].id)
    await world.fake.wait_for(lambda: len(bot.rows()) == 4)
    assert bot.rows()[2:] == [("user", "summarise"), ("assistant", LONG)]


async def test_embed_output_uses_4096_character_descriptions(world: World) -> None:
    text = " ".join([SENTENCE] * 19)  # 5112 characters
    bot = await world.start(text, max_new_tokens=1000, output="embed", edit_interval_s=0.25)
    dm = world.fake.open_dm("carol")
    await world.fake.user_message(dm, "carol", "long please")

    def descriptions() -> list[str] | None:
        shown = [m.embeds[0]["description"] for m in world.fake.bot_messages(dm) if m.embeds]
        return shown if "".join(shown) == text else None

    shown = await world.fake.wait_for(descriptions, timeout=30)
    assert len(shown) == 2 and len(shown[0]) <= 4096
    assert shown[0].endswith("watches.") and shown[1].startswith(" ---")  # at a sentence
    assert all(m.content == "" for m in world.fake.bot_messages(dm))
    await world.fake.wait_for(lambda: len(bot.rows()) == 2)


UNICODE = "Париж — столица Франции. 巴黎是法国的首都。 🇫🇷 👍🏽 👩‍👩‍👧 café"


async def test_unicode_streams_without_broken_characters(world: World) -> None:
    await world.start(UNICODE, delay_s=0.01)
    dm = world.fake.open_dm("carol")
    await world.fake.user_message(dm, "carol", "в чём дело? 你好")
    [reply] = await answered(world.fake, dm, UNICODE)
    assert all("\ufffd" not in version for version in reply.content_history)


async def test_edits_are_throttled_per_channel_and_never_unchanged(world: World) -> None:
    guild = world.fake.add_guild("lab", channels=["one", "two"])
    text = " ".join(f"token{i}" for i in range(20))
    await world.start(text, delay_s=0.015, edit_interval_s=0.25)
    channels = [guild.channel_id("one"), guild.channel_id("two")]
    for channel in channels:
        await world.fake.user_message(channel, "alice", "stream please", mentions_bot=True)
    for channel in channels:
        [reply] = await answered(world.fake, channel, text)
        history = reply.content_history
        assert len(history) >= 3, "the answer should grow by edits"
        assert all(a != b for a, b in zip(history, history[1:], strict=False))
        assert all(text.startswith(version) for version in history)
    edits = world.fake.requests_to("PATCH", r"/channels/\d+/messages/\d+")
    for channel in channels:
        times = [e.timestamp for e in edits if e.path.startswith(f"/channels/{channel}/")]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert gaps and min(gaps) >= 0.24, gaps


async def test_rate_limit_mid_stream_is_waited_out(world: World) -> None:
    text = " ".join(f"token{i}" for i in range(20))
    await world.start(text, delay_s=0.01)
    injected = world.fake.inject_429("PATCH", r"/channels/\d+/messages/\d+", retry_after=0.4)
    dm = world.fake.open_dm("carol")
    await world.fake.user_message(dm, "carol", "go")
    [reply] = await answered(world.fake, dm, text)
    patches = world.fake.requests_to("PATCH", r"/channels/\d+/messages/\d+")
    assert injected.hits == 1 and patches[0].status == 429
    assert patches[1].timestamp - patches[0].timestamp >= 0.4
    assert all(p.status == 200 for p in patches[1:])
    assert world.fake.bot_messages(dm) == [reply]  # no error message, nothing lost


async def test_a_429_discord_py_gives_up_on_is_waited_out_too(world: World) -> None:
    text = " ".join(f"token{i}" for i in range(20))
    await world.start(text, delay_s=0.01)
    # No Via header (a proxy's 429): discord.py raises instead of retrying.
    world.fake.inject_429("PATCH", r"/channels/\d+/messages/\d+", retry_after=0.3, via=False)
    dm = world.fake.open_dm("carol")
    await world.fake.user_message(dm, "carol", "go")
    [reply] = await answered(world.fake, dm, text)
    patches = world.fake.requests_to("PATCH", r"/channels/\d+/messages/\d+")
    assert patches[0].status == 429 and patches[1].timestamp - patches[0].timestamp >= 0.3
    assert world.fake.bot_messages(dm) == [reply]


# -- failures, the busy queue, concurrency -------------------------------------------------


async def test_failed_generation_gets_a_short_error(world: World) -> None:
    bot = await world.start(fail_at=0)
    dm = world.fake.open_dm("carol")
    await world.fake.user_message(dm, "carol", "hello?")
    await answered(world.fake, dm, FAILED)
    assert bot.rows() == [("user", "hello?")]


async def test_busy_engine_answers_at_once(world: World) -> None:
    guild = world.fake.add_guild("lab", channels=["a", "b", "c"])
    bot = await world.start(max_queue=1)
    bot.model.gate.clear()
    engine = bot.service.engine
    a, b, c = (guild.channel_id(n) for n in "abc")
    await world.fake.user_message(a, "alice", "one", mentions_bot=True)
    await world.fake.wait_for(lambda: engine.queue_depth == 1 and engine._queue.qsize() == 0)
    await world.fake.user_message(b, "bob", "two", mentions_bot=True)
    await world.fake.wait_for(lambda: engine._queue.qsize() == 1)
    started = time.monotonic()
    await world.fake.user_message(c, "carol", "three", mentions_bot=True)
    await answered(world.fake, c, BUSY)
    assert time.monotonic() - started < 1.0
    bot.model.gate.set()
    await answered(world.fake, a)
    await answered(world.fake, b)


async def test_channels_in_parallel_and_order_within_a_channel(world: World) -> None:
    guild = world.fake.add_guild("lab", channels=["x", "y"])
    bot = await world.start(delay_s=0.01)
    x, y = guild.channel_id("x"), guild.channel_id("y")
    await world.fake.user_message(x, "alice", "x1", mentions_bot=True)
    await world.fake.user_message(x, "bob", "x2", mentions_bot=True)
    await world.fake.user_message(y, "carol", "y1", mentions_bot=True)
    x_replies = await answered(world.fake, x, count=2)
    [y_reply] = await answered(world.fake, y)
    # y1 did not wait for x2, which waited for x1 (one conversation, in order).
    assert int(y_reply.id) < int(x_replies[1].id)
    assert await bot.chain_of(x, x_replies[1].id) == ["x1", ANSWER, "x2", ANSWER]


async def test_unknown_events_do_not_break_the_bot(world: World) -> None:
    guild = world.fake.add_guild("lab")
    await world.start()
    channel = guild.text_channel_id
    await world.fake.dispatch_raw("SOMETHING_DISCORD_ADDED_LATER", {"guild_id": guild.id})
    odd = await world.fake.user_message(channel, "alice", "odd one", mentions_bot=True)
    payload = dict(world.fake.message_payload(odd.id), id="1" * 19, type=4242)
    await world.fake.dispatch_raw("MESSAGE_CREATE", payload)
    await world.fake.dispatch_raw("MESSAGE_REACTION_ADD", {"weird": True})
    await world.fake.user_message(channel, "alice", "still there?", mentions_bot=True)
    await answered(world.fake, channel, count=2)
    assert len(world.fake.bot_messages(channel)) == 2  # the unknown type was not answered


async def test_stopping_lets_a_running_reply_finish(world: World) -> None:
    text = " ".join(f"token{i}" for i in range(15))
    bot = await world.start(text, delay_s=0.02, grace_s=5.0)
    dm = world.fake.open_dm("carol")
    await world.fake.user_message(dm, "carol", "quick, before you go")
    await world.fake.wait_for(lambda: world.fake.bot_messages(dm))  # streaming has begun
    await bot.stop()
    assert [m.content for m in world.fake.bot_messages(dm)] == [text]
    assert world.fake.connected_sessions == 0


async def test_stopping_cuts_a_stuck_reply_short_with_a_note(world: World) -> None:
    bot = await world.start(grace_s=0.3)
    bot.model.gate.clear()
    dm = world.fake.open_dm("carol")
    await world.fake.user_message(dm, "carol", "this takes forever")
    await world.fake.wait_for(lambda: bot.rows() == [("user", "this takes forever")])
    started = time.monotonic()
    await bot.stop()
    bot.model.gate.set()
    assert time.monotonic() - started < 3.0
    [note] = world.fake.bot_messages(dm)
    assert "restarted" in note.content
    assert world.fake.connected_sessions == 0
    await assert_nothing_leaked()


# -- setup problems are clear -----------------------------------------------------------


async def test_api_base_alone_finds_the_gateway_the_server_names(world: World) -> None:
    await world.start(gateway_url="")
    dm = world.fake.open_dm("carol")
    await world.fake.user_message(dm, "carol", "found you")
    await answered(world.fake, dm)
    assert [r.path for r in world.fake.requests_to("GET", "/gateway.*")] == ["/gateway/bot"]


async def test_bad_token_names_its_source_not_its_value(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.config import ConfigError

    monkeypatch.setenv(TOKEN_ENV, "not-the-token")
    with pytest.raises(ConfigError, match=TOKEN_ENV) as caught:
        await world.start()
    assert "not-the-token" not in str(caught.value)


async def test_missing_message_content_intent_says_where_to_enable_it(world: World) -> None:
    from engine.config import ConfigError

    world.fake.privileged_intents = 0
    with pytest.raises(ConfigError, match="Message Content Intent"):
        await world.start()
