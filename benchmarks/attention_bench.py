"""Decode attention on the GPU: the Triton split-K kernel's settings, swept per batch size.

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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.attention import reference_attention  # noqa: E402
from engine.attention_triton import triton_decode_attention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    heads, dim, slots, tokens = 32, 128, 65, 2048
    shape = (args.layers, slots, tokens, heads, dim)
    k_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    results: dict[str, dict[str, float]] = {}
    cases = {
        "b1_ctx128": (1, 128, 128),
        "b1_ctx1300": (1, 1300, 1300),
        "b8_ctx100-900": (8, 100, 900),
        "b32_ctx100-900": (32, 100, 900),
        "b64_ctx100-900": (64, 100, 900),
        "b64_ctx300-500": (64, 300, 500),
    }
    settings = list(itertools.product((64, 128, 256, 512, 2048), (16, 32, 64), (2, 4, 8), (2, 3)))
    for name, (batch, low, high) in cases.items():
        gen = torch.Generator().manual_seed(batch)
        lengths = torch.randint(low, high + 1, (batch,), generator=gen).cuda()
        slot_ids = torch.randperm(slots - 1, generator=gen)[:batch].cuda()
        q = torch.randn((batch, heads, dim), dtype=torch.bfloat16, device="cuda")
        expected = reference_attention(q, k_cache[0], v_cache[0], slot_ids, lengths).float()
        moved = int(lengths.sum()) * heads * dim * 2 * 2  # K and V, one layer
        timings = {}
        for split, block, warps, stages in settings:
            if block > split:
                continue

            def step(
                split=split, block=block, warps=warps, stages=stages, q=q, s=slot_ids, n=lengths
            ) -> None:
                for layer in range(args.layers):
                    triton_decode_attention(
                        q, k_cache[layer], v_cache[layer], s, n,
                        split, block, warps, stages,
                    )  # fmt: skip

            try:
                out = triton_decode_attention(
                    q, k_cache[0], v_cache[0], slot_ids, lengths, split, block, warps, stages
                ).float()
                error = ((out - expected).norm() / expected.norm()).item()
                if not error < 2e-2:
                    print(f"{name} {split}/{block}/{warps}/{stages}: error {error:.2g}")
                    continue
                step()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                graph.replay()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(5):
                    graph.replay()
                end.record()
                end.synchronize()
                us = start.elapsed_time(end) * 1000 / 5 / args.layers
            except Exception as exc:  # noqa: BLE001 - a setting that does not compile
                print(f"{name} {split}/{block}/{warps}/{stages}: {type(exc).__name__}")
                continue
            timings[f"{split}/{block}/{warps}/{stages}"] = round(us, 2)
        ranked = sorted(timings.items(), key=lambda kv: kv[1])
        current = timings.get("128/32/4/3", math.nan)
        best_key, best_us = ranked[0]
        print(
            f"{name:16} current 128/32/4/3 {current:7.1f} us ({moved / current / 1e6:.2f} TB/s)"
            f"  best {best_key} {best_us:7.1f} us ({moved / best_us / 1e6:.2f} TB/s)"
            f"  next: {', '.join(f'{k} {v}' for k, v in ranked[1:6])}"
        )
        results[name] = {"current_us": current, "best": best_key, "best_us": best_us,
                         "bytes_per_layer": moved, "all": timings}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention-bench.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
