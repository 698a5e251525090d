"""Decode attention on the GPU: the Triton split-K kernel's settings, swept per batch size
(fixed-size or equal splits, grid batch-first or heads-first), next to the engine's own
setting. This times the split and merge kernels; at batch <= 4 the engine runs the
one-kernel RoPE variant with the same splits (engine/attention_triton.py).

Each setting runs inside a CUDA graph over all 32 layers' caches in turn (as in a decode
step: no launch overhead, nothing left in L2), on sequences of random lengths. Prints
microseconds per layer and the bandwidth reached (bytes of K and V read per second),
and the best setting per batch size.

    python benchmarks/attention_bench.py [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.attention import Settings, kernel_settings, reference_attention  # noqa: E402
from engine.attention_triton import triton_decode_attention  # noqa: E402


def sweep(batch: int, dot: bool) -> list[Settings]:
    """Fixed-size splits (the cache cut every `split` keys) and equal splits per sequence
    (`parts`); past one sequence, each with the grid batch first and heads first. dot:
    the tensor-core variant instead, whose loads are pipelined (blocks, warps, stages)."""
    if dot:
        cuts = [(64, 0), (128, 0), (256, 0), (0, 2), (0, 4)] if batch > 1 else [(0, 16), (0, 32)]
        deep = [
            (32, 4, 3),
            (32, 4, 4),
            (64, 4, 2),
            (64, 4, 3),
            (64, 8, 3),
            (128, 4, 2),
            (128, 8, 2),
        ]
        return [
            Settings(split, block, w, stages, parts, batch > 1, dot=True)
            for (split, parts), (block, w, stages) in itertools.product(cuts, deep)
        ]
    if batch == 1:
        fixed = itertools.product((64, 128), (32, 64), (4, 8), (False,))
        equal = itertools.product((8, 16, 32), (32, 64), (4, 8), (False,))
    else:
        fixed = itertools.product((64, 128, 256), (16, 32), (2, 4), (False, True))
        equal = itertools.product((1, 2, 4, 8), (16, 32, 64), (2, 4), (False, True))
    return [Settings(split, block, w, 3, 0, first) for split, block, w, first in fixed] + [
        Settings(0, block, w, 3, parts, first) for parts, block, w, first in equal
    ]


def label(settings: Settings) -> str:
    cut = f"parts{settings.parts}" if settings.parts else f"split{settings.split}"
    order = " heads-first" if settings.heads_first else ""
    dot = " dot" if settings.dot else ""
    return f"{cut}/{settings.block_n}/{settings.warps}/{settings.stages}{order}{dot}"


def time_layers(
    settings: Settings,
    q: torch.Tensor,
    caches: tuple,
    slot_ids: torch.Tensor,
    lengths: torch.Tensor,
) -> float:
    """us per layer: every layer's attention in turn, replayed as one CUDA graph."""
    k_cache, v_cache = caches

    def step() -> None:
        for layer in range(k_cache.shape[0]):
            triton_decode_attention(q, k_cache[layer], v_cache[layer], slot_ids, lengths, settings)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / 5 / k_cache.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--cases", nargs="+", help="only these cases (e.g. b64_ctx300-500)")
    parser.add_argument(
        "--sweep",
        choices=("plain", "dot", "both"),
        default="both",
        help="which kernel variant's settings to sweep (the engine's setting is always timed)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    heads, dim, slots, tokens = 32, 128, 65, 2048
    shape = (args.layers, slots, tokens, heads, dim)
    k_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    results: dict[str, Any] = {}
    cases = {
        "b1_ctx128": (1, 128, 128),
        "b1_ctx1300": (1, 1300, 1300),
        "b8_ctx100-900": (8, 100, 900),
        "b32_ctx100-900": (32, 100, 900),
        "b64_ctx100-900": (64, 100, 900),
        "b64_ctx300-500": (64, 300, 500),
    }
    for name, (batch, low, high) in cases.items():
        if args.cases and name not in args.cases:
            continue
        gen = torch.Generator().manual_seed(batch)
        lengths = torch.randint(low, high + 1, (batch,), generator=gen).cuda()
        slot_ids = torch.randperm(slots - 1, generator=gen)[:batch].cuda()
        q = torch.randn((batch, heads, dim), dtype=torch.bfloat16, device="cuda")
        expected = reference_attention(q, k_cache[0], v_cache[0], slot_ids, lengths).float()
        moved = int(lengths.sum()) * heads * dim * 2 * 2  # K and V, one layer
        timings = {}
        engine = kernel_settings(batch)
        candidates = [engine]
        if args.sweep in ("plain", "both"):
            candidates += sweep(batch, dot=False)
        if args.sweep in ("dot", "both"):
            candidates += sweep(batch, dot=True)
        for settings in dict.fromkeys(candidates):
            try:
                out = triton_decode_attention(
                    q, k_cache[0], v_cache[0], slot_ids, lengths, settings
                ).float()
                error = ((out - expected).norm() / expected.norm()).item()
                if not error < 2e-2:
                    print(f"{name} {label(settings)}: error {error:.2g}")
                    continue
                us = time_layers(settings, q, (k_cache, v_cache), slot_ids, lengths)
            except Exception as exc:  # noqa: BLE001 - a setting that does not compile
                print(f"{name} {label(settings)}: {type(exc).__name__}")
                continue
            timings[label(settings)] = round(us, 2)
        ranked = sorted(timings.items(), key=lambda kv: kv[1])
        current = timings.get(label(engine), math.nan)
        best_key, best_us = ranked[0]
        print(
            f"{name:16} engine {label(engine)} {current:7.1f} us ({moved / current / 1e6:.2f} TB/s)"
            f"  best {best_key} {best_us:7.1f} us"
            f" ({moved / best_us / 1e6:.2f} TB/s)"
            f"  next: {', '.join(f'{k} {v}' for k, v in ranked[1:6])}",
            flush=True,
        )
        results[name] = {"engine": label(engine), "engine_us": current,
                         "best": best_key, "best_us": best_us, "bytes_per_layer": moved,
                         "all": timings}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"attention-bench-{args.sweep}.json").write_text(
        json.dumps(results, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
