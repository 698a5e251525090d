"""Chat messages -> prompt text -> token ids: the one place both serving and training use.

Two formats: the model's own chat template (tokenizer.chat_template), and the Alpaca
template of the seed recipe (tloen/alpaca-lora, `### Instruction:` / `### Response:`)
for Alpaca-tuned adapters. `training/` imports this module, so what is trained is
exactly what is served.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from engine.types import ChatMessage

Span = tuple[int, int]  # [start, end) character offsets into rendered text

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

    # training -----------------------------------------------------------------------
    def render_with_spans(self, messages: Sequence[ChatMessage]) -> tuple[str, list[Span]]:
        """The whole conversation as text, and the character span of each assistant turn
        that a model must learn to generate.

        A turn's span starts where its generation prompt ends (render of the messages
        before it, with add_generation_prompt) and ends after its end-of-turn marker
        (<|im_end|>, EOS, ...), so the trained text is exactly what serving asks the
        model to produce: not a character more or less. Raises ValueError when the
        format cannot render the conversation or the turn cannot be located."""
        text = self.render(messages, add_generation_prompt=False)
        spans: list[Span] = []
        cursor = 0
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prompt = self.render(messages[:index], add_generation_prompt=True)
            turn = self.render(messages[: index + 1], add_generation_prompt=False)
            if turn.startswith(prompt) and text.startswith(turn) and len(prompt) >= cursor:
                span = self._reply_span(turn, len(prompt), message.content)
            else:
                # A template that renders history differently from a fresh prompt (e.g.
                # one that drops earlier reasoning): find the reply in the full text.
                found = text.find(message.content, cursor)
                if not message.content or found < 0:
                    raise ValueError(
                        f"the {self.name} chat format does not render assistant turn "
                        f"{index + 1} verbatim; cannot tell which tokens to train"
                    )
                span = self._reply_span(text, found, message.content)
            spans.append(span)
            cursor = span[1]
        return text, spans

    def encode_with_mask(self, messages: Sequence[ChatMessage]) -> tuple[list[int], list[bool]]:
        """Token ids of the whole conversation and, per token, whether it belongs to an
        assistant turn's reply (see `tokenize_with_mask`)."""
        return self.tokenize_with_mask([self.render_with_spans(messages)])[0]

    def tokenize_with_mask(
        self, rendered: Sequence[tuple[str, Sequence[Span]]]
    ) -> list[tuple[list[int], list[bool]]]:
        """Tokenize texts from `render_with_spans` (in one batch) with their masks.

        The mask comes from the tokenizer's offset mapping: a token is trained when its
        characters overlap a reply span. Checked per reply: the ids before it must be
        the ids serving sends for that turn (`encode` of the prompt). Where the tokenizer
        merges across the boundary (e.g. "\n\n" alone but "\n", "\n" before a word),
        the text is tokenized in pieces cut at each reply's start instead, so every
        reply follows its exact serving prompt."""
        texts = [text for text, _ in rendered]
        prompts = [text[:start] for text, spans in rendered for start, _ in spans]
        whole = self.tokenizer(
            texts, add_special_tokens=self.add_special_tokens, return_offsets_mapping=True
        )
        prompt_ids = (
            self.tokenizer(prompts, add_special_tokens=self.add_special_tokens)["input_ids"]
            if prompts
            else []
        )
        results = []
        at = 0
        for (text, spans), ids, offsets in zip(
            rendered, whole["input_ids"], whole["offset_mapping"], strict=True
        ):
            expected = prompt_ids[at : at + len(spans)]
            at += len(spans)
            mask = mask_from_offsets(offsets, spans)
            firsts = [_first_token_of(offsets, span) for span in spans]
            exact = all(
                list(ids[:first]) == list(prompt)
                for first, prompt in zip(firsts, expected, strict=True)
            )
            results.append((list(ids), mask) if exact else self._tokenize_pieces(text, spans))
        return results

    def _tokenize_pieces(self, text: str, spans: Sequence[Span]) -> tuple[list[int], list[bool]]:
        cuts = [0, *(start for start, _ in spans), len(text)]
        ids: list[int] = []
        mask: list[bool] = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            if a == b:
                continue
            piece = self.tokenizer(
                text[a:b],
                add_special_tokens=self.add_special_tokens and a == 0,
                return_offsets_mapping=True,
            )
            local = [(start - a, end - a) for start, end in spans if a <= start < b]
            ids.extend(piece["input_ids"])
            mask.extend(mask_from_offsets(piece["offset_mapping"], local))
        return ids, mask

    @functools.cached_property
    def end_of_turn_markers(self) -> tuple[str, ...]:
        """Texts that close an assistant turn: the known end-of-turn tokens, EOS, and any
        special token among the stop ids."""
        special = set(self.tokenizer.get_added_vocab())
        names = self.tokenizer.convert_ids_to_tokens(sorted(self.stop_token_ids))
        markers = [*END_OF_TURN_TOKENS, *(n for n in names if n in special)]
        if self.tokenizer.eos_token:
            markers.append(self.tokenizer.eos_token)
        return tuple(dict.fromkeys(m for m in markers if m))

    def _reply_span(self, text: str, start: int, content: str) -> Span:
        """[start, end of the first end-of-turn marker after the reply's content)."""
        found = text.find(content, start) if content else -1
        search_from = found + len(content) if found >= 0 else start
        ends = [
            at + len(marker)
            for marker in self.end_of_turn_markers
            if (at := text.find(marker, search_from)) >= 0
        ]
        # The next turn, if any, starts after this one's marker: never look past it.
        if ends:
            return start, min(ends)
        # No marker (a template without one): the reply up to its trailing whitespace.
        return start, len(text[:search_from].rstrip()) if found >= 0 else len(text.rstrip())


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


def mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[bool]:
    """Per token, whether its characters overlap a span. A token straddling a span's
    start (e.g. " Hello" after "[/INST]") is trained: the model must generate it."""
    mask = [False] * len(offsets)
    span_index = 0
    for token, (start, end) in enumerate(offsets):
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        mask[token] = end > start and start < span_end and end > span_start
    return mask


def _first_token_of(offsets: Sequence[tuple[int, int]], span: Span) -> int:
    """Index of the first token overlapping `span` (len(offsets) if none does)."""
    start, end = span
    return next(
        (i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < end),
        len(offsets),
    )


def make_chat_format(name: str, tokenizer: Any, extra_stop_ids: Sequence[int] = ()) -> ChatFormat:
    """'auto' uses the model's template when it has one, else Alpaca."""
    if name == "auto":
        name = "template" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if name == "template":
        return TemplateFormat(tokenizer, extra_stop_ids)
    if name == "alpaca":
        return AlpacaFormat(tokenizer, extra_stop_ids)
    raise ValueError(f"chat_format {name!r}: must be 'auto', 'template' or 'alpaca'")
