"""Continuous batching over a slot KV cache: the worker thread's loop for LLaMA models.

Each iteration takes new requests while slots are free, prefills one chunk of one
prompt, and runs one decode step for every sequence already generating (vLLM v1's
EngineCore.step: schedule -> step -> publish). Requests join between steps and leave
the moment they finish. A finished sequence's slot keeps its KV, so the next turn of
the same chat prefills only what is new (prefix reuse); idle slots are taken least
recently used first.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from engine.detokenize import IncrementalDecoder, StopFilter
from engine.llama import LlamaRunner
from engine.sampling_batch import sample_batch
from engine.types import Completion, EngineError, FinishReason

if TYPE_CHECKING:
    from engine.worker import Request

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    request: Request
    slot: int
    prompt: list[int]
    cached: int  # prompt tokens whose KV is in the slot
    budget: int
    decoder: IncrementalDecoder
    stops: StopFilter
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    first_token_at: float = 0.0
    position: int = 0  # where the next input token goes
    next_token: int = -1


@dataclass
class Slot:
    tokens: list[int] = field(default_factory=list)  # whose KV the slot holds, in order
    busy: bool = False
    last_used: float = 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchScheduler:
    def __init__(
        self,
        runner: LlamaRunner,
        tokenizer: Any,
        stop_token_ids: frozenset[int],
        *,
        adapter_name: str,
        prefill_chunk: int = 512,
        cuda_graphs: bool = True,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids
        self.adapter_name = adapter_name
        self.prefill_chunk = prefill_chunk
        # The last slot is scratch space for CUDA-graph padding rows.
        self.slots = [Slot() for _ in range(runner.slots - (1 if cuda_graphs else 0))]
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []
        self._active = 0
        self.tokens_generated = 0
        self.prefill_tokens = 0  # prompt tokens actually computed (prefix reuse skips some)
        self.graphs = None
        if cuda_graphs and runner.device.type == "cuda":
            from engine.decode_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(
                runner.decode, len(self.slots), runner.slots - 1, runner.device
            )

    @property
    def active(self) -> int:
        """Sequences in flight. Kept as a counter that drops before a finished request is
        published, so a caller that saw its answer end never still counts it."""
        return self._active

    # the loop ----------------------------------------------------------------------
    def run(self, requests: queue.Queue[Request | None]) -> None:
        """Serve until a None arrives on the queue."""
        if self.graphs is not None and not self.graphs.captured:
            # Every bucket now, not on first use: a capture mid-serving would stall all
            # streams for a fraction of a second.
            with torch.inference_mode():
                self.graphs.capture_all()
        while True:
            if not self._admit(requests):
                return
            self._drop_cancelled()
            with torch.inference_mode():
                if self.prefilling:
                    self._prefill_step()
                if self.decoding:
                    self._decode_step()

    def _admit(self, requests: queue.Queue[Request | None]) -> bool:
        """Move queued requests into free slots; block when there is nothing to do.
        Returns False on shutdown."""
        while any(not s.busy for s in self.slots):
            try:
                if self.active:
                    request = requests.get_nowait()
                else:
                    request = requests.get()
            except queue.Empty:
                return True
            if request is None:
                self._fail_all(EngineError("the engine is shutting down"))
                return False
            if not request.stream.cancelled:
                self._start(request)
        return True

    def _start(self, request: Request) -> None:
        prompt = request.prompt_ids
        index, reused = self._choose_slot(prompt)
        slot = self.slots[index]
        slot.busy = True
        self._active += 1
        slot.tokens = slot.tokens[:reused]
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        budget = min(params.max_new_tokens, self.runner.slot_tokens - len(prompt))
        self.prefilling.append(
            Sequence(
                request=request,
                slot=index,
                prompt=prompt,
                cached=reused,
                budget=budget,
                decoder=IncrementalDecoder(self.tokenizer),
                stops=StopFilter(params.stop),
                generator=generator,
            )
        )

    def _choose_slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot sharing the longest prefix with `prompt` (else the least
        recently used), and how many of its tokens can be kept."""
        free = [i for i, s in enumerate(self.slots) if not s.busy]
        best = max(
            free,
            key=lambda i: (common_prefix(self.slots[i].tokens, prompt), -self.slots[i].last_used),
        )
        shared = common_prefix(self.slots[best].tokens, prompt)
        if shared == 0:
            best = min(free, key=lambda i: self.slots[i].last_used)
        # At least one prompt token must run, to get the logits of the next token.
        return best, min(shared, len(prompt) - 1)

    # steps -------------------------------------------------------------------------
    def _prefill_step(self) -> None:
        """Prefill up to `prefill_chunk` prompt tokens, packed across waiting prompts
        (a long prompt continues in the next step), so decoding never stalls long."""
        chunks: list[tuple[Sequence, list[int]]] = []
        room = self.prefill_chunk
        for seq in self.prefilling:
            if room <= 0:
                break
            piece = seq.prompt[seq.cached : seq.cached + room]
            chunks.append((seq, piece))
            room -= len(piece)
            self.prefill_tokens += len(piece)
        device = self.runner.device
        logits = self.runner.prefill_many(
            [(seq.slot, torch.tensor(piece, device=device), seq.cached) for seq, piece in chunks]
        )
        done: list[tuple[Sequence, int]] = []
        for row, (seq, piece) in enumerate(chunks):
            self.slots[seq.slot].tokens.extend(piece)
            seq.cached += len(piece)
            if seq.cached == len(seq.prompt):
                done.append((seq, row))
        if not done:
            return
        for seq, _row in done:
            self.prefilling.remove(seq)
            seq.position = len(seq.prompt)
        rows = torch.tensor([row for _, row in done], device=device)
        first = sample_batch(
            logits[rows],
            [seq.request.params for seq, _ in done],
            [self._seen(seq) for seq, _ in done],
            [seq.generator for seq, _ in done],
        )
        for (seq, _row), token in zip(done, first, strict=True):
            if self._accept(seq, token):
                self.decoding.append(seq)

    def _decode_step(self) -> None:
        batch = self.decoding
        device = self.runner.device
        # One host-to-device copy for the three inputs.
        inputs = torch.tensor(
            [[s.next_token for s in batch], [s.slot for s in batch], [s.position for s in batch]]
        ).to(device, non_blocking=True)
        tokens, slots, positions = inputs[0], inputs[1], inputs[2]
        if self.graphs is not None:
            logits = self.graphs.run(tokens, slots, positions).clone()
        else:
            logits = self.runner.decode(tokens, slots, positions)
        for s in batch:
            self.slots[s.slot].tokens.append(s.next_token)
            s.position += 1
        chosen = sample_batch(
            logits,
            [s.request.params for s in batch],
            [self._seen(s) for s in batch],
            [s.generator for s in batch],
        )
        self.decoding = [s for s, t in zip(batch, chosen, strict=True) if self._accept(s, t)]

    def _seen(self, seq: Sequence) -> torch.Tensor | None:
        if seq.request.params.repetition_penalty == 1.0:
            return None
        return torch.tensor(seq.prompt + seq.generated, device=self.runner.device)

    def _accept(self, seq: Sequence, token: int) -> bool:
        """Publish one sampled token; False when the sequence has finished."""
        if not seq.first_token_at:
            seq.first_token_at = time.perf_counter()
        if token in self.stop_token_ids:
            return self._finish(seq, "stop")
        seq.generated.append(token)
        self.tokens_generated += 1
        out = seq.stops.push(seq.decoder.push(token))
        seq.text.append(out)
        seq.request.stream.push(out)
        if seq.stops.stopped:
            return self._finish(seq, "stop")
        if len(seq.generated) >= seq.budget or seq.position >= self.runner.slot_tokens:
            return self._finish(seq, "length")
        seq.next_token = token
        return True

    def _finish(self, seq: Sequence, reason: FinishReason) -> bool:
        if reason != "cancelled":
            tail = seq.stops.push(seq.decoder.flush()) + seq.stops.flush()
            seq.text.append(tail)
            seq.request.stream.push(tail)
        slot = self.slots[seq.slot]
        slot.busy = False
        slot.last_used = time.monotonic()
        self._active -= 1
        now = time.perf_counter()
        request = seq.request
        request.stream.finish(
            Completion(
                text="".join(seq.text),
                finish_reason=reason,
                prompt_tokens=len(seq.prompt),
                completion_tokens=len(seq.generated),
                ttft_s=(seq.first_token_at or now) - request.submitted,
                total_s=now - request.submitted,
                adapter=self.adapter_name,
                token_ids=tuple(seq.generated),
            )
        )
        return False

    def _drop_cancelled(self) -> None:
        for group in (self.prefilling, self.decoding):
            for seq in [s for s in group if s.request.stream.cancelled]:
                group.remove(seq)  # its slot keeps exactly the KV written so far
                self._finish(seq, "cancelled")

    def _fail_all(self, error: EngineError) -> None:
        in_flight = self.prefilling + self.decoding
        self.prefilling.clear()
        self.decoding.clear()
        self._active = 0
        for seq in in_flight:
            seq.request.stream.fail(error)

    def fail_all(self, error: EngineError) -> None:
        """After a crash of a step: every request in flight gets the error; slots are
        emptied (their KV may be half-written)."""
        self._fail_all(error)
        for slot in self.slots:
            slot.busy = False
            slot.tokens = []
