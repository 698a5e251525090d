"""Where a decode step's time goes on the GPU: graph-replayed step time per batch size
for the LLaMA-7B shape (random bf16 weights), against the bytes it must read.

    python benchmarks/decode_profile.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_bench import random_llama_7b  # noqa: E402
from engine.decode_graphs import DecodeGraphs  # noqa: E402
from engine.llama import LlamaRunner  # noqa: E402


def main() -> None:
    model = random_llama_7b().eval()
    runner = LlamaRunner(model, slots=65, slot_tokens=2048)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        print(f"BLAS library: {library}")
        graphs = DecodeGraphs(runner.decode, 64, 64, torch.device("cuda"))
        measure(runner, graphs, weights)


def measure(runner: LlamaRunner, graphs: DecodeGraphs, weights: int) -> None:
    print(f"{'batch':>5} {'context':>7} {'ms/step':>8} {'GB read':>8} {'TB/s':>6} {'tok/s':>8}")
    with torch.inference_mode():
        for batch, context in [
            (1, 128),
            (1, 1024),
            (8, 512),
            (32, 512),
            (64, 128),
            (64, 512),
            (64, 1024),
        ]:
            tokens = torch.randint(0, 32000, (batch,), device="cuda")
            slots = torch.arange(batch, device="cuda")
            positions = torch.full((batch,), context - 1, device="cuda")
            for _ in range(3):
                graphs.run(tokens, slots, positions)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                graphs.run(tokens, slots, positions)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 20
            read = weights + batch * context * runner.kv_bytes_per_token()
            print(
                f"{batch:5} {context:7} {ms:8.2f} {read / 1e9:8.2f} {read / ms / 1e9:6.2f} {batch / ms * 1000:8.0f}"
            )


if __name__ == "__main__":
    main()
