"""The chat service with a real store and the real worker on a scripted model."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bot.service import BUSY, FAILED, REFUSED, Access, ChatService, Incoming
from bot.store import Store
from engine.types import SamplingParams

ANSWER = "Paris is the capital of France."


class RecordingSink:
    def __init__(self) -> None:
        self.notices: list[str] = []
        self.updates: list[str] = []
        self.finished: list[tuple[str, int]] = []
        self.typing_shown = False

    async def notice(self, text: str) -> None:
        self.notices.append(text)

    async def typing(self) -> None:
        self.typing_shown = True

    async def update(self, text: str) -> None:
        self.updates.append(text)

    async def finish(self, text: str, reply_id: int) -> None:
        self.finished.append((text, reply_id))


def rows(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT role, text, status FROM messages ORDER BY id").fetchall()


@pytest.fixture
async def make_service(tmp_path: Path, scripted_engine: Any) -> Any:
    stores: list[Store] = []

    async def make(answer: str = ANSWER, *, access: Access | None = None, **kw: Any) -> Any:
        engine, model = scripted_engine(answer, **kw)
        store = await Store.open(tmp_path / "bot.db")
        stores.append(store)
        service = ChatService(
            store,
            engine,
            system_prompt="You are a test bot.",
            sampling=SamplingParams(max_new_tokens=200, temperature=0),
            access=access,
        )
        return service, model

    yield make
    for store in stores:
        await store.close()


def msg(text: str, chat: str = "c1", user: str = "u1") -> Incoming:
    return Incoming(platform="test", chat_id=chat, user_id=user, text=text)


async def test_reply_streams_and_is_stored_with_its_details(
    make_service: Any, tmp_path: Path
) -> None:
    service, _model = await make_service()
    sink = RecordingSink()
    await service.handle(msg("What is the capital of France?"), sink)
    assert sink.typing_shown
    assert sink.finished[0][0] == ANSWER
    assert sink.updates[-1] == ANSWER and len(sink.updates) >= 1
    assert all(ANSWER.startswith(u) for u in sink.updates)
    assert rows(tmp_path / "bot.db") == [
        ("user", "What is the capital of France?", "ok"),
        ("assistant", ANSWER, "ok"),
    ]
    with sqlite3.connect(tmp_path / "bot.db") as conn:
        tokens, latency, adapter, mid = conn.execute(
            "SELECT tokens, latency_ms, adapter, id FROM messages WHERE role='assistant'"
        ).fetchone()
    assert tokens > 0 and latency > 0 and adapter == "scripted"
    assert sink.finished[0][1] == mid


async def test_user_message_is_stored_before_generation(make_service: Any, tmp_path: Path) -> None:
    service, model = await make_service()
    model.gate.clear()
    task = asyncio.create_task(service.handle(msg("remember me"), RecordingSink()))
    for _ in range(100):
        if rows(tmp_path / "bot.db"):
            break
        await asyncio.sleep(0.02)
    assert rows(tmp_path / "bot.db") == [("user", "remember me", "ok")]
    model.gate.set()
    await task
    assert [r[0] for r in rows(tmp_path / "bot.db")] == ["user", "assistant"]


async def test_reset_and_retry(make_service: Any, tmp_path: Path) -> None:
    service, _model = await make_service()
    sink = RecordingSink()
    await service.handle(msg("/retry"), sink)
    assert "Nothing to retry" in sink.notices[0]
    await service.handle(msg("first"), RecordingSink())
    retry = RecordingSink()
    await service.handle(msg("/retry"), retry)
    assert retry.finished[0][0] == ANSWER
    assert [r[2] for r in rows(tmp_path / "bot.db")] == ["ok", "superseded", "ok"]
    reset = RecordingSink()
    await service.handle(msg("/reset"), reset)
    assert "new conversation" in reset.notices[0]
    history = await service.store.history(await service.store.open_conversation("test", "c1", "c1"))
    assert history == []
    assert len(rows(tmp_path / "bot.db")) == 3  # nothing deleted


async def test_busy_engine_answers_at_once(make_service: Any) -> None:
    service, model = await make_service(max_queue=1)
    model.gate.clear()
    engine = service.engine

    async def until(condition: Any) -> None:
        for _ in range(200):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("engine never reached the expected state")

    first = asyncio.create_task(service.handle(msg("one", chat="a"), RecordingSink()))
    await until(lambda: engine.queue_depth == 1 and engine._queue.qsize() == 0)  # generating
    second = asyncio.create_task(service.handle(msg("two", chat="b"), RecordingSink()))
    await until(lambda: engine._queue.qsize() == 1)  # waiting in the queue
    busy = RecordingSink()
    await asyncio.wait_for(service.handle(msg("three", chat="c"), busy), timeout=1)
    assert busy.notices == [BUSY]
    model.gate.set()
    await asyncio.gather(first, second)


async def test_failed_generation_gets_a_message_and_keeps_the_question(
    make_service: Any, tmp_path: Path
) -> None:
    service, _model = await make_service(fail_at=0)
    sink = RecordingSink()
    await service.handle(msg("hello?"), sink)
    assert sink.notices == [FAILED]
    assert rows(tmp_path / "bot.db") == [("user", "hello?", "ok")]


async def test_disallowed_user_is_refused_and_nothing_is_stored(
    make_service: Any, tmp_path: Path
) -> None:
    service, _model = await make_service(access=Access(allowed_users=("42",)))
    sink = RecordingSink()
    await service.handle(msg("let me in", user="7"), sink)
    assert sink.notices == [REFUSED]
    assert rows(tmp_path / "bot.db") == []
    allowed = RecordingSink()
    await service.handle(msg("hi", user="42"), allowed)
    assert allowed.finished


async def test_context_keeps_the_newest_history_within_budget(make_service: Any) -> None:
    service, _model = await make_service()
    conv = await service.store.open_conversation("test", "c1", "c1")
    for i in range(59):  # ends with a user turn, as when a reply is due
        role = "user" if i % 2 == 0 else "assistant"
        await service.store.add_message(
            conv,
            platform="test",
            chat_id="c1",
            user_id="u1",
            role=role,
            text=f"message number {i} " + "padding " * 20,
            tokens=service._cost(role, f"message number {i} " + "padding " * 20),
        )
    history = await service.store.history(conv)
    service.sampling = SamplingParams(max_new_tokens=service.engine.context_window - 300)
    context = service.build_context(history)
    assert context[0].role == "system"
    assert context[1].role == "user"
    assert "message number 58" in context[-1].content
    assert service.engine.count_tokens(context) <= 300
    assert len(context) < 20


async def test_message_longer_than_the_context_is_refused_politely(make_service: Any) -> None:
    service, _model = await make_service()
    sink = RecordingSink()
    await service.handle(msg("word " * 3000), sink)
    assert "too long" in sink.notices[0]
    assert not sink.finished


async def test_chats_in_parallel_and_order_within_a_chat(make_service: Any, tmp_path: Path) -> None:
    service, _model = await make_service(delay_s=0.002)
    sinks = [RecordingSink() for _ in range(4)]
    await asyncio.gather(
        service.handle(msg("q1", chat="x"), sinks[0]),
        service.handle(msg("q2", chat="x"), sinks[1]),
        service.handle(msg("other", chat="y"), sinks[2]),
        service.handle(msg("more", chat="z"), sinks[3]),
    )
    assert all(s.finished for s in sinks)
    with sqlite3.connect(tmp_path / "bot.db") as conn:
        x = conn.execute("SELECT role, text FROM messages WHERE chat_id='x' ORDER BY id").fetchall()
    assert x == [("user", "q1"), ("assistant", ANSWER), ("user", "q2"), ("assistant", ANSWER)]


async def test_reply_to_an_older_answer_continues_that_chain(make_service: Any) -> None:
    service, _model = await make_service()
    store = service.store
    first = RecordingSink()
    await service.handle(msg("q1"), first)
    await service.remember_platform_ids(msg("q1"), first.finished[0][1], ["m-10", "m-11"])
    await service.handle(msg("q2"), RecordingSink())
    await service.handle(
        Incoming(platform="test", chat_id="c1", user_id="u2", text="q3", reply_to="m-11"),
        RecordingSink(),
    )
    conv = await store.open_conversation("test", "c1", "c1")
    newest = await store.last_message(conv)
    assert newest is not None and newest.role == "assistant"
    assert [m.text for m in await store.chain(newest.id)] == ["q1", ANSWER, "q3", ANSWER]


async def test_forget_deletes_a_users_messages_and_the_replies_to_them(
    make_service: Any, tmp_path: Path
) -> None:
    service, _model = await make_service()
    await service.handle(msg("mine", user="alice"), RecordingSink())
    answer = RecordingSink()
    await service.handle(msg("theirs", user="bob"), answer)
    await service.store.rate(answer.finished[0][1], "alice", 1)
    deleted = await service.store.forget_user("test", "alice")
    assert deleted == 2
    assert rows(tmp_path / "bot.db") == [("user", "theirs", "ok"), ("assistant", ANSWER, "ok")]
    with sqlite3.connect(tmp_path / "bot.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone() == (0,)
    assert await service.store.stats("test") == {"users": 1, "conversations": 1, "messages": 2}
