"""The layout of one mixed step's rows (engine/llama.LlamaRunner.run_plan): prompt
chunks first, then decode rows; their tokens, positions and slots, the rows whose
logits are returned, the chunks as varlen sequences (for the chunk-attention kernel)
and where its decode rows start (for the decode-attention kernel), uploaded in one
host-to-device copy. Padded to fixed sizes, a plan is what a CUDA graph of the
step replays with new contents (engine/decode_graphs.MixedGraphs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sampling_batch import upload


@dataclass
class VarlenPlan:
    """The prompt chunks as the varlen sequences of the chunk-attention kernel
    (engine/chunk_triton.py), which reads the keys in place from the slot cache (the
    decode rows after them take the decode-attention kernel). Sequence i's queries are
    rows cu_q[i]:cu_q[i+1]; its keys are the first used[i] positions of its slot, which
    starts at row cu_k[i] = slot * slot_tokens of the flattened cache (the layout of
    flash attention's varlen call with seqused_k: only cu_k[i] is read, so the offsets
    need not grow). Padded sequences are empty."""

    cu_q: torch.Tensor  # (C + 1,) int32
    cu_k: torch.Tensor  # (C + 1,) int32; the last is never read
    used: torch.Tensor  # (C,) int32


@dataclass(frozen=True)
class Pad:
    """Fixed sizes for a plan (a CUDA graph replays one shape): `rows` rows (extra rows
    write their KV to the scratch slot and are never read), and `seqs` sequences and
    returned rows."""

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
    varlen: VarlenPlan | None
    decode_first: torch.Tensor  # (1,) the first decode row, on the device
    decode_capacity: int  # decode rows the step's shapes allow (padded: the most there can be)

    @classmethod
    def build(
        cls,
        chunks: list[tuple[int, list[int], int]],
        decode: Sequence[tuple[int, int, int]],
        device: torch.device,
        *,
        varlen: bool,
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
        if pad is not None:
            assert len(tokens) <= pad.rows and len(outputs) <= pad.seqs, (len(tokens), pad)
            extra = pad.rows - len(tokens)
            tokens, positions = tokens + [0] * extra, positions + [0] * extra
            slots += [pad.scratch_slot] * extra
            outputs += [0] * (pad.seqs - len(outputs))
            cu_q += [cu_q[-1]] * (pad.seqs + 1 - len(cu_q))
            used += [0] * (pad.seqs - len(used))
        cu_k += [0] * (len(cu_q) - len(cu_k))
        # One host-to-device copy for all the step's indices.
        sizes = [len(tokens)] * 3 + [len(outputs), 1]
        values = tokens + positions + slots + outputs + [prefill_rows]
        if varlen:
            sizes += [len(cu_q), len(cu_k), len(used)]
            values += cu_q + cu_k + used
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
            varlen=VarlenPlan(views[5], views[6], views[7]) if varlen else None,
            decode_first=views[4],
            decode_capacity=pad.seqs if pad is not None else len(decode),
        )
