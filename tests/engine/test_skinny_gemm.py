"""The skinny matrix-product kernel (run by Triton's interpreter on the CPU:
tests/engine/interpreter.py), the calibration's candidates and the product dispatcher's
torch fallback. The GPU tests are skipped without CUDA."""

from __future__ import annotations

import gc

import pytest
import torch

# Triton comes with CUDA builds of torch, not with the CPU build CI installs.
pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from engine.linear import torch_linear  # noqa: E402
from engine.skinny_calibrate import Group, calibrate, candidates  # noqa: E402
from engine.skinny_gemm import Kernel, SkinnyGemm, Tile, skinny_matmul  # noqa: E402
from tests.engine.interpreter import run_interpreted  # noqa: E402

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


def test_kernel_matches_float64_reference_in_the_interpreter() -> None:
    results = run_interpreted(SCRIPT, CASES)
    for case, (dtype, shape, error, same) in zip(CASES, results, strict=True):
        assert dtype == f"torch.{case[0]}" and shape == [case[1], case[2]], case
        assert error < 1e-2, (case, error)
        assert same, case


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cublaslt_picks_match_float64_and_serve_their_rows_in_graphs() -> None:
    """Every heuristic pick engine/cublaslt.py offers computes the product (with a
    bias too), and SkinnyGemm sends the rows it was measured for to its pick: after a
    norm prologue, or adding into the residual in place, inside a CUDA graph."""
    from engine.cublaslt import Matmul, workspace
    from engine.linear import Prologue

    torch.manual_seed(2)
    n, k = 1536, 1024
    w = torch.randn(n, k, device="cuda").to(torch.bfloat16)
    scale = (1 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16)
    norm = Prologue(norm=scale, eps=1e-5)
    for m in (16, 24):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        bias = torch.randn(m, n, device="cuda").to(torch.bfloat16)
        r = x.double()
        normed = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5) * scale.double()
        for with_bias in (False, True):
            matmul = Matmul(m, n, k, torch.bfloat16, with_bias, w.device)
            assert matmul.algos
            b = bias if with_bias else None
            extra = bias.double() if with_bias else 0
            ref = r @ w.double().T + extra
            space = workspace(w.device)
            for algo in range(len(matmul.algos)):
                out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                y = matmul(algo, x, w, b, out, space)
                assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2, algo
                if with_bias:  # in place, as the engine adds into the residual stream
                    kept = bias.clone()
                    y = matmul(algo, x, w, kept, kept, space)
                    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2, algo
            kind = "" if with_bias else "norm"
            key = (n, k, with_bias, m, kind)
            linear = SkinnyGemm({}, into_bias=True, lt={key: (matmul, len(matmul.algos) - 1)})
            prologue = None if with_bias else norm
            expected = (r if with_bias else normed) @ w.double().T + extra
            kept = bias.clone()
            linear(x, w, kept if with_bias else None, prologue)  # warm up outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = linear(x, w, kept if with_bias else None, prologue)
            kept.copy_(bias)
            graph.replay()
            assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-2
            if with_bias:  # the residual stream itself, as torch's products leave it
                assert y.data_ptr() == kept.data_ptr()
            # The graph keeps working once the Matmul (and its descriptors) are gone.
            close = matmul.close
            del linear, matmul
            gc.collect()
            assert not close.alive
            kept.copy_(bias)
            if not with_bias:
                y.zero_()  # so the replay must write it again
            graph.replay()
            assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-2
