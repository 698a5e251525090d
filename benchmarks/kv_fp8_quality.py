"""What a float8 KV cache ([engine] kv_cache = "fp8") costs in quality, on the CPU.

Runs the embedded SmolLM2-135M-Instruct (fp32) over text from this repository with its
keys (after RoPE) and values rounded as a cache would store them, and prints the
perplexity of each: exact, bf16, float8 e4m3 with one factor per token and head (what
the engine stores: the row's largest magnitude to 448), and float8 e4m3 without a
factor (a per-tensor scale of 1, as caches without calibration use).

    python benchmarks/kv_fp8_quality.py [--out DIR] [--tokens N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import ModelConfig  # noqa: E402
from engine.loading import resolve_base  # noqa: E402

FP8_MAX = 448.0


def per_row(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-30) / FP8_MAX
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


ROUNDINGS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "exact (fp32)": None,
    "bf16": lambda x: x.to(torch.bfloat16).float(),
    "fp8 e4m3, a factor per token and head (the engine's)": per_row,
    "fp8 e4m3, no factor": lambda x: x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama import modeling_llama

    folder, _name = resolve_base(ModelConfig())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.config._attn_implementation = "eager"
    text = "\n\n".join(
        (ROOT / name).read_text() for name in ("README.md", "ARCHITECTURE.md", "docs/serve.md")
    )
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    original = modeling_llama.eager_attention_forward
    rounding: list[Callable[[torch.Tensor], torch.Tensor] | None] = [None]

    def rounded(module: Any, query: Any, key: Any, value: Any, *rest: Any, **kw: Any) -> Any:
        fn = rounding[0]
        if fn is not None:
            key, value = fn(key), fn(value)
        return original(module, query, key, value, *rest, **kw)

    modeling_llama.eager_attention_forward = rounded
    results = {}
    try:
        with torch.inference_mode():
            for name, fn in ROUNDINGS.items():
                rounding[0] = fn
                loss = model(ids, labels=ids).loss.item()
                results[name] = round(math.exp(loss), 4)
                print(f"{name:55} perplexity {results[name]:.4f}", flush=True)
    finally:
        modeling_llama.eager_attention_forward = original
    exact = results["exact (fp32)"]
    summary = {name: round(ppl / exact - 1, 5) for name, ppl in results.items()}
    record = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} {platform.processor()} torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct (embedded), fp32, eager attention",
        "tokens": int(ids.shape[1]),
        "perplexity": results,
        "relative_to_exact": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kv-fp8-quality-{datetime.date.today()}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print("written to", path)


if __name__ == "__main__":
    main()
