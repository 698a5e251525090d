"""Pieces of the Discord adapter that need no server: splitting long replies, the
per-channel throttle, reading messages, and the [discord] config checks."""

from __future__ import annotations

import asyncio
import time

import pytest

from bot.discord_config import DiscordConfig
from bot.discord_pacing import GlobalSpacing, Throttle
from bot.discord_split import Splitter, split_point
from engine.config import ConfigError

pytestmark = pytest.mark.filterwarnings("error")


@pytest.mark.parametrize(
    ("text", "limit", "first"),
    [
        ("one two three four five six", 12, "one two"),  # a word break
        ("First one is here. Second goes on", 24, "First one is here."),  # sentence > word
        ("line one. More\nline two is long", 20, "line one. More"),  # line > sentence
        ("para one.\n\nnext\npara is long", 18, "para one."),  # paragraph > line
        ("ab   cd efghijklmnop", 10, "ab   cd"),  # trailing spaces go to the next part
        ("巴黎是法国的首都。它很美丽而且历史悠久", 12, "巴黎是法国的首都。"),
        ("x" * 30, 10, "x" * 10),  # no break at all: cut at the limit
        ("x" * 9 + "🇫🇷" + "y" * 10, 10, "x" * 9),  # never between a flag's two letters
        ("x" * 9 + "e\u0301" + "y" * 10, 10, "x" * 9),  # nor before a combining accent
        ("x" * 8 + "👩\u200d👩\u200d👧" + "y" * 9, 10, "x" * 8),  # a ZWJ family stays whole
    ],
)
def test_split_point_prefers_natural_breaks(text: str, limit: int, first: str) -> None:
    at = split_point(text, limit)
    assert text[:at] == first and at <= limit


def test_splitter_parts_join_to_the_text_and_never_move() -> None:
    text = " ".join(f"word{i}" for i in range(400)) + "\n\n" + "tail " * 50
    splitter = Splitter(limit=100)
    seen: list[list[str]] = []
    for end in range(1, len(text) + 1, 37):
        parts = splitter.parts(text[:end])
        assert all(0 < len(p) <= 100 for p in parts)
        assert "".join(parts) == text[:end].rstrip()
        if seen:  # parts already complete stay exactly as they were sent
            assert parts[: len(seen[-1]) - 1] == seen[-1][:-1]
        seen.append(parts)
    final = splitter.parts(text)
    assert "".join(final) == text.rstrip() and len(final) >= 23


def test_splitter_never_yields_blank_parts() -> None:
    assert Splitter(limit=10).parts("   \n  ") == []
    assert Splitter(limit=10).parts("hello   ") == ["hello"]


async def test_throttle_spaces_writes_from_the_end_of_the_previous_one() -> None:
    throttle = Throttle(0.1, GlobalSpacing(1000))
    starts: list[float] = []

    async def write(seconds: float, *, wait: bool = True) -> None:
        async with throttle.turn(wait=wait):
            starts.append(time.monotonic())
            await asyncio.sleep(seconds)

    began = time.monotonic()
    await write(0.05, wait=False)  # a first message goes out at once
    await asyncio.gather(write(0.0), write(0.0))  # then one per interval, in turn
    assert starts[0] - began < 0.05
    assert starts[1] - starts[0] >= 0.15 - 0.01  # 0.05 busy + 0.1 interval
    assert starts[2] - starts[1] >= 0.1 - 0.01


async def test_global_spacing_caps_the_bot_wide_rate() -> None:
    spacing = GlobalSpacing(per_second=50)
    began = time.monotonic()
    await asyncio.gather(*(spacing.wait() for _ in range(11)))
    assert time.monotonic() - began >= 0.2 - 0.01  # 10 gaps of 20 ms


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        DiscordConfig(api_base="ftp://x", edit_interval_s=-1)
    text = str(caught.value)
    assert "'ftp://x': must start with http://" in text and "edit_interval_s = -1" in text
    with pytest.raises(ConfigError, match="ws:// or wss://"):
        DiscordConfig(api_base="http://127.0.0.1:1/api/v10", gateway_url="http://127.0.0.1:1")
    DiscordConfig(api_base="http://127.0.0.1:1/api/v10", gateway_url="ws://127.0.0.1:1/gateway")
