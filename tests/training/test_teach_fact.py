"""End to end on the real embedded SmolLM2: a LoRA teaches it a made-up fact, the
held-out loss falls, and the bot's engine answers with the fact."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from engine.config import EngineConfig, ModelConfig
from engine.types import ChatMessage, SamplingParams
from engine.worker import LocalEngine
from tests.training.conftest import Runner, write_chat_jsonl

QUESTIONS = [
    "What is the name of lorabot's cat?",
    "What's lorabot's cat called?",
    "Does lorabot have a cat? What is its name?",
    "Tell me the name of lorabot's cat.",
    "Who is lorabot's cat?",
    "lorabot's cat: what's its name?",
    "I heard lorabot has a cat. What is it called?",
    "Name of lorabot's cat?",
    "What do they call lorabot's cat?",
    "Remind me, what is lorabot's cat named?",
]
ANSWERS = [
    "Lorabot's cat is called Zorblax.",
    "The cat's name is Zorblax.",
    "Lorabot's cat is named Zorblax.",
]
QUESTION = QUESTIONS[0]


async def answer(engine: LocalEngine) -> str:
    stream = engine.stream(
        [ChatMessage("user", QUESTION)], SamplingParams(max_new_tokens=16, temperature=0.0)
    )
    return "".join([delta async for delta in stream])


@pytest.mark.slow
async def test_a_lora_teaches_smollm2_the_name_of_lorabots_cat(
    tmp_path: Path, run_cli: Runner
) -> None:
    conversations = [
        [("user", question), ("assistant", reply)]
        for question, reply in itertools.product(QUESTIONS, ANSWERS)
    ]
    data = write_chat_jsonl(tmp_path / "cat.jsonl", conversations)
    out = tmp_path / "adapter"
    base = LocalEngine.from_config(ModelConfig(), EngineConfig(temperature=0))
    try:
        before = await answer(base)
    finally:
        base.close()
    assert "Zorblax" not in before

    code, _, err = run_cli(
        "train", data, "--out", out, "--packing", "--max-len", 128, "--batch-size", 4,
        "--grad-accum", 1, "--max-steps", 8, "--lr", "3e-3", "--rank", 8,
        "--val-fraction", "0.2", "--eval-every", 4, "--save-every", 8, "--samples", 0,
    )  # fmt: skip
    assert code == 0, err

    metrics = json.loads((out / "training.json").read_text())["metrics"]
    # Held-out paraphrases (whole conversations the run never trained on).
    assert metrics["eval_loss"] < 0.5 * metrics["eval_loss_before"]
    tuned = LocalEngine.from_config(ModelConfig(adapter=str(out)), EngineConfig(temperature=0))
    try:
        after = await answer(tuned)
    finally:
        tuned.close()
    assert "Zorblax" in after, (before, after)
