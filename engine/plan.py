"""The layout of one mixed step's rows (engine/llama.LlamaRunner.run_plan): prompt
chunks first, then decode rows; their tokens, positions and slots, the rows whose
logits are returned, and the sequence layout of the step's varlen flash call, uploaded
in one host-to-device copy. Padded to fixed sizes, a plan is what a CUDA graph of the
step replays with new contents (engine/decode_graphs.MixedGraphs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sampling_batch import upload


@dataclass
class FlashPlan:
    """Every row's sequence for one varlen flash call that reads the keys in place from
    the slot cache: the prompt chunks, then each decode row as a sequence of one query.
    Sequence i's queries are rows cu_q[i]:cu_q[i+1]; its keys are the first used[i]
    positions of its slot, which starts at row cu_k[i] = slot * slot_tokens of the
    flattened cache (given used, flash attention reads only cu_k[i], so the offsets
    need not grow). Padded sequences are empty."""

    cu_q: torch.Tensor  # (C + 1,) int32
    cu_k: torch.Tensor  # (C + 1,) int32; the last is never read
    used: torch.Tensor  # (C,) int32
    max_q: int


@dataclass(frozen=True)
class Pad:
    """Fixed sizes for a plan (a CUDA graph replays one shape): `rows` rows (extra rows
    write their KV to the scratch slot and are never read; the longest chunk counts as
    `rows` long), and `seqs` sequences and returned rows."""

    rows: int
    seqs: int
    scratch_slot: int


@dataclass
class Plan:
    """The rows of one forward: prompt chunks first, then decode rows."""

    ids: torch.Tensor  # every index below, packed in one int32 device tensor
    tokens: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    slots: torch.Tensor  # (N,)
    outputs: torch.Tensor  # (C + B,) the rows whose logits are returned
    chunks: list[tuple[int, int, int]]  # (slot, length, start) of each prompt chunk
    chunk_rows: list[int]  # the first row of each chunk
    prefill_rows: int
    decode_rows: int
    flash: FlashPlan | None

    @classmethod
    def build(
        cls,
        chunks: list[tuple[int, list[int], int]],
        decode: Sequence[tuple[int, int, int]],
        device: torch.device,
        *,
        flash: bool,
        slot_tokens: int,
        pad: Pad | None = None,
    ) -> Plan:
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        outputs: list[int] = []
        layout, firsts = [], []
        cu_q, cu_k, used = [0], [], []
        for slot, ids, start in chunks:
            firsts.append(len(tokens))
            layout.append((slot, len(ids), start))
            stop = start + len(ids)
            tokens += ids
            positions += range(start, stop)
            slots += [slot] * len(ids)
            outputs.append(len(tokens) - 1)
            cu_q.append(len(tokens))
            cu_k.append(slot * slot_tokens)
            used.append(stop)
        prefill_rows = len(tokens)
        for token, slot, position in decode:
            outputs.append(len(tokens))
            tokens.append(token)
            positions.append(position)
            slots.append(slot)
            cu_q.append(len(tokens))
            cu_k.append(slot * slot_tokens)
            used.append(position + 1)
        max_q = max((length for _, length, _ in layout), default=1)
        if pad is not None:
            assert len(tokens) <= pad.rows and len(outputs) <= pad.seqs, (len(tokens), pad)
            extra = pad.rows - len(tokens)
            tokens, positions = tokens + [0] * extra, positions + [0] * extra
            slots += [pad.scratch_slot] * extra
            outputs += [0] * (pad.seqs - len(outputs))
            cu_q += [cu_q[-1]] * (pad.seqs + 1 - len(cu_q))
            used += [0] * (pad.seqs - len(used))
            max_q = pad.rows
        cu_k += [0] * (len(cu_q) - len(cu_k))
        # One host-to-device copy for all the step's indices.
        sizes = [len(tokens)] * 3 + [len(outputs)]
        if flash:
            sizes += [len(cu_q), len(cu_k), len(used)]
            values = tokens + positions + slots + outputs + cu_q + cu_k + used
        else:
            values = tokens + positions + slots + outputs
        packed = upload(values, device, torch.int32)
        views = packed.split(sizes)
        return cls(
            ids=packed,
            tokens=views[0],
            positions=views[1],
            slots=views[2],
            outputs=views[3],
            chunks=layout,
            chunk_rows=firsts,
            prefill_rows=prefill_rows,
            decode_rows=len(decode),
            flash=FlashPlan(views[4], views[5], views[6], max_q) if flash else None,
        )
