"""[telegram]: the Telegram adapter's section (see config.example.toml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config import ConfigError


@dataclass(frozen=True)
class TelegramConfig:
    enabled: bool = False
    token_env: str = "TELEGRAM_BOT_TOKEN"
    token_file: str = ""
    base_url: str = ""
    allowed_users: tuple[int, ...] = ()
    allowed_chats: tuple[int, ...] = ()
    admins: tuple[int, ...] = ()
    group_context: Literal["per_group", "per_user"] = "per_group"

    def __post_init__(self) -> None:
        if self.enabled and not (self.token_env or self.token_file):
            raise ConfigError("[telegram] token_env and token_file are both empty: name one")
