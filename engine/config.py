"""Typed, frozen config sections and the TOML-section parser every package shares.

Each package owns the sections it configures (engine: [model], [engine]; bot: the rest);
`parse_sections` turns raw TOML tables into those dataclasses, reporting every bad key
at once, with its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from engine.types import SamplingParams

T = TypeVar("T")


class ConfigError(ValueError):
    """Bad configuration. The message lists every problem found, one per line."""


Quantization = Literal["none", "8bit", "4bit"]
ChatFormatName = Literal["auto", "template", "alpaca"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
KVCache = Literal["auto", "fp8"]


@dataclass(frozen=True)
class ModelConfig:
    """[model]: which weights answer, and how they are loaded."""

    base: str = "embedded"
    adapter: str = ""
    quantization: Quantization = "none"
    chat_format: ChatFormatName = "auto"
    dtype: DType = "auto"
    device: Device = "auto"
    context_window: int = 0
    cache_dir: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not self.base:
            problems.append("[model] base = '': name 'embedded', a model folder or a .gguf file")
        if self.context_window < 0:
            problems.append(
                f"[model] context_window = {self.context_window}: must be >= 0 (0 = the model's own)"
            )
        if problems:
            raise ConfigError("\n".join(problems))


@dataclass(frozen=True)
class EngineConfig:
    """[engine]: the generation worker and the default sampling of every request."""

    max_queue: int = 32
    max_new_tokens: int = 512
    temperature: float = 0.3
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    stall_timeout_s: float = 120.0
    threads: int = 0
    # Continuous batching (LLaMA-family models without quantization): sequences served at
    # once (0 = auto), tokens each can hold (0 = min(context, 4096)), rows per step while
    # prompts wait (one per answering chat, the rest, at least half, prompt tokens; 0 =
    # auto: 768 on a GPU, 512 on the CPU), the decode step as CUDA graphs on a GPU, and
    # the KV cache's element type ("auto": the model's; "fp8": float8 e4m3 with a factor
    # per token and head, on sm_89+ GPUs).
    slots: int = 0
    slot_tokens: int = 0
    prefill_chunk: int = 0
    cuda_graphs: bool = True
    kv_cache: KVCache = "auto"
    # Where answers come from: this process ("local") or an OpenAI-compatible server
    # ("openai": engine/remote.py; `python -m engine serve`, vLLM, llama.cpp, Ollama).
    backend: Literal["local", "openai"] = "local"
    base_url: str = ""
    api_key_env: str = ""
    remote_model: str = ""
    request_timeout_s: float = 60.0

    def sampling(self) -> SamplingParams:
        """The default sampling of a request."""
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
        )

    def __post_init__(self) -> None:
        url_ok = self.backend != "openai" or self.base_url.startswith(("http://", "https://"))
        checks = [
            ("max_queue", self.max_queue >= 1, ">= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", 0.0 <= self.temperature <= 5.0, "between 0 and 5 (0 = greedy)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 5.0, "in (0, 5]"),
            ("stall_timeout_s", self.stall_timeout_s > 0, "> 0"),
            ("threads", self.threads >= 0, ">= 0 (0 = all cores)"),
            ("slots", self.slots >= 0, ">= 0 (0 = auto)"),
            ("slot_tokens", self.slot_tokens == 0 or self.slot_tokens >= 64, "0 (auto) or >= 64"),
            (
                "prefill_chunk",
                self.prefill_chunk == 0 or self.prefill_chunk >= 16,
                "0 (auto) or >= 16",
            ),
            ("base_url", url_ok, "an http(s):// URL with backend = 'openai'"),
            ("request_timeout_s", self.request_timeout_s > 0, "> 0"),
        ]
        problems = [
            f"[engine] {key} = {getattr(self, key)!r}: must be {allowed}"
            for key, ok, allowed in checks
            if not ok
        ]
        if problems:
            raise ConfigError("\n".join(problems))


def read_toml(path: Path | None) -> tuple[dict[str, Any], Path]:
    """The file's tables, and the folder its relative paths are relative to (the
    current folder when there is no file: then every default applies)."""
    if path is None:
        return {}, Path.cwd()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return data, path.resolve().parent


def resolve_path(value: str, folder: Path) -> str:
    """A path from the config, relative to the config file's folder ("" and
    "embedded" stay as they are)."""
    if not value or value == "embedded":
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else folder / path)


def with_resolved_paths(model: ModelConfig, folder: Path) -> ModelConfig:
    return dataclasses.replace(
        model,
        base=resolve_path(model.base, folder),
        adapter=resolve_path(model.adapter, folder),
        cache_dir=resolve_path(model.cache_dir, folder),
    )


def parse_sections(
    data: dict[str, Any], sections: dict[str, type], *, allow_other_sections: bool = False
) -> dict[str, Any]:
    """Build one frozen dataclass per section; raise ConfigError listing every problem."""
    problems: list[str] = []
    if not allow_other_sections:
        for name in data:
            if name not in sections:
                problems.append(f"[{name}]: unknown section (known: {', '.join(sections)})")
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            problems.append(f"{name} = {raw!r}: must be a [{name}] table")
            continue
        section = _build(cls, name, raw, problems)
        if section is not None:
            built[name] = section
    if problems:
        raise ConfigError("\n".join(problems))
    return built


def _build(cls: type[T], section: str, raw: dict[str, Any], problems: list[str]) -> T | None:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    ok = True
    for key, value in raw.items():
        if key not in known:
            problems.append(f"[{section}] {key}: unknown key (known: {', '.join(sorted(known))})")
            ok = False
            continue
        converted, error = _convert(value, hints[key])
        if error:
            problems.append(f"[{section}] {key} = {value!r}: {error}")
            ok = False
        else:
            kwargs[key] = converted
    try:
        # Built even after type errors (with those keys at their defaults) so that range
        # problems of the other keys are reported in the same run.
        built = cls(**kwargs)
    except ConfigError as exc:
        problems.extend(str(exc).splitlines())
        return None
    return built if ok else None


def _convert(value: Any, hint: Any) -> tuple[Any, str | None]:
    """Check a TOML value against a field's type; lists become tuples (configs are frozen)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value in allowed:
            return value, None
        return None, "must be one of " + ", ".join(repr(a) for a in allowed)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            converted, error = _convert(value, option)
            if error is None:
                return converted, None
        return None, f"must be {_describe(hint)}"
    if origin is tuple:
        (item_hint, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, list):
            return None, f"must be a list of {_describe(item_hint)}"
        items = []
        for item in value:
            converted, error = _convert(item, item_hint)
            if error:
                return None, f"list item {item!r}: {error}"
            items.append(converted)
        return tuple(items), None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value), None
    if hint is int and isinstance(value, bool):
        return None, "must be an integer"
    if isinstance(value, hint):
        return value, None
    return None, f"must be {_describe(hint)}"


def _describe(hint: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    if hint in names:
        return names[hint]
    return str(hint).replace("typing.", "")
