"""Checkpoints and the adapter files: written whole or not at all, checked after writing.

A checkpoint is a folder `checkpoints/step-000120/` holding the adapter (peft's
safetensors + config) and `state.pt`: optimizer, scheduler, step (the data position:
batching.Plan maps a step to its rows), metrics so far and the options that shaped the
run. It is written to a temporary folder and renamed into place, so a crash mid-write
leaves the previous checkpoint as the latest. RNG needs no state: every step reseeds
from (seed, process, step).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STATE_FILE = "state.pt"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint or adapter is missing, incomplete or does not match the run."""


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / STATE_FILE).is_file() and (entry / ADAPTER_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def save_adapter(model: Any, folder: Path) -> None:
    """peft's save_pretrained, then a check that what is on disk is what is trained:
    every LoRA tensor present, non-empty and equal to the model's (the seed recipe could
    write a 443-byte adapter holding nothing)."""
    from peft import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    # peft's empty model-card template; report.md is the real one.
    (folder / "README.md").unlink(missing_ok=True)
    verify_adapter(folder, get_peft_model_state_dict(model))


def verify_adapter(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    path = folder / ADAPTER_FILE
    if not path.is_file() or not (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{folder}: {ADAPTER_FILE} or {ADAPTER_CONFIG} was not written")
    try:
        saved = load_file(str(path))
        json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"{folder}: the adapter just written cannot be read: {exc}") from None
    if not expected or not saved:
        raise CheckpointError(f"{path}: the adapter holds no LoRA weights")
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} LoRA tensors missing, e.g. {missing[0]}")
    for name, tensor in expected.items():
        if saved[name].shape != tensor.shape or not torch.equal(
            saved[name], tensor.detach().to("cpu", saved[name].dtype)
        ):
            raise CheckpointError(f"{path}: tensor {name} differs from the trained weights")


def load_adapter_weights(model: Any, folder: Path) -> None:
    from peft import set_peft_model_state_dict

    try:
        weights = load_file(str(folder / ADAPTER_FILE))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{folder / ADAPTER_FILE}: cannot be read: {exc}") from None
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(
            f"{folder}: the checkpoint's adapter does not fit this model "
            f"({len(unexpected)} unknown tensors, e.g. {unexpected[0]})"
        )


def save_checkpoint(out: Path, step: int, model: Any, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`."""
    target = checkpoint_dir(out, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save_adapter(model, tmp)
        torch.save(state, tmp / STATE_FILE)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_state(folder: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = torch.load(folder / STATE_FILE, weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{folder / STATE_FILE}: cannot be read: {exc}") from None
    return state
