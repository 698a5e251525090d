"""Training under `torchrun --nproc_per_node 2` on the CPU (gloo), the path several GPUs
take: two processes with half the per-process batch train the same adapter as one
process with the whole batch, only rank 0 writes, and a checkpoint resumes across
world sizes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import FACTS, write_chat_jsonl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def train(
    processes: int, data: Path, base: Path, out: Path, batch: int, *extra: object
) -> subprocess.CompletedProcess[str]:
    options = [
        "train", data, "--base", base, "--out", out, "--batch-size", batch, "--grad-accum", 1,
        "--lr", "5e-3", "--dropout", 0, "--val-fraction", 0.25, "--samples", 0,
        "--max-len", 128, "--max-steps", 4, "--save-every", 2, "--keep-checkpoints", 5, *extra,
    ]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    launcher += ["--master_port", str(29500 + os.getpid() % 1000), "-m", "training"]
    command = launcher if processes > 1 else [sys.executable, "-m", "training"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [*command, *[str(o) for o in options]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        # Same sums in another order (gloo all-reduce): equal up to float32 rounding.
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("multiprocess")
    data = write_chat_jsonl(
        folder / "chat.jsonl", [[("user", q), ("assistant", a)] for q, a in FACTS * 4]
    )
    one = train(1, data, tiny_dir, folder / "one", 4)
    assert one.returncode == 0, one.stderr[-3000:]
    two = train(2, data, tiny_dir, folder / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    return {"data": data, "base": tiny_dir, "one": folder / "one", "two": folder / "two"}


def test_two_processes_train_what_one_process_trains(runs: dict[str, Path]) -> None:
    assert_same_adapter(adapter(runs["one"]), adapter(runs["two"]))
    one = json.loads((runs["one"] / "training.json").read_text())["history"]
    two = json.loads((runs["two"] / "training.json").read_text())["history"]
    assert len(one) == len(two) > 0
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        if "loss" in a:
            assert abs(a["loss"] - b["loss"]) < 1e-4


def test_only_rank_zero_writes(runs: dict[str, Path]) -> None:
    out = runs["two"]
    meta = json.loads((out / "training.json").read_text())
    assert meta["launch"].get("WORLD_SIZE") == "2"
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-000002", "step-000004"]  # no half-written or doubled
    top = sorted(p.name for p in out.iterdir())
    assert top == sorted(p.name for p in runs["one"].iterdir())  # the same set of outputs


@pytest.mark.parametrize(("source", "processes", "batch"), [("two", 1, 4), ("one", 2, 2)])
def test_resume_across_world_sizes(
    runs: dict[str, Path], tmp_path: Path, source: str, processes: int, batch: int
) -> None:
    resumed = tmp_path / f"from-{source}"
    start = runs[source] / "checkpoints" / "step-000002"
    shutil.copytree(start, resumed / "checkpoints" / "step-000002")
    result = train(processes, runs["data"], runs["base"], resumed, batch, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_adapter(adapter(runs["one"]), adapter(resumed))
