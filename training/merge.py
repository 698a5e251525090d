"""`python -m training merge`: base + adapter -> one model folder `[model] base` can load.

The adapter is merged the way the engine merges it at load (engine.loading.
attach_adapter), in float32, then saved in the base's own dtype with its tokenizer and
chat template.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from engine.config import ConfigError, ModelConfig
from engine.loading import attach_adapter, resolve_base
from training.checkpoint import ADAPTER_CONFIG
from training.report import METADATA_FILE

MERGE_FILE = "lorabot-merge.json"


def adapter_base(adapter: Path) -> tuple[str, str]:
    """([model] base the adapter was trained on, its chat format) from training.json,
    else peft's adapter_config.json."""
    metadata = adapter / METADATA_FILE
    if metadata.is_file():
        data = json.loads(metadata.read_text(encoding="utf-8"))
        return data["base"]["config"], data.get("chat_format", "auto")
    config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return str(config.get("base_model_name_or_path") or "embedded"), "auto"


def merge(adapter: Path, out: Path, *, base: str | None, cache_dir: str = "") -> Path:
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"--adapter {adapter}: no {ADAPTER_CONFIG} there (not a LoRA adapter)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty; choose a new folder")
    trained_base, chat_format = adapter_base(adapter)
    cfg = ModelConfig(base=base or trained_base, device="cpu", dtype="float32", cache_dir=cache_dir)
    hf_logging.set_verbosity_error()
    folder, name = resolve_base(cfg)
    stored_dtype = getattr(AutoConfig.from_pretrained(folder), "dtype", None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    merged, _ = attach_adapter(model, adapter, merge=True)
    if isinstance(stored_dtype, torch.dtype) and stored_dtype != torch.float32:
        merged = merged.to(stored_dtype)
    save_merged(merged, tokenizer, out)
    (out / MERGE_FILE).write_text(
        json.dumps(
            {
                "base": name,
                "base_folder": str(folder),
                "adapter": str(adapter),
                "chat_format": chat_format,
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    hint = f'[model] base = "{out}"'
    if chat_format == "alpaca":
        hint += ' and chat_format = "alpaca" (the adapter was trained on the Alpaca prompt)'
    print(f"merged model written to {out}; serve it with {hint}", file=sys.stderr)
    return out


def save_merged(model: Any, tokenizer: Any, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
