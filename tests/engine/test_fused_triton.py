"""engine/fused_triton.py's RoPE + cache-write kernel under Triton's interpreter on the
CPU (in a subprocess: TRITON_INTERPRET is read at import), in fp32: its roundings are
transformers' (each product, then the sum), so the result is torch's bit for bit. The
row counts take each of `rope_heads`' blocks of heads (1, 4 and 16 a program), whole
and partial; bf16 runs on the GPU (tests/engine/test_gpu.py)."""

from __future__ import annotations

import pytest

# Triton comes with CUDA builds of torch, not with the CPU build CI installs.
pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from tests.engine.interpreter import run_interpreted  # noqa: E402

# (rows, heads, kv_heads): grouped heads (GQA) and LLaMA-7B's 32 + 32.
CASES = [(5, 8, 2), (20, 8, 2), (70, 8, 2), (20, 32, 32), (70, 32, 32)]

SCRIPT = """
import json, sys
import torch
from engine.fused_triton import rope_heads, rope_into_cache

torch.manual_seed(0)
for rows, heads, kv_heads in json.loads(sys.argv[1]):
    dim = 32
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim)
    cos, sin = torch.randn(128, dim), torch.randn(128, dim)
    positions = (torch.arange(rows) * 37) % 128  # distinct (slot, position) pairs
    slots = torch.arange(rows) % 4
    kc = torch.zeros(4, 128, kv_heads, dim)
    vc = torch.zeros_like(kc)
    q = rope_into_cache(qkv, cos, sin, positions, slots, kc, vc, heads, kv_heads)

    def rope(t):
        half = dim // 2
        rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        return t * cos[positions][:, None] + rotated * sin[positions][:, None]

    k_end = (heads + kv_heads) * dim
    same_q = torch.equal(q, rope(qkv[:, : heads * dim].view(rows, heads, dim)))
    same_k = torch.equal(kc[slots, positions], rope(qkv[:, heads * dim : k_end].view(rows, kv_heads, dim)))
    same_v = torch.equal(vc[slots, positions], qkv[:, k_end:].view(rows, kv_heads, dim))
    written = torch.zeros(4, 128, dtype=torch.bool)
    written[slots, positions] = True
    only = bool((kc[~written] == 0).all() and (vc[~written] == 0).all())
    print(json.dumps([rope_heads(rows), same_q, same_k, same_v, only]))
"""


def test_rope_and_cache_write_round_as_transformers_in_the_interpreter() -> None:
    results = run_interpreted(SCRIPT, CASES)
    assert sorted({r[0] for r in results}) == [1, 4, 16]  # every block size was taken
    for case, (_, same_q, same_k, same_v, only) in zip(CASES, results, strict=True):
        assert same_q and same_k and same_v, case
        assert only, case  # nothing but the rows' own (slot, position) is written
