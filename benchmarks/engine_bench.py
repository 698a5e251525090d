"""Decode speed on one GPU: HF `generate` (the seed recipe) vs lorabot's engine, in one run.

Builds the LLaMA-7B shape with random bf16 weights (or loads --model FOLDER), attaches
a LoRA adapter (r16 on all linear layers, non-zero B), and measures side by side:
  (1) HF generate, one request at a time, LoRA unmerged (a sample of 8 requests),
  (2) HF generate, one static left-padded batch of the 64-chat workload,
  (3) lorabot's engine (continuous batching, merged LoRA, CUDA graphs).
Workloads: one stream (prompt 128, 128 new); 64 chats at once (prompts 32-512, replies
64-256, EOS off); a 10-turn conversation adding 100 tokens of history per turn.

    python benchmarks/engine_bench.py --tokenizer DIR [--model DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.chat_format import make_chat_format  # noqa: E402
from engine.types import SamplingParams  # noqa: E402
from engine.worker import LocalEngine  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.randn(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    del src, dst
    return 2 * 2 * 1024**3 / seconds


def random_llama_7b() -> Any:
    """The LLaMA-7B shape with random bf16 weights, on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    )  # fmt: skip
    with torch.device("cuda"):
        return LlamaForCausalLM(config).to(torch.bfloat16)


def build_model(args: argparse.Namespace) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda()
    else:
        model = random_llama_7b()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)  # a trained adapter, not a no-op
    return peft_model.eval()


def workload(rng: random.Random) -> list[tuple[list[int], int]]:
    return [
        ([rng.randrange(100, 31000) for _ in range(rng.randint(32, 512))], rng.randint(64, 256))
        for _ in range(64)
    ]


def hf_sequential(model: Any, requests: list[tuple[list[int], int]]) -> float:
    generated, seconds = 0, 0.0
    for prompt, new in requests:
        ids = torch.tensor([prompt], device="cuda")
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
        torch.cuda.synchronize()
        seconds += time.perf_counter() - started
        generated += out.shape[1] - ids.shape[1]
    return generated / seconds


def hf_batched(model: Any, requests: list[tuple[list[int], int]]) -> float:
    longest = max(len(p) for p, _ in requests)
    ids = torch.zeros((len(requests), longest), dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for row, (prompt, _new) in enumerate(requests):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    new = max(n for _, n in requests)
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
    )
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    return sum(n for _, n in requests) / wall  # the tokens each chat asked for


async def timed(engine: LocalEngine, prompt: list[int], new: int) -> dict[str, Any]:
    params = SamplingParams(max_new_tokens=new, temperature=0.0)
    started = time.perf_counter()
    stream = engine.stream_tokens(prompt, params)
    arrivals = []
    async for _delta in stream:
        arrivals.append(time.perf_counter())
    done = stream.completion
    assert done is not None and done.completion_tokens == new, done
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return {
        "ttft": arrivals[0] - started,
        "total": arrivals[-1] - started,
        "tokens": done.completion_tokens,
        "gaps": gaps,
        "decode_tok_s": (new - 1) / (arrivals[-1] - arrivals[0]),
        "ids": list(done.token_ids),
    }


async def engine_runs(
    engine: LocalEngine,
    requests: list[tuple[list[int], int]],
    rng: random.Random,
    conversations: int,
) -> dict[str, Any]:
    prompt = [rng.randrange(100, 31000) for _ in range(128)]
    await timed(engine, prompt, 16)  # warm-up: graphs, Triton, cuBLAS
    # A crowd of other chats warms up the batched paths; the measured 64 must be new to
    # the engine (a prompt it has seen would be served from its slot's cache).
    await asyncio.gather(*(timed(engine, p, 8) for p, _ in workload(random.Random(1))))
    singles = [
        await timed(engine, [rng.randrange(100, 31000) for _ in range(128)], 128) for _ in range(3)
    ]
    torch.cuda.synchronize()
    started = time.perf_counter()
    results = await asyncio.gather(*(timed(engine, p, n) for p, n in requests))
    wall = time.perf_counter() - started
    gaps = [g for r in results for g in r["gaps"]]
    # 10-turn conversations; each turn adds the reply and 100 tokens of history. The
    # prompt tokens each turn computes show the reuse directly (TTFTs of 10-25 ms are
    # at the mercy of host jitter; hence the median over several conversations).
    runs, computed = [], []
    scheduler = engine._scheduler
    for _conversation in range(conversations):
        history = [rng.randrange(100, 31000) for _ in range(128)]
        turns, prefilled, lengths = [], [], []
        for _turn in range(10):
            lengths.append(len(history))
            before = scheduler.prefill_tokens if scheduler is not None else 0
            result = await timed(engine, history, 32)
            turns.append(result["ttft"])
            if scheduler is not None:
                prefilled.append(scheduler.prefill_tokens - before)
            history = history + result["ids"] + [rng.randrange(100, 31000) for _ in range(100)]
        runs.append(turns)
        computed.append(prefilled)
    turns = [statistics.median(run[i] for run in runs) for i in range(10)]
    return {
        "single_stream_tok_s": statistics.median(r["decode_tok_s"] for r in singles),
        "single_stream_ttft_ms": 1000 * statistics.median(r["ttft"] for r in singles),
        "concurrent64_tok_s": sum(r["tokens"] for r in results) / wall,
        "concurrent64_ttft_p50_ms": 1000 * pct([r["ttft"] for r in results], 0.5),
        "concurrent64_ttft_p99_ms": 1000 * pct([r["ttft"] for r in results], 0.99),
        "concurrent64_itl_p50_ms": 1000 * pct(gaps, 0.5),
        "concurrent64_itl_p99_ms": 1000 * pct(gaps, 0.99),
        "turn_ttft_ms": [round(1000 * t, 2) for t in turns],
        "turn10_over_turn1_ttft": turns[-1] / turns[0],
        "turn_prompt_tokens_computed": computed[0] if computed and computed[0] else None,
        "turn_prompt_tokens": lengths,
    }


def hf_greedy(model: Any, requests: list[tuple[list[int], int]], new: int) -> list[list[int]]:
    outputs = []
    with torch.inference_mode():
        for prompt, _ in requests:
            ids = torch.tensor([prompt], device="cuda")
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
            outputs.append(out[0, ids.shape[1] :].tolist())
    return outputs


async def greedy_agreement(
    engine: LocalEngine, requests: list[tuple[list[int], int]], references: list[list[int]]
) -> dict[str, Any]:
    """bf16 greedy tokens of the engine vs HF generate on the same merged weights."""
    same, prefix = 0, []
    for (prompt, _), reference in zip(requests, references, strict=True):
        ids = (await timed(engine, prompt, len(reference)))["ids"]
        same += sum(a == b for a, b in zip(ids, reference, strict=True))
        first_diff = next(
            (i for i, (a, b) in enumerate(zip(ids, reference, strict=True)) if a != b), len(ids)
        )
        prefix.append(first_diff)
    total = sum(len(r) for r in references)
    return {"greedy_tokens_agree": f"{same}/{total}", "greedy_identical_prefix": prefix}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder (any LLaMA-family)")
    parser.add_argument("--model", default="", help="a real model folder instead of random weights")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--skip-hf", action="store_true", help="only lorabot's engine")
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=0,
        help="[engine] prefill_chunk (0: the engine's default)",
    )
    parser.add_argument("--conversations", type=int, default=9, help="10-turn chats timed")
    parser.add_argument(
        "--kv-cache", choices=["auto", "fp8"], default="auto", help="[engine] kv_cache"
    )
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN plans every new shape (slow)
    rng = random.Random(0)
    bandwidth = copy_bandwidth()
    model = build_model(args)
    requests = workload(rng)
    figures: dict[str, Any] = {}
    if not args.skip_hf:
        with torch.inference_mode():
            figures["hf_sequential_tok_s"] = hf_sequential(model, requests[:8])
            figures["hf_batched64_tok_s"] = hf_batched(model, requests)
        torch.cuda.empty_cache()
    merged = model.merge_and_unload()
    references = hf_greedy(merged, requests[:4], 64)
    weight_bytes = sum(p.numel() * p.element_size() for p in merged.parameters())
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    chat_format = make_chat_format("alpaca", tokenizer)
    chat_format.stop_token_ids = frozenset()  # EOS off: fixed reply lengths
    chat_format.stop_strings = ()
    torch.cuda.reset_peak_memory_stats()
    engine = LocalEngine(
        merged,
        tokenizer,
        chat_format,
        context_window=2048,
        max_queue=256,
        slots=64,
        slot_tokens=2048,
        prefill_chunk=args.prefill_chunk,
        kv_cache=args.kv_cache,
    )
    scheduler = engine._scheduler
    figures["prefill_chunk"] = scheduler.prefill_chunk if scheduler is not None else None
    figures["kv_cache"] = "fp8" if scheduler is not None and scheduler.runner.kv_fp8 else "auto"
    if scheduler is not None:  # what engine start chose for the decode products
        linear = scheduler.runner.decode_linear
        figures["calibration_s"] = getattr(linear, "seconds", None)
        figures["cublaslt_picks"] = [str(d) for d in getattr(linear, "lt_decisions", [])]
    figures.update(asyncio.run(engine_runs(engine, requests, rng, args.conversations)))
    figures.update(asyncio.run(greedy_agreement(engine, requests[:4], references)))
    engine.close()
    limit = bandwidth / weight_bytes
    figures.update(
        {
            "copy_bandwidth_tb_s": bandwidth / 1e12,
            "weights_gb": weight_bytes / 1e9,
            "bandwidth_limit_single_tok_s": limit,
            "bandwidth_fraction_single": figures["single_stream_tok_s"] / limit,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
        }
    )
    if "hf_sequential_tok_s" in figures:
        figures["single_vs_hf_sequential"] = (
            figures["single_stream_tok_s"] / figures["hf_sequential_tok_s"]
        )
        figures["concurrent64_vs_hf_batched"] = (
            figures["concurrent64_tok_s"] / figures["hf_batched64_tok_s"]
        )
    summary_keys = [
        "single_stream_tok_s", "concurrent64_tok_s", "concurrent64_itl_p99_ms",
        "concurrent64_ttft_p50_ms", "turn10_over_turn1_ttft", "hf_sequential_tok_s",
        "hf_batched64_tok_s", "bandwidth_fraction_single",
    ]  # fmt: skip
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
        "summary": {k: round(figures[k], 3) for k in summary_keys if k in figures},
        "figures": {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"engine-{result['date']}{args.tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result["figures"].items():
        print(f"{key:34} {value}")
    print(f"written to {path}", os.environ.get("OUT", ""))


if __name__ == "__main__":
    main()
