"""The SQLite store: every conversation, message and rating, on one file (aiosqlite).

WAL mode so readers never block the writer; `busy_timeout` so several processes can
share the file; a schema version (PRAGMA user_version) with forward-only migrations.
A conversation is one (platform, conversation key) thread; /reset closes it and opens
a new one, so nothing is ever lost.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiosqlite

Role = Literal["system", "user", "assistant"]

# Each entry moves the schema up one version; never edit a released one, append.
MIGRATIONS: tuple[str, ...] = (
    # 1: conversations and messages
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        platform TEXT NOT NULL,
        conv_key TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        closed_at REAL
    );
    CREATE UNIQUE INDEX conversations_open
        ON conversations (platform, conv_key) WHERE closed_at IS NULL;
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        platform TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        text TEXT NOT NULL,
        created_at REAL NOT NULL,
        tokens INTEGER,
        status TEXT NOT NULL DEFAULT 'ok'
    );
    CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
    """,
    # 2: generation details of replies, and ratings
    """
    ALTER TABLE messages ADD COLUMN latency_ms REAL;
    ALTER TABLE messages ADD COLUMN ttft_ms REAL;
    ALTER TABLE messages ADD COLUMN adapter TEXT;
    ALTER TABLE messages ADD COLUMN platform_message_id TEXT;
    CREATE INDEX messages_by_user ON messages (platform, user_id);
    CREATE TABLE feedback (
        message_id INTEGER PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
        user_id TEXT NOT NULL,
        rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
        created_at REAL NOT NULL
    );
    """,
    # 3: reply chains (each message points at the one it answers or follows) and the
    # platform's own ids of our messages (a long reply may span several)
    """
    ALTER TABLE messages ADD COLUMN parent_id INTEGER
        REFERENCES messages (id) ON DELETE SET NULL;
    ALTER TABLE messages ADD COLUMN user_name TEXT;
    CREATE TABLE platform_messages (
        platform TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        platform_message_id TEXT NOT NULL,
        message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        PRIMARY KEY (platform, chat_id, platform_message_id)
    );
    CREATE INDEX platform_messages_by_message ON platform_messages (message_id);
    """,
    # 4: one rating per (answer, user): in a group everyone's 👍/👎 counts
    """
    CREATE TABLE feedback_by_user (
        message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        user_id TEXT NOT NULL,
        rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
        created_at REAL NOT NULL,
        PRIMARY KEY (message_id, user_id)
    );
    INSERT INTO feedback_by_user SELECT message_id, user_id, rating, created_at FROM feedback;
    DROP TABLE feedback;
    ALTER TABLE feedback_by_user RENAME TO feedback;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The database cannot be used (e.g. written by a newer lorabot)."""


@dataclass(frozen=True)
class StoredMessage:
    id: int
    conversation_id: int
    role: Role
    text: str
    user_id: str
    created_at: float
    tokens: int | None
    status: str
    parent_id: int | None = None


MESSAGE_COLUMNS = "id, conversation_id, role, text, user_id, created_at, tokens, status, parent_id"


@dataclass(frozen=True)
class ReplyStats:
    tokens: int
    latency_ms: float
    ttft_ms: float
    adapter: str


class Store:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: str | Path) -> Store:
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA busy_timeout = 10000")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA foreign_keys = ON")
        await db.execute("PRAGMA synchronous = NORMAL")
        store = cls(db)
        try:
            await store._migrate()
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        await self._db.close()

    async def schema_version(self) -> int:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _migrate(self, target: int = SCHEMA_VERSION) -> None:
        # BEGIN IMMEDIATE: two processes starting at once must not both migrate.
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            version = await self.schema_version()
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the database is at schema version {version}, newer than this "
                    f"lorabot understands ({SCHEMA_VERSION}); upgrade lorabot"
                )
            for number in range(version, target):
                for statement in _statements(MIGRATIONS[number]):
                    await self._db.execute(statement)
                await self._db.execute(f"PRAGMA user_version = {number + 1}")
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise

    # conversations ---------------------------------------------------------------
    async def open_conversation(self, platform: str, conv_key: str, chat_id: str) -> int:
        """The open conversation of this key, created if there is none."""
        sql = "SELECT id FROM conversations WHERE platform=? AND conv_key=? AND closed_at IS NULL"
        async with self._db.execute(sql, (platform, conv_key)) as cur:
            row = await cur.fetchone()
        if row:
            return int(row[0])
        cur = await self._db.execute(
            "INSERT INTO conversations (platform, conv_key, chat_id, created_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (platform, conv_key, chat_id, time.time()),
        )
        if cur.rowcount == 1 and cur.lastrowid is not None:
            return cur.lastrowid
        return await self.open_conversation(platform, conv_key, chat_id)  # lost a race

    async def close_conversation(self, platform: str, conv_key: str) -> bool:
        cur = await self._db.execute(
            "UPDATE conversations SET closed_at=? "
            "WHERE platform=? AND conv_key=? AND closed_at IS NULL",
            (time.time(), platform, conv_key),
        )
        return cur.rowcount > 0

    # messages --------------------------------------------------------------------
    async def add_message(
        self,
        conversation_id: int,
        *,
        platform: str,
        chat_id: str,
        user_id: str,
        role: Role,
        text: str,
        tokens: int | None = None,
        stats: ReplyStats | None = None,
        status: str = "ok",
        parent_id: int | None = None,
        user_name: str | None = None,
    ) -> int:
        cur = await self._db.execute(
            "INSERT INTO messages (conversation_id, platform, chat_id, user_id, role, text,"
            " created_at, tokens, status, latency_ms, ttft_ms, adapter, parent_id, user_name)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                conversation_id,
                platform,
                chat_id,
                user_id,
                role,
                text,
                time.time(),
                stats.tokens if stats else tokens,
                status,
                stats.latency_ms if stats else None,
                stats.ttft_ms if stats else None,
                stats.adapter if stats else None,
                parent_id,
                user_name,
            ),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def link_platform_message(
        self, platform: str, chat_id: str, platform_message_id: str, message_id: int
    ) -> None:
        """Remember that the platform shows `message_id` as `platform_message_id`."""
        await self._db.execute(
            "INSERT OR REPLACE INTO platform_messages"
            " (platform, chat_id, platform_message_id, message_id) VALUES (?, ?, ?, ?)",
            (platform, chat_id, platform_message_id, message_id),
        )

    async def find_platform_message(
        self, platform: str, chat_id: str, platform_message_id: str
    ) -> StoredMessage | None:
        sql = (
            f"SELECT {_qualified('m')} FROM platform_messages p JOIN messages m"
            " ON m.id = p.message_id"
            " WHERE p.platform=? AND p.chat_id=? AND p.platform_message_id=?"
        )
        async with self._db.execute(sql, (platform, chat_id, platform_message_id)) as cur:
            row = await cur.fetchone()
        return StoredMessage(*row) if row else None

    async def message(self, message_id: int) -> StoredMessage | None:
        sql = f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id=?"
        async with self._db.execute(sql, (message_id,)) as cur:
            row = await cur.fetchone()
        return StoredMessage(*row) if row else None

    async def chain(self, message_id: int, limit: int = 200) -> list[StoredMessage]:
        """The message and up to `limit`-1 of its ancestors (parent links), oldest first:
        the conversation as the model should see it."""
        sql = (
            "WITH RECURSIVE up(id, depth) AS ("
            " SELECT id, 0 FROM messages WHERE id=?"
            " UNION ALL SELECT m.parent_id, up.depth + 1 FROM messages m JOIN up ON m.id = up.id"
            " WHERE m.parent_id IS NOT NULL AND up.depth + 1 < ?)"
            f" SELECT {_qualified('m')} FROM up JOIN messages m ON m.id = up.id"
            " ORDER BY up.depth DESC"
        )
        async with self._db.execute(sql, (message_id, limit)) as cur:
            rows = await cur.fetchall()
        return [StoredMessage(*row) for row in rows]

    async def last_message(self, conversation_id: int) -> StoredMessage | None:
        """The newest usable message of a conversation (what the next turn follows)."""
        sql = (
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id=? AND status='ok'"
            " ORDER BY id DESC LIMIT 1"
        )
        async with self._db.execute(sql, (conversation_id,)) as cur:
            row = await cur.fetchone()
        return StoredMessage(*row) if row else None

    async def history(self, conversation_id: int, limit: int = 200) -> list[StoredMessage]:
        """The newest `limit` usable messages of a conversation, oldest first."""
        sql = (
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id=? AND status='ok'"
            " ORDER BY id DESC LIMIT ?"
        )
        async with self._db.execute(sql, (conversation_id, limit)) as cur:
            rows = await cur.fetchall()
        return [StoredMessage(*row) for row in reversed(list(rows))]

    async def supersede_replies(self, message_id: int) -> int:
        """Mark the replies to `message_id` as superseded (for /retry); kept, not deleted."""
        cur = await self._db.execute(
            "UPDATE messages SET status='superseded'"
            " WHERE parent_id=? AND role='assistant' AND status='ok'",
            (message_id,),
        )
        return cur.rowcount

    async def last_user_message(self, conversation_id: int) -> StoredMessage | None:
        sql = (
            f"SELECT {MESSAGE_COLUMNS} FROM messages"
            " WHERE conversation_id=? AND status='ok' AND role='user' ORDER BY id DESC LIMIT 1"
        )
        async with self._db.execute(sql, (conversation_id,)) as cur:
            row = await cur.fetchone()
        return StoredMessage(*row) if row else None

    async def forget_user(self, platform: str, user_id: str) -> int:
        """Delete everything stored about one user of a platform: their messages, the
        replies to them, their ratings, and conversations left empty. Returns the number
        of messages deleted."""
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            cur = await self._db.execute(
                "DELETE FROM messages WHERE platform=? AND (user_id=? OR parent_id IN"
                " (SELECT id FROM messages WHERE platform=? AND user_id=? AND role='user'))",
                (platform, user_id, platform, user_id),
            )
            deleted = cur.rowcount
            await self._db.execute(
                "DELETE FROM feedback WHERE user_id=? AND message_id IN"
                " (SELECT id FROM messages WHERE platform=?)",
                (user_id, platform),
            )
            await self._db.execute(
                "DELETE FROM conversations WHERE platform=? AND NOT EXISTS"
                " (SELECT 1 FROM messages m WHERE m.conversation_id = conversations.id)",
                (platform,),
            )
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        return deleted

    async def move_chat(self, platform: str, old: str, new: str) -> int:
        """A chat got a new id (a Telegram group upgraded to a supergroup): its
        conversations and messages follow it, so the conversation goes on. Conversation
        keys that name the chat ("<chat>" or "<chat>:<user>") are renamed; one the new
        chat already has open stays where it was. The platform's message ids stay with
        the old chat: they number that chat's messages only (a supergroup counts its own
        from 1), so under the new id they would point at other messages. Returns the
        number of conversations moved; moving again is a no-op."""
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            cur = await self._db.execute(
                "UPDATE OR IGNORE conversations SET chat_id=?, conv_key = CASE"
                " WHEN conv_key=? THEN ? WHEN substr(conv_key, 1, ?)=?"
                " THEN ? || substr(conv_key, ?) ELSE conv_key END"
                " WHERE platform=? AND chat_id=?",
                (new, old, new, len(old) + 1, old + ":", new, len(old) + 1, platform, old),
            )
            moved = cur.rowcount
            await self._db.execute(
                "UPDATE messages SET chat_id=? WHERE platform=? AND chat_id=?",
                (new, platform, old),
            )
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        return moved

    async def stats(self, platform: str | None = None) -> dict[str, int]:
        """Users, conversations and messages (of one platform, or all)."""
        where, args = (" WHERE platform=?", (platform,)) if platform else ("", ())
        sql = (
            "SELECT COUNT(DISTINCT CASE WHEN role='user' THEN platform || ':' || user_id END),"
            f" COUNT(DISTINCT conversation_id), COUNT(*) FROM messages{where}"
        )
        async with self._db.execute(sql, args) as cur:
            row = await cur.fetchone()
        users, conversations, messages = row if row else (0, 0, 0)
        return {"users": users, "conversations": conversations, "messages": messages}

    async def rate(self, message_id: int, user_id: str, rating: int) -> bool:
        """Store a user's 👍 (1) / 👎 (-1) for an assistant message (their latest counts;
        each user's rating is kept); False if there is no such message."""
        if rating not in (-1, 1):
            raise ValueError(f"rating {rating}: must be -1 or 1")
        sql = "SELECT 1 FROM messages WHERE id=? AND role='assistant'"
        async with self._db.execute(sql, (message_id,)) as cur:
            if await cur.fetchone() is None:
                return False
        await self._db.execute(
            "INSERT INTO feedback (message_id, user_id, rating, created_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (message_id, user_id) DO UPDATE SET"
            " rating=excluded.rating, created_at=excluded.created_at",
            (message_id, user_id, rating, time.time()),
        )
        return True

    async def unrate(self, message_id: int, user_id: str, rating: int) -> bool:
        """Withdraw a user's rating of an answer, if it is still this one (a 👍 taken
        back after a 👎 changes nothing: the 👎 was the latest); True if one was removed."""
        cur = await self._db.execute(
            "DELETE FROM feedback WHERE message_id=? AND user_id=? AND rating=?",
            (message_id, user_id, rating),
        )
        return cur.rowcount > 0

    async def reply_speed(
        self, platform: str | None = None, since: float = 0.0
    ) -> tuple[int, int, float]:
        """Replies stored since `since` (epoch seconds), their tokens, and the seconds
        spent generating them after each first token (for a tokens/s figure)."""
        sql = (
            "SELECT COUNT(*), COALESCE(SUM(tokens), 0), COALESCE(SUM(latency_ms - ttft_ms), 0)"
            " FROM messages WHERE role='assistant' AND latency_ms IS NOT NULL AND created_at>=?"
        )
        args: tuple[object, ...] = (since,)
        if platform:
            sql += " AND platform=?"
            args += (platform,)
        async with self._db.execute(sql, args) as cur:
            row = await cur.fetchone()
        replies, tokens, milliseconds = row if row else (0, 0, 0.0)
        return int(replies), int(tokens), max(float(milliseconds), 0.0) / 1000

    async def count_messages(self, platform: str | None = None) -> int:
        sql = "SELECT COUNT(*) FROM messages" + (" WHERE platform=?" if platform else "")
        async with self._db.execute(sql, (platform,) if platform else ()) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0


def _qualified(alias: str) -> str:
    return ", ".join(f"{alias}.{column.strip()}" for column in MESSAGE_COLUMNS.split(","))


def _statements(script: str) -> Sequence[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
