"""Continuous batching over a slot KV cache: the worker thread's loop for LLaMA models.

Each iteration takes new requests while slots are free, then runs one step (vLLM v1's
EngineCore.step: schedule -> step -> publish). While prompts wait, a step carries every
generating sequence's next token and fills the rest of `prefill_chunk` rows with their
tokens (at least half of it: mixed prefill and decode, as vLLM's chunked prefill does
with its token budget); otherwise it is a decode step for every generating sequence.
On a GPU decode steps are replayed from CUDA graphs (engine/decode_graphs.py), and
mixed steps too where the varlen Triton kernels serve the model (bf16/fp16 on an Ampere
or newer GPU).
Requests join between steps and leave the moment they finish. A finished sequence's
slot keeps its KV, so the next turn of the same chat prefills only what is new (prefix
reuse); idle slots are taken least recently used first.

Decoding is pipelined on a GPU ("async output"): step t+1 is queued with step t's
sampled ids still on the device, and only then does the host wait for step t's ids and
detokenize, stream and check them, while the device runs step t+1. A sequence that
finished at step t has had step t+1 run for it too: that row is dropped unseen (never
streamed, counted or recorded as slot content). Steps chain while the batch stays
the same, or loses only rows that end by length at step t (known before it is read:
step t+1 runs for the others); a prefill, a cancellation or a stop (seen only once step
t is read) drains the pipeline first. A mixed step's tokens are read at once (the next
step's rows depend on them: who finished its prompt, who stopped at a stop id or its
length), but detokenized and streamed only after the next step is queued, so the device
does not wait for that either; a stop string found then has had one more row run for it,
dropped unseen as above.
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
from engine.sampling_batch import sample_batch, upload
from engine.types import Completion, EngineError, FinishReason

if TYPE_CHECKING:
    from engine.worker import Request

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence:
    """One request from admission to its end; compared by identity (a batch is the same
    batch while it holds the same sequences)."""

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
    finished: bool = False


@dataclass(eq=False)
class DecodeStep:
    """A decode step queued on the device. Its sampled ids stay there (the next step can
    start from them) and are copied to the host in the background."""

    batch: list[Sequence]
    slots: torch.Tensor  # (B,) on the device
    positions: torch.Tensor  # (B,) where this step's input tokens were written
    tokens: torch.Tensor  # (B,) the sampled ids, on the device
    host: torch.Tensor  # (B,) the same ids on the host, once `copied` has happened
    copied: torch.cuda.Event | None

    def read(self) -> list[int]:
        """The sampled ids (waits for the step to finish)."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()  # type: ignore[no-any-return]


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
        pipelined: bool | None = None,
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
        # The step launched but not yet read. Pipelining pays only where the device runs
        # ahead of the host (CUDA); on the CPU it would just delay each token by a step.
        self._pending: DecodeStep | None = None
        # A mixed step's tokens, read and counted but not yet streamed (pipelined only):
        # published once the next step is queued. Each of their sequences is decoding
        # (a reply's last token is streamed at once), so a next step always comes.
        self._deferred: list[tuple[Sequence, int]] = []
        self.pipelined = runner.device.type == "cuda" if pipelined is None else pipelined
        self.overlapped_steps = 0  # decode steps launched before the previous was read
        self._active = 0
        self.tokens_generated = 0
        self.prefill_tokens = 0  # prompt tokens actually computed (prefix reuse skips some)
        self.graphs = None
        self.mixed_graphs = None
        if cuda_graphs and runner.device.type == "cuda":
            from engine.decode_graphs import DecodeGraphs, MixedGraphs

            scratch = runner.slots - 1
            self.graphs = DecodeGraphs(runner.decode, len(self.slots), scratch, runner.device)
            if runner.varlen:  # the mixed step's shapes are fixed only with those kernels
                self.mixed_graphs = MixedGraphs(runner, prefill_chunk + len(self.slots), scratch)

    @property
    def active(self) -> int:
        """Sequences in flight. Kept as a counter that drops before a finished request is
        published, so a caller that saw its answer end never still counts it."""
        return self._active

    # the loop ----------------------------------------------------------------------
    def run(self, requests: queue.Queue[Request | None]) -> None:
        """Serve until a None arrives on the queue."""
        # Every bucket now, not on first use: a capture mid-serving would stall all
        # streams for a fraction of a second.
        for graphs in (self.graphs, self.mixed_graphs):
            if graphs is not None and not graphs.captured:
                with torch.inference_mode():
                    graphs.capture_all()
        while True:
            if not self._admit(requests):
                return
            with torch.inference_mode():
                self._drop_cancelled()
                if self.prefilling:
                    self._drain()  # new sequences join the batch: nothing may be in flight
                    self._prefill_step()  # decoding sequences advance in it too
                elif self.decoding or self._pending is not None:
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
                self._flush()  # what was read is streamed, as without pipelining
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
        """Prefill prompt tokens, packed across waiting prompts (a long prompt continues
        in the next step), with every decoding sequence's next token in the same pass:
        its row rides along in the prompt's matrix products, so decoding neither stalls
        nor pays for a step of its own. The decoding rows count against `prefill_chunk`
        (down to half of it for prompts): a step of 512 rows is 30% faster than one of
        576 on an H200 (whole tiles), which a 512-token chunk and 64 decoding rows made."""
        chunks: list[tuple[Sequence, list[int]]] = []
        room = max(self.prefill_chunk - len(self.decoding), self.prefill_chunk // 2)
        for seq in self.prefilling:
            if room <= 0:
                break
            piece = seq.prompt[seq.cached : seq.cached + room]
            chunks.append((seq, piece))
            room -= len(piece)
            self.prefill_tokens += len(piece)
        decoding = self.decoding  # nothing is in flight: the caller drained
        forward = self.runner.forward if self.mixed_graphs is None else self.mixed_graphs.run
        logits = forward(
            [(seq.slot, piece, seq.cached) for seq, piece in chunks],
            [(s.next_token, s.slot, s.position) for s in decoding],
        )
        self._flush()  # the previous mixed step's tokens, while the device runs this one
        done: list[tuple[Sequence, int]] = []
        for row, (seq, piece) in enumerate(chunks):
            self.slots[seq.slot].tokens.extend(piece)
            seq.cached += len(piece)
            if seq.cached == len(seq.prompt):
                done.append((seq, row))
        for seq, _row in done:
            self.prefilling.remove(seq)
            seq.position = len(seq.prompt)
        sampled = [seq for seq, _ in done] + decoding
        if not sampled:
            return
        rows = [row for _, row in done] + [len(chunks) + i for i in range(len(decoding))]
        tokens = sample_batch(
            logits[upload(rows, self.runner.device)],
            [seq.request.params for seq in sampled],
            [self._seen(seq) for seq in sampled],
            [seq.generator for seq in sampled],
        ).tolist()
        first, after = tokens[: len(done)], tokens[len(done) :]
        if not self.pipelined:
            self._hand_out(decoding, after)
            for (seq, _row), token in zip(done, first, strict=True):
                if self._accept(seq, token):
                    self.decoding.append(seq)
            return
        # Pipelined: what the next step needs now, the text once it is queued (_flush).
        for seq, token in zip(decoding, after, strict=True):
            if seq.finished:
                continue  # stopped by a stop string found after this step was queued
            self.slots[seq.slot].tokens.append(seq.next_token)
            seq.position += 1
            self._take_deferred(seq, token)
        for (seq, _row), token in zip(done, first, strict=True):
            if self._take_deferred(seq, token):
                self.decoding.append(seq)
        self.decoding = [s for s in self.decoding if not s.finished]

    def _take_deferred(self, seq: Sequence, token: int) -> bool:
        """A mixed step's token, pipelined: counted now, streamed by the next _flush;
        a sequence's last token (its length) is streamed at once, which ends it and
        frees its slot for a waiting request before the next admission. Returns whether
        the sequence goes on."""
        if not self._take(seq, token):
            return False
        if self._ending(seq):
            return self._emit(seq, token)  # False: it ends here
        self._deferred.append((seq, token))
        return True

    def _decode_step(self) -> None:
        """Queue the next decode step, then publish the previous one while the device runs
        it; when the batch has changed (or pipelining is off) publish first. Rows that
        end at the previous step by length (known before it is read) are left out of
        the next one, so a reply reaching its budget does not stall the others."""
        previous, self._pending = self._pending, None
        if previous is not None and self.pipelined and previous.batch == self.decoding:
            going_on = self._going_on(previous)
            if going_on:
                self._pending = self._launch(going_on, after=previous)
                self.overlapped_steps += 1
            self._publish(previous)
            if not self.decoding:
                self._pending = None  # every row has finished: nothing to read there
            return
        if previous is not None:
            self._publish(previous)
        if not self.decoding:
            return
        step = self._launch(self.decoding)
        self._flush()  # a mixed step's tokens, while the device runs this one
        if self.pipelined:
            self._pending = step
        else:
            self._publish(step)

    def _going_on(self, step: DecodeStep) -> list[Sequence]:
        """The rows of `step` that may take one more step before it is read: not those
        reaching their budget at `step` (their next token would be thrown away) or the
        end of their slot (it would be written outside the cache)."""
        limit = self.runner.slot_tokens
        return [s for s in step.batch if len(s.generated) + 1 < s.budget and s.position + 1 < limit]

    def _launch(self, batch: list[Sequence], after: DecodeStep | None = None) -> DecodeStep:
        """Queue one decode step for `batch`. Its inputs are the tokens the host accepted,
        or, chained `after` a step not read yet, that step's ids on the device."""
        device = self.runner.device
        seen = [self._seen(s) for s in batch]
        if after is None:
            # One host-to-device copy for the three inputs.
            inputs = upload(
                [
                    [s.next_token for s in batch],
                    [s.slot for s in batch],
                    [s.position for s in batch],
                ],
                device,
            )
            tokens, slots, positions = inputs[0], inputs[1], inputs[2]
        else:
            tokens, slots, positions = after.tokens, after.slots, after.positions + 1
            rows = list(range(len(batch)))
            if batch != after.batch:  # some rows ended at `after`: the others' rows
                where = {id(s): row for row, s in enumerate(after.batch)}
                rows = [where[id(s)] for s in batch]
                pick = upload(rows, device)
                tokens, slots, positions = tokens[pick], slots[pick], positions[pick]
            # The repetition penalty also counts the token the host has not read yet.
            seen = [
                None if t is None else torch.cat([t, after.tokens[row : row + 1]])
                for row, t in zip(rows, seen, strict=True)
            ]
        if self.graphs is not None:
            logits = self.graphs.run(tokens, slots, positions).clone()
        else:
            logits = self.runner.decode(tokens, slots, positions)
        chosen = sample_batch(
            logits, [s.request.params for s in batch], seen, [s.generator for s in batch]
        )
        if chosen.device.type != "cuda":
            return DecodeStep(batch, slots, positions, chosen, chosen, None)
        host = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
        host.copy_(chosen, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return DecodeStep(batch, slots, positions, chosen, host, copied)

    def _publish(self, step: DecodeStep) -> None:
        """Hand a step's tokens to their requests (waiting for the step if need be)."""
        self._hand_out(step.batch, step.read())

    def _hand_out(self, batch: list[Sequence], tokens: list[int]) -> None:
        """One decode row's token to each sequence of `batch`. Rows of sequences that
        finished after the step was launched are dropped unseen; their KV write lands
        one past the slot's recorded tokens, so prefix reuse never trusts it."""
        for seq, token in zip(batch, tokens, strict=True):
            if seq.finished:
                continue
            self.slots[seq.slot].tokens.append(seq.next_token)  # the step's input, now cached
            seq.position += 1
            self._accept(seq, token)
        self.decoding = [s for s in self.decoding if not s.finished]

    def _drain(self) -> None:
        """Read the step in flight, if any, before the batch changes."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._publish(pending)

    def _seen(self, seq: Sequence) -> torch.Tensor | None:
        if seq.request.params.repetition_penalty == 1.0:
            return None
        return upload(seq.prompt + seq.generated, self.runner.device, torch.long)

    def _accept(self, seq: Sequence, token: int) -> bool:
        """Publish one sampled token; False when the sequence has finished."""
        return self._take(seq, token) and self._emit(seq, token)

    def _take(self, seq: Sequence, token: int) -> bool:
        """Count a sampled token as the sequence's next (False: a stop id ended it)."""
        if token in self.stop_token_ids:
            if not seq.first_token_at:
                seq.first_token_at = time.perf_counter()
            return self._finish(seq, "stop")
        seq.generated.append(token)
        self.tokens_generated += 1
        seq.next_token = token
        return True

    def _emit(self, seq: Sequence, token: int) -> bool:
        """Stream a taken token's text; False when the sequence has finished (a stop
        string, its budget or the end of its slot)."""
        if not seq.first_token_at:
            seq.first_token_at = time.perf_counter()
        out = seq.stops.push(seq.decoder.push(token))
        seq.text.append(out)
        seq.request.stream.push(out)
        if seq.stops.stopped:
            return self._finish(seq, "stop")
        if self._ending(seq):
            return self._finish(seq, "length")
        return True

    def _ending(self, seq: Sequence) -> bool:
        """Whether the sequence's last token is its last (its budget, its slot's end)."""
        return len(seq.generated) >= seq.budget or seq.position >= self.runner.slot_tokens

    def _flush(self) -> None:
        """Stream the tokens a mixed step read but did not stream yet (in order). Each
        leaves the list once streamed: if streaming fails, the rest are still there."""
        if not self._deferred:
            return
        while self._deferred:
            seq, token = self._deferred[0]
            if not seq.finished:
                self._emit(seq, token)
            del self._deferred[0]
        self.decoding = [s for s in self.decoding if not s.finished]

    def _finish(self, seq: Sequence, reason: FinishReason) -> bool:
        seq.finished = True
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
        # One look at who cancelled: a cancel landing meanwhile waits for the next round.
        cancelled = {id(s) for s in self.prefilling + self.decoding if s.request.stream.cancelled}
        if not cancelled:
            return
        if any(id(s) in cancelled for s, _ in self._deferred):
            self._flush()  # their tokens before their end
        if any(id(s) in cancelled for s in self.decoding):
            self._drain()  # the step in flight holds their last token: read it first
        for group in (self.prefilling, self.decoding):
            for seq in [s for s in group if id(s) in cancelled and not s.finished]:
                group.remove(seq)  # its slot keeps exactly the KV written so far
                self._finish(seq, "cancelled")

    def _fail_all(self, error: EngineError) -> None:
        in_flight = self.prefilling + self.decoding  # every deferred sequence is decoding
        self.prefilling.clear()
        self.decoding.clear()
        self._deferred.clear()
        self._pending = None
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
