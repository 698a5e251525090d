"""[telegram]: the Telegram adapter's section (see config.example.toml and
docs/telegram.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config import ConfigError


@dataclass(frozen=True)
class TelegramConfig:
    enabled: bool = False
    token_env: str = "TELEGRAM_BOT_TOKEN"
    token_file: str = ""
    base_url: str = ""  # Bot API endpoint; the token is appended ("" = Telegram's own)
    allowed_users: tuple[int, ...] = ()  # empty = everyone
    allowed_chats: tuple[int, ...] = ()  # empty = everywhere; groups are negative
    admins: tuple[int, ...] = ()  # may use /stats; always allowed
    group_context: Literal["per_group", "per_user"] = "per_group"

    def __post_init__(self) -> None:
        problems = []
        if self.enabled and not (self.token_env or self.token_file):
            problems.append("[telegram] token_env and token_file are both empty: name one")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            problems.append(
                f"[telegram] base_url = {self.base_url!r}: must start with http:// or https:// "
                "(e.g. http://127.0.0.1:8081/bot), or be empty for Telegram's own"
            )
        if problems:
            raise ConfigError("\n".join(problems))
