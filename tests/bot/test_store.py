"""The SQLite store on a real file: ordering, migrations, concurrent writers."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aiosqlite
import pytest

from bot.store import MIGRATIONS, SCHEMA_VERSION, Store, StoreError


async def add(store: Store, conv: int, role: str, text: str, user: str = "u1") -> int:
    return await store.add_message(
        conv,
        platform="test",
        chat_id="c1",
        user_id=user,
        role=role,
        text=text,  # type: ignore[arg-type]
    )


async def test_history_is_oldest_first_and_limited(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "bot.db")
    conv = await store.open_conversation("test", "c1", "c1")
    for i in range(10):
        await add(store, conv, "user" if i % 2 == 0 else "assistant", f"m{i}")
    newest = await store.history(conv, limit=4)
    assert [m.text for m in newest] == ["m6", "m7", "m8", "m9"]
    await store.close()


async def test_reset_opens_a_new_conversation_and_keeps_the_old(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "bot.db")
    first = await store.open_conversation("test", "c1", "c1")
    await add(store, first, "user", "before reset")
    assert await store.close_conversation("test", "c1")
    second = await store.open_conversation("test", "c1", "c1")
    assert second != first
    assert await store.history(second) == []
    assert [m.text for m in await store.history(first)] == ["before reset"]
    await store.close()


async def test_a_moved_chat_keeps_its_conversations_but_not_its_message_ids(
    tmp_path: Path,
) -> None:
    """A group upgraded to a supergroup: the conversation moves to the new chat id, but
    the group's message ids stay with the group (the supergroup numbers its own messages
    from 1, so old id 1 would point at the wrong message there)."""
    store = await Store.open(tmp_path / "bot.db")
    conv = await store.open_conversation("test", "c1", "c1")
    question = await add(store, conv, "user", "first question")
    await store.link_platform_message("test", "c1", "1", question)
    assert await store.move_chat("test", "c1", "s1") == 1
    assert await store.move_chat("test", "c1", "s1") == 0  # again: nothing left to move
    assert await store.open_conversation("test", "s1", "s1") == conv
    assert await store.find_platform_message("test", "s1", "1") is None
    old = await store.find_platform_message("test", "c1", "1")
    assert old is not None and old.id == question
    assert await store.stats("test") == {"users": 1, "conversations": 1, "messages": 1}
    await store.close()


async def test_data_survives_reopening_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    store = await Store.open(path)
    conv = await store.open_conversation("test", "c1", "c1")
    await add(store, conv, "user", "kept")
    await store.close()
    again = await Store.open(path)
    assert await again.open_conversation("test", "c1", "c1") == conv
    assert [m.text for m in await again.history(conv)] == ["kept"]
    await again.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_migration_from_version_1_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    async with aiosqlite.connect(path) as db:  # a database written by schema version 1
        await db.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
        await db.execute(
            "INSERT INTO conversations (platform, conv_key, chat_id, created_at)"
            " VALUES ('test', 'c1', 'c1', 0)"
        )
        await db.execute(
            "INSERT INTO messages (conversation_id, platform, chat_id, user_id, role, text,"
            " created_at) VALUES (1, 'test', 'c1', 'u1', 'assistant', 'old reply', 0)"
        )
        await db.commit()
    store = await Store.open(path)
    assert await store.schema_version() == SCHEMA_VERSION
    assert [m.text for m in await store.history(1)] == ["old reply"]
    assert await store.rate(1, "u1", 1)  # the feedback table came with migration 2
    await store.close()


async def test_database_from_a_newer_lorabot_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this lorabot understands"):
        await Store.open(path)


async def test_ratings_only_for_assistant_messages_and_last_one_wins(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "bot.db")
    conv = await store.open_conversation("test", "c1", "c1")
    question = await add(store, conv, "user", "q")
    answer = await add(store, conv, "assistant", "a")
    assert not await store.rate(question, "u1", 1)
    assert await store.rate(answer, "u1", 1)
    assert await store.rate(answer, "u1", -1)
    await store.close()
    with sqlite3.connect(tmp_path / "bot.db") as db:
        assert db.execute("SELECT message_id, rating FROM feedback").fetchall() == [(answer, -1)]


async def test_every_users_rating_of_an_answer_is_kept(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "bot.db")
    conv = await store.open_conversation("test", "group", "group")
    await add(store, conv, "user", "q")
    answer = await add(store, conv, "assistant", "a")
    for user, rating in (("ann", 1), ("bob", -1), ("cy", 1), ("bob", 1)):
        assert await store.rate(answer, user, rating)
    await store.close()
    with sqlite3.connect(tmp_path / "bot.db") as db:
        rows = db.execute("SELECT user_id, rating FROM feedback ORDER BY user_id").fetchall()
    assert rows == [("ann", 1), ("bob", 1), ("cy", 1)]


async def test_concurrent_writers_from_two_connections(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    stores = [await Store.open(path), await Store.open(path)]
    conv = await stores[0].open_conversation("test", "c1", "c1")
    assert await stores[1].open_conversation("test", "c1", "c1") == conv

    async def write(store: Store, who: str) -> None:
        for i in range(40):
            await add(store, conv, "user", f"{who}-{i}", user=who)

    await asyncio.gather(write(stores[0], "a"), write(stores[1], "b"))
    rows = await stores[0].history(conv, limit=1000)
    assert len(rows) == 80
    for who in "ab":
        mine = [m.text for m in rows if m.user_id == who]
        assert mine == [f"{who}-{i}" for i in range(40)]  # each writer's order kept
    for store in stores:
        await store.close()
