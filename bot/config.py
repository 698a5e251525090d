"""The bot's configuration: one TOML file read once into frozen sections.

[model] and [engine] belong to the engine package; [storage] and [bot] are the bot's.
Relative paths in the file are relative to the file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from bot.discord_config import DiscordConfig
from bot.telegram_config import TelegramConfig
from engine.config import (
    ConfigError,
    EngineConfig,
    ModelConfig,
    parse_sections,
    read_toml,
    resolve_path,
    with_resolved_paths,
)
from engine.serve_config import ServeConfig

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful AI assistant named lorabot. Answer clearly and concisely."
)


@dataclass(frozen=True)
class StorageConfig:
    """[storage]: the SQLite file that keeps every conversation."""

    path: str = "lorabot.db"


@dataclass(frozen=True)
class BotConfig:
    """[bot]: behaviour shared by every platform."""

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        levels = ("DEBUG", "INFO", "WARNING", "ERROR")
        if self.log_level.upper() not in levels:
            raise ConfigError(
                f"[bot] log_level = {self.log_level!r}: must be one of {', '.join(levels)}"
            )


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    engine: EngineConfig
    storage: StorageConfig
    bot: BotConfig
    telegram: TelegramConfig
    discord: DiscordConfig
    serve: ServeConfig


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "engine": EngineConfig,
    "storage": StorageConfig,
    "bot": BotConfig,
    "telegram": TelegramConfig,
    "discord": DiscordConfig,
    "serve": ServeConfig,
}


def read_secret(section: str, env_name: str, file: str) -> str:
    """A token from the file the config names, else from the environment variable.
    The error names where to put it, never a value."""
    import os

    if file:
        try:
            secret = Path(file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"[{section}] token_file = {file!r}: {exc.strerror}") from None
        if secret:
            return secret
        raise ConfigError(f"[{section}] token_file = {file!r} is empty")
    secret = os.environ.get(env_name, "").strip()
    if not secret:
        raise ConfigError(
            f"[{section}] is enabled but the environment variable {env_name} is not set "
            "(put the bot token there, or name a file with token_file)"
        )
    return secret


def load_config(path: Path | None) -> Config:
    """Read and check the TOML file; without one, every default applies. Relative paths
    are relative to the file's folder."""
    data, folder = read_toml(path)
    config = Config(**parse_sections(data, SECTIONS))
    return replace(
        config,
        model=with_resolved_paths(config.model, folder),
        storage=replace(config.storage, path=resolve_path(config.storage.path, folder)),
        telegram=replace(
            config.telegram, token_file=resolve_path(config.telegram.token_file, folder)
        ),
        discord=replace(config.discord, token_file=resolve_path(config.discord.token_file, folder)),
    )
