"""One optimizer step over its micro-batches, and the held-out loss.

The loss is the mean over every trained token of the whole step (all micro-batches,
all processes), not a mean of per-batch means: a short reply weighs what its tokens
weigh. A non-finite loss or gradient stops the run before the optimizer touches the
weights, so the last checkpoint stays the last good state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from training import fast
from training.batching import IGNORE, Batch, Row, collate
from training.examples import Example


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients became NaN/inf."""


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the step's trained tokens, all processes
    grad_norm: float
    tokens: int  # tokens this process ran through the model
    lr: float


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each position predicting the next token's label.
    logits (B, T, V), labels (B, T) -> scalar."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE,
        reduction="sum",
    )


def forward_loss(model: Any, batch: Batch) -> torch.Tensor:
    # No attention mask: position ids carry the example boundaries (batching.py), and
    # with the fast paths (training/fast.py) so do the bounds.
    paths = fast.paths_of(model)
    kwargs: dict[str, Any] = {}
    if paths is not None and paths.packed_attention:
        kwargs = {
            "lorabot_cu_seqlens": batch.cu_seqlens,
            "lorabot_max_seqlen": batch.max_seqlen,
            "lorabot_bounds": batch.bounds,
        }
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, **kwargs}
    if paths is not None and paths.head_loss:
        with fast.hidden_out(model) as head_weight:
            hidden = model(**inputs, use_cache=False).logits
        return fast.head_loss_sum(hidden, head_weight, batch.loss_positions, batch.loss_targets)
    out = model(**inputs, use_cache=False)
    return token_loss_sum(out.logits, batch.labels)


def train_step(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    micro_batches: Sequence[Sequence[Row]],
    examples: Sequence[Example],
    *,
    step_targets: int,
    accelerator: Any,
    pad_id: int,
    max_grad_norm: float,
    step: int,
) -> StepResult:
    """Forward/backward each micro-batch (gradients synchronised once, on the last), then
    clip and step. Raises NonFiniteLoss without stepping."""
    model.train()
    world = accelerator.num_processes
    local_sum = torch.zeros((), device=accelerator.device)
    tokens = 0
    for index, rows in enumerate(micro_batches):
        batch = collate(rows, examples, pad_id).to(accelerator.device)
        tokens += batch.tokens
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync:
            loss_sum = forward_loss(model, batch)
            # DDP averages gradients over processes; scaling by `world` makes the
            # result the gradient of the step's token mean.
            accelerator.backward(loss_sum * (world / max(step_targets, 1)))
        local_sum += loss_sum.detach()
    total = accelerator.reduce(local_sum, reduction="sum") if world > 1 else local_sum
    loss = float(total) / max(step_targets, 1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm))
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        value = loss if not math.isfinite(loss) else grad_norm
        raise NonFiniteLoss(f"the {what} became {value} at step {step}")
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss, grad_norm=grad_norm, tokens=tokens, lr=lr)


@torch.no_grad()
def evaluate(
    model: Any,
    rows: Sequence[Row],
    examples: Sequence[Example],
    *,
    batch_size: int,
    accelerator: Any,
    pad_id: int,
) -> float:
    """Mean loss per trained token of the held-out rows (shared over the processes)."""
    if not rows:
        return float("nan")
    # The unwrapped model: DDP's forward would wait for the other processes, whose
    # shares may hold a different number of batches.
    plain = accelerator.unwrap_model(model)
    was_training = plain.training
    plain.eval()
    mine = sorted(
        rows[accelerator.process_index :: accelerator.num_processes], key=lambda r: -r.length
    )
    sums = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for start in range(0, len(mine), batch_size):
        batch = collate(mine[start : start + batch_size], examples, pad_id).to(accelerator.device)
        sums[0] += forward_loss(plain, batch).double()
        sums[1] += batch.targets
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    plain.train(was_training)
    return float(sums[0] / sums[1].clamp(min=1))
