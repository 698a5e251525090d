"""The skinny matrix-product kernel (run by Triton's interpreter on the CPU, in a
subprocess because TRITON_INTERPRET is read when the kernels are defined) and its
dispatcher's torch fallback. The GPU test is skipped without CUDA."""

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

from engine.skinny_gemm import (  # noqa: E402
    Group,
    Kernel,
    SkinnyGemm,
    Tile,
    calibrate,
    candidates,
    skinny_matmul,
    torch_linear,
)

ROOT = Path(__file__).resolve().parents[2]

# (dtype, M, N, K, tile (block_m, block_n, block_k), split, bias, prologue). The interpreter's
# tl.dot mishandles bf16 (it multiplies the raw bits), so the tensor-core tiles run in
# fp16 here; the one-row tile (no tl.dot) runs in bf16. Shapes cover: K split into fp32
# partials, K not a whole number of tiles, N not a whole number of tiles, M < block_m.
CASES = [
    ("bfloat16", 1, 100, 96, (1, 32, 32), 1, False, ""),
    ("bfloat16", 1, 100, 96, (1, 32, 32), 2, True, ""),
    ("float16", 3, 70, 128, (16, 32, 32), 1, True, ""),
    ("float16", 5, 64, 200, (16, 32, 64), 2, False, ""),
    ("float16", 16, 48, 64, (16, 16, 32), 2, True, ""),
    ("float16", 20, 33, 64, (32, 16, 32), 1, False, ""),
    # Prologues: RMSNorm of the rows, or silu(gate) * up of rows holding [gate | up].
    ("bfloat16", 1, 100, 96, (1, 32, 32), 2, False, "norm"),
    ("float16", 5, 64, 200, (16, 32, 64), 2, True, "norm"),
    ("bfloat16", 1, 100, 96, (1, 32, 32), 1, True, "glu"),
    ("float16", 3, 70, 200, (16, 32, 64), 2, True, "glu"),
]

SCRIPT = """
import json, sys
import torch
from engine.linear import Prologue
from engine.skinny_gemm import Kernel, Tile, skinny_matmul

torch.manual_seed(0)
for dtype, m, n, k, (bm, bn, bk), split, with_bias, kind in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    x = torch.randn(m, 2 * k if kind == "glu" else k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    bias = torch.randn(m, n).to(dtype) if with_bias else None
    scale = (1 + 0.1 * torch.randn(k)).to(dtype)
    prologue = {"": None, "norm": Prologue(norm=scale, eps=1e-5), "glu": Prologue(glu=True)}
    y = skinny_matmul(x, w, bias, Kernel(Tile(bm, bn, bk, 4, 3), split), prologue[kind])
    rows = x.double()
    if kind == "norm":
        rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-5) * scale.double()
    if kind == "glu":
        rows = torch.nn.functional.silu(rows[:, :k]) * rows[:, k:]
    ref = rows @ w.double().T + (bias.double() if with_bias else 0)
    error = ((y.double() - ref).norm() / ref.norm()).item()
    print(json.dumps([str(y.dtype), list(y.shape), error]))
"""


def test_kernel_matches_float64_reference_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(CASES)
    for case, (dtype, shape, error) in zip(CASES, results, strict=True):
        assert dtype == f"torch.{case[0]}" and shape == [case[1], case[2]], case
        assert error < 1e-2, (case, error)


def test_dispatcher_falls_back_to_torch_on_the_cpu() -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 64).to(torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16)
    bias = torch.randn(3, 96).to(torch.bfloat16)
    measured = calibrate([Group([w]), Group([w], with_bias=True)], max_rows=8)
    assert measured.plans == {}
    # Even with a plan for this very shape, CPU tensors never reach Triton.
    planned = SkinnyGemm({(96, 64, True, 4, ""): Kernel(Tile(16, 32, 32, 4, 3), 1)})
    for linear in (measured, planned):
        assert torch.equal(linear(x, w), x @ w.T)
        assert torch.equal(linear(x, w, bias), torch.addmm(bias, x, w.T))
        assert torch.equal(linear(x, w, bias), torch_linear(x, w, bias))


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
    w = weights[0]
    for m in (1, 3, 16):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        bias = torch.randn(m, n, device="cuda").to(torch.bfloat16)
        for b in (None, bias):
            ref = x.double() @ w.double().T + (0 if b is None else b.double())
            outputs = [skinny_matmul(x, w, b, kernel) for kernel in candidates(n, k, m, sms)]
            linear(x, w, b)  # warm up outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs.append(linear(x, w, b))
            graph.replay()
            for y in outputs:
                assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


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
            outputs = [
                skinny_matmul(rows, w, b, kernel, prologue) for kernel in candidates(n, k, m, sms)
            ]
            outputs.append(linear(rows, w, b, prologue))
            for y in outputs:
                assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
