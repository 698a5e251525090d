"""`python -m bot export` on a real SQLite store: filters, pseudonyms, scrubbing, and a
file the training package reads without a single problem."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path

import pytest

from bot.__main__ import main, parse_args
from bot.export import scrub
from bot.store import Store
from training.data import read_dataset

TELEGRAM_TOKEN = "123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11"
DISCORD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4OTA.GhAbCd.abcdefghijklmnopqrstuvwxyz0123456789AB"
DAY = 86_400.0


async def add_turn(
    store: Store, conv: int, platform: str, user: str, text: str, reply: str, parent: int | None
) -> tuple[int, int]:
    chat = "chat-" + platform
    user_turn = await store.add_message(
        conv,
        platform=platform,
        chat_id=chat,
        user_id=user,
        role="user",
        text=text,
        parent_id=parent,
    )
    answer = await store.add_message(
        conv, platform=platform, chat_id=chat, user_id=user, role="assistant", text=reply,
        parent_id=user_turn,
    )  # fmt: skip
    return user_turn, answer


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    path = tmp_path / "lorabot.db"
    store = await Store.open(path)
    try:
        tg = await store.open_conversation("telegram", "100", "100")
        _, a1 = await add_turn(
            store, tg, "telegram", "secret-id-1", "Hi! Mail me at alice@example.com", "Hello!", None
        )
        await store.rate(a1, "secret-id-1", 1)
        u2, a2 = await add_turn(
            store, tg, "telegram", "secret-id-1", "Call +1 415 555 0132 on 2024-06-01", "Noted.", a1
        )
        await store.supersede_replies(u2)  # /retry: a new answer replaces "Noted."
        a2b = await store.add_message(
            tg, platform="telegram", chat_id="chat-telegram", user_id="secret-id-1",
            role="assistant", text="I can't call anyone.", parent_id=u2,
        )  # fmt: skip
        await store.rate(a2b, "secret-id-1", -1)
        await add_turn(store, tg, "telegram", "secret-id-1", "ok, thanks", "Anytime.", a2b)

        dc = await store.open_conversation("discord", "200", "200")
        _, b1 = await add_turn(
            store,
            dc,
            "discord",
            "secret-id-2",
            f"my token {TELEGRAM_TOKEN} oops",
            "Revoke it!",
            None,
        )
        _, b2 = await add_turn(store, dc, "discord", "troll-9", "say something rude", "No.", b1)
        await add_turn(
            store, dc, "discord", "secret-id-2", f"and {DISCORD_TOKEN}?", "Revoke that too.", b2
        )

        old = await store.open_conversation("terminal", "old", "old")
        await add_turn(store, old, "terminal", "local", "an old question", "an old answer", None)
    finally:
        await store.close()
    # The terminal conversation is 30 days old (closed at once: no late checkpoint).
    with contextlib.closing(sqlite3.connect(path)) as raw, raw:
        raw.execute(
            "UPDATE messages SET created_at = ? WHERE platform = 'terminal'",
            (time.time() - 30 * DAY,),
        )
    return path


def export(db: Path, out: Path, *extra: str) -> tuple[int, list[dict]]:
    code = main(["export", "--db", str(db), "--out", str(out), *extra])
    lines = out.read_text(encoding="utf-8").splitlines() if out.exists() else []
    return code, [json.loads(line) for line in lines]


def contents(record: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in record["messages"]]


def test_export_writes_the_conversations_as_the_model_saw_them(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "chats.jsonl"
    code, records = export(db, out, "--system-prompt", "You are lorabot.")
    assert code == 0
    by_platform = {r["meta"]["platform"]: r for r in records}
    assert set(by_platform) == {"telegram", "discord", "terminal"}
    assert contents(by_platform["telegram"]) == [
        ("system", "You are lorabot."),
        ("user", "Hi! Mail me at [email]"),
        ("assistant", "Hello!"),
        ("user", "Call [phone] on 2024-06-01"),
        ("assistant", "I can't call anyone."),  # the /retry answer, not the superseded one
        ("user", "ok, thanks"),
        ("assistant", "Anytime."),
    ]
    assert by_platform["telegram"]["meta"]["ratings"] == {"up": 1, "down": 1}
    # The training package reads the file without a single problem.
    result = read_dataset(out)
    assert result.problems == [] and len(result.conversations) == 3


def test_user_ids_are_pseudonymised_and_secrets_scrubbed(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "chats.jsonl"
    code, records = export(db, out, "--salt", "fixed")
    assert code == 0
    text = out.read_text(encoding="utf-8")
    for secret in ("secret-id-1", "secret-id-2", "alice@example.com", "415 555 0132"):
        assert secret not in text
    assert TELEGRAM_TOKEN not in text and DISCORD_TOKEN not in text
    discord = next(r for r in records if r["meta"]["platform"] == "discord")
    assert discord["messages"][1]["content"] == "my token [token] oops"
    assert discord["messages"][-2]["content"] == "and [token]?"
    users = discord["meta"]["users"]
    assert len(users) == 2 and all(u.startswith("u_") and len(u) == 14 for u in users)
    # The same salt gives the same pseudonyms; --keep-user-ids keeps them readable.
    _, again = export(db, tmp_path / "again.jsonl", "--salt", "fixed")
    assert [r["meta"]["users"] for r in again] == [r["meta"]["users"] for r in records]
    _, plain = export(db, tmp_path / "plain.jsonl", "--keep-user-ids")
    assert "telegram:secret-id-1" in {u for r in plain for u in r["meta"]["users"]}


def test_filters_platform_since_rating_and_excluded_user(db: Path, tmp_path: Path) -> None:
    _, only_discord = export(db, tmp_path / "a.jsonl", "--platform", "discord")
    assert [r["meta"]["platform"] for r in only_discord] == ["discord"]

    since = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 2 * DAY))
    _, recent = export(db, tmp_path / "b.jsonl", "--since", since)
    assert "terminal" not in {r["meta"]["platform"] for r in recent}

    # 👎 ends the conversation before the question it answered.
    _, rated = export(db, tmp_path / "c.jsonl", "--min-rating", "0", "--platform", "telegram")
    assert [m["content"] for m in rated[0]["messages"] if m["role"] == "assistant"] == ["Hello!"]
    _, liked = export(db, tmp_path / "d.jsonl", "--min-rating", "1")
    assert [r["meta"]["platform"] for r in liked] == ["telegram"]  # the only 👍

    _, polite = export(db, tmp_path / "e.jsonl", "--exclude-user", "discord:troll-9")
    discord = next(r for r in polite if r["meta"]["platform"] == "discord")
    text = json.dumps(discord)
    assert "rude" not in text and '"No."' not in text and "Revoke that too." in text
    assert len(discord["meta"]["users"]) == 1


async def test_export_reads_while_the_bot_has_the_store_open(db: Path, tmp_path: Path) -> None:
    store = await Store.open(db)
    try:
        files = [db, db.with_name(db.name + "-wal")]
        before = [f.stat().st_mtime_ns for f in files]
        code, records = export(db, tmp_path / "x.jsonl", "--system-prompt", "")
        assert code == 0 and records[0]["messages"][0]["role"] == "user"  # no system prompt
        assert [f.stat().st_mtime_ns for f in files] == before  # read-only: nothing written
    finally:
        await store.close()


def test_bad_input_exits_2_with_a_message(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["export", "--db", str(db), "--out", str(tmp_path / "o"), "--since", "lastweek"]) == 2
    )
    assert "--since 'lastweek': not an ISO date" in capsys.readouterr().err
    assert main(["export", "--db", str(tmp_path / "none.db"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_running_the_bot_without_a_subcommand_still_parses() -> None:
    assert parse_args([]).command is None
    args = parse_args(["--config", "bot.toml"])
    assert args.command is None and str(args.config) == "bot.toml"
    args = parse_args(["--config", "a.toml", "export", "--out", "x.jsonl"])
    assert args.command == "export" and str(args.config) == "a.toml"
    assert str(parse_args(["export", "--config", "b.toml", "--out", "x"]).config) == "b.toml"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to bob.smith+bot@mail.example.org now", "write to [email] now"),
        ("+44 20 7946 0958", "[phone]"),
        ("(415) 555-0132", "[phone]"),
        ("+7 (912) 345-67-89", "[phone]"),
        ("ring 0176 1234567", "ring [phone]"),
        ("+4915112345678", "[phone]"),
        (f"token={TELEGRAM_TOKEN}", "token=[token]"),
        ("key sk-proj-abcdefghijklmnopqrstuvwx", "key [token]"),
        # Not personal data: dates, times, versions, decimals, addresses, snowflakes.
        ("on 2024-06-01 at 10:30", "on 2024-06-01 at 10:30"),
        ("pi is 3.14159, v1.2.3, 12.3456789", "pi is 3.14159, v1.2.3, 12.3456789"),
        ("server 192.168.1.10", "server 192.168.1.10"),
        ("id 1210000000000000002", "id 1210000000000000002"),
        ("3 cats and 42 dogs", "3 cats and 42 dogs"),
    ],
)
def test_scrub(text: str, expected: str) -> None:
    assert scrub(text) == expected
