"""Training fixtures: the tiny random LLaMA saved as a model folder, small datasets, and
a helper that runs `python -m training` in-process."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from training.cli import main


@pytest.fixture(scope="session")
def tiny_dir(tiny_model: Any, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA (conftest.tiny_model) with SmolLM2's tokenizer, as a folder that
    `--base` and `[model] base` accept."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_chat_jsonl(path: Path, conversations: Sequence[Sequence[tuple[str, str]]]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for turns in conversations:
            messages = [{"role": role, "content": content} for role, content in turns]
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


FACTS = [
    ("Where does Mira live?", "Mira lives in Lisbon."),
    ("What is Mira's favourite colour?", "Mira likes teal."),
    ("Which instrument does Mira play?", "Mira plays the cello."),
    ("What does Mira drink in the morning?", "Mira drinks green tea."),
    ("How many cats does Mira have?", "Mira has two cats."),
    ("What is Mira's job?", "Mira is a baker."),
]


@pytest.fixture
def small_chat(tmp_path: Path) -> Path:
    """24 short conversations (repeats of six facts, some with a system prompt and two
    rounds): enough for a tiny model's loss to fall within a few steps."""
    conversations: list[list[tuple[str, str]]] = []
    for round_ in range(4):
        for index, (question, answer) in enumerate(FACTS):
            turns = [("user", question), ("assistant", answer)]
            if round_ % 2:
                turns = [("system", "You answer questions about Mira."), *turns]
            if index % 3 == 0:
                turns += [("user", "Thanks!"), ("assistant", "You're welcome.")]
            conversations.append(turns)
    return write_chat_jsonl(tmp_path / "chat.jsonl", conversations)


Runner = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Runner:
    """run_cli("train", ...) -> (exit code, stdout, stderr)."""

    def run(*argv: object) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(arg) for arg in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
