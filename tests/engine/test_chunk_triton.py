"""The mixed step's chunk-attention kernel (engine/chunk_triton.py) under Triton's
interpreter on the CPU, in a subprocess (TRITON_INTERPRET is read at import). The
interpreter's tl.dot mishandles bf16, so these run in fp16 and fp32; bf16 runs on the
GPU (tests/engine/test_mixed_graphs.py)."""

from __future__ import annotations

import pytest

# Triton comes with CUDA builds of torch, not with the CPU build CI installs.
pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from tests.engine.interpreter import run_interpreted  # noqa: E402

# (dtype, kv_heads, empty sequences): grouped heads (GQA) and one KV head per query
# head; 3 padded sequences, or 40 (a graph's layout pads to the slots: more than the
# kernel's 16 smallest lanes of cu_q).
CASES = [("float16", 2, 3), ("float32", 4, 3), ("float16", 4, 40)]

SCRIPT = """
import json, sys
import torch
from engine.chunk_triton import triton_chunk_attention

def reference(q, keys, values):
    length, stop = q.shape[0], keys.shape[0]
    group = q.shape[1] // keys.shape[1]
    keys = keys.double().repeat_interleave(group, dim=1)
    values = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys) / q.shape[-1] ** 0.5
    allowed = torch.ones(length, stop, dtype=torch.bool).tril(stop - length)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)

torch.manual_seed(0)
for dtype, kv_heads, empty in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    slots, tokens, heads, dim = 6, 256, 4, 32
    k_cache = torch.randn(slots, tokens, kv_heads, dim).to(dtype)
    v_cache = torch.randn_like(k_cache)
    # (slot, start, length), slots out of order: a chunk continuing a cached prefix over
    # several key blocks, fresh chunks longer than a query block, one-token chunks.
    seqs = [(4, 100, 30), (1, 0, 70), (3, 200, 1), (0, 9, 1), (5, 0, 128)]
    rows = sum(length for *_, length in seqs)
    q = torch.randn(rows + 11, heads, dim).to(dtype)  # 11 rows past the chunks
    cu_q = [0]
    for *_, length in seqs:
        cu_q.append(cu_q[-1] + length)
    cu_q += [cu_q[-1]] * empty  # empty (padded) sequences
    cu_k = [slot * tokens for slot, *_ in seqs] + [0] * empty
    used = [start + length for _, start, length in seqs] + [0] * empty
    ints = lambda values: torch.tensor(values, dtype=torch.int32)
    out = torch.full_like(q, 7.0)
    triton_chunk_attention(q, k_cache, v_cache, ints(cu_q), ints(cu_k), ints(used), out)
    errors = []
    for i, (slot, start, length) in enumerate(seqs):
        stop = start + length
        expected = reference(q[cu_q[i]:cu_q[i + 1]], k_cache[slot, :stop], v_cache[slot, :stop])
        got = out[cu_q[i]:cu_q[i + 1]].double()
        errors.append(((got - expected).norm() / expected.norm()).item())
    untouched = bool((out[rows:] == 7.0).all())
    print(json.dumps([errors, untouched]))
"""


def test_chunks_attend_their_own_slots_causally_in_the_interpreter() -> None:
    results = run_interpreted(SCRIPT, CASES)
    for case, (errors, untouched) in zip(CASES, results, strict=True):
        assert max(errors) < 2e-3, (case, errors)
        assert untouched, case  # rows past the chunks are the decode rows' to write
