"""The base model with a fresh LoRA on it, loaded the way the engine loads it.

Base resolution (embedded GGUF, HF folder, .gguf), device, dtype and the bitsandbytes
config come from engine.loading, so the weights trained against are the weights served.
Differences from serving: the process's own GPU under several processes, float32
instead of float16 (float16 overflows in training; the seed recipe's NaNs), LoRA
weights kept in float32 whatever the base's dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from engine.config import ConfigError, ModelConfig
from engine.loading import pick_device, pick_dtype, quantization_config, resolve_base

log = logging.getLogger(__name__)


@dataclass
class BaseModel:
    model: Any
    tokenizer: Any
    name: str  # display name (folder or embedded model)
    folder: str  # the Hugging Face folder the weights came from
    device: torch.device
    dtype: torch.dtype


def load_tokenizer(cfg: ModelConfig) -> tuple[Any, str, str]:
    """(tokenizer, display name, folder) without loading the weights (for `prepare`)."""
    hf_logging.set_verbosity_error()
    folder, name = resolve_base(cfg)
    return AutoTokenizer.from_pretrained(folder), name, str(folder)


def training_device(cfg: ModelConfig, local_rank: int) -> torch.device:
    device = pick_device(cfg)
    if device.type == "cuda":
        return torch.device("cuda", local_rank)
    return device


def training_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    dtype = pick_dtype(cfg, device)
    if dtype == torch.float16 and cfg.dtype == "auto":
        log.warning("this GPU has no bfloat16: training the base in float32 (float16 overflows)")
        return torch.float32
    return dtype


def load_base(cfg: ModelConfig, local_rank: int = 0) -> BaseModel:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = training_device(cfg, local_rank)
    dtype = training_dtype(cfg, device)
    quant = quantization_config(cfg, device, dtype)
    folder, name = resolve_base(cfg)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if quant is None:
        model.to(device)  # type: ignore[arg-type]  # transformers' stub wraps `to`
    return BaseModel(model, tokenizer, name, str(folder), device, dtype)


def enable_checkpointing(model: Any) -> None:
    """Recompute activations in backward (non-reentrant: works under DDP and with
    frozen inputs). transformers 5.2x renamed the method; older ones have the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def add_lora(
    base: BaseModel,
    *,
    rank: int,
    alpha: int,
    dropout: float,
    target_modules: tuple[str, ...],
    gradient_checkpointing: bool,
) -> Any:
    """A peft model whose only trainable weights are the LoRA matrices (float32).

    A quantized base is not put through peft's prepare_model_for_kbit_training: it
    casts the norms, embeddings and head to float32, which makes every activation
    float32 (twice the memory, no bfloat16 matmuls). Like LLaMA-Factory, the base keeps
    its dtype; the adapter alone is float32."""
    from peft import LoraConfig, get_peft_model

    model = base.model
    model.config.use_cache = False
    if gradient_checkpointing:
        enable_checkpointing(model)
    targets: str | list[str] = (
        "all-linear" if target_modules == ("all-linear",) else list(target_modules)
    )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        # e.g. a --target-modules name this architecture does not have.
        raise ConfigError(f"cannot add LoRA to {base.name}: {exc}") from None
    for parameter in peft_model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return peft_model
