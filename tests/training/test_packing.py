"""Packing: examples sharing a row never see each other; rows and steps are planned
deterministically."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from engine.chat_format import make_chat_format
from training.batching import Plan, collate, pack_rows, single_rows
from training.data import Conversation, Turn
from training.examples import build_examples
from training.step import token_loss_sum


def make_examples(tokenizer: Any, count: int) -> list[Any]:
    fmt = make_chat_format("template", tokenizer)
    conversations = [
        Conversation(
            (Turn("user", f"question {i} " + "x " * (i * 3)), Turn("assistant", f"answer {i}")),
            f"t:line {i}",
        )
        for i in range(count)
    ]
    examples, _ = build_examples(conversations, fmt, max_len=512)
    return examples


@pytest.fixture(params=["sdpa", "eager"])
def model(request: pytest.FixtureRequest, tiny_model: Any) -> Any:
    clone = copy.deepcopy(tiny_model)
    clone.set_attn_implementation(request.param)
    return clone.eval()


@torch.no_grad()
def test_packed_logits_equal_each_example_alone(model: Any, tokenizer: Any) -> None:
    examples = make_examples(tokenizer, 3)
    (row,) = pack_rows(examples, max_len=sum(len(e) for e in examples))
    assert len(row.examples) == 3
    batch = collate([row], examples, pad_id=0)
    # use_cache=False, as in training: with a cache transformers reads no boundaries.
    packed = model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
    ).logits[0]
    at = 0
    for index in row.examples:
        alone = model(input_ids=examples[index].input_ids.long()[None]).logits[0]
        size = len(examples[index])
        torch.testing.assert_close(packed[at : at + size], alone, rtol=1e-4, atol=1e-4)
        at += size
    # Without the position-id restarts the second example would attend to the first:
    plain = model(input_ids=batch.input_ids, use_cache=False).logits[0]
    second = row.examples[1]
    start = len(examples[row.examples[0]])
    alone = model(input_ids=examples[second].input_ids.long()[None]).logits[0]
    assert not torch.allclose(plain[start : start + len(examples[second])], alone, atol=1e-3)


@torch.no_grad()
def test_padding_changes_nothing_and_packed_loss_is_the_sum(model: Any, tokenizer: Any) -> None:
    examples = make_examples(tokenizer, 4)
    rows = single_rows(examples)
    padded = collate(rows, examples, pad_id=0)  # rows of different lengths: padded
    separate = sum(
        token_loss_sum(
            model(input_ids=collate([r], examples, 0).input_ids).logits,
            collate([r], examples, 0).labels,
        )
        for r in rows
    )
    batched = token_loss_sum(
        model(input_ids=padded.input_ids, position_ids=padded.position_ids, use_cache=False).logits,
        padded.labels,
    )
    packed_batch = collate(pack_rows(examples, 10_000), examples, pad_id=0)
    packed = token_loss_sum(
        model(
            input_ids=packed_batch.input_ids,
            position_ids=packed_batch.position_ids,
            use_cache=False,
        ).logits,
        packed_batch.labels,
    )
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-3)
    assert padded.targets == packed_batch.targets == sum(int(e.trained.sum()) for e in examples)


def test_pack_rows_places_every_example_once_within_max_len(tokenizer: Any) -> None:
    examples = make_examples(tokenizer, 30)
    rows = pack_rows(examples, max_len=400)
    placed = sorted(i for row in rows for i in row.examples)
    assert placed == list(range(30))
    assert all(row.length <= 400 for row in rows)
    assert all(row.length == sum(len(examples[i]) for i in row.examples) for row in rows)
    total = sum(len(e) for e in examples)
    assert len(rows) == -(-total // 400)  # as few rows as the tokens need
    assert pack_rows(examples, max_len=400) == rows  # deterministic


def test_plan_covers_every_row_once_per_epoch_split_over_processes(tokenizer: Any) -> None:
    examples = make_examples(tokenizer, 11)
    rows = tuple(single_rows(examples))
    plan = Plan(rows, seed=3, rows_per_step=4, world_size=2)
    # 11 rows over 2 processes: 10 usable a epoch, in 3 steps of 4, 4 and 2 rows.
    assert plan.steps_per_epoch == 3
    for epoch in (0, 1):
        seen = [r for s in range(3) for r in plan.step_rows(epoch * 3 + s)]
        assert len(seen) == len(set(seen)) == 10
    assert plan.step_rows(0) != plan.step_rows(3)  # a new order each epoch
    for step in range(6):
        shares = [plan.micro_batches(step, rank, batch_size=1) for rank in (0, 1)]
        assert all(shares)  # every process works in every step
        mine = {rows.index(r) for share in shares for batch in share for r in batch}
        assert mine == set(plan.step_rows(step))
        collated = sum(collate(b, examples, 0).targets for s in shares for b in s)
        assert plan.step_targets(step, examples) == collated
    assert Plan(rows, seed=3, rows_per_step=4, world_size=2).step_rows(4) == plan.step_rows(4)
