"""The skinny matrix-product kernel and the decode-attention kernel (run by Triton's
interpreter on the CPU, in a subprocess because TRITON_INTERPRET is read when the
kernels are defined) and the product dispatcher's torch fallback. The GPU tests are
skipped without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton comes with CUDA builds of torch, not with the CPU build CI installs.
pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from engine.attention import Settings  # noqa: E402
from engine.skinny_calibrate import Group, calibrate, candidates  # noqa: E402
from engine.skinny_gemm import (  # noqa: E402
    Kernel,
    SkinnyGemm,
    Tile,
    skinny_matmul,
    torch_linear,
)

ROOT = Path(__file__).resolve().parents[2]

# (dtype, M, N, K, tile (block_m, block_n, block_k), split, bias, prologue). The interpreter's
# tl.dot mishandles bf16 (it multiplies the raw bits), so the tensor-core tiles run in
# fp16 here; the one-row tile (no tl.dot) runs in bf16. Shapes cover: K split into fp32
# partials (summed by the last program of each column tile), K not a whole number of
# tiles, N not a whole number of tiles, M < block_m, and splits that do not divide the K
# tiles evenly (the last split shorter: 7 tiles in 3 + 3 + 1, 5 in 2 + 2 + 1, ...).
CASES = [
    ("bfloat16", 1, 100, 96, (1, 32, 32), 1, False, ""),
    ("bfloat16", 1, 100, 96, (1, 32, 32), 2, True, ""),
    ("float16", 3, 70, 128, (16, 32, 32), 1, True, ""),
    ("float16", 5, 64, 200, (16, 32, 64), 2, False, ""),
    ("float16", 16, 48, 64, (16, 16, 32), 2, True, ""),
    ("float16", 20, 33, 64, (32, 16, 32), 1, False, ""),
    ("float16", 5, 70, 200, (16, 32, 32), 4, True, ""),  # 7 K tiles: 2 + 2 + 2 + 1
    # Prologues: RMSNorm of the rows, or silu(gate) * up of rows holding [gate | up].
    ("bfloat16", 1, 100, 96, (1, 32, 32), 1, True, "norm"),
    ("bfloat16", 1, 100, 96, (1, 32, 32), 2, False, "norm"),
    ("bfloat16", 1, 100, 160, (1, 32, 32), 4, True, "norm"),  # 5 K tiles: 2 + 2 + 1
    ("float16", 1, 64, 128, (16, 32, 32), 1, False, "norm"),
    ("float16", 5, 64, 200, (16, 32, 64), 2, True, "norm"),
    ("float16", 3, 70, 160, (16, 32, 32), 3, False, "norm"),  # 5 K tiles: 2 + 2 + 1
    ("bfloat16", 1, 100, 96, (1, 32, 32), 1, True, "glu"),
    ("bfloat16", 1, 100, 200, (1, 32, 32), 3, True, "glu"),  # 7 K tiles: 3 + 3 + 1
    ("float16", 3, 70, 200, (16, 32, 64), 2, True, "glu"),
]

# Each case twice in a row on the same counters: the second result must be the first
# bit for bit (the counters were set back to zero, the sum has a fixed order).
SCRIPT = """
import json, sys
import torch
from engine.linear import Prologue, unfused
from engine.skinny_gemm import Kernel, Tile, column_tiles, skinny_matmul

torch.manual_seed(0)
for dtype, m, n, k, (bm, bn, bk), split, with_bias, kind in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    x = torch.randn(m, 2 * k if kind == "glu" else k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    bias = torch.randn(m, n).to(dtype) if with_bias else None
    scale = (1 + 0.1 * torch.randn(k)).to(dtype)
    kernel = Kernel(Tile(bm, bn, bk, 4, 3), split)
    counters = torch.zeros(column_tiles(n, kernel), dtype=torch.int32)
    prologue = {"": None, "norm": Prologue(norm=scale, eps=1e-5), "glu": Prologue(glu=True)}
    y = skinny_matmul(x, w, bias, kernel, counters, prologue[kind])
    again = skinny_matmul(x, w, bias, kernel, counters, prologue[kind])
    # The torch path in float64: the reference the engine's fallback computes.
    exact = {"": Prologue(), "norm": Prologue(norm=scale.double(), eps=1e-5)}
    exact["glu"] = prologue["glu"]
    ref = unfused(x.double(), w.double(), None if bias is None else bias.double(), exact[kind])
    error = ((y.double() - ref).norm() / ref.norm()).item()
    same = torch.equal(y, again) and not counters.any().item()
    print(json.dumps([str(y.dtype), list(y.shape), error, same]))
"""


def run_interpreted(script: str, cases: list, per_case: int = 1) -> list:
    """The script's JSON lines, `per_case` per case, run under Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == per_case * len(cases)
    return results


def test_kernel_matches_float64_reference_in_the_interpreter() -> None:
    results = run_interpreted(SCRIPT, CASES)
    for case, (dtype, shape, error, same) in zip(CASES, results, strict=True):
        assert dtype == f"torch.{case[0]}" and shape == [case[1], case[2]], case
        assert error < 1e-2, (case, error)
        assert same, case


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


def test_dispatcher_falls_back_to_torch_on_the_cpu() -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 64).to(torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16)
    bias = torch.randn(3, 96).to(torch.bfloat16)
    measured = calibrate([Group([w]), Group([w], with_bias=True)], max_rows=8)
    assert measured.plans == {}
    # Even with a plan for this very shape, CPU tensors never reach Triton.
    plans = {(96, 64, True, 4, ""): Kernel(Tile(16, 32, 32, 4, 3), 1)}
    planned = SkinnyGemm(plans, device=torch.device("cpu"))
    for linear in (measured, planned):
        assert torch.equal(linear(x, w), x @ w.T)
        assert torch.equal(linear(x, w, bias), torch.addmm(bias, x, w.T))
        assert torch.equal(linear(x, w, bias), torch_linear(x, w, bias))


def test_torch_path_adds_into_the_residual_in_place_only_when_asked() -> None:
    """The engine's residual products (SkinnyGemm(into_bias=True), residual_linear) add
    into the residual stream itself: no copy of it per product. Without into_bias the
    bias is left as it was."""
    from engine.linear import Prologue, residual_linear

    torch.manual_seed(0)
    w = torch.randn(96, 64).to(torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16)
    gate_up = torch.randn(3, 128).to(torch.bfloat16)
    bias = torch.randn(3, 96).to(torch.bfloat16)
    glu = Prologue(glu=True)
    for linear in (SkinnyGemm({}, into_bias=True), residual_linear):
        for rows, prologue in ((x, None), (gate_up, glu)):
            residual = bias.clone()
            expected = SkinnyGemm({})(rows, w, bias, prologue)
            out = linear(rows, w, residual, prologue)
            assert out is residual and torch.equal(out, expected)
    kept = bias.clone()
    assert torch.equal(SkinnyGemm({})(x, w, kept), torch.addmm(bias, x, w.T))
    assert torch.equal(kept, bias)


def test_candidates_fill_the_sms_for_the_llama_7b_shapes() -> None:
    sms = 132
    for n, k in [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]:
        for bucket in (1, 2, 4, 8, 16, 32, 64):
            kernels = candidates(n, k, bucket, sms)
            assert kernels, (n, k, bucket)
            for kernel in kernels:
                tile = kernel.tile
                assert tile.block_m >= bucket
                programs = -(-n // tile.block_n) * kernel.split
                assert sms / 2 <= programs <= 8 * sms, (n, k, kernel)
    # N = 4096 is only 64 blocks of 64 columns for 132 SMs: K is split to fill them.
    assert {kernel.split for kernel in candidates(4096, 11008, 1, sms)} >= {2, 4, 8, 16}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_candidate_and_the_dispatcher_match_float64_on_the_gpu() -> None:
    torch.manual_seed(0)
    n, k = 1536, 1000  # K not a whole number of tiles
    weights = [torch.randn(n, k, device="cuda").to(torch.bfloat16) for _ in range(3)]
    linear = calibrate([Group(weights), Group(weights, with_bias=True)], max_rows=16)
    assert len(linear.decisions) == 2 * 5
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    counters = torch.zeros(n, dtype=torch.int32, device="cuda")  # one per column, enough
    w = weights[0]
    for m in (1, 3, 16):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        bias = torch.randn(m, n, device="cuda").to(torch.bfloat16)
        for b in (None, bias):
            ref = x.double() @ w.double().T + (0 if b is None else b.double())
            outputs = []
            for kernel in candidates(n, k, m, sms):
                outputs.append(skinny_matmul(x, w, b, kernel, counters))
                # Again on the same counters: they were left at zero, the sum is in order.
                assert torch.equal(skinny_matmul(x, w, b, kernel, counters), outputs[-1])
            linear(x, w, b)  # warm up outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs.append(linear(x, w, b))
            graph.replay()
            first = outputs[-1].clone()
            graph.replay()
            assert torch.equal(outputs[-1], first)
            for y in outputs:
                assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    assert not counters.any() and (linear.counters is None or not linear.counters.any())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_prologues_match_float64_on_the_gpu() -> None:
    from engine.linear import Prologue

    torch.manual_seed(1)
    n, k = 1536, 1000
    weights = [torch.randn(n, k, device="cuda").to(torch.bfloat16) for _ in range(3)]
    scale = (1 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16)
    norm, glu = Prologue(norm=scale, eps=1e-5), Prologue(glu=True)
    linear = calibrate([Group(weights, kind="norm"), Group(weights, True, "glu")], max_rows=16)
    assert len(linear.decisions) == 2 * 5
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    counters = torch.zeros(n, dtype=torch.int32, device="cuda")
    w = weights[0]
    for m in (1, 3, 16):
        x = torch.randn(m, 2 * k, device="cuda").to(torch.bfloat16)
        bias = torch.randn(m, n, device="cuda").to(torch.bfloat16)
        for prologue, rows, b in ((norm, x[:, :k].contiguous(), None), (glu, x, bias)):
            r = rows.double()
            if prologue is norm:
                r = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5) * scale.double()
            else:
                r = torch.nn.functional.silu(r[:, :k]) * r[:, k:]
            ref = r @ w.double().T + (0 if b is None else b.double())
            outputs = []
            for kernel in candidates(n, k, m, sms):
                outputs.append(skinny_matmul(rows, w, b, kernel, counters, prologue))
                again = skinny_matmul(rows, w, b, kernel, counters, prologue)
                assert torch.equal(again, outputs[-1])
            outputs.append(linear(rows, w, b, prologue))
            for y in outputs:
                assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    assert not counters.any()
