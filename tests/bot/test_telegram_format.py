"""Formatting, splitting and pacing of Telegram replies, checked against the fake Bot
API's port of Telegram's own HTML parser."""

from __future__ import annotations

import pytest

from bot.telegram_format import (
    MAX_MESSAGE,
    is_plain,
    open_fence,
    split_point,
    split_text,
    to_html,
    utf16_len,
)
from bot.telegram_pacing import Pacing, RateWindow
from tests.fakes.telegram_server import finalize_text, parse_formatted_text

TRICKY = [
    "Use `a < b && c > d` and **bold** text.",
    "**unclosed bold and *nested italic* inside",
    "snake_case_name and 2 * 3 * 4 = 24, a_b_c",
    "*italic **bold** x* and ~~gone~~ and __strong__",
    "# Title with **stars**\n- item one\n* item two\n+ item three",
    "> quoted <tag>\n> second line\nafter",
    "[a link](https://example.org/?q=1&r=<2>) and [bad](javascript:alert(1))",
    "```python\nif a < b:\n    print('**not bold**')\n```\nafter the code",
    "```\nunclosed code block with <html> & stuff",
    "Emoji 👨‍👩‍👧 and flags 🇫🇷🇩🇪, Chinese 你好，世界！ RTL مرحبا بالعالم",
    "`` `ticks` `` and `` and ` lone",
    "&amp; &lt; literal entities < > &",
    "**a `code` b** and [**x**](http://x.org)",
]


@pytest.mark.parametrize("markdown", TRICKY)
def test_html_is_always_accepted_by_telegrams_parser(markdown: str) -> None:
    text, _entities = parse_formatted_text(to_html(markdown), "HTML")
    # Nothing the model wrote is lost: every word survives formatting.
    for word in ("bold", "item", "quoted", "code", "Chinese", "literal", "24"):
        if word in markdown:
            assert word in text


def test_markdown_becomes_entities() -> None:
    text, entities = parse_formatted_text(
        to_html("## Plan\n**Step 1**: run `make`, see [docs](https://x.org).\n- done"), "HTML"
    )
    assert text == "Plan\nStep 1: run make, see docs.\n• done"
    assert [e["type"] for e in entities] == ["bold", "bold", "code", "text_link"]


def test_code_is_never_formatted_inside() -> None:
    text, entities = parse_formatted_text(to_html("```py\nx = a*b*c  # **no**\n```"), "HTML")
    assert text == "x = a*b*c  # **no**"
    assert [e["type"] for e in entities] == ["pre"]
    assert entities[0]["language"] == "py"


def test_plain_text_needs_no_formatting() -> None:
    assert is_plain("Paris is the capital of France. 2 * 3 = 6 & a_b")
    assert not is_plain("Paris is **the** capital")


def test_split_prefers_paragraphs_then_lines_then_sentences() -> None:
    para = "word " * 500  # 2500 chars
    text = para + "\n\n" + para + "\n" + para
    cut = split_point(text)
    assert text[:cut].endswith("\n\n")
    lines = "Sentence one is here. " * 300
    cut = split_point(lines)
    assert lines[:cut].endswith("here.") and utf16_len(lines[:cut]) <= MAX_MESSAGE


def test_split_chinese_at_full_stops_and_never_inside_emoji() -> None:
    chinese = "这是一个很长的句子。" * 600
    cut = split_point(chinese)
    assert chinese[:cut].endswith("。") and cut <= MAX_MESSAGE
    family = "👨‍👩‍👧" * 2000  # no break anywhere: a hard cut between families
    parts = split_text(family)
    assert "".join(parts) == family
    assert all(utf16_len(p) <= MAX_MESSAGE and p.startswith("👨") for p in parts)
    flags = "🇫🇷" * 3000
    assert all(utf16_len(p) % 4 == 0 for p in split_text(flags))  # pairs kept whole


@pytest.mark.parametrize("unit", ["a", "é", "😀", "中"])
def test_every_part_fits_telegram_whatever_it_counts(unit: str) -> None:
    text = (unit * 37 + " ") * 300
    parts = split_text(text)
    assert "".join(parts) == text
    for part in parts:
        shown, _ = finalize_text(part, [])
        assert 0 < len(shown) <= MAX_MESSAGE and utf16_len(part) <= MAX_MESSAGE


def test_open_fence_is_reported_for_reopening() -> None:
    assert open_fence("text\n```python\nx = 1\n") == "```python"
    assert open_fence("```python\nx = 1\n```\n") is None
    assert open_fence("no code") is None


def test_rate_window_keeps_the_budget_and_the_gap() -> None:
    window = RateWindow(limit=20, window_s=60.0)
    now = 0.0
    for _ in range(20):
        assert window.wait(now, gap=1.0) == 0.0
        window.record(now)
        now += 1.0
    # 20 in the last 60 s: the 21st waits until the first leaves the window.
    assert window.wait(now, gap=1.0) == pytest.approx(40.0)
    # Streaming edits keep headroom: they already stopped 4 slots earlier.
    assert window.wait(15.0, gap=3.0, headroom=4) > 0
    window.hold(100.0)
    assert window.wait(61.0, gap=1.0) == pytest.approx(39.0)


def test_pacing_defaults_follow_telegram_limits() -> None:
    pacing = Pacing()
    assert pacing.chat_gap_s == 1.0
    assert (pacing.group_budget, pacing.group_window_s) == (20, 60.0)
    assert pacing.group_edit_gap_s == 3.0
    with pytest.raises(ValueError, match="group_headroom"):
        Pacing(group_budget=4, group_headroom=4)
