"""`python -m bot [--config FILE]`: run the bot (the terminal chat when no platform is
enabled)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from engine.config import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bot.config import load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"lorabot: bad configuration:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.bot.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from bot.app import run

    try:
        asyncio.run(run(config))
    except ConfigError as exc:
        print(f"lorabot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbye — your conversation is kept.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
