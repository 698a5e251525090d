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
    # Seconds between two edits (or follow-up messages) of the bot in one channel while
    # a reply streams. Discord allows about 5 message writes per 5 s per channel.
    edit_interval_s: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.enabled and not (self.token_env or self.token_file):
            problems.append("[discord] token_env and token_file are both empty: name one")
        if self.api_base and not self.api_base.startswith(("http://", "https://")):
            problems.append(
                f"[discord] api_base = {self.api_base!r}: must start with http:// or https://"
            )
        if self.gateway_url and not self.gateway_url.startswith(("ws://", "wss://")):
            problems.append(
                f"[discord] gateway_url = {self.gateway_url!r}: must start with ws:// or wss://"
            )
        if not 0.0 <= self.edit_interval_s <= 60.0:
            problems.append(
                f"[discord] edit_interval_s = {self.edit_interval_s!r}: must be between 0 and 60"
            )
        if problems:
            raise ConfigError("\n".join(problems))
