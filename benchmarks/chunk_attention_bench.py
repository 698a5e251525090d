"""A mixed step's chunk attention on the GPU: torch's varlen flash attention reading the
keys in place from the slot cache (what served the chunks until session 7) against
engine/chunk_triton.py, side by side in one run. LLaMA-7B heads (32 x 128), bf16, a
66-slot cache of 2,048 tokens a slot, 32 layers replayed as one CUDA graph; the layouts
are those a mixed step's graph replays (padded to 66 sequences) and one eager chunk.

    python benchmarks/chunk_attention_bench.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.chunk_triton import triton_chunk_attention  # noqa: E402

LAYERS, SLOTS, TOKENS, HEADS, DIM = 32, 66, 2048, 32, 128

# name: ((slot, start, length) chunks, rows of q, sequences in the layout)
CASES: dict[str, tuple[list[tuple[int, int, int]], int, int]] = {
    "1x512_fresh_1seq": ([(3, 0, 512)], 512, 1),
    "449_fresh_pad66_rows512": ([(3, 0, 449)], 512, 66),
    "200+200+112_fresh_pad66": ([(3, 0, 200), (7, 0, 200), (9, 0, 112)], 512, 66),
    "512_after_512_pad66": ([(3, 512, 512)], 512, 66),
    "3x150_mid_prompt_pad66": ([(3, 300, 150), (7, 100, 150), (9, 0, 150)], 512, 66),
    "turn10_101_after_1215_rows128_pad66": ([(3, 1215, 101)], 128, 66),
    "1024_fresh_pad66": ([(3, 0, 1024)], 1024, 66),
}


def flash(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    cu_q: torch.Tensor, cu_k: torch.Tensor, used: torch.Tensor, max_q: int,
) -> torch.Tensor:  # fmt: skip
    """The baseline: aten's flash attention over the flattened cache with seqused_k."""
    flat = SLOTS * TOKENS
    return torch.ops.aten._flash_attention_forward(
        q, k_cache.view(flat, HEADS, DIM), v_cache.view(flat, HEADS, DIM),
        cu_q, cu_k, max_q, TOKENS, 0.0, True, False, seqused_k=used,
    )[0]  # fmt: skip


def us_per_layer(fn: Callable[[], object], reps: int = 10) -> float:
    """Microseconds a layer of fn (all LAYERS layers), replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps * 1000 / LAYERS


def measure(
    k: torch.Tensor, v: torch.Tensor, chunks: list[tuple[int, int, int]], rows: int, seqs: int
) -> dict[str, float]:
    q = torch.randn(rows, HEADS, DIM, dtype=torch.bfloat16, device="cuda")
    cu_q, cu_k, used = [0], [], []
    for slot, start, length in chunks:
        cu_q.append(cu_q[-1] + length)
        cu_k.append(slot * TOKENS)
        used.append(start + length)
    cu_q += [cu_q[-1]] * (seqs + 1 - len(cu_q))
    used += [0] * (seqs - len(used))
    cu_k += [0] * (len(cu_q) - len(cu_k))
    cq, ck, u = (torch.tensor(x, dtype=torch.int32, device="cuda") for x in (cu_q, cu_k, used))
    # flash's max_q: the padded rows in a graph, the longest chunk (at least 2) eagerly
    max_q = rows if seqs > 1 else max(2, *(length for *_, length in chunks))
    out = torch.empty_like(q)
    ref = flash(q, k[0], v[0], cq, ck, u, max_q)
    triton_chunk_attention(q, k[0], v[0], cq, ck, u, out)
    n = cu_q[len(chunks)]
    error = ((out[:n].float() - ref[:n].float()).norm() / ref[:n].float().norm()).item()
    base = us_per_layer(lambda: [flash(q, k[i], v[i], cq, ck, u, max_q) for i in range(LAYERS)])
    ours = us_per_layer(
        lambda: [triton_chunk_attention(q, k[i], v[i], cq, ck, u, out) for i in range(LAYERS)]
    )
    return {
        "flash_us": round(base, 1), "triton_us": round(ours, 1),
        "speedup": round(base / ours, 2), "rel_err": round(error, 5),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (LAYERS, SLOTS, TOKENS, HEADS, DIM)
    k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    results = {}
    for name, (chunks, rows, seqs) in CASES.items():
        results[name] = measure(k, v, chunks, rows, seqs)
        print(name, json.dumps(results[name]), flush=True)
    record = {
        "command": "python benchmarks/chunk_attention_bench.py",
        "machine": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"chunk-attention-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print("written to", path)


if __name__ == "__main__":
    main()
