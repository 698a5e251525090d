"""Decode's skinny matrix products on the GPU: cuBLAS against engine/skinny_gemm.py's
Triton kernel for the LLaMA-7B weight shapes and M = 1..64 rows, as bandwidth next to
a plain device-to-device copy; then the graph-replayed 7B decode step (random weights)
with the dispatcher on and off, and on with programmatic dependent launch off.

    python benchmarks/gemv_bench.py [--out DIR] [--skip-decode] [--skip-shapes]
        [--rows M ...] [--try-dot-tiles JSON]

Each product runs with the prologue llama.py gives it (RMSNorm of the rows before qkv,
gate_up and lm_head; silu(gate) * up before down): torch runs it as its own kernel, the
Triton kernel fused. Each is timed as a CUDA graph cycling through copies of the weight
that together outgrow L2 (engine.skinny_calibrate.search, what engine start runs). A failing
variant is printed and skipped; the run goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import pdl, skinny_calibrate  # noqa: E402
from engine.linear import Prologue, unfused  # noqa: E402
from engine.skinny_calibrate import search  # noqa: E402
from engine.skinny_gemm import column_tiles, skinny_matmul  # noqa: E402

# (name, N, K, with the residual added as in llama.py's addmm, prologue kind)
SHAPES = [
    ("qkv", 12288, 4096, False, "norm"),
    ("o", 4096, 4096, True, ""),
    ("gate_up", 22016, 4096, False, "norm"),
    ("down", 4096, 11008, True, "glu"),
    ("lm_head", 32000, 4096, False, "norm"),
]
ROWS = (1, 2, 4, 8, 16, 32, 64)
DECODE_BATCHES = (1, 8, 32, 64)


def copy_bandwidth() -> float:
    """TB/s of a 1 GiB device-to-device copy, bytes read + bytes written."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1000)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e12


def relative_error(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: Any, prologue: Prologue
) -> float:
    """Against float64 math on the GPU: RMSNorm as LlamaRMSNorm, or silu(gate) * up."""
    rows = x.double()
    if prologue.norm is not None:
        rms = torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + prologue.eps)
        rows = rows * rms * prologue.norm.double()
    elif prologue.glu:
        gate, up = rows.chunk(2, dim=-1)
        rows = torch.nn.functional.silu(gate) * up
    ref = rows @ w.double().T + (0 if b is None else b.double())
    return float(((y.double() - ref).norm() / ref.norm()).item())


def bench_shape(
    name: str,
    n: int,
    k: int,
    with_bias: bool,
    kind: str,
    copy_tbps: float,
    row_counts: tuple[int, ...] = ROWS,
) -> list[dict]:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    copies = max(2, -(-4 * l2 // (n * k * 2)))
    weights = [torch.randn(n, k, device="cuda").to(torch.bfloat16) for _ in range(copies)]
    stream = torch.cuda.Stream()
    prologue = Prologue()
    if kind == "norm":
        scale = 1 + 0.1 * torch.randn(k, device="cuda")
        prologue = Prologue(norm=scale.to(torch.bfloat16), eps=1e-5)
    elif kind == "glu":
        prologue = Prologue(glu=True)
    rows = []
    for m in row_counts:
        try:
            trials = search(weights, m, with_bias, kind, stream)
            torch_us, best = trials[0].us, min(trials[1:], key=lambda t: t.us, default=None)
            x = torch.randn(m, 2 * k if kind == "glu" else k, device="cuda").to(torch.bfloat16)
            b = torch.randn(m, n, device="cuda").to(torch.bfloat16) if with_bias else None
            # Bytes of the product itself (for glu, x holds [gate | up]: twice the row).
            moved = 2 * (n * k + m * x.shape[1] + m * n + (m * n if with_bias else 0))
            w = weights[0]
            row = {
                "shape": name, "N": n, "K": k, "M": m, "bias": with_bias, "kind": kind,
                "torch_us": torch_us, "torch_tbps": moved / torch_us / 1e6,
                "torch_error": relative_error(unfused(x, w, b, prologue), x, w, b, prologue),
                "trials": [{"kernel": str(t.kernel), "us": t.us} for t in trials[1:]],
            }  # fmt: skip
            if best is not None and best.kernel is not None:
                counters = torch.zeros(
                    column_tiles(n, best.kernel), dtype=torch.int32, device="cuda"
                )
                y = skinny_matmul(x, w, b, best.kernel, counters, prologue)
                row |= {
                    "triton_us": best.us, "triton_tbps": moved / best.us / 1e6,
                    "triton_error": relative_error(y, x, w, b, prologue),
                    "kernel": str(best.kernel), "speedup": torch_us / best.us,
                }  # fmt: skip
            rows.append(row)
            print_row(row, copy_tbps)
        # A benchmark reports a failing variant and goes on with the next one.
        except Exception:  # noqa: BLE001
            print(f"{name} M={m}: FAILED\n{traceback.format_exc()}", flush=True)
    return rows


def print_row(row: dict, copy_tbps: float) -> None:
    label = f"{row['shape']} {row['kind']}".strip()
    head = (
        f"{label:>13} {row['M']:3} {row['torch_us']:9.1f} {row['torch_tbps']:6.2f}"
        f" {100 * row['torch_tbps'] / copy_tbps:5.1f}% {row['torch_error']:8.1e}"
    )
    if "triton_us" not in row:
        print(f"{head}   (no Triton kernel ran)", flush=True)
        return
    print(
        f"{head} {row['triton_us']:9.1f} {row['triton_tbps']:6.2f}"
        f" {100 * row['triton_tbps'] / copy_tbps:5.1f}% {row['triton_error']:8.1e}"
        f" {row['speedup']:6.2f}x  {row['kernel']}",
        flush=True,
    )


def bench_shapes(copy_tbps: float, row_counts: tuple[int, ...] = ROWS) -> list[dict]:
    print(
        f"\n{'shape':>13} {'M':>3} {'torch us':>9} {'TB/s':>6} {'%copy':>6} {'rel err':>8}"
        f" {'triton us':>9} {'TB/s':>6} {'%copy':>6} {'rel err':>8} {'speedup':>7}  best kernel"
    )
    rows = []
    started = time.perf_counter()
    for name, n, k, with_bias, kind in SHAPES:
        try:
            rows += bench_shape(name, n, k, with_bias, kind, copy_tbps, row_counts)
        except Exception:  # noqa: BLE001
            print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)
        torch.cuda.empty_cache()
    print(f"(all shapes, including Triton compiles: {time.perf_counter() - started:.1f} s)")
    print_layer_sums(rows)
    return rows


def print_layer_sums(rows: list[dict]) -> None:
    """One layer's four products (qkv, o, gate_up, down) per M: torch alone against the
    faster of the two for each, which is what the dispatcher picks."""
    print(f"\n{'M':>3} {'layer torch us':>14} {'layer best us':>14} {'gain':>6}")
    for m in ROWS:
        mine = [r for r in rows if r["M"] == m and r["shape"] != "lm_head"]
        if len(mine) != 4:
            continue
        slow = sum(r["torch_us"] for r in mine)
        fast = sum(min(r["torch_us"], r.get("triton_us", r["torch_us"])) for r in mine)
        print(f"{m:3} {slow:14.1f} {fast:14.1f} {slow / fast:5.3f}x")


def bench_decode() -> dict:
    """Graph-replayed 7B decode step, dispatcher on and off (decode_profile's setup)."""
    from benchmarks.engine_bench import random_llama_7b
    from engine.decode_graphs import DecodeGraphs
    from engine.linear import residual_linear as plain  # torch's path as the engine runs it
    from engine.llama import LlamaRunner

    model = random_llama_7b().eval()
    started = time.perf_counter()
    runner = LlamaRunner(model, slots=65, slot_tokens=1024)
    result: dict[str, Any] = {"runner_start_s": time.perf_counter() - started}
    dispatcher = runner.decode_linear
    decisions = [str(d) for d in getattr(dispatcher, "decisions", [])]
    result |= {"calibration_s": getattr(dispatcher, "seconds", None), "decisions": decisions}
    print(f"\nLlamaRunner start {result['runner_start_s']:.1f} s, of which calibration "
          f"{result['calibration_s']} s; decisions:")  # fmt: skip
    for line in decisions:
        print("  " + line)
    logits = {}
    modes = [("torch", plain, True), ("dispatcher", dispatcher, True)]
    modes += [("dispatcher_no_pdl", dispatcher, False)]  # engine/pdl.py switched off
    for mode, linear, with_pdl in modes:
        runner.decode_linear = linear
        pdl.ALLOWED = with_pdl
        try:
            result[mode], found = time_decode(runner, DecodeGraphs)
            logits.setdefault(mode.split("_no_")[0], found)
        except Exception:  # noqa: BLE001
            print(f"decode with {mode}: FAILED\n{traceback.format_exc()}", flush=True)
        finally:
            pdl.ALLOWED = True
        torch.cuda.empty_cache()
    if len(logits) == 2:
        a, b = logits["torch"].double(), logits["dispatcher"].double()
        result["logits_rel_diff"] = float(((a - b).norm() / a.norm()).item())
        result["argmax_agree"] = float((a.argmax(-1) == b.argmax(-1)).double().mean().item())
        print(f"logits, dispatcher vs torch: relative difference {result['logits_rel_diff']:.2e}"
              f", argmax agreement {result['argmax_agree']:.3f}")  # fmt: skip
    print(f"\n{'batch':>5} {'torch ms':>9} {'dispatcher ms':>14} {'speedup':>8} {'no PDL':>8}")
    for batch in DECODE_BATCHES:
        t, d = result.get("torch", {}).get(batch), result.get("dispatcher", {}).get(batch)
        off = result.get("dispatcher_no_pdl", {}).get(batch, float("nan"))
        if t and d:
            print(f"{batch:5} {t:9.3f} {d:14.3f} {t / d:7.3f}x {off:8.3f}")
    return result


def time_decode(runner: Any, graphs_type: Any) -> tuple[dict[int, float], torch.Tensor]:
    """ms per graph-replayed step at each batch (context 512); the logits at batch 8."""
    graphs = graphs_type(runner.decode, 64, 64, torch.device("cuda"))
    times, logits = {}, None
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        for batch in DECODE_BATCHES:
            tokens = torch.randint(0, 32000, (batch,), device="cuda", generator=gen)
            slots = torch.arange(batch, device="cuda")
            positions = torch.full((batch,), 511, device="cuda")
            for _ in range(3):
                out = graphs.run(tokens, slots, positions)
            if batch == 8:
                logits = out.clone()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                graphs.run(tokens, slots, positions)
            end.record()
            end.synchronize()
            times[batch] = start.elapsed_time(end) / 20
    assert logits is not None
    return times, logits


def main() -> None:
    parser = argparse.ArgumentParser(
        description="cuBLAS vs Triton skinny GEMM, and the decode step"
    )
    parser.add_argument("--out", type=Path, help="folder for gemv-bench.json")
    parser.add_argument("--skip-decode", action="store_true", help="only the kernel table")
    parser.add_argument("--skip-shapes", action="store_true", help="only the decode step")
    parser.add_argument(
        "--rows", type=int, nargs="+", default=list(ROWS), help="row counts for the kernel table"
    )
    parser.add_argument(
        "--try-dot-tiles",
        type=json.loads,
        default=[],
        help="extra tensor-core tiles to try, JSON [[N, K, warps, stages], ...]",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # a candidate kernel that fails says why
    import triton

    props = torch.cuda.get_device_properties(0)
    report: dict[str, Any] = {
        "device": props.name, "sms": props.multi_processor_count,
        "l2_mb": getattr(props, "L2_cache_size", 0) / 2**20, "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
    }  # fmt: skip
    print(json.dumps(report))
    report["copy_tbps"] = copy_bandwidth()
    print(f"device-to-device copy: {report['copy_tbps']:.2f} TB/s (bytes read + written)")
    if args.try_dot_tiles:
        skinny_calibrate.DOT_TILES += tuple(tuple(t) for t in args.try_dot_tiles)
        report["dot_tiles"] = skinny_calibrate.DOT_TILES
    if not args.skip_shapes:
        report["shapes"] = bench_shapes(report["copy_tbps"], tuple(args.rows))
    if not args.skip_decode:
        try:
            report["decode"] = bench_decode()
        except Exception:  # noqa: BLE001
            print(f"decode: FAILED\n{traceback.format_exc()}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "gemv-bench.json"
        path.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
