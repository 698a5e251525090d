"""`python -m engine serve [--config FILE] [--host H] [--port P]`: the engine over HTTP
with the OpenAI API shape, and the chat page at `/` (see docs/serve.md).

The config file may be the bot's own: [model], [engine] and [serve] are read, the other
sections are left to the bot.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from engine.config import (
    ConfigError,
    EngineConfig,
    ModelConfig,
    parse_sections,
    read_toml,
    with_resolved_paths,
)
from engine.serve_config import ServeConfig
from engine.types import Engine

log = logging.getLogger("engine")

SECTIONS: dict[str, type] = {"model": ModelConfig, "engine": EngineConfig, "serve": ServeConfig}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API and chat page")
    serve.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    serve.add_argument("--host", help="address to listen on (default: [serve] host)")
    serve.add_argument("--port", type=int, help="port (default: [serve] port; 0 = any free)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def load_sections(path: Path | None) -> dict[str, Any]:
    """[model], [engine], [serve] of the file; relative model paths are relative to it."""
    data, folder = read_toml(path)
    sections = parse_sections(data, SECTIONS, allow_other_sections=True)
    sections["model"] = with_resolved_paths(sections["model"], folder)
    return sections


async def open_engine(model_cfg: ModelConfig, engine_cfg: EngineConfig) -> Engine:
    """The configured backend: the model in this process, or a remote server (then this
    server adds auth, metrics and the chat page in front of it)."""
    if engine_cfg.backend == "openai":
        from engine.remote import OpenAIEngine

        return await OpenAIEngine.open(model_cfg, engine_cfg)
    from engine.worker import LocalEngine

    return await asyncio.to_thread(LocalEngine.from_config, model_cfg, engine_cfg)


async def close_engine(engine: Engine) -> None:
    from engine.remote import OpenAIEngine

    if isinstance(engine, OpenAIEngine):
        await engine.aclose()
    else:
        engine.close()


async def serve(sections: dict[str, Any]) -> None:
    from engine.server import create_app, start_server

    serve_cfg: ServeConfig = sections["serve"]
    engine_cfg: EngineConfig = sections["engine"]
    serve_cfg.api_key()  # a missing key is a config error before the model loads
    engine = await open_engine(sections["model"], engine_cfg)
    try:
        app = create_app(engine, serve_cfg, engine_cfg.sampling())
        runner, port = await start_server(app, serve_cfg.host, serve_cfg.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        # The one line scripts (and the tests) wait for; the URL has the bound port.
        print(f"serving {', '.join(engine.models())} on http://{serve_cfg.host}:{port}", flush=True)
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            await runner.cleanup()
    finally:
        await close_engine(engine)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        sections = load_sections(args.config)
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        sections["serve"] = replace(sections["serve"], **overrides)
    except ConfigError as exc:
        print(f"lorabot: bad configuration:\n{exc}", file=sys.stderr)
        return 2
    log.info("config: %s", {name: asdict(section) for name, section in sections.items()})
    try:
        asyncio.run(serve(sections))
    except ConfigError as exc:
        print(f"lorabot: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
