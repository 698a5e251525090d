"""Conversations -> training examples: token ids and, per token, whether it is trained.

Tokenized with the engine's own chat format (what is trained is what is served). The
mask comes from the rendered text (`ChatFormat.render_with_spans`), so it cannot be off
by one. A conversation longer than `max_len` loses its oldest user/assistant exchanges
(the system prompt stays); when even the last exchange does not fit it is skipped,
never cut: a reply that loses its end-of-turn token teaches the model not to stop.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jinja2.exceptions import TemplateError

from engine.chat_format import ChatFormat, Span
from engine.config import ConfigError
from engine.types import ChatMessage
from training.data import Conversation

TOKENIZE_CHUNK = 512  # conversations per tokenizer call (a fast tokenizer batches in Rust)


@dataclass(frozen=True)
class Example:
    input_ids: torch.Tensor  # (T,) int32
    trained: torch.Tensor  # (T,) bool: the token is a target of the loss
    source: str  # "file:position" of the conversation

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class ExampleStats:
    conversations: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0  # conversations that lost their oldest exchanges
    dropped_turns: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # "file:position: reason"
    lengths: list[int] = field(default_factory=list)

    def skip(self, conversation: Conversation, category: str, detail: str) -> None:
        self.skipped[category] += 1
        self.problems.append(f"{conversation.source}: {category}: {detail}")

    def as_dict(self) -> dict[str, Any]:
        lengths = sorted(self.lengths)
        return {
            "conversations": self.conversations,
            "examples": self.examples,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "truncated": self.truncated,
            "dropped_turns": self.dropped_turns,
            "skipped": dict(self.skipped.most_common()),
            "length_median": int(statistics.median(lengths)) if lengths else 0,
            "length_p95": lengths[int(0.95 * (len(lengths) - 1))] if lengths else 0,
            "length_max": lengths[-1] if lengths else 0,
        }


def to_messages(conversation: Conversation) -> list[ChatMessage]:
    """The conversation as chat messages, without trailing user turns (nothing answers
    them, so nothing can be learnt from them)."""
    messages = [ChatMessage(turn.role, turn.content) for turn in conversation.turns]
    while messages and messages[-1].role != "assistant":
        messages.pop()
    return messages


def build_examples(
    conversations: Sequence[Conversation],
    chat_format: ChatFormat,
    max_len: int,
    *,
    train_on_inputs: bool = False,
) -> tuple[list[Example], ExampleStats]:
    """One example per usable conversation, in order; the rest counted in stats.skipped."""
    if not getattr(chat_format.tokenizer, "is_fast", False):
        raise ConfigError("training needs a fast tokenizer (a model folder with tokenizer.json)")
    stats = ExampleStats(conversations=len(conversations))
    examples: list[Example] = []
    for start in range(0, len(conversations), TOKENIZE_CHUNK):
        chunk = conversations[start : start + TOKENIZE_CHUNK]
        rendered: list[tuple[Conversation, list[ChatMessage], str, list[Span]]] = []
        for conversation in chunk:
            messages = to_messages(conversation)
            if not messages:
                stats.skip(conversation, "no assistant turn", "nothing to learn from")
                continue
            try:
                text, spans = chat_format.render_with_spans(messages)
            except (ValueError, TemplateError) as exc:
                stats.skip(conversation, "chat format error", str(exc))
                continue
            rendered.append((conversation, messages, text, spans))
        if not rendered:
            continue
        encoded = chat_format.tokenize_with_mask([(text, spans) for _, _, text, spans in rendered])
        for (conversation, messages, _, _), (ids, mask) in zip(rendered, encoded, strict=True):
            if len(ids) > max_len:
                fitted = truncate(messages, chat_format, max_len)
                if fitted is None:
                    stats.skip(
                        conversation,
                        "too long",
                        f"{len(ids)} tokens, and the last exchange alone exceeds --max-len "
                        f"{max_len}",
                    )
                    continue
                ids, mask, dropped = fitted
                stats.truncated += 1
                stats.dropped_turns += dropped
            example = make_example(ids, mask, conversation.source, train_on_inputs)
            examples.append(example)
            stats.tokens += len(example)
            stats.trained_tokens += int(example.trained.sum())
            stats.lengths.append(len(example))
    stats.examples = len(examples)
    return examples, stats


def make_example(
    ids: Sequence[int], mask: Sequence[bool], source: str, train_on_inputs: bool
) -> Example:
    trained = torch.ones(len(ids), dtype=torch.bool) if train_on_inputs else torch.tensor(mask)
    # The first token has nothing before it to be predicted from (and in a packed row,
    # what is before it belongs to another example).
    trained[0] = False
    return Example(torch.tensor(ids, dtype=torch.int32), trained, source)


def truncate(
    messages: Sequence[ChatMessage], chat_format: ChatFormat, max_len: int
) -> tuple[list[int], list[bool], int] | None:
    """Drop the fewest oldest user/assistant exchanges (keeping the system prompt) so the
    conversation fits; None when even the last exchange alone does not."""
    system = list(messages[:1]) if messages[0].role == "system" else []
    body = list(messages[len(system) :])
    # Exchange boundaries: indices of user turns (the body alternates, user first).
    starts = [i for i, m in enumerate(body) if m.role == "user"]

    def encode(first: int) -> tuple[list[int], list[bool]]:
        return chat_format.encode_with_mask([*system, *body[starts[first] :]])

    low, high = 1, len(starts) - 1  # find the smallest number of exchanges to drop
    best: tuple[int, list[int], list[bool]] | None = None
    while low <= high:
        middle = (low + high) // 2
        ids, mask = encode(middle)
        if len(ids) <= max_len:
            best = (middle, ids, mask)
            high = middle - 1
        else:
            low = middle + 1
    if best is None:
        return None
    first, ids, mask = best
    return ids, mask, starts[first]
