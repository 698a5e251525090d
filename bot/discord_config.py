"""[discord]: the Discord adapter's section (see config.example.toml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config import ConfigError


@dataclass(frozen=True)
class DiscordConfig:
    enabled: bool = False
    token_env: str = "DISCORD_BOT_TOKEN"
    token_file: str = ""
    api_base: str = ""
    gateway_url: str = ""
    output: Literal["plain", "embed"] = "plain"
    allowed_guilds: tuple[int, ...] = ()
    allowed_channels: tuple[int, ...] = ()
    allowed_roles: tuple[int, ...] = ()
    allowed_users: tuple[int, ...] = ()
    admins: tuple[int, ...] = ()
    allow_dms: bool = True

    def __post_init__(self) -> None:
        if self.enabled and not (self.token_env or self.token_file):
            raise ConfigError("[discord] token_env and token_file are both empty: name one")
