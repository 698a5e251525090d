"""Shared fixtures: the embedded model's tokenizer, a tiny random LLaMA, and a
scripted model whose output is fixed in advance (for exact streaming checks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from engine.chat_format import make_chat_format
from engine.config import ModelConfig
from engine.loading import resolve_base
from engine.worker import LocalEngine


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2, converted once into the user's lorabot cache."""
    folder, _name = resolve_base(ModelConfig())
    return folder


@pytest.fixture(scope="session")
def tokenizer(embedded_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="session")
def tiny_model(tokenizer: Any) -> Any:
    """A 2-layer random LLaMA with SmolLM2's vocabulary (fast, deterministic)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


class ScriptedLM(torch.nn.Module):
    """Answers every prompt with `script` (token ids) then EOS; optional per-step delay,
    a gate to hold generation, or an exception at a given step."""

    def __init__(
        self,
        vocab_size: int,
        script: list[int],
        eos_id: int,
        *,
        delay_s: float = 0.0,
        fail_at: int | None = None,
    ) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size = vocab_size
        self.script = script
        self.eos_id = eos_id
        self.delay_s = delay_s
        self.fail_at = fail_at
        self.gate = threading.Event()
        self.gate.set()
        self.steps = 0
        self._position = 0

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        self.gate.wait()
        if self.delay_s:
            time.sleep(self.delay_s)
        if input_ids.shape[1] > 1 or self._position >= len(self.script) + 1:
            self._position = 0  # a new prompt (prefill) restarts the script
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("scripted failure")
        self.steps += 1
        token = self.script[self._position] if self._position < len(self.script) else self.eos_id
        self._position += 1
        logits = torch.full((1, 1, self.vocab_size), -1e4)
        logits[0, 0, token] = 0.0

        class Out:
            pass

        out = Out()
        out.logits = logits  # type: ignore[attr-defined]
        return out


@pytest.fixture
def scripted_engine(tokenizer: Any) -> Iterator[Any]:
    """make(text, **kw) -> (LocalEngine, ScriptedLM) answering `text` to every prompt."""
    made: list[tuple[LocalEngine, ScriptedLM]] = []

    def make(text: str, *, max_queue: int = 8, stall_timeout_s: float = 30.0, **kw: Any) -> Any:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        model = ScriptedLM(len(tokenizer), ids, tokenizer.eos_token_id, **kw)
        engine = LocalEngine(
            model,
            tokenizer,
            make_chat_format("template", tokenizer),
            context_window=2048,
            max_queue=max_queue,
            stall_timeout_s=stall_timeout_s,
            adapter_name="scripted",
        )
        made.append((engine, model))
        return engine, model

    yield make
    for engine, model in made:
        model.gate.set()
        engine.close()


@pytest.fixture
def tiny_engine(tiny_model: Any, tokenizer: Any) -> Iterator[LocalEngine]:
    engine = LocalEngine(
        tiny_model,
        tokenizer,
        make_chat_format("template", tokenizer),
        context_window=1024,
        max_queue=4,
    )
    yield engine
    engine.close()
