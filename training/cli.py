"""`python -m training {prepare,train,merge}`: argparse in, one function call out.

Bad input (files, flags, config, an --out that holds another run) ends with exit code 2
and a message, never a traceback; a run stopped by a non-finite loss with exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jinja2.exceptions import TemplateError

from engine.config import ConfigError
from training.checkpoint import CheckpointError
from training.data import FORMATS
from training.loop import TrainingStopped
from training.options import TrainOptions, model_config, parse_target_modules
from training.prepare import NothingToTrain

DEFAULTS = TrainOptions(data=("-",), out="-")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+", metavar="FILE", help="dataset files")
    parser.add_argument("--format", choices=FORMATS, help="dataset format (default: detected)")
    parser.add_argument("--persona", help="group chats: whose messages become the assistant")
    parser.add_argument(
        "--gap-minutes",
        type=float,
        default=DEFAULTS.gap_minutes,
        help="group chats: a silence this long starts a new conversation",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="take [model] from the bot's TOML file")
    parser.add_argument("--base", help="'embedded', a model folder or a .gguf file")
    parser.add_argument("--chat-format", choices=("auto", "template", "alpaca"))
    parser.add_argument("--max-len", type=int, default=DEFAULTS.max_len, help="tokens per example")
    parser.add_argument(
        "--train-on-inputs", action="store_true", help="also train on prompts, not only replies"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="statistics of what would be trained on")
    add_data_arguments(prepare)
    add_model_arguments(prepare)
    prepare.add_argument("--out", type=Path, help="write the normalised conversations (JSONL)")
    prepare.add_argument("--json", action="store_true", help="statistics as JSON")

    train = commands.add_parser("train", help="train a LoRA adapter")
    add_data_arguments(train)
    add_model_arguments(train)
    train.add_argument("--out", required=True, help="output folder (adapter, report, checkpoints)")
    train.add_argument("--quantization", choices=("none", "8bit", "4bit"), help="QLoRA (CUDA)")
    train.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"))
    train.add_argument("--device", choices=("auto", "cpu", "cuda"))
    d = DEFAULTS
    for flag, kind, default, text in (
        ("--rank", int, d.rank, "LoRA rank r"),
        ("--alpha", int, d.alpha, "LoRA alpha"),
        ("--dropout", float, d.dropout, "LoRA dropout"),
        ("--epochs", int, d.epochs, "passes over the data"),
        ("--max-steps", int, d.max_steps, "optimizer steps (overrides --epochs)"),
        ("--lr", float, d.lr, "peak learning rate"),
        ("--warmup-steps", int, d.warmup_steps, "-1: 3%% of the steps"),
        ("--weight-decay", float, d.weight_decay, "AdamW weight decay"),
        ("--batch-size", int, d.batch_size, "rows per micro-batch and process"),
        ("--grad-accum", int, d.grad_accum, "micro-batches per optimizer step"),
        ("--val-fraction", float, d.val_fraction, "conversations held out for eval"),
        ("--eval-every", int, d.eval_every, "steps between evals (0: ten per run)"),
        ("--save-every", int, d.save_every, "steps between checkpoints (0: ten per run)"),
        ("--keep-checkpoints", int, d.keep_checkpoints, "newest checkpoints kept"),
        ("--seed", int, d.seed, "seed of the split, the order and dropout"),
        ("--samples", int, d.samples, "held-out prompts answered in the report"),
        ("--sample-tokens", int, d.sample_tokens, "longest sample answer, in tokens"),
    ):
        train.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})")
    train.add_argument(
        "--target-modules",
        default="all-linear",
        help="'all-linear' or comma-separated module names, e.g. q_proj,v_proj",
    )
    train.add_argument("--packing", action="store_true", help="pack short examples into rows")
    train.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each layer in backward: less memory, one extra forward",
    )
    train.add_argument(
        "--fast-paths",
        action=argparse.BooleanOptionalAction,
        default=d.fast_paths,
        help="fused LoRA, loss on trained positions, variable-length attention "
        "(--no-fast-paths: plain transformers/peft, for comparison)",
    )
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    merge = commands.add_parser("merge", help="merge an adapter into its base model")
    merge.add_argument("--adapter", type=Path, required=True, help="a `train --out` folder")
    merge.add_argument("--out", type=Path, required=True, help="new folder for the merged model")
    merge.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    return parser


def model_overrides(args: argparse.Namespace) -> dict[str, object]:
    names = ("base", "chat_format", "quantization", "dtype", "device")
    return {name: getattr(args, name, None) for name in names}


def train_options(args: argparse.Namespace) -> TrainOptions:
    fields = set(TrainOptions.__dataclass_fields__) - {"data", "out", "target_modules"}
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    return TrainOptions(
        data=tuple(args.data),
        out=args.out,
        target_modules=parse_target_modules(args.target_modules),
        **values,
    )


def run_command(args: argparse.Namespace) -> int:
    if args.command == "merge":
        from training.merge import merge

        merge(args.adapter, args.out, base=args.base)
        return 0
    model_cfg = model_config(args.config, model_overrides(args))
    if args.command == "prepare":
        from training.prepare import prepare

        prepare(
            args.data,
            fmt=args.format,
            persona=args.persona,
            gap_minutes=args.gap_minutes,
            model_cfg=model_cfg,
            max_len=args.max_len,
            train_on_inputs=args.train_on_inputs,
            out=args.out,
            as_json=args.json,
        )
        return 0
    options = train_options(args)
    from training.run import train

    train(options, model_cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return run_command(args)
    except (ConfigError, NothingToTrain, CheckpointError, TemplateError, OSError) as exc:
        # The input's fault (files, flags, config, the --out folder): a message, no traceback.
        print(f"training: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"training: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "\ntraining: interrupted; checkpoints saved so far are kept "
            "(continue with the same command and --resume)",
            file=sys.stderr,
        )
        return 130
