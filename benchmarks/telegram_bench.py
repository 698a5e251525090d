"""Telegram adapter figures, measured on the fake Bot API (tests/fakes/telegram_server.py)
with the real python-telegram-bot, a real SQLite store and the default pacing:

1. cadence: edits per reply and the gaps between requests in a chat, with the real
   embedded model answering (private chat, then a group);
2. overhead: messages handled per second when the engine costs nothing (an instant
   engine) and with the scripted model on the real worker;
3. crowd: 50 users writing at once (default [engine] max_queue = 32).

    python benchmarks/telegram_bench.py [--new-tokens 96] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.service import BUSY, ChatService  # noqa: E402
from bot.store import Store  # noqa: E402
from bot.telegram_bot import run_telegram  # noqa: E402
from bot.telegram_config import TelegramConfig  # noqa: E402
from bot.telegram_pacing import Pacing  # noqa: E402
from engine.stream import TextStream  # noqa: E402
from engine.types import ChatMessage, Completion, SamplingParams  # noqa: E402
from tests.fakes.telegram_server import FakeTelegram  # noqa: E402

TOKEN_ENV = "LORABOT_BENCH_TELEGRAM_TOKEN"
PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "List three uses of a paperclip and explain each.",
]
CHAT_METHODS = ("sendMessage", "editMessageText", "editMessageReplyMarkup")
GROUP = -100777


class InstantEngine:
    """Answers every prompt at once, in one delta: what is left is the adapter's cost."""

    context_window = 4096
    adapter_name = "instant"
    queue_depth = 0

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return sum(len(m.content) // 4 + 4 for m in messages)

    def models(self) -> list[str]:
        return ["instant"]

    def stream(self, messages: Any, params: Any, adapter: str | None = None) -> TextStream:
        stream = TextStream(asyncio.get_running_loop(), 10.0)
        stream.push(self.answer)
        stream.finish(Completion(self.answer, "stop", 10, 8, 0.0, 0.001, "instant"))
        return stream

    def close(self) -> None:
        pass


def finished(fake: FakeTelegram, chat: int) -> list[Any]:
    return [m for m in fake.bot_messages(chat) if m.reply_markup]


class Served:
    """The bot serving `fake` until stopped."""

    def __init__(self, task: asyncio.Task[None], store: Store) -> None:
        self.task = task
        self.store = store

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.store.close()


async def serve(engine: Any, db: Path, fake: FakeTelegram, pacing: Pacing) -> Served:
    store = await Store.open(db)
    service = ChatService(
        store,
        engine,
        system_prompt="You are a helpful assistant.",
        sampling=SamplingParams(max_new_tokens=engine_tokens(engine), temperature=0),
    )
    config = TelegramConfig(enabled=True, token_env=TOKEN_ENV, base_url=fake.base_url)
    task = asyncio.create_task(
        run_telegram(service, config, pacing=pacing, poll_timeout_s=1, handle_sigterm=False)
    )
    await fake.wait_for(lambda: fake.calls_of("getUpdates") or task.done(), timeout=60)
    return Served(task, store)


def engine_tokens(engine: Any) -> int:
    return getattr(engine, "bench_new_tokens", 64)


def reply_figures(fake: FakeTelegram, chat: int, asked_at: float) -> dict[str, Any]:
    calls = [c for c in fake.calls if c.method in CHAT_METHODS and c.params.get("chat_id") == chat]
    calls = [c for c in calls if c.timestamp >= asked_at]
    gaps = [b.timestamp - a.timestamp for a, b in zip(calls, calls[1:], strict=False)]
    message = finished(fake, chat)[-1]
    return {
        "chars": len(message.text),
        "edits": message.edit_count,
        "requests": len(calls),
        "first_message_s": round(calls[0].timestamp - asked_at, 2),
        "total_s": round(calls[-1].timestamp - asked_at, 2),
        "gap_min_s": round(min(gaps), 2) if gaps else None,
        "gap_median_s": round(statistics.median(gaps), 2) if gaps else None,
    }


async def ask(fake: FakeTelegram, chat: int, text: str, user: int, **kw: Any) -> dict[str, Any]:
    done = len(finished(fake, chat))
    asked_at = time.monotonic()
    fake.send_text(chat, text, user_id=user, **kw)
    await fake.wait_for(lambda: len(finished(fake, chat)) > done, timeout=600)
    return reply_figures(fake, chat, asked_at)


async def cadence(new_tokens: int, workdir: Path) -> dict[str, Any]:
    from engine.config import EngineConfig, ModelConfig
    from engine.worker import LocalEngine

    engine = await asyncio.to_thread(
        LocalEngine.from_config,
        ModelConfig(),
        EngineConfig(temperature=0, max_new_tokens=new_tokens),
    )
    engine.bench_new_tokens = new_tokens  # type: ignore[attr-defined]
    try:
        async with FakeTelegram() as fake:
            os.environ[TOKEN_ENV] = fake.token
            bot = await serve(engine, workdir / "cadence.db", fake, Pacing())
            private = [await ask(fake, 5001, prompt, 5001) for prompt in PROMPTS]
            group = await ask(fake, GROUP, f"/ask {PROMPTS[0]}", 5002, chat_type="supergroup")
            await bot.stop()
    finally:
        engine.close()
    return {"engine": "embedded SmolLM2-135M, CPU", "private": private, "group": group}


async def throughput(
    make_engine: Callable[[], Any], workdir: Path, name: str, messages: int, chats: int
) -> dict[str, Any]:
    """Messages handled per second: `messages` spread over `chats` private chats, pacing
    off (the bot's own cost, not Telegram's limits)."""
    engine = make_engine()
    unpaced = Pacing(chat_gap_s=0.0, bot_budget=1_000_000, bot_headroom=0)
    try:
        async with FakeTelegram() as fake:
            os.environ[TOKEN_ENV] = fake.token
            bot = await serve(engine, workdir / f"{name}.db", fake, unpaced)
            started = time.monotonic()
            for i in range(messages):
                chat = 7000 + i % chats
                fake.send_text(chat, f"message {i}", user_id=chat)
            per_chat = messages // chats
            await fake.wait_for(
                lambda: all(len(finished(fake, 7000 + c)) >= per_chat for c in range(chats)),
                timeout=600,
            )
            elapsed = time.monotonic() - started
            requests = len([c for c in fake.calls if c.method in CHAT_METHODS])
            await bot.stop()
    finally:
        engine.close()
    return {
        "engine": name,
        "messages": messages,
        "chats": chats,
        "elapsed_s": round(elapsed, 2),
        "messages_per_s": round(messages / elapsed, 1),
        "bot_api_requests_per_message": round(requests / messages, 2),
    }


async def crowd(make_engine: Callable[[], Any], workdir: Path, users: int) -> dict[str, Any]:
    engine = make_engine()
    try:
        async with FakeTelegram() as fake:
            os.environ[TOKEN_ENV] = fake.token
            bot = await serve(engine, workdir / "crowd.db", fake, Pacing())
            started = time.monotonic()
            ids = [8000 + i for i in range(users)]
            for user in ids:
                fake.send_text(user, "What is the capital of France?", user_id=user)

            def settled() -> bool:
                return all(
                    finished(fake, u) or [m.text for m in fake.bot_messages(u)] == [BUSY]
                    for u in ids
                )

            await fake.wait_for(settled, timeout=600)
            elapsed = time.monotonic() - started
            await bot.stop()
    finally:
        engine.close()
    busy = [u for u in ids if not finished(fake, u)]
    first = {}
    for call in fake.calls:
        chat = call.params.get("chat_id")
        if call.method == "sendMessage" and chat not in first:
            first[chat] = call.timestamp - started
    answered_first = sorted(first[u] for u in ids if u not in busy)
    busy_first = sorted(first[u] for u in busy)
    per_second: dict[int, int] = {}
    for call in fake.calls:
        if call.method in CHAT_METHODS:
            second = int(call.timestamp - started)
            per_second[second] = per_second.get(second, 0) + 1
    return {
        "users": users,
        "answered": users - len(busy),
        "told_busy": len(busy),
        "busy_notice_max_s": round(max(busy_first), 2) if busy_first else None,
        "first_message_s": {
            "min": round(answered_first[0], 2),
            "median": round(statistics.median(answered_first), 2),
            "max": round(answered_first[-1], 2),
        },
        "all_settled_s": round(elapsed, 2),
        "peak_bot_api_requests_per_s": max(per_second.values()),
        "typing_actions": len(fake.calls_of("sendChatAction")),
    }


def scripted_engine_factory(answer: str, delay_s: float, max_queue: int = 32) -> Callable[[], Any]:
    def make() -> Any:
        from transformers import AutoTokenizer

        from engine.chat_format import make_chat_format
        from engine.config import ModelConfig
        from engine.loading import resolve_base
        from engine.worker import LocalEngine
        from tests.conftest import ScriptedLM

        folder, _ = resolve_base(ModelConfig())
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        model = ScriptedLM(len(tokenizer), ids, tokenizer.eos_token_id, delay_s=delay_s)
        engine = LocalEngine(
            model,
            tokenizer,
            make_chat_format("template", tokenizer),
            context_window=2048,
            max_queue=max_queue,
        )
        engine.bench_new_tokens = 200  # type: ignore[attr-defined]
        return engine

    return make


async def main(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("PTB_TIMEDELTA", "true")
    answer = "Paris is the capital of France. It is known for the Eiffel Tower."
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        figures: dict[str, Any] = {
            "cadence": await cadence(args.new_tokens, workdir),
            "throughput": [
                await throughput(lambda: InstantEngine(answer), workdir, "instant", 500, 50),
                await throughput(
                    scripted_engine_factory(answer, 0.0, max_queue=512),
                    workdir,
                    "scripted model on the worker",
                    200,
                    50,
                ),
            ],
            "crowd_50_users": await crowd(scripted_engine_factory(answer, 0.01), workdir, 50),
        }
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    results = asyncio.run(main(args))
    record = {
        "command": " ".join(["python benchmarks/telegram_bench.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
        "pacing": "defaults: 1 s per private chat, 20/min per group (edits 3 s apart), 30/s",
        **results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"telegram-{record['date']}.json"
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2, ensure_ascii=False))
    print(f"wrote {path}")
