"""The decode-attention kernels of engine/attention_triton.py (split-K, a mixed step's
decode rows, and the RoPE-fused variant for small batches) under Triton's interpreter
on the CPU; bf16 on the GPU is tests/engine/test_gpu.py's."""

from __future__ import annotations

import pytest
import torch

# Triton comes with CUDA builds of torch, not with the CPU build CI installs.
pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from engine.attention import Settings  # noqa: E402
from tests.engine.interpreter import run_interpreted  # noqa: E402

# (heads, kv heads, dtype): GQA groups of 1, 4 and 3 (padded to 4).
ATTENTION_CASES = [(4, 4, "bfloat16"), (8, 2, "bfloat16"), (6, 2, "float16")]

# Five sequences in a 64-token cache, in splits of 16 keys (4 splits, blocks of 8):
# 1 and 5 keys (less than one split), 16 and 64 (whole splits), 37 (a part of one);
# then each sequence cut in 4 equal splits of whole blocks, the grid heads first; then
# the tensor-core variant (queries padded to 16 rows, blocks of 16), but not in bf16,
# whose products the interpreter gets wrong (tests/engine/test_gpu.py runs those).
ATTENTION_SCRIPT = """
import json, sys
import torch
from engine.attention import Settings, reference_attention
from engine.attention_triton import triton_decode_attention

torch.manual_seed(0)
for heads, kv_heads, dtype in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    k = torch.randn(6, 64, kv_heads, 32).to(dtype)
    v = torch.randn_like(k)
    q = torch.randn(5, heads, 32).to(dtype)
    slots = torch.tensor([5, 0, 3, 1, 2])
    lengths = torch.tensor([16, 1, 37, 64, 5])
    ref = reference_attention(q, k, v, slots, lengths).double()
    for settings in (
        Settings(16, 8),
        Settings(0, 8, parts=4, heads_first=True),
        Settings(16, 16, dot=dtype != torch.bfloat16),
    ):
        out = triton_decode_attention(q, k, v, slots, lengths, settings)
        again = triton_decode_attention(q, k, v, slots, lengths, settings)
        error = ((out.double() - ref).norm() / ref.norm()).item()
        same = torch.equal(out, again)
        print(json.dumps([str(out.dtype), list(out.shape), error, same]))
"""


def test_decode_attention_matches_float64_reference_in_the_interpreter() -> None:
    results = run_interpreted(ATTENTION_SCRIPT, ATTENTION_CASES, per_case=3)  # three settings
    cases = [case for case in ATTENTION_CASES for _ in range(3)]
    for case, (dtype, shape, error, same) in zip(cases, results, strict=True):
        assert dtype == f"torch.{case[2]}" and shape == [5, case[0], 32], case
        assert error < 1e-2, (case, error)
        assert same, case


# A mixed step's decode rows: the rows from first[0] (a device value), at most `batch` of
# them and none past the step's rows, attend over position + 1 keys; the rows before them
# (prompt rows, the chunk kernel's) and after them are left as they were.
ROWS_SCRIPT = """
import itertools, json, sys
import torch
from engine.attention import Settings, reference_attention
from engine.attention_triton import triton_decode_rows_attention

torch.manual_seed(0)
for heads, kv_heads, dtype in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    k = torch.randn(6, 64, kv_heads, 32).to(dtype)
    v = torch.randn_like(k)
    q = torch.randn(9, heads, 32).to(dtype)
    slots = torch.tensor([0, 0, 0, 5, 0, 3, 1, 2, 4])
    positions = torch.tensor([0, 1, 2, 15, 0, 36, 63, 4, 0])
    dot = dtype != torch.bfloat16
    for settings, (first, batch) in itertools.product(
        (Settings(16, 16, dot=dot), Settings(0, 16, parts=2, heads_first=True, dot=dot)),
        ((3, 6), (3, 8), (5, 2)),
    ):
        out = torch.full_like(q, 7.0)
        at = torch.tensor([first], dtype=torch.int32)
        triton_decode_rows_attention(q, k, v, slots, positions, at, batch, out, settings)
        stop = min(first + batch, 9)
        part = slice(first, stop)
        ref = reference_attention(q[part], k, v, slots[part], positions[part] + 1).double()
        error = ((out[part].double() - ref).norm() / ref.norm()).item()
        kept = bool((out[:first] == 7).all() and (out[stop:] == 7).all())
        print(json.dumps([error, kept]))
"""


def test_mixed_step_decode_rows_start_where_the_device_says() -> None:
    results = run_interpreted(ROWS_SCRIPT, ATTENTION_CASES[1:], per_case=6)
    assert len(results) == 12
    for error, kept in results:
        assert error < 1e-2, error
        assert kept


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (Settings(0, 8), "split > 0 or parts > 0"),
        (Settings(0, 8, parts=3), "parts must be a power of two"),
    ],
)
def test_decode_attention_settings_that_cannot_cut_are_refused(
    settings: Settings, says: str
) -> None:
    from engine.attention_triton import triton_decode_attention

    k = torch.zeros(2, 16, 2, 8)
    with pytest.raises(ValueError, match=says):
        triton_decode_attention(
            torch.zeros(1, 2, 8), k, k, torch.tensor([0]), torch.tensor([4]), settings
        )


# The fused variant for small batches: the q/k/v row in, RoPE applied, the new key and
# value cached at position length - 1, the splits merged by the last one to finish.
ROPE_SCRIPT = """
import json, sys
import torch
from engine.attention import Settings, reference_attention
from engine.attention_triton import triton_rope_decode_attention

def rotate(x, cos, sin):  # transformers' apply_rotary_pos_emb, on (..., D)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

torch.manual_seed(0)
for heads, kv_heads, dtype in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    dim, batch = 32, 4
    k = torch.randn(6, 64, kv_heads, dim).to(dtype)
    v = torch.randn_like(k)
    angles = torch.arange(64)[:, None] * 0.1 / (1 + torch.arange(dim // 2))[None, :]
    cos = torch.cat((angles, angles), dim=-1).cos().to(dtype)
    sin = torch.cat((angles, angles), dim=-1).sin().to(dtype)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim).to(dtype)
    slots = torch.tensor([5, 0, 3, 1])
    lengths = torch.tensor([16, 1, 37, 64])  # new token at the end of a split, alone, inside
    counters = torch.zeros(batch * kv_heads, dtype=torch.int32)
    k_ref, v_ref = k.clone(), v.clone()
    q = qkv[:, : heads * dim].view(batch, heads, dim)
    new_k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(batch, kv_heads, dim)
    new_v = qkv[:, (heads + kv_heads) * dim :].view(batch, kv_heads, dim)
    c, s_ = cos[lengths - 1][:, None, :], sin[lengths - 1][:, None, :]
    k_ref[slots, lengths - 1] = rotate(new_k.float(), c.float(), s_.float()).to(dtype)
    v_ref[slots, lengths - 1] = new_v
    ref = reference_attention(rotate(q.float(), c.float(), s_.float()).to(dtype), k_ref, v_ref, slots, lengths)
    for settings in (
        Settings(16, 8, 4, 3),
        Settings(0, 8, 4, 3, parts=4, heads_first=True),
        Settings(0, 16, 4, 3, parts=4, dot=True),
    ):
        k_run, v_run = k.clone(), v.clone()
        out = triton_rope_decode_attention(qkv, cos, sin, k_run, v_run, slots, lengths, heads, counters, settings)
        again = triton_rope_decode_attention(qkv, cos, sin, k_run, v_run, slots, lengths, heads, counters, settings)
        error = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        cache = max((k_run - k_ref).abs().max().item(), (v_run - v_ref).abs().max().item())
        same = torch.equal(out, again) and not counters.any().item()
        print(json.dumps([list(out.shape), error, cache, same]))
"""


# The interpreter multiplies bf16 as raw bits, so no bf16 here (tests/engine/test_gpu.py
# checks bf16 against the separate RoPE and attention kernels on the GPU).
ROPE_CASES = [(4, 4, "float32"), (8, 2, "float16"), (6, 2, "float16")]


def test_rope_decode_attention_caches_the_new_token_in_the_interpreter() -> None:
    results = run_interpreted(ROPE_SCRIPT, ROPE_CASES, per_case=3)  # three settings
    cases = [case for case in ROPE_CASES for _ in range(3)]
    for case, (shape, error, cache, same) in zip(cases, results, strict=True):
        assert shape == [4, case[0], 32], case
        assert error < 1e-2, (case, error)
        assert cache < 2e-2, (case, cache)  # the new key: RoPE within a rounding
        assert same, case  # counters back at zero, the merge in a fixed order
