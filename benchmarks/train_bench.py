"""LoRA training speed on one GPU: the seed recipe's loop and lorabot's trainer, side by
side in one run, on a LLaMA-7B-shape model with random bf16 weights.

    python benchmarks/train_bench.py --out DIR          # H200: about 5 minutes
    python benchmarks/train_bench.py --small --steps 2  # any machine: a smoke test

Runs (each: warm-up steps, then timed optimizer steps of `--accum` micro-batches):
  baseline   HF/peft model, padded micro-batch 4, Alpaca-like lengths 64-256, LoRA r8
             on q,v, dropout 0.05, the model's own loss over every token (the seed
             recipe trains on inputs); a plain PyTorch loop with AdamW
  lorabot    training.step.train_step on the same examples: packed 1024-token rows,
             micro-batch 4, fast paths, LoRA r8 q,v (same adapter as the baseline)
  lorabot-all-linear   the same with lorabot's default targets (all linear layers)
  packed-r16  packed 2048-token rows, micro-batch 8, r16 all-linear (fast paths)
  packed-r16-ckpt      the same with gradient checkpointing
  packed-r16-b4, packed-r16-b4-plain   micro-batch 4, with and without the fast paths
             (the plain path does not fit micro-batch 8 in 141 GB): speed, and the
             same loss curve from the same seed
  qlora4      4-bit NF4 base (bitsandbytes), r16 all-linear, packed 512-token rows,
              micro-batch 4, gradient checkpointing; qlora4-no-ckpt without it
Real tokens/s counts tokens of examples (no padding). MFU counts 4 x (linear weights)
FLOPs per token (forward, and backward to the activations; the base gets no weight
gradient), against 989 TFLOP/s and against the bf16 matmul rate measured in the run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import platform
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import fast  # noqa: E402
from training.batching import IGNORE, Plan, pack_rows, single_rows  # noqa: E402
from training.examples import Example  # noqa: E402
from training.model import BaseModel, add_lora  # noqa: E402
from training.step import train_step  # noqa: E402

PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16, datasheet


@dataclass
class Result:
    name: str
    real_tok_s: float = 0.0
    mfu: float = 0.0
    fraction_of_matmul: float = 0.0
    peak_gb: float = 0.0
    loss_first: float = 0.0
    loss_last: float = 0.0
    step_s: float = 0.0
    tokens_per_step: float = 0.0
    padded_fraction: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device) -> float:
    """Median rate of a bf16 8192^3 matrix product (1024^3 on the CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        times.append((time.perf_counter() - start) / 5)
    return 2 * n**3 / sorted(times)[len(times) // 2]


def alpaca_like(count: int, vocab: int, seed: int, low: int = 64, high: int = 256) -> list[Example]:
    """Lengths uniform in [low, high]; the first 35-65 % is the prompt (not trained)."""
    rng = random.Random(seed)
    examples = []
    for index in range(count):
        length = rng.randint(low, high)
        prompt = int(length * rng.uniform(0.35, 0.65))
        ids = torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(index))
        trained = torch.zeros(length, dtype=torch.bool)
        trained[prompt:] = True
        examples.append(Example(ids.int(), trained, f"synthetic:{index}"))
    return examples


def linear_params(model: Any) -> int:
    """Weights of every linear layer the tokens go through (all layers and the head)."""
    cfg = model.config
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * cfg.vocab_size


def timed(
    run_step: Any, warmup: int, steps: int, device: torch.device
) -> tuple[float, list[float], int]:
    """(seconds of the timed steps, losses, tokens of the timed steps)."""
    losses = []
    for _ in range(warmup):
        losses.append(run_step()[0])
    sync(device)
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        loss, count = run_step()
        losses.append(loss)
        tokens += count
    sync(device)
    return time.perf_counter() - start, losses, tokens


def baseline_run(base: Any, examples: list[Example], args: Any, device: torch.device) -> Result:
    """The seed recipe: peft on the HF model, padded micro-batches, HF's loss."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(base, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    order = list(range(len(examples)))
    random.Random(1).shuffle(order)
    cursor = 0
    padded = [0, 0]

    def step() -> tuple[float, int]:
        nonlocal cursor
        total, tokens = 0.0, 0
        for _ in range(args.accum):
            chosen = [examples[order[(cursor + k) % len(order)]] for k in range(4)]
            cursor += 4
            width = -(-max(len(e) for e in chosen) // 8) * 8  # pad_to_multiple_of=8
            ids = torch.zeros(4, width, dtype=torch.long)
            mask = torch.zeros(4, width, dtype=torch.long)
            for row, e in enumerate(chosen):
                ids[row, : len(e)] = e.input_ids.long()
                mask[row, : len(e)] = 1
            labels = ids.masked_fill(mask == 0, IGNORE)
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            (out.loss / args.accum).backward()
            total += out.loss.detach()
            real = sum(len(e) for e in chosen)
            tokens += real
            padded[0] += real
            padded[1] += 4 * width
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total) / args.accum, tokens

    result = measure("baseline", step, args, device, base)
    result.padded_fraction = 1 - padded[0] / max(padded[1], 1)
    model.unload()
    return result


def lorabot_run(
    name: str,
    base_model: Any,
    examples: list[Example],
    args: Any,
    device: torch.device,
    *,
    rank: int,
    targets: tuple[str, ...],
    max_len: int,
    batch_size: int,
    fast_paths: bool = True,
    checkpointing: bool = False,
    dropout: float = 0.05,
) -> Result:
    torch.manual_seed(0)
    base = BaseModel(base_model, None, "random-7b", "", device, torch.bfloat16)
    model = add_lora(
        base, rank=rank, alpha=2 * rank, dropout=dropout, target_modules=targets,
        gradient_checkpointing=checkpointing,
    )  # fmt: skip
    paths = fast.enable(model) if fast_paths else None
    model.train()
    rows = pack_rows(examples, max_len) if max_len else single_rows(examples)
    # The trainer's own accelerator, as `python -m training train` makes it (one process).
    accel = Accelerator(mixed_precision="no", cpu=device.type == "cpu")
    plan = Plan(tuple(rows), 0, batch_size * args.accum, 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = {"step": 0}
    widths = [0, 0]

    def step() -> tuple[float, int]:
        index = state["step"]
        state["step"] += 1
        micro = plan.micro_batches(index, 0, batch_size)
        for rows_ in micro:
            widths[0] += sum(r.length for r in rows_)
            widths[1] += len(rows_) * max(r.length for r in rows_)
        result = train_step(
            model, optimizer, scheduler, micro, examples,
            step_targets=plan.step_targets(index, examples), accelerator=accel,
            pad_id=0, max_grad_norm=1.0, step=index,
        )  # fmt: skip
        return result.loss, result.tokens

    result = measure(name, step, args, device, base_model)
    result.padded_fraction = 1 - widths[0] / max(widths[1], 1)
    if name in args.profile.split(","):
        profile(name, step, args)
    result.notes = {
        "rank": rank, "targets": list(targets), "max_len": max_len, "batch_size": batch_size,
        "fast_paths": paths.as_dict() if paths else None, "checkpointing": checkpointing,
        "dropout": dropout,
    }  # fmt: skip
    if paths is not None:
        fast.use_plain_attention(model)
    if checkpointing:
        plain = model.get_base_model()
        if hasattr(plain, "activation_checkpointing_disable"):
            plain.activation_checkpointing_disable()
        else:
            plain.gradient_checkpointing_disable()
    model.unload()
    return result


def measure(name: str, step: Any, args: Any, device: torch.device, model: Any) -> Result:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds, losses, tokens = timed(step, args.warmup, args.steps, device)
    tok_s = tokens / seconds
    flops = 4 * linear_params(model)
    result = Result(
        name=name,
        real_tok_s=tok_s,
        mfu=tok_s * flops / PEAK_BF16,
        fraction_of_matmul=tok_s * flops / args.matmul,
        peak_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0,
        loss_first=losses[0],
        loss_last=losses[-1],
        step_s=seconds / args.steps,
        tokens_per_step=tokens / args.steps,
    )
    print(
        f"{name:<22} {tok_s:>9.0f} tok/s  MFU {result.mfu:5.1%}  of matmul "
        f"{result.fraction_of_matmul:5.1%}  peak {result.peak_gb:6.2f} GB  "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}",
        flush=True,
    )
    return result


def profile(name: str, step: Any, args: Any) -> None:
    """One more step under torch.profiler: the operators that took the GPU's time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    try:
        table = averages.table(sort_by="self_device_time_total", row_limit=40)
    except (AttributeError, KeyError, ValueError):
        table = averages.table(sort_by="self_cuda_time_total", row_limit=40)
    head = "\n".join(table.splitlines()[:22])
    print(f"--- profile of {name} (one step) ---\n{head}", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"profile-{name}.txt").write_text(table)


def quantize_4bit(model: Any) -> None:
    """Replace every decoder linear layer with bitsandbytes NF4 (bf16 compute), as
    transformers' BitsAndBytesConfig(load_in_4bit, nf4, double quant) loads them."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child_name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False,
                    compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                    device="meta",
                )  # fmt: skip
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4",
                    compress_statistics=True,
                ).to(child.weight.device)  # fmt: skip
                setattr(parent, child_name, q)
                del child
    model.is_loaded_in_4bit = True
    gc.collect()
    torch.cuda.empty_cache()


def build_model(args: Any, device: torch.device) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.small:
        config = LlamaConfig(
            vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4,
        )  # fmt: skip
    else:
        config = LlamaConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # initialised where it runs: seconds, not minutes
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.config.use_cache = False
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="folder for train-<date>.json")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--only", default="", help="comma-separated run names")
    parser.add_argument("--skip-qlora", action="store_true")
    parser.add_argument(
        "--profile", default="", help="comma-separated run names: print their top kernels"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.small:
        sys.exit("train_bench needs a CUDA GPU (or --small for a CPU smoke test)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.enable_cudnn_sdp(False)  # a plan per new shape (issue 7)
    args.matmul = matmul_rate(device)
    print(f"{gpu_name()}: bf16 matmul {args.matmul / 1e12:.1f} TFLOP/s")
    wanted = set(filter(None, args.only.split(",")))

    def want(name: str) -> bool:
        return not wanted or name in wanted

    model = build_model(args, device)
    vocab = model.config.vocab_size
    alpaca = alpaca_like(4096, vocab, seed=1)
    long_rows = alpaca_like(4096, vocab, seed=2, low=64, high=512)
    results: list[Result] = []
    qv, every = ("q_proj", "v_proj"), ("all-linear",)
    runs: list[tuple[str, Any]] = [
        ("baseline", lambda: baseline_run(model, alpaca, args, device)),
        # Before any fast run: Liger's kernels stay on the shared model's modules.
        ("packed-r16-b4-plain", lambda: lorabot_run(
            "packed-r16-b4-plain", model, long_rows, args, device, rank=16, targets=every,
            max_len=2048, batch_size=4, dropout=0.0, fast_paths=False)),
        ("lorabot", lambda: lorabot_run(
            "lorabot", model, alpaca, args, device, rank=8, targets=qv, max_len=1024,
            batch_size=4)),
        ("lorabot-unpacked", lambda: lorabot_run(
            "lorabot-unpacked", model, alpaca, args, device, rank=8, targets=qv, max_len=0,
            batch_size=4)),
        ("lorabot-all-linear", lambda: lorabot_run(
            "lorabot-all-linear", model, alpaca, args, device, rank=8, targets=every,
            max_len=1024, batch_size=4)),
        ("packed-r16", lambda: lorabot_run(
            "packed-r16", model, long_rows, args, device, rank=16, targets=every,
            max_len=2048, batch_size=8, dropout=0.0)),
        ("packed-r16-b4", lambda: lorabot_run(
            "packed-r16-b4", model, long_rows, args, device, rank=16, targets=every,
            max_len=2048, batch_size=4, dropout=0.0)),

        ("packed-r16-ckpt", lambda: lorabot_run(
            "packed-r16-ckpt", model, long_rows, args, device, rank=16, targets=every,
            max_len=2048, batch_size=8, dropout=0.0, checkpointing=True)),
    ]  # fmt: skip
    for name, run in runs:
        if not want(name):
            continue
        try:
            results.append(run())
        except Exception as exc:  # noqa: BLE001  (one failed variant must not lose the others)
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            results.append(Result(name=name, error=f"{type(exc).__name__}: {exc}"))
        gc.collect()
        torch.cuda.empty_cache()
    if device.type == "cuda" and not args.skip_qlora and (want("qlora4") or want("qlora4-no-ckpt")):
        try:
            quantize_4bit(model)
            for name, ckpt in (("qlora4", True), ("qlora4-no-ckpt", False)):
                if want(name):
                    results.append(
                        lorabot_run(
                            name,
                            model,
                            long_rows,
                            args,
                            device,
                            rank=16,
                            targets=every,
                            max_len=512,
                            batch_size=4,
                            checkpointing=ckpt,
                            dropout=0.0,
                        )  # fmt: skip
                    )
        except Exception as exc:  # noqa: BLE001
            print(f"qlora4: FAILED {type(exc).__name__}: {exc}", flush=True)
            results.append(Result(name="qlora4", error=f"{type(exc).__name__}: {exc}"))
    report(results, args)


def report(results: list[Result], args: Any) -> None:
    by = {r.name: r for r in results if not r.error}

    def get(name: str, key: str) -> float | None:
        return getattr(by[name], key) if name in by else None

    base, mine = get("baseline", "real_tok_s"), get("lorabot", "real_tok_s")
    summary = {
        "baseline_real_tok_s": base,
        "lorabot_real_tok_s": mine,
        "speedup_vs_baseline": mine / base if base and mine else None,
        "packed_r16_tok_s": get("packed-r16", "real_tok_s"),
        "packed_r16_fraction_of_matmul": get("packed-r16", "fraction_of_matmul"),
        "qlora4_peak_gb": get("qlora4", "peak_gb"),
        "qlora4_tok_s": get("qlora4", "real_tok_s"),
    }
    print("summary:", json.dumps(summary, indent=1))
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "host": socket.gethostname(),
            "gpu": gpu_name(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            **_versions(),
        },
        "matmul_tflops": args.matmul / 1e12,
        "settings": {"steps": args.steps, "warmup": args.warmup, "accum": args.accum},
        "summary": summary,
        "runs": [copy.deepcopy(r.__dict__) for r in results],
    }
    path = args.out / f"train-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"written {path}")


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("transformers", "peft", "bitsandbytes", "triton"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    main()
