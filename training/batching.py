"""Rows, packing and collation: examples -> the tensors one forward pass takes.

A row holds one example, or with packing several short ones end to end. Each example
restarts its position ids at 0; transformers reads the restarts as sequence boundaries
and builds a block-diagonal causal mask, so no token attends to another example
(tests/training/test_packing.py checks the logits equal those of each example alone).
Padding is one more "example" at the end of a row with no targets, so no attention
mask is needed at all.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from training.examples import Example

IGNORE = -100  # label of positions without a target (F.cross_entropy's ignore_index)


@dataclass(frozen=True)
class Row:
    examples: tuple[int, ...]  # indices into the example list
    length: int  # tokens


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, IGNORE where nothing is trained
    position_ids: torch.Tensor  # (B, T) int64, restarting at 0 for each example
    tokens: int  # real (non-padding) tokens
    # Where each example (and each row's padding) starts in the flattened (B*T) batch,
    # and where the last ends: the variable-length attention's boundaries.
    bounds: tuple[int, ...]
    cu_seqlens: torch.Tensor  # bounds as an int32 tensor
    # Flat (B*T) indices of the positions that predict a trained token, and those
    # tokens: computed here so the GPU never waits for the host to find them.
    loss_positions: torch.Tensor
    loss_targets: torch.Tensor

    @property
    def targets(self) -> int:
        """Positions the loss is taken over."""
        return int(self.loss_targets.numel())

    @property
    def max_seqlen(self) -> int:
        return max((b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False)), default=0)

    def to(self, device: torch.device) -> Batch:
        """On a GPU the copies are asynchronous (from pinned memory): the host goes on
        queueing work instead of waiting for the GPU to drain."""

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda":
                return tensor.pin_memory().to(device, non_blocking=True)
            return tensor.to(device)

        return Batch(
            move(self.input_ids),
            move(self.labels),
            move(self.position_ids),
            self.tokens,
            self.bounds,
            move(self.cu_seqlens),
            move(self.loss_positions),
            move(self.loss_targets),
        )


def single_rows(examples: Sequence[Example]) -> list[Row]:
    return [Row((index,), len(example)) for index, example in enumerate(examples)]


def pack_rows(examples: Sequence[Example], max_len: int) -> list[Row]:
    """Best-fit decreasing: longest examples first, each into the fullest row that still
    has room for it. Deterministic; O(n log n) lookups."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    contents: list[list[int]] = []
    lengths: list[int] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for index in order:
        size = len(examples[index])
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
            contents[row].append(index)
            lengths[row] += size
            if room - size > 0:
                bisect.insort(free, (room - size, row))
        else:
            contents.append([index])
            lengths.append(size)
            if max_len - size > 0:
                bisect.insort(free, (max_len - size, len(contents) - 1))
    return [Row(tuple(content), length) for content, length in zip(contents, lengths, strict=True)]


def collate(rows: Sequence[Row], examples: Sequence[Example], pad_id: int) -> Batch:
    width = max(row.length for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    bounds = [0]
    for r, row in enumerate(rows):
        at = 0
        for index in row.examples:
            example = examples[index]
            size = len(example)
            bounds.append(r * width + at + size)
            ids = example.input_ids.long()
            input_ids[r, at : at + size] = ids
            labels[r, at : at + size] = torch.where(example.trained, ids, IGNORE)
            position_ids[r, at : at + size] = torch.arange(size)
            at += size
        # Padding counts from 0 again: a block of its own that nothing attends to.
        position_ids[r, at:] = torch.arange(width - at)
        if at < width:
            bounds.append((r + 1) * width)
    positions, targets = loss_targets(labels)
    return Batch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        tokens=sum(row.length for row in rows),
        bounds=tuple(bounds),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        loss_positions=positions,
        loss_targets=targets,
    )


def loss_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, T) -> (flat indices p into B*T whose next label is trained, those
    labels): position p is where the model predicts token p + 1."""
    following = labels[:, 1:]
    rows, cols = (following != IGNORE).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, following[rows, cols]


@dataclass(frozen=True)
class Plan:
    """Which rows each optimizer step takes: a pure function of (seed, step), so a
    resumed run continues with exactly the rows an uninterrupted one would."""

    rows: tuple[Row, ...]
    seed: int
    rows_per_step: int  # batch_size x grad_accum x world_size
    world_size: int

    @property
    def steps_per_epoch(self) -> int:
        # Under several processes every one must get a row in every step: leave out the
        # last few rows of an epoch that cannot be shared (different ones each epoch).
        usable = len(self.rows) - len(self.rows) % self.world_size
        return max(1, -(-usable // self.rows_per_step))

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=generator).tolist()

    def step_rows(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        usable = len(order) - len(order) % self.world_size
        return order[: max(usable, 1)][
            index * self.rows_per_step : (index + 1) * self.rows_per_step
        ]

    def micro_batches(self, step: int, rank: int, batch_size: int) -> list[list[Row]]:
        """This process's share of a step, in micro-batches of similar lengths (less
        padding)."""
        mine = sorted(
            self.step_rows(step)[rank :: self.world_size], key=lambda i: -self.rows[i].length
        )
        return [
            [self.rows[i] for i in mine[start : start + batch_size]]
            for start in range(0, len(mine), batch_size)
        ]

    def step_targets(self, step: int, examples: Sequence[Example]) -> int:
        """Loss positions of the whole step, over every process (the loss divisor)."""
        # An example's first token is never trained (make_example), so this equals the
        # count over the collated labels that the shifted loss sees.
        return sum(
            int(examples[e].trained.sum())
            for index in self.step_rows(step)
            for e in self.rows[index].examples
        )
