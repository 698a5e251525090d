"""[serve]: the OpenAI-compatible HTTP server and its chat page (see docs/serve.md).

`python -m engine serve` always serves; `enabled` makes `python -m bot` run the same
server inside the bot, where the chat page's conversations are stored like any other
platform's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from engine.config import ConfigError


@dataclass(frozen=True)
class ServeConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str = ""
    chat_page: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not self.host:
            problems.append("[serve] host = '': name an address, e.g. '127.0.0.1' or '0.0.0.0'")
        if not 0 <= self.port <= 65535:
            problems.append(f"[serve] port = {self.port}: must be in [0, 65535] (0 = any free)")
        if problems:
            raise ConfigError("\n".join(problems))

    def api_key(self) -> str:
        """The bearer token clients must send ("" = no auth). Never logged."""
        if not self.api_key_env:
            return ""
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise ConfigError(
                f"[serve] api_key_env = {self.api_key_env!r} but that environment variable "
                "is not set (set it, or remove api_key_env to serve without auth)"
            )
        return key
