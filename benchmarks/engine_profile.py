"""Where the engine's time goes on the 64-chat workload (a diagnosis, not a comparison).

Runs engine_bench's 64-chat workload through lorabot's engine with the scheduler's
steps timed: GPU time of each prefill and decode step (CUDA events, no extra syncs),
host time of launching and publishing, the time the host waits for the device, and
the engine-side gap between a sequence's tokens (when the worker publishes them) next
to the gap its consumer sees. Then, with the worker idle, it times the pieces alone:
a decode step per batch size and context length, decode attention, and prefill chunks.

    python benchmarks/engine_profile.py --tokenizer DIR [--out DIR] [--tiny]

--tiny: a small random model on the CPU (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine_bench import pct, random_llama_7b, timed, workload  # noqa: E402
from engine import batching  # noqa: E402
from engine.chat_format import make_chat_format  # noqa: E402
from engine.worker import LocalEngine  # noqa: E402


class Timer:
    """Pairs of CUDA events (or host clocks on the CPU), read after the run."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.spans: dict[str, list[tuple[Any, Any, int]]] = defaultdict(list)

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, name: str, start: Any, end: Any, size: int = 0) -> None:
        self.spans[name].append((start, end, size))

    def ms(self, name: str) -> list[tuple[float, int]]:
        out = []
        for start, end, size in self.spans[name]:
            if self.cuda:
                out.append((start.elapsed_time(end), size))
            else:
                out.append((1000 * (end - start), size))
        return out


def instrument(scheduler: batching.BatchScheduler, timer: Timer) -> dict[str, Any]:
    """Wrap the scheduler's steps; returns the dict the wrappers fill."""
    host: dict[str, float] = defaultdict(float)
    accepted: dict[int, list[float]] = defaultdict(list)
    log: list[tuple[float, str, int]] = []
    prefill, launch, publish, emit = (
        scheduler._prefill_step,
        scheduler._launch,
        scheduler._publish,
        scheduler._emit,
    )

    def timed_prefill() -> None:
        started = time.perf_counter()
        log.append((started, "prefill", len(scheduler.prefilling)))
        a = timer.mark()
        prefill()
        timer.add("prefill", a, timer.mark())
        host["prefill_s"] += time.perf_counter() - started

    def timed_launch(batch: list[Any], after: Any = None) -> Any:
        started = time.perf_counter()
        log.append((started, "launch", len(batch)))
        a = timer.mark()
        step = launch(batch, after=after)
        timer.add("decode", a, timer.mark(), len(batch))
        host["launch_s"] += time.perf_counter() - started
        return step

    def timed_publish(step: Any) -> None:
        started = time.perf_counter()
        waited = time.perf_counter()
        if step.copied is not None:
            step.copied.synchronize()
        host["wait_s"] += time.perf_counter() - waited
        publish(step)
        host["publish_s"] += time.perf_counter() - started
        log.append((time.perf_counter(), "published", len(step.batch)))

    def timed_emit(seq: Any, token: int) -> bool:  # when a token reaches its stream
        accepted[id(seq)].append(time.perf_counter())
        return emit(seq, token)

    scheduler._prefill_step = timed_prefill  # type: ignore[method-assign]
    scheduler._launch = timed_launch  # type: ignore[method-assign]
    scheduler._publish = timed_publish  # type: ignore[method-assign]
    scheduler._emit = timed_emit  # type: ignore[method-assign]
    return {"host": host, "accepted": accepted, "log": log}


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def time_fn(fn: Any, cuda: bool, repeat: int = 10) -> float:
    """Milliseconds per call (median of `repeat`, after one warm-up)."""
    fn()
    sync(cuda)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        sync(cuda)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def pieces(engine: LocalEngine, cuda: bool) -> dict[str, Any]:
    """Decode steps, attention and prefill timed alone (the worker is idle)."""
    from engine.attention import decode_attention

    scheduler = engine._scheduler
    assert scheduler is not None
    runner = scheduler.runner
    device = runner.device
    out: dict[str, Any] = {}
    kv = runner.kv_bytes_per_token()
    weights = (
        sum(
            t.numel() * t.element_size()
            for layer in runner.layers
            for t in (layer.qkv, layer.o, layer.gate_up, layer.down)
        )
        + runner.lm_head.numel() * runner.lm_head.element_size()
    )
    top = len(scheduler.slots)
    with torch.inference_mode():
        for batch in (1, 8, 16, 32, 64):
            if batch > top:
                continue
            for context in (128, 512, 1024):
                tokens = torch.full((batch,), 5, dtype=torch.long, device=device)
                slots = torch.arange(batch, device=device)
                positions = torch.full((batch,), context - 1, dtype=torch.long, device=device)
                if scheduler.graphs is not None:
                    ms = time_fn(lambda: scheduler.graphs.run(tokens, slots, positions), cuda)  # noqa: B023
                else:
                    ms = time_fn(lambda: runner.decode(tokens, slots, positions), cuda)  # noqa: B023
                moved = weights + batch * context * kv
                out[f"decode_b{batch}_ctx{context}_ms"] = round(ms, 3)
                out[f"decode_b{batch}_ctx{context}_tb_s"] = round(moved / ms / 1e9, 3)
        q = torch.randn((64, runner.heads, runner.head_dim), dtype=runner.dtype, device=device)
        slots = torch.arange(min(64, top), device=device)
        q = q[: slots.shape[0]]
        k_cache, v_cache, scales = runner.k_cache[0], runner.v_cache[0], runner._scales(0)
        for context in (128, 400, 1024):
            lengths = torch.full_like(slots, context)
            ms = time_fn(
                lambda: decode_attention(q, k_cache, v_cache, slots, lengths, scales),  # noqa: B023
                cuda,
            )
            out[f"attention_b{slots.shape[0]}_ctx{context}_us_per_layer"] = round(1000 * ms, 1)
            moved = slots.shape[0] * context * kv / len(runner.layers)
            out[f"attention_b{slots.shape[0]}_ctx{context}_tb_s"] = round(moved / ms / 1e9, 3)
        # A mixed step: 512 prompt tokens with up to 64 decode rows at 400 tokens of
        # context, in the scheduler's slots (the last runner slot is graph scratch).
        spare = len(scheduler.slots) - 1  # a slot no decode row uses
        rows = [(5, slot, 399) for slot in range(min(64, spare))]
        ms = time_fn(lambda: runner.forward([(spare, list(range(100, 612)), 0)], rows), cuda, 5)
        out[f"mixed_512_plus_{len(rows)}_decode_ms"] = round(ms, 3)
        for sizes in ((512,), (128, 128, 128, 128), (256,), (64,)):
            chunks = [(i, list(range(100, 100 + n)), 0) for i, n in enumerate(sizes)]
            ms = time_fn(lambda: runner.forward(chunks), cuda, repeat=5)  # noqa: B023
            out[f"prefill_{'+'.join(map(str, sizes))}_ms"] = round(ms, 3)
        # The same steps replayed from the scheduler's mixed-step graphs (no host).
        mixed = scheduler.mixed_graphs
        if mixed is not None:
            ms = time_fn(lambda: mixed.run([(spare, list(range(100, 612)), 0)], rows), cuda, 5)
            out[f"graph_mixed_512_plus_{len(rows)}_decode_ms"] = round(ms, 3)
            for n in (512, 64):
                chunk = [(spare, list(range(100, 100 + n)), 0)]
                ms = time_fn(lambda: mixed.run(chunk), cuda, repeat=5)  # noqa: B023
                out[f"graph_prefill_{n}_ms"] = round(ms, 3)
    # Host time of a mixed step: where the Python goes (cProfile, 5 calls).
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    with torch.inference_mode():
        profiler.enable()
        for _ in range(5):
            runner.forward([(spare, list(range(100, 164)), 0)], rows)
        profiler.disable()
        sync(cuda)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())
    # The same decode step with and without the fused prologues (same GPU, same run).
    if scheduler.graphs is not None:
        plans = runner.decode_linear.plans
        tokens = torch.full((1,), 5, dtype=torch.long, device=device)
        one, last = torch.zeros(1, dtype=torch.long, device=device), torch.full_like(tokens, 127)
        for label, kept in (
            ("fused", plans),
            ("unfused", {k: v for k, v in plans.items() if not k[4]}),
        ):
            runner.decode_linear.plans = kept
            graphs = type(scheduler.graphs)(runner.decode, 1, runner.slots - 1, device)
            with torch.inference_mode():
                ms = time_fn(lambda g=graphs: g.run(tokens, one, last), cuda, repeat=50)
            out[f"decode_b1_ctx128_{label}_ms"] = round(ms, 4)
        runner.decode_linear.plans = plans
    out["skinny_gemm_decisions"] = [str(d) for d in getattr(runner.decode_linear, "decisions", [])]
    lt = getattr(runner.decode_linear, "lt_decisions", [])
    out["cublaslt_picks"] = [str(d) for d in lt]
    out["weights_gb"] = round(weights / 1e9, 3)
    out["kv_mb_per_token"] = round(kv / 1e6, 3)
    return out


async def run_workload(engine: LocalEngine, requests: list[tuple[list[int], int]]) -> Any:
    started = time.perf_counter()
    results = await asyncio.gather(*(timed(engine, p, n) for p, n in requests))
    return results, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tiny", action="store_true", help="small random model on the CPU")
    parser.add_argument("--prefill-chunk", type=int, default=0, help="0: the engine's default")
    parser.add_argument(
        "--kv-cache", choices=["auto", "fp8"], default="auto", help="[engine] kv_cache"
    )
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cuda = not args.tiny
    torch.manual_seed(0)
    if args.tiny:
        config = LlamaConfig(
            vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        )  # fmt: skip
        model = LlamaForCausalLM(config).eval()
    else:
        torch.backends.cuda.enable_cudnn_sdp(False)
        model = random_llama_7b().eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    chat_format = make_chat_format("alpaca", tokenizer)
    chat_format.stop_token_ids = frozenset()
    chat_format.stop_strings = ()
    rng = random.Random(0)
    requests = workload(rng)
    if args.tiny:
        requests = [(p[:64], n // 8) for p, n in requests[:8]]

    async def go() -> dict[str, Any]:
        engine = LocalEngine(
            model, tokenizer, chat_format, context_window=2048, max_queue=256,
            slots=64, slot_tokens=2048, prefill_chunk=args.prefill_chunk,
            kv_cache=args.kv_cache,
        )  # fmt: skip
        scheduler = engine._scheduler
        assert scheduler is not None
        # Warm-up on other prompts: the measured chats must be new to the engine (a
        # prompt seen before would be served from its slot's cache).
        warm = workload(random.Random(1))
        await timed(engine, warm[0][0], 8)  # graphs captured, kernels compiled
        await asyncio.gather(*(timed(engine, p, 4) for p, _ in warm))
        timer = Timer(cuda)
        probe = instrument(scheduler, timer)
        results, wall = await run_workload(engine, requests)
        sync(cuda)
        figures: dict[str, Any] = {"wall_s": round(wall, 3)}
        tokens = sum(r["tokens"] for r in results)
        figures["tok_s"] = round(tokens / wall, 1)
        for name in ("prefill", "decode"):
            spans = timer.ms(name)
            figures[f"{name}_steps"] = len(spans)
            figures[f"{name}_gpu_s"] = round(sum(ms for ms, _ in spans) / 1000, 3)
        by_size: dict[int, list[float]] = defaultdict(list)
        for ms, size in timer.ms("decode"):
            by_size[size].append(ms)
        figures["decode_ms_by_batch"] = {
            size: [len(v), round(statistics.median(v), 3)] for size, v in sorted(by_size.items())
        }
        figures["prefill_ms"] = [round(ms, 2) for ms, _ in timer.ms("prefill")]
        figures["gpu_idle_s"] = round(wall - figures["prefill_gpu_s"] - figures["decode_gpu_s"], 3)
        figures.update({k: round(v, 3) for k, v in probe["host"].items()})
        engine_gaps = [
            b - a
            for times in probe["accepted"].values()
            for a, b in zip(times, times[1:], strict=False)
        ]
        client_gaps = [g for r in results for g in r["gaps"]]
        for label, gaps in (("engine", engine_gaps), ("client", client_gaps)):
            figures[f"{label}_itl_count"] = len(gaps)
            for q in (0.5, 0.9, 0.99):
                figures[f"{label}_itl_p{round(q * 100)}_ms"] = round(1000 * pct(gaps, q), 2)
        figures["ttft_p50_ms"] = round(1000 * pct([r["ttft"] for r in results], 0.5), 1)
        figures["ttft_p99_ms"] = round(1000 * pct([r["ttft"] for r in results], 0.99), 1)
        # The scheduler's events around the ten longest engine-side gaps.
        spans = sorted(
            (
                (b - a, a, b)
                for times in probe["accepted"].values()
                for a, b in zip(times, times[1:], strict=False)
            ),
            reverse=True,
        )[:10]
        origin = min(t for t, _, _ in probe["log"]) if probe["log"] else 0.0
        figures["longest_gaps"] = [
            {
                "ms": round(1000 * gap, 2),
                "at_ms": round(1000 * (a - origin), 1),
                "events": [
                    f"{1000 * (t - origin):.1f} {kind} {n}"
                    for t, kind, n in probe["log"]
                    if a <= t <= b
                ][:12],
            }
            for gap, a, b in spans
        ]
        figures["pieces"] = pieces(engine, cuda)
        engine.close()
        return figures

    figures = asyncio.run(go())
    text = json.dumps(figures, indent=1)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"engine-profile-{time.strftime('%Y-%m-%d')}{args.tag}.json"
    (args.out / name).write_text(text + "\n")


if __name__ == "__main__":
    main()
