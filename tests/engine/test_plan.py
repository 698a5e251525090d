"""A mixed step's plan (engine/plan.py): the rows, the chunk-attention kernel's varlen
sequences (the prompt chunks only) and where the decode rows start, as the GPU reads
them."""

from __future__ import annotations

import torch

from engine.plan import Pad, Plan

CHUNKS = [(3, [11, 12, 13], 0), (1, [21], 40)]  # a fresh prompt; one token after a prefix
DECODE = [(31, 0, 7), (32, 2, 99)]  # (token, slot, position)


def build(pad: Pad | None = None) -> Plan:
    return Plan.build(CHUNKS, DECODE, torch.device("cpu"), varlen=True, slot_tokens=128, pad=pad)


def test_chunk_rows_come_first_then_decode_rows() -> None:
    plan = build()
    assert plan.tokens.tolist() == [11, 12, 13, 21, 31, 32]
    assert plan.positions.tolist() == [0, 1, 2, 40, 7, 99]
    assert plan.slots.tolist() == [3, 3, 3, 1, 0, 2]
    assert plan.outputs.tolist() == [2, 3, 4, 5]  # each chunk's last row, each decode row
    assert plan.decode_first.tolist() == [4] and plan.decode_capacity == 2
    seqs = plan.varlen
    assert seqs is not None
    # Only the chunks are varlen sequences; their keys start at their slot's first row.
    assert seqs.cu_q.tolist() == [0, 3, 4]
    assert seqs.cu_k.tolist()[:2] == [3 * 128, 1 * 128]
    assert seqs.used.tolist() == [3, 41]


def test_a_step_without_chunks_has_no_varlen_sequences() -> None:
    alone = Plan.build([], DECODE, torch.device("cpu"), varlen=True, slot_tokens=64)
    assert alone.varlen is not None and alone.varlen.cu_q.tolist() == [0]  # no chunk call
    assert alone.decode_first.tolist() == [0] and alone.decode_capacity == 2


def test_padded_plans_have_one_shape_whatever_their_rows() -> None:
    pad = Pad(rows=16, seqs=6, scratch_slot=7)
    plan, other = build(pad), Plan.build([(2, [1] * 9, 0)], [], torch.device("cpu"),
                                         varlen=True, slot_tokens=128, pad=pad)  # fmt: skip
    assert plan.ids.shape == other.ids.shape  # a graph's inputs are rewritten in place
    assert plan.tokens.shape == (16,) and plan.slots[6:].tolist() == [7] * 10
    assert plan.decode_capacity == other.decode_capacity == 6  # the most rows there can be
    assert plan.decode_first.tolist() == [4] and other.decode_first.tolist() == [9]
    assert plan.varlen is not None and plan.varlen.cu_q.tolist() == [0, 3, 4, 4, 4, 4, 4]
    assert plan.varlen.used.tolist() == [3, 41, 0, 0, 0, 0]


def test_index_lists_reach_the_device_as_torch_tensor_would_make_them() -> None:
    """upload's fast path for int lists (the array module) gives torch.tensor's result:
    every value, the dtype, an empty list, values past 2**31 in int64."""
    from engine.sampling_batch import upload

    cases: list[tuple[list[int], torch.dtype]] = [
        ([], torch.int32),
        ([7], torch.int32),
        (list(range(-5, 4000)), torch.int32),
        ([2**31 + 5, -(2**40), 3], torch.int64),
    ]
    for values, dtype in cases:
        got = upload(values, torch.device("cpu"), dtype)
        assert got.dtype == dtype and got.tolist() == values
    plan = Plan.build(
        [(5, list(range(1000, 1700)), 0)], DECODE, torch.device("cpu"), varlen=True, slot_tokens=128
    )
    assert plan.tokens.tolist() == list(range(1000, 1700)) + [31, 32]
