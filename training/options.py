"""The training run's options: one frozen dataclass, checked at once, every problem listed.

Defaults follow the seed recipe (tloen/alpaca-lora: lr 3e-4, r 8, alpha 16, dropout
0.05, 3 epochs) except the targets: all linear layers, which is what modern trainers
(QLoRA, LLaMA-Factory, axolotl) use and what fits best per parameter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import (
    ConfigError,
    ModelConfig,
    parse_sections,
    read_toml,
    with_resolved_paths,
)

# Options that may differ when a run is resumed; every other one must match. (Moved
# data files are fine: the data's hash is checked instead.)
MAY_CHANGE_ON_RESUME = frozenset(
    {
        "data",
        "out",
        "resume",
        "lr",
        "epochs",
        "max_steps",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "samples",
        "sample_tokens",
        "fast_paths",  # the same function computed faster (training/fast.py)
    }
)


@dataclass(frozen=True)
class TrainOptions:
    data: tuple[str, ...]
    out: str
    format: str | None = None
    persona: str | None = None
    gap_minutes: float = 60.0
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)
    epochs: int = 3
    max_steps: int = 0  # > 0 overrides epochs
    lr: float = 3e-4
    warmup_steps: int = -1  # -1: 3% of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 4
    grad_accum: int = 4
    max_len: int = 1024
    val_fraction: float = 0.05
    eval_every: int = 0  # 0: ten times over the run
    save_every: int = 0  # 0: ten times over the run
    keep_checkpoints: int = 2
    seed: int = 42
    packing: bool = False
    gradient_checkpointing: bool = False
    fast_paths: bool = True  # training/fast.py; False: plain transformers/peft
    train_on_inputs: bool = False
    resume: bool = False
    samples: int = 3  # held-out prompts answered before/after in the report
    sample_tokens: int = 64

    def __post_init__(self) -> None:
        checks = [
            ("data", bool(self.data), "at least one file"),
            ("out", bool(self.out), "a folder"),
            ("rank", self.rank >= 1, ">= 1"),
            ("alpha", self.alpha > 0, "> 0"),
            ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
            ("target_modules", bool(self.target_modules), "'all-linear' or module names"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("max_steps", self.max_steps >= 0, ">= 0 (0 = use --epochs)"),
            ("lr", 0.0 < self.lr < 1.0, "in (0, 1)"),
            ("warmup_steps", self.warmup_steps >= -1, ">= 0 (or -1 for 3% of the steps)"),
            ("weight_decay", self.weight_decay >= 0.0, ">= 0"),
            ("max_grad_norm", self.max_grad_norm > 0.0, "> 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("max_len", self.max_len >= 16, ">= 16"),
            ("val_fraction", 0.0 <= self.val_fraction < 1.0, "in [0, 1)"),
            ("eval_every", self.eval_every >= 0, ">= 0 (0 = ten times per run)"),
            ("save_every", self.save_every >= 0, ">= 0 (0 = ten times per run)"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
            ("samples", self.samples >= 0, ">= 0"),
            ("sample_tokens", self.sample_tokens >= 1, ">= 1"),
            ("gap_minutes", self.gap_minutes >= 0, ">= 0"),
        ]
        problems = [
            f"--{name.replace('_', '-')} {getattr(self, name)!r}: must be {allowed}"
            for name, ok, allowed in checks
            if not ok
        ]
        if problems:
            raise ConfigError("\n".join(problems))

    def as_dict(self) -> dict[str, Any]:
        return {
            key: list(v) if isinstance(v, tuple) else v
            for key, v in dataclasses.asdict(self).items()
        }


def parse_target_modules(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if "all-linear" in names and len(names) > 1:
        raise ConfigError("--target-modules: 'all-linear' cannot be combined with names")
    return names


def model_config(config_file: Path | None, overrides: dict[str, Any]) -> ModelConfig:
    """[model] of the bot's TOML (other sections ignored; relative paths are relative
    to the file, as the bot reads them), then the command line's non-None overrides."""
    model = ModelConfig()
    if config_file is not None:
        data, folder = read_toml(config_file)
        model = parse_sections(data, {"model": ModelConfig}, allow_other_sections=True)["model"]
        # A run trains a fresh adapter on the base.
        model = dataclasses.replace(with_resolved_paths(model, folder), adapter="")
    given = {key: value for key, value in overrides.items() if value is not None}
    return dataclasses.replace(model, **given)
