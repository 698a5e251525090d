"""Examples: truncation keeps the newest exchanges and every reply's end-of-turn token."""

from __future__ import annotations

from typing import Any

import pytest

from engine.chat_format import make_chat_format
from training.data import Conversation, Turn
from training.examples import build_examples


def conversation(*turns: tuple[str, str], source: str = "test:line 1") -> Conversation:
    return Conversation(tuple(Turn(role, content) for role, content in turns), source)  # type: ignore[arg-type]


LONG = conversation(
    ("system", "You are terse."),
    ("user", "first question " + "blah " * 40),
    ("assistant", "first answer " + "meh " * 40),
    ("user", "second question"),
    ("assistant", "second answer"),
    ("user", "third question"),
    ("assistant", "third answer"),
)


@pytest.fixture(params=["template", "alpaca"])
def fmt(request: pytest.FixtureRequest, tokenizer: Any) -> Any:
    return make_chat_format(request.param, tokenizer)


def trained_text(fmt: Any, example: Any) -> str:
    ids = example.input_ids[example.trained].tolist()
    return str(fmt.tokenizer.decode(ids, skip_special_tokens=False))


def test_short_conversation_is_one_example_with_only_replies_trained(fmt: Any) -> None:
    examples, stats = build_examples([LONG], fmt, max_len=1024)
    (example,) = examples
    eos = "<|im_end|>"
    assert (
        trained_text(fmt, example)
        == f"first answer {'meh ' * 40}{eos}second answer{eos}third answer{eos}"
    )
    assert stats.truncated == 0 and stats.examples == 1
    assert stats.tokens == len(example) and stats.trained_tokens == int(example.trained.sum())


def test_truncation_drops_the_oldest_exchange_and_keeps_the_system_prompt(fmt: Any) -> None:
    full, _ = build_examples([LONG], fmt, max_len=1024)
    limit = len(full[0]) - 20  # the first exchange (~90 tokens) must go, nothing more
    examples, stats = build_examples([LONG], fmt, max_len=limit)
    (example,) = examples
    text = fmt.tokenizer.decode(example.input_ids.tolist(), skip_special_tokens=False)
    assert "You are terse." in text
    assert "first" not in text and "second question" in text and "third question" in text
    assert len(example) <= limit
    assert stats.truncated == 1 and stats.dropped_turns == 2
    # The last token trained is the end-of-turn token: the model still learns to stop.
    assert trained_text(fmt, example).endswith("third answer<|im_end|>")
    last_trained = int(example.trained.nonzero()[-1])
    assert int(example.input_ids[last_trained]) == fmt.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_a_last_exchange_that_cannot_fit_is_skipped_never_cut(fmt: Any) -> None:
    huge = conversation(("user", "hi"), ("assistant", "word " * 300), source="big.jsonl:line 9")
    examples, stats = build_examples([huge, LONG], fmt, max_len=200)
    assert len(examples) == 1 and examples[0].source == "test:line 1"
    assert stats.skipped["too long"] == 1
    assert stats.problems[0].startswith("big.jsonl:line 9: too long:")


def test_trailing_user_turns_are_dropped_and_empty_ones_reported(fmt: Any) -> None:
    dangling = conversation(("user", "a"), ("assistant", "b"), ("user", "unanswered"))
    unanswered = conversation(("user", "nobody answers"), source="x:line 2")
    examples, stats = build_examples([dangling, unanswered], fmt, max_len=1024)
    text = fmt.tokenizer.decode(examples[0].input_ids.tolist())
    assert "unanswered" not in text
    assert stats.skipped["no assistant turn"] == 1


def test_train_on_inputs_trains_every_token_but_the_first(fmt: Any) -> None:
    (example,), _ = build_examples([LONG], fmt, max_len=1024, train_on_inputs=True)
    assert not example.trained[0] and bool(example.trained[1:].all())


def test_a_template_that_rejects_the_conversation_is_reported_per_conversation(
    tokenizer: Any,
) -> None:
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    )
    fmt = make_chat_format("template", strict)
    plain = conversation(("user", "hi"), ("assistant", "hello"))
    examples, stats = build_examples([LONG, plain], fmt, max_len=1024)
    assert len(examples) == 1
    assert stats.skipped["chat format error"] == 1
    assert "System role not supported" in stats.problems[0]
