"""CPU figures of the training package: tokens/s and peak memory of a LoRA run on the
embedded SmolLM2-135M with and without the fast paths (training/fast.py), and the time
`prepare` takes on 50k generated Alpaca records.

    python benchmarks/train_cpu_bench.py [--steps 10] [--records 50000] [--out benchmarks/results]

Each part runs `python -m training` in a child process, as an admin would; the peak
memory is the child's maximum RSS. The load average is recorded with the figures: on a
shared machine other processes' load changes them a lot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

TOPICS = ["the sea", "bread", "LoRA", "trains", "autumn", "chess", "tea", "rivers", "Go", "bees"]
ZH_TOPICS = ["大海", "面包", "火车", "秋天", "象棋", "茶", "河流", "蜜蜂"]


def child(args: list[str]) -> tuple[float, int, subprocess.CompletedProcess[str]]:
    """(wall seconds, peak RSS MiB of this child, result) of `python -m training ARGS`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"python -m training {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest child so far: report it only if this one set it.
    return elapsed, (peak // 1024 if peak > before else -1), done


def chat_dataset(path: Path, count: int) -> None:
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as handle:
        for index in range(count):
            topic = rng.choice(TOPICS)
            question = f"Tell me something about {topic}, in {rng.randint(2, 4)} sentences."
            answer = " ".join(
                f"Fact {n} about {topic}: it is number {index + n} on my list of favourite things."
                for n in range(rng.randint(2, 4))
            )
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")


def alpaca_dataset(path: Path, count: int) -> None:
    """Alpaca records like the seed's data: a third Chinese, a third with `input`."""
    rng = random.Random(1)
    records: list[dict[str, str]] = []
    for index in range(count):
        if index % 3 == 0:
            topic = rng.choice(ZH_TOPICS)
            record = {
                "instruction": f"请用{rng.randint(2, 5)}句话介绍{topic}。",
                "input": "",
                "output": "。".join(
                    f"关于{topic}的第{n}点：这很有趣" for n in range(rng.randint(2, 6))
                )
                + "。",
            }
        else:
            topic = rng.choice(TOPICS)
            record = {
                "instruction": f"Write {rng.randint(2, 5)} sentences about {topic}.",
                "input": f"Audience: readers aged {rng.randint(8, 80)}." if index % 3 == 1 else "",
                "output": " ".join(
                    f"Sentence {n} says something true about {topic}."
                    for n in range(rng.randint(2, 6))
                ),
            }
        records.append(record)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")


def lora_run(folder: Path, steps: int, fast_paths: bool) -> dict[str, Any]:
    data = folder / "chat.jsonl"
    chat_dataset(data, 200)
    out = folder / ("adapter" if fast_paths else "adapter-plain")
    args = [
        "train", str(data), "--out", str(out), "--max-steps", str(steps), "--batch-size", "4",
        "--grad-accum", "1", "--max-len", "256", "--packing", "--val-fraction", "0",
        "--save-every", str(steps), "--lr", "1e-3",
        "--fast-paths" if fast_paths else "--no-fast-paths",
    ]  # fmt: skip
    wall, rss, _ = child(args)
    metrics = json.loads((out / "training.json").read_text(encoding="utf-8"))["metrics"]
    return {
        "command": "python -m training "
        + " ".join(["train", "chat.jsonl", "--out", "adapter", *args[4:]]),
        "model": "SmolLM2-135M-Instruct (embedded), float32, LoRA r 8 all-linear",
        "steps": metrics["steps"],
        "tokens": metrics["tokens"],
        "train_seconds": metrics["train_seconds"],
        "tokens_per_second": round(metrics["tokens_per_second"], 1),
        "final_loss": metrics["final_loss"],
        "peak_rss_mib": rss,
        "wall_s_including_load_and_save": round(wall, 2),
    }


def prepare_run(folder: Path, records: int) -> dict[str, Any]:
    data = folder / "alpaca.json"
    alpaca_dataset(data, records)
    wall, rss, done = child(["prepare", str(data), "--json"])
    report = json.loads(done.stdout)
    return {
        "command": f"python -m training prepare alpaca.json --json  ({records} records)",
        "file_mib": round(data.stat().st_size / 2**20, 1),
        "conversations": report["read"]["conversations"],
        "tokens": report["tokens"]["tokens"],
        "seconds_in_prepare": report["seconds"],
        "wall_s_including_startup": round(wall, 2),
        "peak_rss_mib": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare = prepare_run(folder, args.records)
        lora = lora_run(folder, args.steps, fast_paths=True)
        plain = lora_run(folder, args.steps, fast_paths=False)
    today = datetime.date.today().isoformat()
    result = {
        "command": "python benchmarks/train_cpu_bench.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": today,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "lora_smollm2": lora,
        "lora_smollm2_no_fast_paths": plain,
        "fast_paths_speedup": round(lora["tokens_per_second"] / plain["tokens_per_second"], 3),
        "prepare_alpaca": prepare,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"train-cpu-{today}.json"
    target.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, ensure_ascii=False, indent=2))
    print(f"written to {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
