"""The local generation worker: one thread owns the model; requests come through one
bounded queue and stream text back to their own `TextStream`.

The loop is the three verbs of vLLM's EngineCore.step: take a request, step it
(prefill, then decode steps), publish its text. One request runs at a time for now; the
request/response types are plain so the loop can grow into continuous batching.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import queue
import threading
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import DynamicCache

from engine.attention import fp8_cache_capable
from engine.batching import BatchScheduler
from engine.chat_format import ChatFormat, make_chat_format
from engine.config import EngineConfig, KVCache, ModelConfig
from engine.detokenize import IncrementalDecoder, StopFilter
from engine.llama import LlamaRunner, head_size, kv_bytes_per_token, supports
from engine.loading import choose_chat_format, load_model
from engine.sampling import sample_next
from engine.stream import TextStream
from engine.types import (
    ChatMessage,
    Completion,
    EngineBusy,
    EngineError,
    FinishReason,
    PromptTooLong,
    SamplingParams,
    UnknownModel,
)

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # long prompts go through the model in pieces of this many tokens
DEFAULT_SLOT_TOKENS = 4096  # longest sequence a slot holds unless configured
# Rows of a mixed step unless configured (engine/batching.py). On a GPU 768: an H200, 7B,
# 64 new chats, float8 cache, one engine switching between sizes (notes-2026-11-29-gpu-
# session13.md): 5,747 tokens/s against 5,618 at 512, the 99th-percentile gap between
# tokens 21 ms against 16.5, time to first token 251 ms against 270 at the median; 640:
# 5,704 and 19 ms; 1024: 5,736 and 27 ms. The CPU keeps 512, as measured there before.
GPU_PREFILL_CHUNK = 768
CPU_PREFILL_CHUNK = 512
MAX_AUTO_SLOTS = 64


def auto_slots(model: Any, slot_tokens: int, device: torch.device, kv_fp8: bool = False) -> int:
    """How many sequences to batch: on a GPU as many as 85% of free memory holds (up to
    64); on the CPU a few (more only adds latency there)."""
    if device.type != "cuda":
        return 4
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dtype = torch.float8_e4m3fn if kv_fp8 else next(model.parameters()).dtype
    per_token = kv_bytes_per_token(config.num_hidden_layers, kv_heads, head_size(config), dtype)
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, min(MAX_AUTO_SLOTS, int(0.85 * free) // (per_token * slot_tokens) - 1))


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream
    submitted: float = field(default_factory=time.perf_counter)


class LocalEngine:
    """Serves one model from a worker thread. Create it inside a running event loop."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        chat_format: ChatFormat,
        *,
        context_window: int,
        max_queue: int = 32,
        stall_timeout_s: float = 120.0,
        adapter_name: str = "",
        model_name: str = "model",
        batching: bool = True,
        slots: int = 0,
        slot_tokens: int = 0,
        prefill_chunk: int = 0,
        cuda_graphs: bool = True,
        kv_cache: KVCache = "auto",
        serves_base: bool = True,
    ) -> None:
        if kv_cache not in typing.get_args(KVCache):
            allowed = " or ".join(map(repr, typing.get_args(KVCache)))
            raise ValueError(f"kv_cache must be {allowed}, got {kv_cache!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.context_window = context_window
        self.adapter_name = adapter_name
        self.model_name = model_name
        self.serves_base = serves_base
        self._stall_timeout_s = stall_timeout_s
        self._queue: queue.Queue[Request | None] = queue.Queue(maxsize=max_queue)
        self._device = next(model.parameters()).device
        # transformers renamed the cache argument (5.2x: `cache`); accept either.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._active = 0
        self._tokens_generated = 0
        self._scheduler: BatchScheduler | None = None
        if batching and supports(model):
            self._scheduler = self._make_scheduler(
                slots, slot_tokens, prefill_chunk, cuda_graphs, kv_cache
            )
            self.context_window = min(context_window, self._scheduler.runner.slot_tokens)
        elif batching:
            if kv_cache == "fp8":
                log.warning("kv_cache = 'fp8' applies to continuous batching only: not used")
            log.info(
                "one request at a time: continuous batching serves unquantized LLaMA-family "
                "weights (merged adapters, no biases or sliding window; on a GPU, head "
                "sizes that are powers of two)"
            )
        self._thread = threading.Thread(target=self._run, name="lorabot-engine", daemon=True)
        self._thread.start()

    def _make_scheduler(
        self,
        slots: int,
        slot_tokens: int,
        prefill_chunk: int,
        cuda_graphs: bool,
        kv_cache: KVCache,
    ) -> BatchScheduler:
        graphs = cuda_graphs and self._device.type == "cuda"
        slot_tokens = slot_tokens or min(self.context_window, DEFAULT_SLOT_TOKENS)
        if not prefill_chunk:
            prefill_chunk = GPU_PREFILL_CHUNK if self._device.type == "cuda" else CPU_PREFILL_CHUNK
        kv_fp8 = kv_cache == "fp8"
        if kv_fp8 and not fp8_cache_capable(self.model.model.embed_tokens.weight):
            log.warning(
                "kv_cache = 'fp8' needs a GPU with float8 (sm_89 or newer), Triton and "
                "bf16 weights: the KV cache stays in the model's dtype"
            )
            kv_fp8 = False
        if not slots:
            slots = auto_slots(self.model, slot_tokens, self._device, kv_fp8)
        runner = LlamaRunner(
            self.model, slots=slots + (1 if graphs else 0), slot_tokens=slot_tokens, kv_fp8=kv_fp8
        )
        log.info(
            "continuous batching: %d slots of %d tokens (%.1f GiB of %s KV cache)",
            slots,
            slot_tokens,
            runner.kv_bytes_per_token() * slot_tokens * runner.slots / 2**30,
            "float8" if kv_fp8 else str(runner.dtype).removeprefix("torch."),
        )
        return BatchScheduler(
            runner,
            self.tokenizer,
            self.chat_format.stop_token_ids,
            adapter_name=self.adapter_name,
            prefill_chunk=prefill_chunk,
            cuda_graphs=graphs,
        )

    @property
    def tokens_generated(self) -> int:
        if self._scheduler is not None:
            return self._scheduler.tokens_generated
        return self._tokens_generated

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, engine_cfg: EngineConfig) -> LocalEngine:
        """Load the configured model and start its worker (takes seconds: call it from a
        thread if the event loop has other work)."""
        if engine_cfg.threads:
            torch.set_num_threads(engine_cfg.threads)
        loaded = load_model(model_cfg)
        chat_format = make_chat_format(
            choose_chat_format(model_cfg.chat_format, model_cfg.adapter),
            loaded.tokenizer,
            extra_stop_ids=loaded.eos_token_ids,
        )
        return cls(
            loaded.model,
            loaded.tokenizer,
            chat_format,
            context_window=loaded.context_window,
            max_queue=engine_cfg.max_queue,
            stall_timeout_s=engine_cfg.stall_timeout_s,
            adapter_name=loaded.adapter_name,
            model_name=loaded.name,
            slots=engine_cfg.slots,
            slot_tokens=engine_cfg.slot_tokens,
            prefill_chunk=engine_cfg.prefill_chunk,
            cuda_graphs=engine_cfg.cuda_graphs,
            kv_cache=engine_cfg.kv_cache,
            serves_base=not loaded.adapter_name,
        )

    # asyncio side -------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests waiting plus those being generated."""
        active = self._scheduler.active if self._scheduler is not None else self._active
        return self._queue.qsize() + active

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Prompt tokens of these messages, with the generation prompt (for budgeting)."""
        return len(self.chat_format.encode(messages))

    def models(self) -> list[str]:
        """Names a request may ask for. A configured adapter is merged into the weights
        (or wraps them), so then the base alone is not served: only the adapter is."""
        names = [self.model_name] if self.serves_base else []
        return names + ([self.adapter_name] if self.adapter_name else [])

    def stream(
        self,
        messages: Sequence[ChatMessage],
        params: SamplingParams,
        adapter: str | None = None,
    ) -> TextStream:
        """Queue a request; raises EngineBusy at once when the queue is full,
        PromptTooLong when the prompt leaves no room for a reply, and UnknownModel for
        an adapter that is not loaded."""
        if adapter is not None and adapter not in self.models():
            raise UnknownModel(f"model {adapter!r} is not served here; try {self.models()}")
        return self.stream_tokens(self.chat_format.encode(messages), params)

    def stream_tokens(self, prompt_ids: list[int], params: SamplingParams) -> TextStream:
        """Like `stream`, for a prompt that is already token ids."""
        if len(prompt_ids) >= self.context_window:
            raise PromptTooLong(
                f"prompt is {len(prompt_ids)} tokens; the model's context is {self.context_window}"
            )
        if not prompt_ids:
            raise ValueError("empty prompt")
        stop = tuple(dict.fromkeys(params.stop + self.chat_format.stop_strings))
        params = replace(params, stop=stop)
        stream = TextStream(asyncio.get_running_loop(), self._stall_timeout_s)
        try:
            self._queue.put_nowait(Request(prompt_ids, params, stream))
        except queue.Full:
            raise EngineBusy(f"{self._queue.maxsize} requests are already waiting") from None
        return stream

    def close(self) -> None:
        """Stop the worker after the request in progress (queued ones are dropped)."""
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                pending.stream.fail(EngineError("the engine is shutting down"))
        self._queue.put(None)
        self._thread.join(timeout=30)

    # worker thread ------------------------------------------------------------------
    def _run(self) -> None:
        if self._scheduler is not None:
            self._run_batched(self._scheduler)
        else:
            self._run_sequential()

    def _run_batched(self, scheduler: BatchScheduler) -> None:
        # The model's many long-lived objects need no cyclic GC passes; freezing them
        # keeps full collections (tens of ms) out of the decode loop.
        gc.freeze()
        try:
            while True:
                try:
                    scheduler.run(self._queue)
                    return
                except Exception as exc:  # noqa: BLE001 - reported to the requests, logged here
                    log.exception("generation step failed")
                    scheduler.fail_all(EngineError(f"generation failed: {type(exc).__name__}"))
        finally:
            gc.unfreeze()

    def _run_sequential(self) -> None:
        """One request at a time through the model's own forward (any HF causal LM:
        quantized, unmerged adapters, architectures the batched runner does not know)."""
        while True:
            request = self._queue.get()
            if request is None:
                return
            if request.stream.cancelled:
                continue
            self._active = 1
            try:
                with torch.inference_mode():
                    self._generate(request)
            except Exception as exc:  # noqa: BLE001 - reported to the request, logged here
                log.exception("generation failed")
                request.stream.fail(EngineError(f"generation failed: {type(exc).__name__}"))
            finally:
                self._active = 0

    def _generate(self, request: Request) -> None:
        params = request.params
        prompt = request.prompt_ids
        budget = min(params.max_new_tokens, self.context_window - len(prompt))
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self._device).manual_seed(params.seed)
        cache = DynamicCache()
        logits = self._prefill(prompt, cache)
        first_token_at = 0.0
        decoder = IncrementalDecoder(self.tokenizer)
        stops = StopFilter(params.stop)
        seen = torch.tensor(prompt, device=self._device)
        generated: list[int] = []
        text: list[str] = []
        reason: FinishReason = "length"
        for _ in range(budget):
            if request.stream.cancelled:
                reason = "cancelled"
                break
            token = sample_next(logits, params, seen, generator)
            if not first_token_at:
                first_token_at = time.perf_counter()
            if token in self.chat_format.stop_token_ids:
                reason = "stop"
                break
            generated.append(token)
            seen = torch.cat([seen, seen.new_tensor([token])])
            out = stops.push(decoder.push(token))
            text.append(out)
            request.stream.push(out)
            if stops.stopped:
                reason = "stop"
                break
            logits = self._decode_step(token, cache)
        if reason != "cancelled":
            tail = stops.push(decoder.flush()) + stops.flush()
            text.append(tail)
            request.stream.push(tail)
        self._tokens_generated += len(generated)
        now = time.perf_counter()
        # No longer counted before the answer is published (as the batched scheduler
        # does): a caller that saw its answer end must not still find it in queue_depth.
        self._active = 0
        request.stream.finish(
            Completion(
                text="".join(text),
                finish_reason=reason,
                prompt_tokens=len(prompt),
                completion_tokens=len(generated),
                ttft_s=(first_token_at or now) - request.submitted,
                total_s=now - request.submitted,
                adapter=self.adapter_name,
                token_ids=tuple(generated),
            )
        )

    def _prefill(self, prompt: list[int], cache: DynamicCache) -> torch.Tensor:
        """Run the prompt through the model in chunks; return the last position's logits."""
        ids = torch.tensor([prompt], device=self._device)
        logits = None
        for start in range(0, len(prompt), PREFILL_CHUNK):
            chunk = ids[:, start : start + PREFILL_CHUNK]
            out = self.model(
                input_ids=chunk, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache}
            )
            logits = out.logits[0, -1]
        assert logits is not None, "prefill of an empty prompt"
        return logits

    def _decode_step(self, token: int, cache: DynamicCache) -> torch.Tensor:
        ids = torch.tensor([[token]], device=self._device)
        out = self.model(
            input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache}
        )
        return out.logits[0, -1]
