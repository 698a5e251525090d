"""Training runs on the tiny LLaMA: outputs, exact resume, NaN stop, merge."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import training.step
from engine.config import EngineConfig, ModelConfig
from engine.types import ChatMessage, SamplingParams
from engine.worker import LocalEngine
from tests.training.conftest import Runner
from training.checkpoint import CheckpointError, list_checkpoints, verify_adapter
from training.cli import main

# 2 layers x 7 linear layers x (lora_A, lora_B)
LORA_TENSORS = 28


def train_args(data: Path, base: Path, out: Path, *extra: object) -> list[str]:
    args = [
        "train", data, "--base", base, "--out", out, "--batch-size", 2, "--grad-accum", 2,
        "--lr", "5e-3", "--val-fraction", "0.25", "--samples", 0, "--max-len", 128, *extra,
    ]  # fmt: skip
    return [str(a) for a in args]


@pytest.fixture(scope="module")
def straight_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six steps in one go, a checkpoint every three (the reference for resume)."""
    from tests.training.conftest import FACTS, write_chat_jsonl

    folder = tmp_path_factory.mktemp("straight")
    conversations = [[("user", q), ("assistant", a)] for q, a in FACTS * 4]
    data = write_chat_jsonl(folder / "chat.jsonl", conversations)
    out = folder / "run"
    code = main(
        train_args(
            data,
            tiny_dir,
            out,
            "--max-steps",
            6,
            "--save-every",
            3,
            "--samples",
            2,
            "--sample-tokens",
            8,
        )  # fmt: skip
    )
    assert code == 0
    return out


def test_a_run_leaves_adapter_metadata_curve_and_report(straight_run: Path) -> None:
    weights = load_file(str(straight_run / "adapter_model.safetensors"))
    assert len(weights) == LORA_TENSORS
    assert all(t.dtype == torch.float32 and t.numel() > 0 for t in weights.values())
    assert any(name.endswith("lora_B.weight") and t.abs().sum() > 0 for name, t in weights.items())
    meta = json.loads((straight_run / "training.json").read_text(encoding="utf-8"))
    assert meta["chat_format"] == "template" and meta["base"]["config"].endswith("tiny-llama0")
    assert len(meta["data"]["sha256"]) == 64
    assert meta["options"]["rank"] == 8 and meta["options"]["target_modules"] == ["all-linear"]
    metrics = meta["metrics"]
    assert metrics["steps"] == 6 and metrics["tokens_per_second"] > 0
    assert metrics["eval_loss"] < metrics["eval_loss_before"]  # held-out loss fell
    png = (straight_run / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (640, 360)
    report = (straight_run / "report.md").read_text(encoding="utf-8")
    assert "- before:" in report and "- after:" in report and "![loss](loss.png)" in report
    assert [p.name for p in list_checkpoints(straight_run)] == ["step-000003", "step-000006"]


def test_resume_gives_exactly_the_uninterrupted_result(
    straight_run: Path, tmp_path: Path, run_cli: Runner
) -> None:
    """Stop after step 3 (keep only that checkpoint), resume in a fresh out folder: the
    adapter and every logged loss equal the uninterrupted run's, bit for bit."""
    resumed = tmp_path / "resumed"
    shutil.copytree(
        straight_run / "checkpoints" / "step-000003", resumed / "checkpoints" / "step-000003"
    )
    torch.manual_seed(1234)  # whatever the process's RNG holds must not matter
    data = Path(json.loads((straight_run / "training.json").read_text())["data"]["files"][0])
    base = Path(json.loads((straight_run / "training.json").read_text())["base"]["folder"])
    code, _, err = run_cli(
        *train_args(data, base, resumed, "--max-steps", 6, "--save-every", 3, "--resume")
    )
    assert code == 0, err
    expected = load_file(str(straight_run / "adapter_model.safetensors"))
    got = load_file(str(resumed / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    history = json.loads((resumed / "training.json").read_text())["history"]
    reference = json.loads((straight_run / "training.json").read_text())["history"]
    assert history == reference


def test_an_existing_run_is_never_silently_restarted(
    straight_run: Path, tmp_path: Path, run_cli: Runner, small_chat: Path, tiny_dir: Path
) -> None:
    code, _, err = run_cli(*train_args(small_chat, tiny_dir, straight_run, "--max-steps", 2))
    assert code == 2 and "already holds a training run; pass --resume" in err
    code, _, err = run_cli(
        *train_args(small_chat, tiny_dir, tmp_path / "new", "--max-steps", 2, "--resume")
    )
    assert code == 2 and "--resume: no checkpoint in" in err
    changed = tmp_path / "changed"
    shutil.copytree(straight_run / "checkpoints", changed / "checkpoints")
    code, _, err = run_cli(
        *train_args(small_chat, tiny_dir, changed, "--max-steps", 6, "--rank", 4, "--resume")
    )
    assert code == 2 and "rank: checkpoint 8, now 4" in err and "data_sha256" in err


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    small_chat: Path, tiny_dir: Path, tmp_path: Path, run_cli: Runner, monkeypatch: Any
) -> None:
    real = training.step.forward_loss
    calls = {"train": 0}

    def diverging(model: Any, batch: Any) -> torch.Tensor:
        loss = real(model, batch)
        if torch.is_grad_enabled():  # training micro-batches only, not eval
            calls["train"] += 1
            if calls["train"] > 2 * 3:  # two micro-batches a step: step 4 diverges
                return loss * float("nan")
        return loss

    monkeypatch.setattr(training.step, "forward_loss", diverging)
    out = tmp_path / "run"
    code, _, err = run_cli(
        *train_args(small_chat, tiny_dir, out, "--max-steps", 8, "--save-every", 2)
    )
    assert code == 1
    assert "the loss became nan at step 4" in err
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}" in err
    assert "--resume --lr 0.0005" in err and "Traceback" not in err
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]
    assert not (out / "adapter_model.safetensors").exists()
    kept = load_file(str(out / "checkpoints" / "step-000002" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())
    # The advice works: resuming with a lower learning rate finishes the run.
    monkeypatch.setattr(training.step, "forward_loss", real)
    code, _, err = run_cli(
        *train_args(small_chat, tiny_dir, out, "--max-steps", 8, "--save-every", 2),
        "--resume", "--lr", "5e-4",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "training.json").read_text())["metrics"]["steps"] == 8


def test_packing_and_gradient_checkpointing_train_too(
    small_chat: Path, tiny_dir: Path, tmp_path: Path, run_cli: Runner
) -> None:
    out = tmp_path / "packed"
    code, _, err = run_cli(
        *train_args(
            small_chat, tiny_dir, out, "--epochs", 2, "--packing", "--gradient-checkpointing"
        )
    )
    assert code == 0, err
    meta = json.loads((out / "training.json").read_text())
    # 18 training conversations of ~40-70 tokens pack into few 128-token rows.
    assert meta["metrics"]["steps"] <= 4
    assert meta["metrics"]["eval_loss"] < meta["metrics"]["eval_loss_before"]


def test_a_truncated_adapter_file_is_caught(straight_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "adapter"
    shutil.copytree(straight_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    expected = load_file(str(copy / "adapter_model.safetensors"))
    verify_adapter(copy, expected)
    data = (copy / "adapter_model.safetensors").read_bytes()
    (copy / "adapter_model.safetensors").write_bytes(data[:443])
    with pytest.raises(CheckpointError, match="cannot be read"):
        verify_adapter(copy, expected)


async def greedy(engine: LocalEngine, prompt: str) -> tuple[int, ...]:
    stream = engine.stream(
        [ChatMessage("user", prompt)], SamplingParams(max_new_tokens=12, temperature=0.0)
    )
    async for _ in stream:
        pass
    assert stream.completion is not None
    return stream.completion.token_ids


async def test_merged_model_and_adapter_answer_alike_through_the_engine(
    straight_run: Path, tmp_path: Path, run_cli: Runner
) -> None:
    merged = tmp_path / "merged"
    code, _, err = run_cli("merge", "--adapter", straight_run, "--out", merged)
    assert code == 0, err
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert (merged / "chat_template.jinja").is_file() or "chat_template" in (
        merged / "tokenizer_config.json"
    ).read_text()
    base = json.loads((straight_run / "training.json").read_text())["base"]["folder"]
    engines = [
        LocalEngine.from_config(ModelConfig(base=base, adapter=str(straight_run)), EngineConfig()),
        LocalEngine.from_config(ModelConfig(base=str(merged)), EngineConfig()),
        LocalEngine.from_config(ModelConfig(base=base), EngineConfig()),
    ]
    # The adapter is merged into the weights: only its name is served, never the base's.
    assert engines[0].models() == [straight_run.name]
    try:
        answers = [await greedy(engine, "Where does Mira live?") for engine in engines]
    finally:
        for engine in engines:
            engine.close()
    adapter, merged_answer, plain = answers
    assert adapter == merged_answer
    assert adapter != plain  # the adapter changed the model
