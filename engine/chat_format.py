"""Chat messages -> prompt text -> token ids: the one place both serving and training use.

Two formats: the model's own chat template (tokenizer.chat_template), and the Alpaca
template of the seed recipe (tloen/alpaca-lora, `### Instruction:` / `### Response:`)
for Alpaca-tuned adapters. `training/` imports this module, so what is trained is
exactly what is served.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.types import ChatMessage

# Tokens that end an assistant turn in common LLaMA-family templates.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


class ChatFormat:
    """Renders messages as text the model was trained on, and tokenizes it."""

    name = "base"
    # Whether the tokenizer adds its own BOS: templates write theirs into the text,
    # the Alpaca recipe relied on the tokenizer's.
    add_special_tokens = False

    def __init__(self, tokenizer: Any, extra_stop_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        ids.update(extra_stop_ids)
        self.stop_token_ids: frozenset[int] = frozenset(ids)
        self.stop_strings: tuple[str, ...] = ()

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        raise NotImplementedError

    def encode(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True
    ) -> list[int]:
        text = self.render(messages, add_generation_prompt)
        ids: list[int] = self.tokenizer(text, add_special_tokens=self.add_special_tokens)[
            "input_ids"
        ]
        return ids


class TemplateFormat(ChatFormat):
    """The model's own Jinja chat template."""

    name = "template"

    def __init__(self, tokenizer: Any, extra_stop_ids: Sequence[int] = ()) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat_format = 'template', but this model's tokenizer has no chat template; "
                "use chat_format = 'alpaca'"
            )
        super().__init__(tokenizer, extra_stop_ids)

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        rendered: str = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        return rendered


class AlpacaFormat(ChatFormat):
    """The seed recipe's template. A system message replaces the standard preamble;
    earlier turns become earlier Instruction/Response pairs, each response ending in EOS."""

    name = "alpaca"
    add_special_tokens = True

    def __init__(self, tokenizer: Any, extra_stop_ids: Sequence[int] = ()) -> None:
        super().__init__(tokenizer, extra_stop_ids)
        self.stop_strings = ("### Instruction:",)

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        preamble = ALPACA_PREAMBLE
        parts: list[str] = []
        eos = self.tokenizer.eos_token or ""
        for message in messages:
            if message.role == "system":
                preamble = message.content
            elif message.role == "user":
                parts.append(f"### Instruction:\n{message.content}\n\n### Response:\n")
            else:
                parts.append(f"{message.content}{eos}\n\n")
        # add_generation_prompt needs nothing extra: a user turn ends in "### Response:\n".
        return (f"{preamble}\n\n" if preamble else "") + "".join(parts)


def make_chat_format(name: str, tokenizer: Any, extra_stop_ids: Sequence[int] = ()) -> ChatFormat:
    """'auto' uses the model's template when it has one, else Alpaca."""
    if name == "auto":
        name = "template" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if name == "template":
        return TemplateFormat(tokenizer, extra_stop_ids)
    if name == "alpaca":
        return AlpacaFormat(tokenizer, extra_stop_ids)
    raise ValueError(f"chat_format {name!r}: must be 'auto', 'template' or 'alpaca'")
