"""`python -m bot [--config FILE]`: run the bot (the terminal chat when no platform is
enabled). `python -m bot export --out chats.jsonl`: the stored conversations as chat
JSONL for `python -m training` (see bot/export.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import ConfigError

if TYPE_CHECKING:
    from bot.config import Config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    commands = parser.add_subparsers(dest="command")
    export = commands.add_parser("export", help="write conversations as chat JSONL for training")
    # SUPPRESS: `python -m bot --config F export` and `... export --config F` both work.
    export.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML config file")
    export.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    export.add_argument("--db", type=Path, help="SQLite file (default: [storage] path)")
    export.add_argument("--since", help="only messages from this ISO date/time on (UTC)")
    export.add_argument(
        "--platform", action="append", default=[], help="only this platform (repeatable)"
    )
    export.add_argument(
        "--min-rating",
        type=int,
        choices=(-1, 0, 1),
        help="end each conversation before a reply rated below this (👍 1, unrated 0, 👎 -1)",
    )
    export.add_argument(
        "--exclude-user",
        action="append",
        default=[],
        help="leave out this user's messages and the replies to them: ID or PLATFORM:ID",
    )
    export.add_argument(
        "--keep-user-ids", action="store_true", help="do not pseudonymise user ids in meta"
    )
    export.add_argument("--salt", default="", help="pseudonym key (default: random per export)")
    export.add_argument(
        "--system-prompt", help="system prompt to put first (default: [bot] system_prompt)"
    )
    return parser.parse_args(argv)


def run_export(args: argparse.Namespace, system_prompt: str, db: Path) -> int:
    from bot.export import ExportOptions, export_chats, parse_since
    from bot.store import StoreError

    try:
        options = ExportOptions(
            since=parse_since(args.since) if args.since else None,
            platforms=tuple(args.platform),
            min_rating=args.min_rating,
            exclude_users=tuple(args.exclude_user),
            pseudonymise=not args.keep_user_ids,
            salt=args.salt,
            system_prompt=system_prompt if args.system_prompt is None else args.system_prompt,
        )
        stats = export_chats(args.db or db, args.out, options)
    except (ValueError, StoreError, OSError) as exc:
        print(f"lorabot export: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {stats.conversations} conversations ({stats.messages} messages) to {args.out}",
        file=sys.stderr,
    )
    for reason, count in stats.left_out.items():
        print(f"  left out: {reason}: {count}", file=sys.stderr)
    return 0


async def run_until_terminated(config: Config) -> None:
    """Run the bot; SIGTERM (systemd, `docker stop`) stops it like Ctrl-C: platforms
    drain their replies, then the engine and the store close."""
    from bot.app import run

    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
    except (NotImplementedError, RuntimeError):  # no signals here (Windows, not main)
        pass
    try:
        await run(config)
    except asyncio.CancelledError:
        if not terminated:
            raise
        logging.getLogger("bot").info("stopped (SIGTERM)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bot.config import load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"lorabot: bad configuration:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "export":
        return run_export(args, config.bot.system_prompt, Path(config.storage.path))
    logging.basicConfig(
        level=config.bot.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(run_until_terminated(config))
    except ConfigError as exc:
        print(f"lorabot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbye — your conversation is kept.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
