"""Dataset readers: what an admin would check before training on a file."""

import codecs
import json
from pathlib import Path

import pytest

from training.data import (
    FORMATS,
    Conversation,
    ReadResult,
    Turn,
    detect_format,
    read_dataset,
    summarize,
)

FIXTURES = Path(__file__).parent / "fixtures"
ZH_ALPACA = FIXTURES / "alpaca" / "trans_chinese_alpaca_data.json"
LF_ALPACA = FIXTURES / "alpaca" / "llama_factory.jsonl"
CHAT = FIXTURES / "chat" / "bot_export.jsonl"
TELEGRAM = FIXTURES / "telegram_group" / "result.json"
TELEGRAM_ACCOUNT = FIXTURES / "telegram_account" / "result.json"
DISCORD = FIXTURES / "discord" / "general.json"
NOT_JSON = FIXTURES / "broken" / "not_json.json"
UNKNOWN_SHAPE = FIXTURES / "broken" / "unknown_shape.json"


def problems_by_position(result: ReadResult) -> dict[str, str]:
    return {problem.position: problem.reason for problem in result.problems}


def turns(conversation: Conversation) -> list[tuple[str, str]]:
    return [(turn.role, turn.content) for turn in conversation.turns]


def write_json(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


# --- format detection -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (ZH_ALPACA, "alpaca"),
        (LF_ALPACA, "alpaca"),
        (CHAT, "chat"),
        (TELEGRAM, "telegram"),
        (TELEGRAM_ACCOUNT, "telegram"),
        (DISCORD, "discord"),
    ],
)
def test_detect_format_recognises_each_fixture(path: Path, expected: str) -> None:
    assert detect_format(path) == expected


@pytest.mark.parametrize("path", [NOT_JSON, UNKNOWN_SHAPE, FIXTURES / "missing.json"])
def test_detect_format_error_names_the_file(path: Path) -> None:
    with pytest.raises(ValueError, match=path.name):
        detect_format(path)


def test_detect_format_survives_a_broken_first_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "logs.jsonl"
    path.write_text(
        '{"messages": [\n{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8"
    )
    assert detect_format(path) == "chat"


def test_detect_format_of_a_minified_discord_export(tmp_path: Path) -> None:
    document = json.loads(DISCORD.read_text(encoding="utf-8"))
    path = tmp_path / "general.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    assert detect_format(path) == "discord"


# --- alpaca -----------------------------------------------------------------


def test_chinese_alpaca_reads_through_bom_and_both_escapings() -> None:
    assert ZH_ALPACA.read_bytes().startswith(codecs.BOM_UTF8)
    result = read_dataset(ZH_ALPACA)
    assert len(result.conversations) == 3
    first, translated, escaped = result.conversations
    assert turns(first) == [
        ("user", "保持健康的三个提示。"),
        (
            "assistant",
            "以下是保持健康的三个提示：\n\n1. 保持身体活动。每天做适当的身体运动。\n2. 均衡饮食。\n3. 睡眠充足。",
        ),
    ]
    assert turns(translated)[0] == ("user", "将以下句子翻译成英文。\n\n我喜欢在周末去爬山。")
    # Record 4 is stored as \u escapes (ensure_ascii=True); it must read the same.
    assert turns(escaped) == [
        ("user", "三原色是什么？"),
        ("assistant", "三原色通常指红色、黄色和蓝色（RYB）。"),
    ]
    assert escaped.source == f"{ZH_ALPACA}:record 4"


def test_chinese_alpaca_reports_each_bad_record_and_keeps_going() -> None:
    result = read_dataset(ZH_ALPACA)
    assert {problem.file for problem in result.problems} == {str(ZH_ALPACA)}
    reasons = problems_by_position(result)
    assert list(reasons) == ["record 3", "record 5", "record 6"]
    assert reasons["record 3"].startswith("empty output")
    assert reasons["record 5"].startswith("not an object")
    assert reasons["record 6"] == "missing field: no 'output'"


def test_llama_factory_alpaca_builds_system_history_and_input() -> None:
    result = read_dataset(LF_ALPACA)
    assert len(result.conversations) == 3
    with_history, with_input, null_input = result.conversations
    assert turns(with_history) == [
        ("system", "You are a concise geography tutor."),
        ("user", "Hi!"),
        ("assistant", "Hello! Ask me about geography."),
        ("user", "What's the largest ocean?"),
        ("assistant", "The Pacific Ocean."),
        ("user", "What's the capital of France?"),
        ("assistant", "Paris."),
    ]
    assert turns(with_input)[0] == (
        "user",
        "Summarize the text.\n\nLoRA freezes the base weights and trains low-rank adapters.",
    )
    assert turns(null_input) == [("user", "Count to three."), ("assistant", "1, 2, 3.")]
    assert null_input.source == f"{LF_ALPACA}:line 5"


def test_llama_factory_alpaca_reports_bad_lines_by_line_number() -> None:
    reasons = problems_by_position(read_dataset(LF_ALPACA))
    # Line 4 is blank: not a problem.
    assert list(reasons) == ["line 3", "line 6", "line 7"]
    assert reasons["line 3"].startswith("invalid JSON")
    assert reasons["line 6"].startswith("bad history")
    assert reasons["line 7"].startswith("wrong type: 'instruction'")


# --- chat JSONL ---------------------------------------------------------------


def test_chat_jsonl_keeps_good_lines_and_ignores_extra_keys() -> None:
    result = read_dataset(CHAT)
    assert [conversation.source for conversation in result.conversations] == [
        f"{CHAT}:line 1",
        f"{CHAT}:line 2",
        f"{CHAT}:line 10",
    ]
    greeting, two_rounds, chinese = result.conversations
    assert turns(greeting) == [
        ("system", "You are lorabot, a friendly assistant."),
        ("user", "hi!"),
        ("assistant", "Hey! How can I help?"),
    ]
    assert [turn.role for turn in two_rounds.turns] == ["user", "assistant", "user", "assistant"]
    assert turns(chinese) == [("user", "你好"), ("assistant", "你好！有什么可以帮你？")]


def test_chat_jsonl_reports_each_bad_line() -> None:
    result = read_dataset(CHAT)
    assert {problem.file for problem in result.problems} == {str(CHAT)}
    categories = {
        position: reason.split(":")[0] for position, reason in problems_by_position(result).items()
    }
    assert categories == {
        "line 3": "invalid JSON",
        "line 4": "unknown role",
        "line 5": "non-string content",
        "line 6": "roles do not alternate",
        "line 7": "no assistant turn",
        "line 8": "empty content",
    }


def test_chat_jsonl_with_bom_and_ascii_escapes(tmp_path: Path) -> None:
    line = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "早上好"},
                {"role": "assistant", "content": "早！"},
            ]
        }
    )
    path = tmp_path / "export.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + (line + "\n").encode("utf-8"))
    result = read_dataset(path)
    assert result.problems == []
    assert turns(result.conversations[0]) == [("user", "早上好"), ("assistant", "早！")]


# --- Telegram -------------------------------------------------------------------


def test_telegram_persona_messages_become_assistant_turns() -> None:
    result = read_dataset(TELEGRAM, persona="Alice")
    assert len(result.conversations) == 2
    morning, evening = result.conversations
    # Alice's opening "Morning all!" has nobody to answer and is dropped;
    # Bob's two messages merge; entity lists flatten to plain text; the
    # deleted account (from = null) is "Unknown"; the photo keeps its caption;
    # Carol's sticker and Bob's forward are left out.
    assert turns(morning) == [
        (
            "user",
            "Bob: Anyone up for the ridge trail on Saturday?\n"
            "Forecast says sunny all day: https://weather.example/ridge",
        ),
        ("assistant", "Count me in!\nI'll bring the map."),
        (
            "user",
            "Carol: @alice_hikes can you share the route?\nUnknown: Is there parking at the trailhead?",
        ),
        ("assistant", "Here's the route, parking is at the bottom."),
    ]
    assert morning.source == f"{TELEGRAM}:message id 4"
    # Only Bob talks to Alice here, so no name prefix; his late "See you
    # next time!" has no answer and is trimmed.
    assert turns(evening) == [
        ("user", "Made it home. Photos tomorrow."),
        ("assistant", "Great day, thanks everyone 🙌"),
    ]


def test_telegram_counts_what_it_left_out() -> None:
    result = read_dataset(TELEGRAM, persona="Alice")
    assert result.skipped["service message"] == 3
    assert result.skipped["sticker without text"] == 1
    assert result.skipped["media without caption"] == 1
    assert result.skipped["forwarded message"] == 1
    assert result.skipped["persona message before anyone else spoke"] == 1
    assert result.skipped["messages after the persona's last reply"] == 2


def test_telegram_reports_bad_messages_by_id() -> None:
    result = read_dataset(TELEGRAM, persona="Alice")
    assert {problem.file for problem in result.problems} == {str(TELEGRAM)}
    reasons = problems_by_position(result)
    assert list(reasons) == ["message id 19", "message id 20", "record 21"]
    assert reasons["message id 19"].startswith("malformed text")
    assert reasons["message id 20"].startswith("missing timestamp")


@pytest.mark.parametrize("persona", ["alice", "ALICE", "user1001"])
def test_telegram_persona_matches_name_case_insensitively_or_id(persona: str) -> None:
    expected = read_dataset(TELEGRAM, persona="Alice").conversations
    assert read_dataset(TELEGRAM, persona=persona).conversations == expected


def test_telegram_long_silence_splits_and_a_longer_gap_joins() -> None:
    # Three hours pass between message 13 and 15.
    assert len(read_dataset(TELEGRAM, persona="Alice", gap_minutes=60).conversations) == 2
    joined = read_dataset(TELEGRAM, persona="Alice", gap_minutes=240).conversations
    assert len(joined) == 1
    assert [turn.role for turn in joined[0].turns] == ["user", "assistant"] * 3
    assert joined[0].turns[4] == Turn("user", "Bob: Thanks!\nMade it home. Photos tomorrow.")


def test_telegram_gap_uses_date_unixtime_not_local_date(tmp_path: Path) -> None:
    # The exporter's clock changed zone between the messages: "date" jumps
    # five hours, yet only a minute passed.
    messages = [
        {
            "id": 1,
            "type": "message",
            "date": "2024-03-31T01:59:00",
            "date_unixtime": "1711850340",
            "from": "Bob",
            "from_id": "user2",
            "text": "still up?",
        },
        {
            "id": 2,
            "type": "message",
            "date": "2024-03-31T07:00:00",
            "date_unixtime": "1711850400",
            "from": "Alice",
            "from_id": "user1",
            "text": "yep",
        },
    ]
    document = {"name": "Bob", "type": "personal_chat", "id": 2, "messages": messages}
    result = read_dataset(write_json(tmp_path / "result.json", document), persona="Alice")
    assert [turns(conversation) for conversation in result.conversations] == [
        [("user", "still up?"), ("assistant", "yep")]
    ]


def test_telegram_without_persona_lists_the_most_active_speakers() -> None:
    result = read_dataset(TELEGRAM)
    assert result.conversations == []
    assert len(result.problems) == 1
    problem = result.problems[0]
    assert (problem.file, problem.position) == (str(TELEGRAM), "file")
    assert "--persona NAME" in problem.reason
    assert "Alice [user1001]: 5 messages" in problem.reason
    assert "Bob [user1002]: 5 messages" in problem.reason
    assert "Unknown [user1004]: 1 message" in problem.reason


def test_telegram_unknown_persona_is_reported() -> None:
    result = read_dataset(TELEGRAM, persona="Zed")
    assert result.conversations == []
    assert [problem.reason.split(":")[0] for problem in result.problems] == ["persona not found"]
    assert "Alice [user1001]: 5 messages" in result.problems[0].reason


def test_telegram_full_account_export_reads_every_chat() -> None:
    result = read_dataset(TELEGRAM_ACCOUNT, persona="Alice")
    assert [conversation.source for conversation in result.conversations] == [
        f"{TELEGRAM_ACCOUNT}:message id 501 in chat 'Bob'",
        f"{TELEGRAM_ACCOUNT}:message id 77 in chat 'Old Climbing Group'",
    ]
    assert turns(result.conversations[0]) == [
        ("user", "hey, free tonight?"),
        ("assistant", "Sure, 8pm at the usual place?"),
        ("user", "Perfect"),
        ("assistant", "See you there"),
    ]
    assert list(problems_by_position(result)) == ["message id 505 in chat 'Bob'"]
    # Saved messages hold Alice's notes only: nothing to answer.
    assert result.skipped["no persona reply in the conversation"] == 1


# --- Discord --------------------------------------------------------------------


def test_discord_persona_messages_become_assistant_turns() -> None:
    result = read_dataset(DISCORD, persona="Kai")
    assert len(result.conversations) == 2
    tuning, reminder = result.conversations
    # Kai's reply is stamped 19:02+01:00, i.e. 18:02 UTC: offsets must be
    # honoured or the conversation would split there.
    assert turns(tuning) == [
        (
            "user",
            "Mira: hey, has anyone tried the new LoRA rank settings?\nrank 64 seems to overfit for me",
        ),
        ("assistant", "Try rank 16 with alpha 32 first.\nAnd keep dropout at 0.05."),
        ("user", "Jonas: what about learning rate?"),
        ("assistant", "2e-4 works well for most models."),
    ]
    assert tuning.source == f"{DISCORD}:message id 1210000000000000002"
    # Two hours later: a new conversation; the bot is just another speaker.
    assert turns(reminder) == [
        ("user", "Carl-bot: Reminder: weekly sync in 10 minutes!\nMira: I'll skip this week"),
        ("assistant", "No worries, notes will be in #notes"),
    ]


def test_discord_skips_system_sticker_media_and_forwarded_messages() -> None:
    skipped = read_dataset(DISCORD, persona="Kai").skipped
    assert skipped["system message (GuildMemberJoin)"] == 1
    assert skipped["system message (ChannelPinnedMessage)"] == 1
    assert skipped["system message (ThreadCreated)"] == 1
    assert skipped["system message (20)"] == 1
    assert skipped["sticker without text"] == 1
    assert skipped["media without caption"] == 1
    assert skipped["forwarded message"] == 1


def test_discord_reports_bad_messages_by_id() -> None:
    result = read_dataset(DISCORD, persona="Kai")
    assert {problem.file for problem in result.problems} == {str(DISCORD)}
    categories = {
        position: reason.split(":")[0] for position, reason in problems_by_position(result).items()
    }
    assert categories == {
        "message id 1210000000000000017": "missing author",
        "message id 1210000000000000018": "bad timestamp",
        "message id 1210000000000000019": "non-string content",
    }


@pytest.mark.parametrize("persona", ["kai", "kai.dev", "800000000000000001"])
def test_discord_persona_matches_nickname_name_or_id(persona: str) -> None:
    expected = read_dataset(DISCORD, persona="Kai").conversations
    assert read_dataset(DISCORD, persona=persona).conversations == expected


def test_discord_ambiguous_persona_is_reported(tmp_path: Path) -> None:
    def message(id: str, author_id: str, text: str, minute: int) -> dict[str, object]:
        return {
            "id": id,
            "type": "Default",
            "timestamp": f"2024-03-01T18:0{minute}:00+00:00",
            "content": text,
            "author": {"id": author_id, "name": "sam", "nickname": "Sam", "isBot": False},
        }

    document = {
        "guild": {"id": "1", "name": "g"},
        "channel": {"id": "2", "name": "c"},
        "messages": [message("10", "501", "hi", 0), message("11", "502", "hello", 1)],
    }
    result = read_dataset(write_json(tmp_path / "dms.json", document), persona="sam")
    assert result.conversations == []
    assert result.problems[0].reason.startswith("ambiguous persona")
    assert "Sam [501]" in result.problems[0].reason and "Sam [502]" in result.problems[0].reason


# --- whole-file failures and robustness -------------------------------------------


def test_a_file_that_is_not_json_is_one_problem() -> None:
    result = read_dataset(NOT_JSON)
    assert result.conversations == []
    assert len(result.problems) == 1
    assert result.problems[0].file == str(NOT_JSON)
    assert result.problems[0].reason.startswith("invalid JSON")


@pytest.mark.parametrize("fmt", [None, "telegram"])
def test_a_truncated_export_is_one_problem(tmp_path: Path, fmt: str | None) -> None:
    path = tmp_path / "result.json"
    path.write_bytes(TELEGRAM.read_bytes()[:2000])
    result = read_dataset(path, fmt, persona="Alice")
    assert [problem.reason.split(":")[0] for problem in result.problems] == ["invalid JSON"]


def test_a_missing_file_is_a_problem_not_an_exception() -> None:
    result = read_dataset(FIXTURES / "missing.json", "alpaca")
    assert [problem.reason.split(":")[0] for problem in result.problems] == ["cannot read file"]


def test_an_unknown_format_name_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="sharegpt"):
        read_dataset(CHAT, "sharegpt")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "path",
    [ZH_ALPACA, LF_ALPACA, CHAT, TELEGRAM, TELEGRAM_ACCOUNT, DISCORD, NOT_JSON, UNKNOWN_SHAPE],
)
def test_reading_any_file_as_any_format_never_raises(path: Path, fmt: str) -> None:
    result = read_dataset(path, fmt, persona="alice")
    assert isinstance(result, ReadResult)
    for conversation in result.conversations:
        assert any(turn.role == "assistant" and turn.content.strip() for turn in conversation.turns)


# --- summary ------------------------------------------------------------------------


def test_summarize_counts_conversations_turns_skips_and_speakers() -> None:
    results = [
        read_dataset(ZH_ALPACA),
        read_dataset(TELEGRAM, persona="Alice"),
        read_dataset(DISCORD, persona="Kai"),
    ]
    summary = summarize(results)
    assert summary["conversations"] == 3 + 2 + 2
    assert summary["turns"] == 6 + 6 + 6
    assert summary["turns_by_role"] == {"user": 9, "assistant": 9}
    assert summary["problems"] == 3 + 3 + 3
    assert summary["skipped"]["by_reason"]["service message"] == 3
    assert summary["skipped"]["by_reason"]["empty output"] == 1
    assert summary["skipped"]["top_reasons"][0] == ("service message", 3)
    assert summary["speakers"]["Kai [800000000000000001]"] == 4


def test_summarize_keeps_whole_file_problems_out_of_skipped_records() -> None:
    summary = summarize(read_dataset(TELEGRAM))
    assert summary["conversations"] == 0
    assert summary["problems_by_reason"]["persona required"] == 1
    assert "persona required" not in summary["skipped"]["by_reason"]
    assert summary["speakers"]["Alice [user1001]"] == 5
