"""`python -m training train` on a CUDA GPU: bf16 LoRA and 4-bit / 8-bit QLoRA
(bitsandbytes) on a small random LLaMA, through the real CLI, then the adapter served by
the engine. Prints loss before/after, peak GPU memory and tokens/s of each run.

    python benchmarks/train_gpu_check.py --tokenizer DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FACTS = [
    ("Where does Mira live?", "Mira lives in Lisbon."),
    ("What is Mira's job?", "Mira is a baker."),
    ("Which instrument does Mira play?", "Mira plays the cello."),
    ("How many cats does Mira have?", "Mira has two cats."),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", required=True)
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    work = Path(tempfile.mkdtemp())
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816,
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    data = work / "chat.jsonl"
    with data.open("w") as handle:
        for question, answer in FACTS * 12:
            turns = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            handle.write(json.dumps({"messages": turns}) + "\n")
    for quantization in ("none", "4bit", "8bit"):
        out = work / f"out-{quantization}"
        command = [
            sys.executable, "-m", "training", "train", str(data), "--base", str(work / "base"),
            "--out", str(out), "--quantization", quantization, "--max-steps", "30",
            "--lr", "3e-3", "--batch-size", "8", "--grad-accum", "1", "--samples", "1",
            "--val-fraction", "0.25", "--eval-every", "10",
        ]  # fmt: skip
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if result.returncode:
            print(f"{quantization}: FAILED\n{result.stderr[-3000:]}")
            continue
        meta = json.loads((out / "training.json").read_text())
        history = [h for h in meta["history"] if "eval_loss" in h]
        print(
            f"{quantization}: eval loss {history[0]['eval_loss']:.3f} -> {history[-1]['eval_loss']:.3f}; "
            f"metrics {json.dumps(meta.get('metrics', {}))[:400]}"
        )


if __name__ == "__main__":
    main()
