"""The label mask: for every chat format, exactly the tokens the served model must
generate for each assistant turn (its reply and end-of-turn token) are trained."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from engine.chat_format import ChatFormat, make_chat_format, mask_from_offsets
from engine.types import ChatMessage

CONVERSATION = [
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "Hi"),
    ChatMessage("assistant", "Hello!"),
    ChatMessage("user", "Capital of France?"),
    ChatMessage("assistant", "Paris."),
]

LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = '' %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content']"
    " + eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% endif %}"
)

# (format, template or None for SmolLM2's own, special tokens to add, eos, expected runs)
CASES = {
    "chatml": ("template", None, [], None, ["Hello!<|im_end|>", "Paris.<|im_end|>"]),
    "alpaca": ("alpaca", None, [], None, ["Hello!<|im_end|>", "Paris.<|im_end|>"]),
    "llama3": (
        "template",
        LLAMA3,
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        ["Hello!<|eot_id|>", "Paris.<|eot_id|>"],
    ),
    "llama2": ("template", LLAMA2, ["<s>", "</s>"], "</s>", [" Hello! </s>", " Paris. </s>"]),
    "gemma": (
        "template",
        GEMMA,
        ["<start_of_turn>", "<end_of_turn>"],
        None,
        ["Hello!<end_of_turn>", "Paris.<end_of_turn>"],
    ),
    "zephyr": ("template", ZEPHYR, ["</s>"], "</s>", ["Hello!</s>", "Paris.</s>"]),
    "alpaca-llama2-eos": ("alpaca", None, ["</s>"], "</s>", ["Hello!</s>", "Paris.</s>"]),
}


def make_format(tokenizer: Any, case: str) -> ChatFormat:
    name, template, specials, eos, _ = CASES[case]
    tok = copy.deepcopy(tokenizer)
    if specials:
        tok.add_tokens(specials, special_tokens=True)
    if eos:
        tok.eos_token = eos
    if template:
        tok.chat_template = template
    return make_chat_format(name, tok)


def trained_runs(ids: list[int], mask: list[bool]) -> list[tuple[int, list[int]]]:
    """(start index, ids) of each contiguous run of trained tokens."""
    runs: list[tuple[int, list[int]]] = []
    for index, (token, trained) in enumerate(zip(ids, mask, strict=True)):
        if trained and index > 0 and mask[index - 1]:
            runs[-1][1].append(token)
        elif trained:
            runs.append((index, [token]))
    return runs


@pytest.mark.parametrize("case", list(CASES))
def test_mask_covers_exactly_each_reply_and_its_end_of_turn(tokenizer: Any, case: str) -> None:
    fmt = make_format(tokenizer, case)
    ids, mask = fmt.encode_with_mask(CONVERSATION)
    runs = trained_runs(ids, mask)
    decoded = [fmt.tokenizer.decode(run, skip_special_tokens=False) for _, run in runs]
    assert decoded == CASES[case][4]


@pytest.mark.parametrize("case", [case for case in CASES if case != "llama3"])
def test_trained_tokens_follow_the_exact_serving_prompt(tokenizer: Any, case: str) -> None:
    """Before each reply sit the very ids the engine sends to the model for that turn:
    training and serving cannot drift apart."""
    fmt = make_format(tokenizer, case)
    ids, mask = fmt.encode_with_mask(CONVERSATION)
    assert ids == fmt.encode(CONVERSATION, add_generation_prompt=False)
    replies = [i for i, m in enumerate(CONVERSATION) if m.role == "assistant"]
    for (start, _run), turn in zip(trained_runs(ids, mask), replies, strict=True):
        assert ids[:start] == fmt.encode(CONVERSATION[:turn], add_generation_prompt=True)


def test_a_tokenizer_merging_across_the_reply_start_still_gets_the_serving_prompt(
    tokenizer: Any,
) -> None:
    """SmolLM2's tokenizer under a Llama 3 template: a prompt ending in "\n\n" is one
    token alone, but "\n", "\n" in front of a word. Tokenizing the whole text would
    train each reply after a prompt serving never sends; cut at each reply instead."""
    fmt = make_format(tokenizer, "llama3")
    newline, double = fmt.tokenizer.encode("\n"), fmt.tokenizer.encode("\n\n")
    assert len(double) == 1 and fmt.tokenizer.encode("\n\nHi")[:2] == newline * 2
    ids, mask = fmt.encode_with_mask(CONVERSATION)
    (first, _), (second, _) = trained_runs(ids, mask)
    assert ids[:first] == fmt.encode(CONVERSATION[:2], add_generation_prompt=True)
    # The second reply follows the same generation prompt tail as served (the history
    # before it is re-tokenized by serving too, so only the tail can be matched).
    serving = fmt.encode(CONVERSATION[:4], add_generation_prompt=True)
    header = fmt.tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    tail = len(serving) - serving[::-1].index(header) - 1
    assert ids[second - (len(serving) - tail) : second] == serving[tail:]
    assert ids[second - 1] == double[0]


@pytest.mark.parametrize("case", ["chatml", "alpaca", "llama3"])
def test_chinese_and_emoji_replies_are_masked_whole(tokenizer: Any, case: str) -> None:
    conversation = [
        ChatMessage("user", "三原色是什么？"),
        ChatMessage("assistant", "红色、黄色和蓝色 🎨"),
    ]
    fmt = make_format(tokenizer, case)
    ids, mask = fmt.encode_with_mask(conversation)
    ((_, run),) = trained_runs(ids, mask)
    marker = CASES[case][4][0].removeprefix("Hello!")
    assert fmt.tokenizer.decode(run, skip_special_tokens=False) == "红色、黄色和蓝色 🎨" + marker


def test_reply_whitespace_trimmed_by_the_template_is_still_found(tokenizer: Any) -> None:
    fmt = make_format(tokenizer, "llama3")
    conversation = [ChatMessage("user", "Hi"), ChatMessage("assistant", "  Hello!\n")]
    ids, mask = fmt.encode_with_mask(conversation)
    ((_, run),) = trained_runs(ids, mask)
    assert fmt.tokenizer.decode(run, skip_special_tokens=False) == "Hello!<|eot_id|>"


def test_reply_that_quotes_the_prompt_is_located_after_it(tokenizer: Any) -> None:
    fmt = make_chat_format("template", tokenizer)
    conversation = [ChatMessage("user", "Say: assistant"), ChatMessage("assistant", "assistant")]
    text, spans = fmt.render_with_spans(conversation)
    assert [text[a:b] for a, b in spans] == ["assistant<|im_end|>"]
    assert text[spans[0][0] - len("<|im_start|>assistant\n") : spans[0][0]] == (
        "<|im_start|>assistant\n"
    )


def test_a_token_straddling_the_reply_start_is_trained() -> None:
    # "[/INST]" ends at 7; the token " Hello" (6..12) carries the reply's first letters.
    offsets = [(0, 2), (2, 6), (6, 12), (12, 13), (13, 17), (17, 18)]
    assert mask_from_offsets(offsets, [(6, 17)]) == [False, False, True, True, True, False]
    assert mask_from_offsets([(0, 0), (0, 3)], [(0, 3)]) == [False, True]  # BOS has no text
