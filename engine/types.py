"""The plain request/response types every engine backend speaks (no torch here)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant"):
            raise ValueError(f"role {self.role!r}: must be 'system', 'user' or 'assistant'")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature 0 means greedy; top_k 0 means off."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if not 0.0 <= self.temperature <= 5.0:
            problems.append(f"temperature={self.temperature}: must be in [0, 5]")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k}: must be >= 0")
        if not 0.0 < self.repetition_penalty <= 5.0:
            problems.append(f"repetition_penalty={self.repetition_penalty}: must be in (0, 5]")
        if any(not s for s in self.stop):
            problems.append("stop: empty strings are not allowed")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Completion:
    """What a finished request reports besides its text."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    adapter: str
    token_ids: tuple[int, ...] = ()


class EngineError(RuntimeError):
    """Generation failed. The message is safe to log; show users something short."""


class EngineBusy(EngineError):
    """The request queue is full: tell the user at once, never wait silently."""


class EngineStalled(EngineError):
    """No output arrived within the stall timeout: an error, never a quiet end."""


class PromptTooLong(EngineError):
    """The prompt alone does not fit the model's context window."""


class UnknownModel(EngineError):
    """A request named a model/adapter this engine does not serve."""


class Engine(Protocol):
    """What the bot needs from a backend, local or remote."""

    context_window: int
    adapter_name: str

    @property
    def queue_depth(self) -> int: ...

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int: ...

    def models(self) -> list[str]:
        """Names a request may ask for: the base model, then each loaded adapter."""
        ...

    def stream(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        adapter: str | None = None,
    ) -> TextStreamLike:
        """Start a request; `adapter` None means the engine's default."""
        ...

    def close(self) -> None: ...


class TextStreamLike(Protocol):
    completion: Completion | None

    def __aiter__(self) -> AsyncGenerator[str, None]: ...

    def cancel(self) -> None: ...
