"""`python -m training train`: data in, adapter + metadata + curve + report out.

Single process, or one process per GPU under `accelerate launch` / `torchrun` (DDP):
every process builds the same examples and plan and takes its own share of each step;
only the main process writes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from engine.chat_format import ChatFormat, make_chat_format
from engine.config import ModelConfig
from engine.loading import pick_device
from training import fast
from training.batching import Plan, Row, pack_rows, single_rows
from training.checkpoint import (
    ADAPTER_FILE,
    CheckpointError,
    list_checkpoints,
    load_adapter_weights,
    load_state,
    save_adapter,
)
from training.corpus import (
    Corpus,
    data_hash,
    describe_problems,
    read_corpus,
    split_validation,
)
from training.examples import Example, ExampleStats, build_examples, to_messages
from training.loop import Run, peak_memory_mib, train_loop
from training.model import add_lora, load_base
from training.options import MAY_CHANGE_ON_RESUME, TrainOptions
from training.prepare import NothingToTrain, print_example_problems, require_conversations
from training.report import (
    answer_samples,
    sample_prompts,
    write_curve,
    write_metadata,
    write_report,
)

log = logging.getLogger(__name__)


def make_accelerator(model_cfg: ModelConfig) -> Any:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # Buffers (rotary tables) never change under LoRA; not broadcasting them keeps the
    # processes free of collectives in forward passes, whose count may differ.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    cpu = pick_device(model_cfg).type == "cpu"
    # dtype is [model] dtype / our choice (bf16 where supported), never accelerate's
    # autocast: fp16 autocast is what gave the seed recipe its NaNs.
    return Accelerator(mixed_precision="no", cpu=cpu, kwargs_handlers=[ddp])


def check_out_folder(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume, None for a fresh run; refuses to silently restart or
    to overwrite another run."""
    saved = list_checkpoints(out)
    if resume:
        if not saved:
            raise CheckpointError(
                f"--resume: no checkpoint in {out / 'checkpoints'} to resume from"
                + (" (the run ended before its first save)" if out.exists() else "")
            )
        return saved[-1]
    if saved or (out / ADAPTER_FILE).exists():
        raise CheckpointError(
            f"{out} already holds a training run; pass --resume to continue it, "
            "or choose another --out"
        )
    return None


def lr_schedule(total_steps: int, warmup_steps: int) -> Any:
    """Linear warm-up, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [
        f"{key}: checkpoint {saved.get(key)!r}, now {value!r}"
        for key, value in current.items()
        if key not in MAY_CHANGE_ON_RESUME and saved.get(key) != value
    ]


def resume_state(run: Run, folder: Path, model: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Load the checkpoint into the (not yet prepared) model and the run; returns the
    state, whose optimizer part `restore_optimizer` loads after `accelerator.prepare`."""
    state = load_state(folder)
    saved_options = dict(state.get("options", {}))
    current_options = dict(meta["options"])
    # Another number of processes is fine (a multi-GPU checkpoint on one GPU, or the
    # reverse) as long as each step holds the same rows: batch-size x processes.
    saved_rows = saved_options.pop("batch_size", 0) * int(state.get("world_size") or 1)
    current_rows = current_options.pop("batch_size", 0) * int(meta["world_size"])
    problems = mismatches(saved_options, current_options)
    problems += mismatches(
        {k: state.get(k) for k in ("data_sha256", "base_folder", "chat_format")},
        {k: meta[k] for k in ("data_sha256", "base_folder", "chat_format")},
    )
    if saved_rows != current_rows:
        problems.append(
            f"rows per step (batch-size x processes): checkpoint {saved_rows}, now "
            f"{current_rows}; with {meta['world_size']} process(es) use --batch-size "
            f"{saved_rows / int(meta['world_size']):g}"
        )
    if problems:
        raise CheckpointError(
            f"--resume: {folder} was made with other settings; resume with the same "
            "data and options (only --lr, --epochs, --max-steps and the schedules may "
            "change):\n  " + "\n  ".join(problems)
        )
    load_adapter_weights(model, folder)
    run.step = int(state["step"])
    run.history = list(state["history"])
    run.tokens = int(state["tokens"])
    run.train_seconds = float(state["train_seconds"])
    return state


def restore_optimizer(run: Run, state: dict[str, Any], factor: Any) -> None:
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    saved_lr = state["options"]["lr"]
    if saved_lr != run.options.lr:
        # A new --lr on resume (after a NaN, say): same schedule shape, new peak.
        run.scheduler.base_lrs = [run.options.lr for _ in run.optimizer.param_groups]
        for group in run.optimizer.param_groups:
            group["initial_lr"] = run.options.lr
            group["lr"] = run.options.lr * factor(run.scheduler.last_epoch)
    log.info("resumed at step %d of %d", run.step, run.total_steps)


def eos_ids(model: Any) -> tuple[int, ...]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def read_data(options: TrainOptions, main: bool) -> tuple[Corpus, list[Any], list[Any]]:
    """(corpus, training conversations, held-out conversations); problems printed."""
    corpus = read_corpus(options.data, options.format, options.persona, options.gap_minutes)
    if corpus.problems and main:
        print(f"{len(corpus.problems)} problem(s) in the input:", file=sys.stderr)
        describe_problems(corpus, sys.stderr)
    require_conversations(corpus, list(options.data))
    train_convs, val_convs = split_validation(
        corpus.conversations, options.val_fraction, options.seed
    )
    return corpus, train_convs, val_convs


def tokenize(
    options: TrainOptions, chat_format: ChatFormat, train_convs: list[Any], val_convs: list[Any]
) -> tuple[list[Example], list[Example], ExampleStats, ExampleStats]:
    examples, train_stats = build_examples(
        train_convs, chat_format, options.max_len, train_on_inputs=options.train_on_inputs
    )
    val_examples, val_stats = build_examples(
        val_convs, chat_format, options.max_len, train_on_inputs=options.train_on_inputs
    )
    if not examples:
        raise NothingToTrain(
            f"no training example fits: {dict(train_stats.skipped)} "
            "(see `python -m training prepare`)"
        )
    return examples, val_examples, train_stats, val_stats


def make_rows(options: TrainOptions, examples: list[Example]) -> list[Row]:
    return pack_rows(examples, options.max_len) if options.packing else single_rows(examples)


def make_optimizer(model: Any, options: TrainOptions, total_steps: int) -> tuple[Any, Any, Any]:
    """AdamW over the LoRA weights, its schedule, and the schedule's factor function."""
    warmup = options.warmup_steps if options.warmup_steps >= 0 else round(0.03 * total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
    factor = lr_schedule(total_steps, warmup)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), factor


def train(options: TrainOptions, model_cfg: ModelConfig) -> dict[str, Any]:
    """The whole run; returns the metadata written to training.json."""
    out = Path(options.out)
    resume_from = check_out_folder(out, options.resume)
    accelerator = make_accelerator(model_cfg)
    main = accelerator.is_main_process
    log.info("options: %s", options.as_dict())
    log.info("model: %s", dataclasses.asdict(model_cfg))
    corpus, train_convs, val_convs = read_data(options, main)

    base = load_base(model_cfg, accelerator.local_process_index)
    chat_format = make_chat_format(
        model_cfg.chat_format, base.tokenizer, extra_stop_ids=eos_ids(base.model)
    )
    examples, val_examples, train_stats, val_stats = tokenize(
        options, chat_format, train_convs, val_convs
    )
    if main:
        print_example_problems(train_stats.problems + val_stats.problems, sys.stderr)
    rows = make_rows(options, examples)
    world = accelerator.num_processes
    if len(rows) < world:
        raise NothingToTrain(f"{len(rows)} training rows cannot be shared by {world} processes")
    plan = Plan(tuple(rows), options.seed, options.batch_size * options.grad_accum * world, world)
    total_steps = options.max_steps or options.epochs * plan.steps_per_epoch

    # The adapter's initial weights come from --seed: the same run gives the same
    # adapter, whatever the number of processes (DDP then broadcasts rank 0's anyway).
    torch.manual_seed(options.seed)
    model = add_lora(
        base,
        rank=options.rank,
        alpha=options.alpha,
        dropout=options.dropout,
        target_modules=options.target_modules,
        gradient_checkpointing=options.gradient_checkpointing,
    )
    if options.fast_paths:
        fast.enable(model)
    optimizer, scheduler, factor = make_optimizer(model, options, total_steps)
    meta = {
        "options": options.as_dict(),
        "data_sha256": data_hash(corpus.conversations),
        "base_folder": base.folder,
        "chat_format": chat_format.name,
        "world_size": world,
    }
    run = Run(
        options=options,
        out=out,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        plan=plan,
        examples=examples,
        val_rows=make_rows(options, val_examples),
        val_examples=val_examples,
        pad_id=pad_id(base.tokenizer),
        total_steps=total_steps,
        checkpoint_meta=meta,
    )
    resumed = resume_state(run, resume_from, model, meta) if resume_from else None
    run.model, run.optimizer = accelerator.prepare(model, optimizer)
    if resumed is not None:
        restore_optimizer(run, resumed, factor)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if corpus.problems:
            write_problems(out, corpus)
        log.info(
            "%d training / %d held-out examples, %d rows, %d steps (%d per epoch)",
            len(examples), len(val_examples), len(rows), total_steps, plan.steps_per_epoch,
        )  # fmt: skip
    train_loop(run)
    metadata: dict[str, Any] = {}
    if main:
        metadata = build_metadata(run, base, model_cfg, chat_format, corpus, train_stats, val_stats)
        finish(run, chat_format, val_convs, metadata)
    accelerator.wait_for_everyone()
    return metadata


def finish(
    run: Run, chat_format: ChatFormat, val_convs: list[Any], metadata: dict[str, Any]
) -> None:
    """The adapter (checked), sample answers, training.json, loss.png and report.md."""
    plain = run.accelerator.unwrap_model(run.model)
    save_adapter(plain, run.out)
    if fast.paths_of(plain) is not None:
        fast.use_plain_attention(plain)  # generation builds its masks the usual way
    prompts = sample_prompts([to_messages(c) for c in val_convs], run.options.samples)
    samples = answer_samples(plain, chat_format, prompts, run.options.sample_tokens)
    write_metadata(run.out, metadata)
    write_curve(run.out, run.history)
    write_report(run.out, metadata, samples)
    print(
        f'adapter written to {run.out}; serve it with [model] adapter = "{run.out}"',
        file=sys.stderr,
    )


def pad_id(tokenizer: Any) -> int:
    """Any id will do (padding has no targets and its own attention block)."""
    candidate = tokenizer.pad_token_id
    if candidate is None:
        candidate = tokenizer.eos_token_id
    return int(candidate or 0)


def write_problems(out: Path, corpus: Any) -> None:
    lines = [f"{p.file} ({p.position}): {p.reason}" for p in corpus.problems]
    (out / "data-problems.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_metadata(
    run: Run,
    base: Any,
    model_cfg: ModelConfig,
    chat_format: ChatFormat,
    corpus: Any,
    train_stats: Any,
    val_stats: Any,
) -> dict[str, Any]:
    history = run.history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    template = getattr(base.tokenizer, "chat_template", None)
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "base": {
            "config": model_cfg.base,
            "name": base.name,
            "folder": base.folder,
            "dtype": str(base.dtype).removeprefix("torch."),
            "quantization": model_cfg.quantization,
        },
        "chat_format": chat_format.name,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "data": {
            "files": list(run.options.data),
            "format": run.options.format,
            "persona": run.options.persona,
            "sha256": run.checkpoint_meta["data_sha256"],
            "conversations": len(corpus.conversations),
            "problems": len(corpus.problems),
            "train_examples": train_stats.examples,
            "val_examples": val_stats.examples,
            "train_tokens": train_stats.as_dict(),
            "val_tokens": val_stats.as_dict(),
        },
        "options": run.options.as_dict(),
        "fast_paths": paths.as_dict() if (paths := fast.paths_of(run.model)) else None,
        "trainable_parameters": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
        "world_size": run.accelerator.num_processes,
        "metrics": {
            "steps": run.step,
            "epochs_run": run.step / run.plan.steps_per_epoch,
            "tokens": run.tokens,
            "train_seconds": round(run.train_seconds, 3),
            "tokens_per_second": run.tokens / max(run.train_seconds, 1e-9),
            "peak_memory_mib": peak_memory_mib(base.device),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "eval_loss_before": evals[0] if evals else None,
            "eval_loss": evals[-1] if evals else None,
        },
        "history": history,
        "launch": {k: os.environ[k] for k in ("WORLD_SIZE", "LOCAL_RANK") if k in os.environ},
    }
