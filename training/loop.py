"""The step loop: seed, step, record, evaluate and checkpoint on schedule, show progress.

Everything a step needs comes in a `Run` built by training/run.py; the loop itself owns
only the schedule. Stops on a non-finite loss before the optimizer step, so the newest
checkpoint is the last good state.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from training.batching import Plan, Row
from training.checkpoint import list_checkpoints, save_checkpoint
from training.examples import Example
from training.options import TrainOptions
from training.step import NonFiniteLoss, evaluate, train_step


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss); the message says what to do."""


@dataclass
class Run:
    options: TrainOptions
    out: Path
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    plan: Plan
    examples: list[Example]
    val_rows: list[Row]
    val_examples: list[Example]
    pad_id: int
    total_steps: int
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0  # over every process, this run and the ones it resumes
    train_seconds: float = 0.0
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)


def every(requested: int, total: int) -> int:
    """The schedule interval: as requested, or ten times over the run."""
    return requested or max(1, math.ceil(total / 10))


def step_seed(seed: int, rank: int, step: int) -> int:
    # Dropout draws depend on (seed, process, step) only: a resumed run and an
    # uninterrupted one draw the same masks, with no RNG state to gather or restore.
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**63)


def peak_memory_mib(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device) // 2**20)
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)  # KiB on Linux


def run_eval(run: Run) -> float:
    return evaluate(
        run.model,
        run.val_rows,
        run.val_examples,
        batch_size=run.options.batch_size,
        accelerator=run.accelerator,
        pad_id=run.pad_id,
    )


def checkpoint_state(run: Run) -> dict[str, Any]:
    return {
        **run.checkpoint_meta,
        "step": run.step,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "history": run.history,
        "tokens": run.tokens,
        "train_seconds": run.train_seconds,
    }


def save(run: Run) -> None:
    if run.is_main:
        model = run.accelerator.unwrap_model(run.model)
        save_checkpoint(
            run.out, run.step, model, checkpoint_state(run), run.options.keep_checkpoints
        )
    run.accelerator.wait_for_everyone()


def stopped_message(run: Run, exc: NonFiniteLoss) -> str:
    saved = list_checkpoints(run.out)
    if saved:
        where = (
            f"the last good checkpoint is {saved[-1]}; continue from it with a lower "
            f"learning rate: the same command with --resume --lr {run.options.lr / 10:g}"
        )
    else:
        where = f"no checkpoint was saved yet; start again with a lower --lr (e.g. {run.options.lr / 10:g})"
    return f"training stopped: {exc} (nothing was saved for this step); {where}"


def train_loop(run: Run) -> None:
    options, accelerator = run.options, run.accelerator
    eval_interval = every(options.eval_every, run.total_steps)
    save_interval = every(options.save_every, run.total_steps)
    if run.step == 0 and run.val_rows:
        run.history.append({"step": 0, "eval_loss": run_eval(run)})
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not run.is_main,
    )
    session_tokens, session_start = 0, time.perf_counter()
    try:
        while run.step < run.total_steps:
            torch.manual_seed(step_seed(options.seed, accelerator.process_index, run.step))
            started = time.perf_counter()
            try:
                result = train_step(
                    run.model,
                    run.optimizer,
                    run.scheduler,
                    run.plan.micro_batches(run.step, accelerator.process_index, options.batch_size),
                    run.examples,
                    step_targets=run.plan.step_targets(run.step, run.examples),
                    accelerator=accelerator,
                    pad_id=run.pad_id,
                    max_grad_norm=options.max_grad_norm,
                    step=run.step + 1,
                )
            except NonFiniteLoss as exc:
                raise TrainingStopped(stopped_message(run, exc)) from None
            run.step += 1
            run.train_seconds += time.perf_counter() - started
            step_tokens = result.tokens * accelerator.num_processes
            run.tokens += step_tokens
            session_tokens += step_tokens
            record: dict[str, Any] = {
                "step": run.step,
                "loss": result.loss,
                "lr": result.lr,
                "grad_norm": result.grad_norm,
                "tokens": run.tokens,
            }
            if run.val_rows and (run.step % eval_interval == 0 or run.step == run.total_steps):
                record["eval_loss"] = run_eval(run)
            run.history.append(record)
            rate = session_tokens / max(time.perf_counter() - session_start, 1e-9)
            bar.set_postfix(
                loss=f"{result.loss:.4f}",
                **({"eval": f"{record['eval_loss']:.4f}"} if "eval_loss" in record else {}),
                tok_s=f"{rate:,.0f}",
                refresh=False,
            )
            bar.update(1)
            if run.step % save_interval == 0 or run.step == run.total_steps:
                save(run)
    finally:
        bar.close()
