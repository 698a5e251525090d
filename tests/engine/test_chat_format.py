"""Chat formats: the exact text and tokens a model sees."""

from __future__ import annotations

from typing import Any

import pytest

from engine.chat_format import ALPACA_PREAMBLE, make_chat_format
from engine.detokenize import IncrementalDecoder, StopFilter
from engine.types import ChatMessage

CONVERSATION = [
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "Hi"),
    ChatMessage("assistant", "Hello!"),
    ChatMessage("user", "Capital of France?"),
]


def test_template_format_is_the_models_own(tokenizer: Any) -> None:
    fmt = make_chat_format("auto", tokenizer)
    assert fmt.name == "template"
    assert fmt.render(CONVERSATION) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = fmt.encode(CONVERSATION)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5  # no double BOS
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in fmt.stop_token_ids


def test_alpaca_format_matches_the_seed_recipe(tokenizer: Any) -> None:
    fmt = make_chat_format("alpaca", tokenizer)
    single = fmt.render([ChatMessage("user", "Name a colour.")])
    assert single == (f"{ALPACA_PREAMBLE}\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    text = fmt.render(CONVERSATION)
    assert text.startswith("Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!")
    assert f"Hello!{tokenizer.eos_token}" in text
    assert text.endswith("### Instruction:\nCapital of France?\n\n### Response:\n")
    assert "### Instruction:" in fmt.stop_strings


def test_unknown_format_is_rejected(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="chat_format 'chatml'"):
        make_chat_format("chatml", tokenizer)


def test_incremental_decoder_rebuilds_multibyte_text(tokenizer: Any) -> None:
    text = "混合 text: 日本語とemoji 🎉🚀 and accents: façade naïve"
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_filter_holds_back_possible_stop_prefix() -> None:
    stop = StopFilter(("###",))
    assert stop.push("answer #") == "answer "
    assert stop.push("#") == ""
    assert stop.push("# never shown") == ""
    assert stop.stopped
    other = StopFilter(("###",))
    assert other.push("a #") == "a "
    assert other.push("1 tag") == "#1 tag"
    assert other.flush() == ""
