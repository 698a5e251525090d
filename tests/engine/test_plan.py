"""A mixed step's plan (engine/plan.py): the rows, the flash call's sequences (the
prompt chunks only) and where the decode rows start, as the GPU reads them."""

from __future__ import annotations

import torch

from engine.plan import Pad, Plan

CHUNKS = [(3, [11, 12, 13], 0), (1, [21], 40)]  # a fresh prompt; one token after a prefix
DECODE = [(31, 0, 7), (32, 2, 99)]  # (token, slot, position)


def build(pad: Pad | None = None) -> Plan:
    return Plan.build(CHUNKS, DECODE, torch.device("cpu"), flash=True, slot_tokens=128, pad=pad)


def test_chunk_rows_come_first_then_decode_rows() -> None:
    plan = build()
    assert plan.tokens.tolist() == [11, 12, 13, 21, 31, 32]
    assert plan.positions.tolist() == [0, 1, 2, 40, 7, 99]
    assert plan.slots.tolist() == [3, 3, 3, 1, 0, 2]
    assert plan.outputs.tolist() == [2, 3, 4, 5]  # each chunk's last row, each decode row
    assert plan.decode_first.tolist() == [4] and plan.decode_capacity == 2
    flash = plan.flash
    assert flash is not None
    # Only the chunks are flash sequences; their keys start at their slot's first row.
    assert flash.cu_q.tolist() == [0, 3, 4]
    assert flash.cu_k.tolist()[:2] == [3 * 128, 1 * 128]
    assert flash.used.tolist() == [3, 41]
    assert flash.max_q == 3


def test_one_token_chunks_keep_flash_off_its_one_query_shortcut() -> None:
    plan = Plan.build([(0, [5], 9)], DECODE, torch.device("cpu"), flash=True, slot_tokens=64)
    assert plan.flash is not None and plan.flash.max_q == 2
    alone = Plan.build([], DECODE, torch.device("cpu"), flash=True, slot_tokens=64)
    assert alone.flash is not None and alone.flash.cu_q.tolist() == [0]  # no flash call
    assert alone.decode_first.tolist() == [0] and alone.decode_capacity == 2


def test_padded_plans_have_one_shape_whatever_their_rows() -> None:
    pad = Pad(rows=16, seqs=6, scratch_slot=7)
    plan, other = build(pad), Plan.build([(2, [1] * 9, 0)], [], torch.device("cpu"),
                                         flash=True, slot_tokens=128, pad=pad)  # fmt: skip
    assert plan.ids.shape == other.ids.shape  # a graph's inputs are rewritten in place
    assert plan.tokens.shape == (16,) and plan.slots[6:].tolist() == [7] * 10
    assert plan.decode_capacity == other.decode_capacity == 6  # the most rows there can be
    assert plan.decode_first.tolist() == [4] and other.decode_first.tolist() == [9]
    assert plan.flash is not None and plan.flash.cu_q.tolist() == [0, 3, 4, 4, 4, 4, 4]
    assert plan.flash.used.tolist() == [3, 41, 0, 0, 0, 0]
