"""CPU figures of the embedded model: start-up time of `python -m bot`, time to first
token, decode tokens/s and peak memory, with HF `generate` on the same prompts as the
baseline, side by side in one run.

    python benchmarks/cpu_bench.py [--new-tokens 128] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import pty
import resource
import select
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "List three uses of a paperclip.",
]


def time_to_prompt(cache_dir: str, db: str) -> tuple[float, int]:
    """Seconds from starting `python -m bot` on a terminal to its `you>` prompt, and the
    child's peak RSS in MiB."""
    config = Path(db).with_suffix(".toml")
    config.write_text(f'[storage]\npath = "{db}"\n[bot]\nlog_level = "WARNING"\n')
    env = dict(os.environ, LORABOT_CACHE_DIR=cache_dir)
    started = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-m", "bot", "--config", str(config)], env)
    screen = b""
    while b"you> " not in screen:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            screen += os.read(fd, 4096)
        if time.perf_counter() - started > 600:
            raise RuntimeError(f"no prompt after 600 s: {screen[-500:]!r}")
    elapsed = time.perf_counter() - started
    os.write(fd, b"/exit\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    return elapsed, rss_mib


async def engine_figures(new_tokens: int, users: int) -> dict[str, Any]:
    from engine.config import EngineConfig, ModelConfig
    from engine.types import ChatMessage, SamplingParams
    from engine.worker import LocalEngine

    engine = LocalEngine.from_config(ModelConfig(), EngineConfig())
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    system = ChatMessage("system", "You are a helpful assistant.")

    async def one(prompt: str) -> tuple[float, float, int]:
        stream = engine.stream([system, ChatMessage("user", prompt)], params)
        started = time.perf_counter()
        first = 0.0
        async for _delta in stream:
            first = first or time.perf_counter() - started
        done = stream.completion
        assert done is not None
        decode_s = done.total_s - done.ttft_s
        return first, (done.completion_tokens - 1) / decode_s, done.completion_tokens

    await one("Warm up.")
    single = [await one(p) for p in PROMPTS]
    started = time.perf_counter()
    together = await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)]) for i in range(users)))
    wall = time.perf_counter() - started
    hf = hf_generate_figures(engine.model, engine.chat_format, system, new_tokens)
    engine.close()
    return {
        "lorabot_ttft_ms_median": 1000 * sorted(s[0] for s in single)[len(single) // 2],
        "lorabot_decode_tok_s_median": sorted(s[1] for s in single)[len(single) // 2],
        "lorabot_concurrent_users": users,
        "lorabot_concurrent_aggregate_tok_s": sum(t[2] for t in together) / wall,
        **hf,
    }


def hf_generate_figures(
    model: Any, chat_format: Any, system: Any, new_tokens: int
) -> dict[str, Any]:
    """The baseline: transformers' generate, one request at a time, greedy."""
    import torch

    from engine.types import ChatMessage

    ttfts, rates = [], []
    for prompt in PROMPTS:
        ids = torch.tensor([chat_format.encode([system, ChatMessage("user", prompt)])])
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            started = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - started
            started = time.perf_counter()
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False
            )
            total = time.perf_counter() - started
        produced = out.shape[1] - ids.shape[1]
        ttfts.append(ttft)
        rates.append((produced - 1) / max(total - ttft, 1e-9))
    return {
        "hf_generate_ttft_ms_median": 1000 * sorted(ttfts)[len(ttfts) // 2],
        "hf_generate_decode_tok_s_median": sorted(rates)[len(rates) // 2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cold_s, cold_rss = time_to_prompt(tmp, f"{tmp}/cold.db")
        warm_s, warm_rss = time_to_prompt(tmp, f"{tmp}/warm.db")
    figures = asyncio.run(engine_figures(args.new_tokens, args.users))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
        "cold_start_s": round(cold_s, 2),
        "warm_start_s": round(warm_s, 2),
        "bot_peak_rss_mib": max(cold_rss, warm_rss),
        "bench_process_peak_rss_mib": peak_mib,
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()},
    }
    result["decode_speed_vs_hf_generate"] = round(
        result["lorabot_decode_tok_s_median"] / result["hf_generate_decode_tok_s_median"], 2
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key:40} {value}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
