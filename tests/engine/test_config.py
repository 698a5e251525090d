"""Config sections: every problem reported at once, with value and allowed range."""

from __future__ import annotations

import pytest

from engine.config import ConfigError, EngineConfig, ModelConfig, parse_sections
from engine.loading import load_model

SECTIONS = {"model": ModelConfig, "engine": EngineConfig}


def test_defaults_need_no_file() -> None:
    built = parse_sections({}, SECTIONS)
    assert built["model"].base == "embedded"
    assert built["engine"].max_queue >= 1


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_sections(
            {
                "model": {"quantization": "3bit", "colour": "red"},
                "engine": {"top_p": 1.5, "max_queue": "many", "prefill_chunk": 8},
                "telegarm": {},
            },
            SECTIONS,
        )
    message = str(caught.value)
    assert "[model] quantization = '3bit': must be one of 'none', '8bit', '4bit'" in message
    assert "[model] colour: unknown key" in message
    assert "[engine] top_p = 1.5: must be in (0, 1]" in message
    assert "[engine] max_queue = 'many': must be an integer" in message
    assert "[engine] prefill_chunk = 8: must be 0 (auto) or >= 16" in message
    assert "[telegarm]: unknown section" in message


def test_quantization_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_model(ModelConfig(quantization="4bit", device="cpu"))


def test_missing_model_folder_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="not 'embedded', a .gguf file, or a model folder"):
        load_model(ModelConfig(base=str(tmp_path / "nope")))


def test_an_adapter_is_served_with_the_chat_format_it_was_trained_with(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engine.loading import choose_chat_format

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "training.json").write_text('{"chat_format": "alpaca"}')
    assert choose_chat_format("auto", str(adapter)) == "alpaca"
    assert choose_chat_format("template", str(adapter)) == "template"  # explicit wins
    assert choose_chat_format("auto", "") == "auto"
    assert choose_chat_format("auto", str(tmp_path / "no-metadata")) == "auto"
