"""Discord adapter figures, measured on the fake Discord (tests/fakes/discord_server.py:
REST + gateway) with the real discord.py, a real SQLite store and the default
`[discord] edit_interval_s = 1.0`:

1. cadence: edits per reply and the gaps between the bot's writes in a channel, with the
   real embedded model answering (DMs, then an @mention in a server);
2. overhead: what the adapter adds to the engine's own time, with an engine that answers
   at once and with the scripted model on the real worker;
3. channels: 50 server channels asking at once, the engine streaming all 50 answers in
   parallel at 20 tokens/s (as a batching GPU server would), Discord's per-channel
   buckets emulated by the fake (5 writes / 5 s): 429s, time to first text, writes/s.

    python benchmarks/discord_bench.py [--new-tokens 96] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.discord_bot import run_discord  # noqa: E402
from bot.discord_config import DiscordConfig  # noqa: E402
from bot.service import ChatService  # noqa: E402
from bot.store import Store  # noqa: E402
from engine.stream import TextStream  # noqa: E402
from engine.types import ChatMessage, Completion, SamplingParams  # noqa: E402
from tests.fakes.discord_server import FakeDiscord  # noqa: E402

TOKEN_ENV = "LORABOT_BENCH_DISCORD_TOKEN"
PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "List three uses of a paperclip and explain each.",
]
WRITES = ("POST", "PATCH")


class PacedEngine:
    """Streams a fixed answer word by word at `tokens_per_s`, any number of requests at
    once; `tokens_per_s` 0 answers at once, in one delta (the adapter's cost alone)."""

    context_window = 4096
    adapter_name = "paced"
    queue_depth = 0

    def __init__(self, answer: str, tokens_per_s: float = 0.0) -> None:
        self.answer = answer
        self.tokens_per_s = tokens_per_s
        self._tasks: set[asyncio.Task[None]] = set()

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return sum(len(m.content) // 4 + 4 for m in messages)

    def models(self) -> list[str]:
        return ["paced"]

    def stream(self, messages: Any, params: Any, adapter: str | None = None) -> TextStream:
        stream = TextStream(asyncio.get_running_loop(), 30.0)
        task = asyncio.create_task(self._produce(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stream

    async def _produce(self, stream: TextStream) -> None:
        started = time.monotonic()
        words = self.answer.split(" ")
        if self.tokens_per_s:
            for i, word in enumerate(words):
                await asyncio.sleep(1 / self.tokens_per_s)
                stream.push(word if i == 0 else " " + word)
        else:
            stream.push(self.answer)
        total = time.monotonic() - started
        stream.finish(Completion(self.answer, "stop", 10, len(words), 0.0, total, "paced"))

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


class Served:
    def __init__(self, task: asyncio.Task[None], store: Store, db: Path) -> None:
        self.task, self.store, self.db = task, store, db

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.store.close()

    def engine_ms(self) -> list[float]:
        with sqlite3.connect(self.db) as conn:
            rows = conn.execute("SELECT latency_ms FROM messages WHERE role='assistant'")
            return [r[0] for r in rows]


async def serve(
    engine: Any, db: Path, fake: FakeDiscord, new_tokens: int = 256, interval: float = 1.0
) -> Served:
    store = await Store.open(db)
    service = ChatService(
        store,
        engine,
        system_prompt="You are a helpful assistant.",
        sampling=SamplingParams(max_new_tokens=new_tokens, temperature=0),
    )
    os.environ[TOKEN_ENV] = fake.token
    config = DiscordConfig(
        enabled=True,
        token_env=TOKEN_ENV,
        api_base=fake.api_base,
        gateway_url=fake.gateway_url,
        edit_interval_s=interval,
    )
    sessions = fake.identify_count
    task = asyncio.create_task(run_discord(service, config))
    await fake.wait_for(lambda: fake.identify_count > sessions or task.done(), timeout=60)
    return Served(task, store, db)


def writes_in(fake: FakeDiscord, channel: str, since: float) -> list[Any]:
    """The bot's message sends and edits in a channel (typing indicators not counted)."""
    return [
        r
        for r in fake.requests
        if r.method in WRITES
        and r.path.startswith(f"/channels/{channel}/messages")
        and r.timestamp >= since
    ]


def reply_figures(fake: FakeDiscord, channel: str, asked_at: float) -> dict[str, Any]:
    writes = writes_in(fake, channel, asked_at)
    gaps = [b.timestamp - a.timestamp for a, b in zip(writes, writes[1:], strict=False)]
    message = fake.bot_messages(channel)[-1]
    history = message.content_history
    return {
        "chars": len(message.content),
        "edits": message.edit_count,
        "unchanged_edits": sum(a == b for a, b in zip(history, history[1:], strict=False)),
        "requests": len(writes),
        "first_message_s": round(writes[0].timestamp - asked_at, 2),
        "total_s": round(writes[-1].timestamp - asked_at, 2),
        "gap_min_s": round(min(gaps), 2) if gaps else None,
        "gap_median_s": round(statistics.median(gaps), 2) if gaps else None,
    }


async def settled(fake: FakeDiscord, served: Served, replies: int, timeout: float = 600) -> None:
    """Until `replies` answers are stored and their final edits went out."""

    def done() -> bool:
        return len(served.engine_ms()) >= replies and not any(
            t for t in asyncio.all_tasks() if t.get_name() == "discord.py: on_message"
        )

    await fake.wait_for(done, timeout=timeout)


async def cadence(new_tokens: int, workdir: Path) -> dict[str, Any]:
    from engine.config import EngineConfig, ModelConfig
    from engine.worker import LocalEngine

    engine = await asyncio.to_thread(
        LocalEngine.from_config,
        ModelConfig(),
        EngineConfig(temperature=0, max_new_tokens=new_tokens),
    )
    try:
        async with FakeDiscord() as fake:
            guild = fake.add_guild("bench")
            served = await serve(engine, workdir / "cadence.db", fake, new_tokens)
            dm = fake.open_dm("carol")
            figures = []
            for count, prompt in enumerate(PROMPTS, start=1):
                asked_at = time.monotonic()
                await fake.user_message(dm, "carol", prompt)
                await settled(fake, served, count)
                figures.append(reply_figures(fake, dm, asked_at))
            channel = guild.text_channel_id
            asked_at = time.monotonic()
            await fake.user_message(channel, "dave", PROMPTS[0], mentions_bot=True)
            await settled(fake, served, len(PROMPTS) + 1)
            mention = reply_figures(fake, channel, asked_at)
            await served.stop()
    finally:
        engine.close()
    return {"engine": "embedded SmolLM2-135M, CPU", "dm": figures, "mention": mention}


async def overhead(
    engine: Any, name: str, workdir: Path, replies: int, interval: float
) -> dict[str, Any]:
    """Replies one after the other in one DM: wall time from the user's message to the
    final text at the fake, minus the engine's own time for that reply."""
    async with FakeDiscord() as fake:
        served = await serve(engine, workdir / f"{name}-{interval}.db", fake, interval=interval)
        dm = fake.open_dm("erin")
        walls = []
        for count in range(1, replies + 1):
            asked_at = time.monotonic()
            await fake.user_message(dm, "erin", f"message {count}")
            await settled(fake, served, count)
            walls.append((writes_in(fake, dm, asked_at)[-1].timestamp - asked_at) * 1000)
        engine_ms = served.engine_ms()
        requests = len(writes_in(fake, dm, 0.0))
        await served.stop()
    extra = [w - e for w, e in zip(walls, engine_ms, strict=True)]
    return {
        "engine": name,
        "edit_interval_s": interval,
        "replies": replies,
        "engine_ms_median": round(statistics.median(engine_ms), 1),
        "reply_wall_ms_median": round(statistics.median(walls), 1),
        "adapter_overhead_ms_median": round(statistics.median(extra), 1),
        "adapter_overhead_ms_p95": round(sorted(extra)[int(0.95 * (len(extra) - 1))], 1),
        "discord_writes_per_reply": round(requests / replies, 2),
    }


async def channels(count: int, tokens_per_s: float, workdir: Path) -> dict[str, Any]:
    answer = " ".join(f"word{i}" for i in range(60))
    engine = PacedEngine(answer, tokens_per_s)
    async with FakeDiscord() as fake:
        names = [f"c{i}" for i in range(count)]
        guild = fake.add_guild("crowd", channels=names)
        for method, path in (
            ("POST", r"/channels/\d+/messages"),
            ("PATCH", r"/channels/\d+/messages/\d+"),
        ):
            fake.limit_route(method, path, limit=5, per=5.0)
        served = await serve(engine, workdir / "channels.db", fake)
        ids = [guild.channel_id(n) for n in names]
        started = time.monotonic()
        await asyncio.gather(
            *(fake.user_message(c, f"user{i}", "go", mentions_bot=True) for i, c in enumerate(ids))
        )

        def complete() -> bool:
            return all(m and m[-1].content == answer for m in (fake.bot_messages(c) for c in ids))

        await fake.wait_for(complete, timeout=120)
        await settled(fake, served, count)
        elapsed = time.monotonic() - started
        writes = [r for r in fake.requests if r.method in WRITES and r.timestamp >= started]
        first = [min(r.timestamp for r in writes_in(fake, c, started)) - started for c in ids]
        last = [max(r.timestamp for r in writes_in(fake, c, started)) - started for c in ids]
        gaps = []
        for channel in ids:
            mine = writes_in(fake, channel, started)
            gaps += [b.timestamp - a.timestamp for a, b in zip(mine, mine[1:], strict=False)]
        await served.stop()
    per_second = max(
        sum(1 for r in writes if t <= r.timestamp < t + 1) for t in (w.timestamp for w in writes)
    )
    return {
        "channels": count,
        "engine": f"paced, {tokens_per_s:g} tokens/s per answer, all in parallel, 60 tokens",
        "all_answers_complete": True,
        "responses_429": sum(1 for r in writes if r.status == 429),
        "first_text_s_median": round(statistics.median(first), 2),
        "first_text_s_max": round(max(first), 2),
        "answer_done_s_median": round(statistics.median(last), 2),
        "answer_done_s_max": round(max(last), 2),
        "elapsed_s": round(elapsed, 2),
        "writes": len(writes),
        "writes_per_answer": round(len(writes) / count, 2),
        "max_writes_in_any_second": per_second,
        "edit_gap_min_s": round(min(gaps), 2) if gaps else None,
    }


def scripted_engine() -> Any:
    from transformers import AutoTokenizer

    from engine.chat_format import make_chat_format
    from engine.config import ModelConfig
    from engine.loading import resolve_base
    from engine.worker import LocalEngine
    from tests.conftest import ScriptedLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(ModelConfig())[0])
    answer = "Paris is the capital of France. " * 4
    ids = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
    model = ScriptedLM(len(tokenizer), ids, tokenizer.eos_token_id)
    return LocalEngine(
        model, tokenizer, make_chat_format("template", tokenizer), context_window=2048
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        result_cadence = await cadence(args.new_tokens, workdir)
        costs = []
        for interval in (1.0, 0.0):
            instant = PacedEngine("Paris is the capital of France.")
            costs.append(await overhead(instant, "instant", workdir, 40, interval))
            engine = scripted_engine()
            try:
                name = "scripted model on the worker"
                costs.append(await overhead(engine, name, workdir, 40, interval))
            finally:
                engine.close()
        crowd = await channels(50, 20.0, workdir)
    return {
        "cadence": result_cadence,
        "overhead": costs,
        "channels": crowd,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    options = parser.parse_args()
    figures = asyncio.run(main(options))
    today = datetime.date.today().isoformat()
    result = {
        "command": "python benchmarks/discord_bench.py"
        + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": today,
        "note": "the fake Discord, the bot and the engine share one process and event loop",
        "edit_interval_s": DiscordConfig().edit_interval_s,
        **figures,
    }
    options.out.mkdir(parents=True, exist_ok=True)
    path = options.out / f"discord-{today}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {path}")
