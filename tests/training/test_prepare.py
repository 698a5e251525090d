"""`python -m training prepare`: statistics, the normalised file, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.training.conftest import Runner
from tests.training.test_readers import CHAT, DISCORD, LF_ALPACA, NOT_JSON, TELEGRAM, ZH_ALPACA
from training.data import read_dataset


def test_prepare_prints_statistics_of_every_input_format(run_cli: Runner, tiny_dir: Path) -> None:
    code, out, err = run_cli("prepare", ZH_ALPACA, LF_ALPACA, CHAT, "--base", tiny_dir, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["read"]["conversations"] == 3 + 3 + 3
    assert report["read"]["skipped"]["by_reason"]["invalid JSON"] == 2
    assert report["tokens"]["examples"] == 9
    assert report["tokens"]["trained_tokens"] < report["tokens"]["tokens"]
    assert report["chat_format"] == "template"
    # Each bad record is named with its file and position.
    assert f"{ZH_ALPACA} (record 6): missing field: no 'output'" in err
    assert f"{CHAT} (line 4): unknown role" in err


def test_prepare_out_writes_chat_jsonl_that_reads_back_the_same(
    run_cli: Runner, tiny_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "conversations.jsonl"
    code, out, err = run_cli(
        "prepare", TELEGRAM, DISCORD, "--persona", "Kai", "--base", tiny_dir, "--out", target
    )
    # Kai is in the Discord export only: the Telegram file is reported, not fatal.
    assert code == 0, err
    assert "persona not found" in err
    assert "conversations: 2" in out and "truncated: 0" in out
    again = read_dataset(target)
    assert again.problems == []
    original = read_dataset(DISCORD, persona="Kai").conversations
    assert [c.turns for c in again.conversations] == [c.turns for c in original]
    first = json.loads(target.read_text(encoding="utf-8").splitlines()[0])
    assert first["source"].endswith("message id 1210000000000000002")


def test_prepare_reports_truncation_and_too_long(run_cli: Runner, tiny_dir: Path) -> None:
    code, out, err = run_cli("prepare", LF_ALPACA, "--base", tiny_dir, "--max-len", "40")
    assert code == 0, err
    assert "conversation(s) left out at tokenization" in err
    assert "too long" in out


def test_nothing_usable_stops_with_a_message_and_exit_code_2(
    run_cli: Runner, tiny_dir: Path
) -> None:
    code, _, err = run_cli("prepare", NOT_JSON, "--base", tiny_dir)
    assert code == 2
    assert "no usable conversation" in err and str(NOT_JSON) in err
    assert "Traceback" not in err


def test_bad_options_and_config_exit_2_without_traceback(
    run_cli: Runner, tiny_dir: Path, tmp_path: Path
) -> None:
    code, _, err = run_cli("train", CHAT, "--out", tmp_path / "o", "--base", tmp_path / "none")
    assert code == 2 and "not 'embedded', a .gguf file, or a model folder" in err
    code, _, err = run_cli("train", CHAT, "--out", tmp_path / "o", "--rank", "0", "--lr", "5")
    assert code == 2 and "--rank 0: must be >= 1" in err and "--lr 5.0: must be in (0, 1)" in err
    bad = tmp_path / "bot.toml"
    bad.write_text('[model]\nbase = "embedded"\nquantisation = "4bit"\n', encoding="utf-8")
    code, _, err = run_cli("prepare", CHAT, "--config", bad)
    assert code == 2 and "[model] quantisation: unknown key" in err


def test_config_file_supplies_the_base_relative_to_itself(
    run_cli: Runner, tiny_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "bot.toml"
    config.write_text(
        f'[model]\nbase = "{tiny_dir.name}"\n[bot]\nsystem_prompt = "hi"\n', encoding="utf-8"
    )
    (tmp_path / tiny_dir.name).symlink_to(tiny_dir)
    code, out, err = run_cli("prepare", CHAT, "--config", config, "--json")
    assert code == 0, err
    assert json.loads(out)["base"] == tiny_dir.name


def test_python_dash_m_training_runs_as_a_program(tiny_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "training", "prepare", str(CHAT), "--base", str(tiny_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "examples: 3 of 3 conversations" in done.stdout
