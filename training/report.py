"""What a finished run leaves next to its adapter: training.json (metadata), loss.png and
report.md with sample answers to held-out prompts before and after training."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.chat_format import ChatFormat
from engine.types import ChatMessage
from training.png import loss_chart

METADATA_FILE = "training.json"
REPORT_FILE = "report.md"
CURVE_FILE = "loss.png"


@dataclass(frozen=True)
class Sample:
    prompt: list[ChatMessage]
    expected: str
    before: str
    after: str


def sample_prompts(
    conversations: list[list[ChatMessage]], count: int
) -> list[tuple[list[ChatMessage], str]]:
    """(messages up to the last reply, that reply) of the first `count` conversations."""
    prompts = []
    for messages in conversations[:count]:
        last = max(i for i, m in enumerate(messages) if m.role == "assistant")
        prompts.append((messages[:last], messages[last].content))
    return prompts


@torch.no_grad()
def greedy_answer(
    model: Any, chat_format: ChatFormat, prompt: list[ChatMessage], max_new_tokens: int
) -> str:
    """The reply the served model would give at temperature 0 (same prompt encoding)."""
    device = next(model.parameters()).device
    ids = torch.tensor([chat_format.encode(prompt)], device=device)
    tokenizer = chat_format.tokenizer
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(chat_format.stop_token_ids),
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    )
    new = [t for t in out[0, ids.shape[1] :].tolist() if t not in chat_format.stop_token_ids]
    text: str = tokenizer.decode(new, skip_special_tokens=True)
    for stop in chat_format.stop_strings:
        text = text.split(stop, 1)[0]
    return text.strip()


def answer_samples(
    model: Any,
    chat_format: ChatFormat,
    prompts: list[tuple[list[ChatMessage], str]],
    max_new_tokens: int,
) -> list[Sample]:
    """Each prompt answered by the base (adapter disabled) and by the trained adapter."""
    was_training = model.training
    model.eval()
    samples = []
    for prompt, expected in prompts:
        with model.disable_adapter():
            before = greedy_answer(model, chat_format, prompt, max_new_tokens)
        after = greedy_answer(model, chat_format, prompt, max_new_tokens)
        samples.append(Sample(prompt, expected, before, after))
    model.train(was_training)
    return samples


def write_metadata(out: Path, metadata: dict[str, Any]) -> None:
    metadata = {
        **metadata,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            **_package_versions(("transformers", "peft", "accelerate")),
        },
    }
    (out / METADATA_FILE).write_text(
        json.dumps(metadata, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )


def _package_versions(names: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def write_curve(out: Path, history: list[dict[str, Any]]) -> None:
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    loss_chart(out / CURVE_FILE, train, evals)


def write_report(out: Path, metadata: dict[str, Any], samples: list[Sample]) -> None:
    metrics, data, options = metadata["metrics"], metadata["data"], metadata["options"]
    lines = [
        f"# LoRA adapter for {metadata['base']['name']}",
        "",
        f"- chat format: `{metadata['chat_format']}` (serve with `[model] chat_format = "
        f'"{metadata["chat_format"]}"` or `"auto"` when the base has that template)',
        f"- data: {data['train_examples']} training / {data['val_examples']} held-out examples "
        f"from {len(data['files'])} file(s), sha256 `{data['sha256'][:16]}`",
        f"- LoRA: r {options['rank']}, alpha {options['alpha']}, dropout {options['dropout']}, "
        f"targets {', '.join(options['target_modules'])}; "
        f"{metadata['trainable_parameters']:,} trainable parameters",
        f"- steps: {metrics['steps']} ({metrics['epochs_run']:.2f} epochs), lr {options['lr']}, "
        f"{metrics['tokens']:,} tokens at {metrics['tokens_per_second']:,.0f} tokens/s, "
        f"peak memory {metrics['peak_memory_mib']:,} MiB",
        f"- train loss: {_fmt(metrics['first_loss'])} -> {_fmt(metrics['final_loss'])}; "
        f"held-out loss: {_fmt(metrics['eval_loss_before'])} -> {_fmt(metrics['eval_loss'])}",
        "",
        f"![loss]({CURVE_FILE})",
        "",
        'Serve it: `[model] adapter = "<this folder>"` in the bot\'s config.',
        "",
    ]
    if samples:
        lines += ["## Held-out prompts, before and after", ""]
        for number, sample in enumerate(samples, start=1):
            question = sample.prompt[-1].content if sample.prompt else ""
            lines += [
                f"### {number}. {_quote(question)}",
                "",
                f"- expected: {_quote(sample.expected)}",
                f"- before: {_quote(sample.before)}",
                f"- after: {_quote(sample.after)}",
                "",
            ]
    (out / REPORT_FILE).write_text("\n".join(lines), encoding="utf-8")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def _quote(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return (flat[:limit] + "…" if len(flat) > limit else flat) or "(empty)"
