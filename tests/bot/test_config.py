"""The bot's TOML config: the documented example is valid and means the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import load_config
from engine.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_is_valid_and_equals_the_defaults(tmp_path: Path) -> None:
    example = load_config(ROOT / "config.example.toml")
    defaults = load_config(None)
    assert example.model == defaults.model
    assert example.engine == defaults.engine
    assert example.bot == defaults.bot
    assert example.telegram == defaults.telegram
    assert example.discord == defaults.discord
    # Relative paths are relative to the config file's folder.
    assert example.storage.path == str(ROOT / "lorabot.db")


def test_bad_file_lists_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[engine]\nmax_queue = 0\ntemprature = 1\n[bot]\nlog_level = "LOUD"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    text = str(caught.value)
    assert "[engine] max_queue = 0: must be >= 1" in text
    assert "[engine] temprature: unknown key" in text
    assert "[bot] log_level = 'LOUD'" in text


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\nbase = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_enabled_platform_without_its_token_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.config import read_secret

    monkeypatch.delenv("MY_TG_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="MY_TG_TOKEN is not set"):
        read_secret("telegram", "MY_TG_TOKEN", "")
    monkeypatch.setenv("MY_TG_TOKEN", "123:abc")
    assert read_secret("telegram", "MY_TG_TOKEN", "") == "123:abc"
    token_file = tmp_path / "token"
    token_file.write_text("456:def\n")
    assert read_secret("telegram", "MY_TG_TOKEN", str(token_file)) == "456:def"
