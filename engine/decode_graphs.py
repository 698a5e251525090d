"""The decode step and the mixed step captured as CUDA graphs, one per size bucket.

A decode step is 5-10 kernels per layer; replaying a graph launches them all at once,
so a small batch runs at the speed of memory instead of the speed of Python. Batches
are padded up to the next bucket with rows that write only to a scratch slot.

A mixed step (prompt chunks plus every decoding row, engine/llama.LlamaRunner.run_plan)
is bound by the host when run eagerly: ~14 launches per layer take longer to issue
than a 512-row pass takes to run. Its graphs are keyed by the number of rows; the
plan (tokens, positions, slots, the chunks' varlen layout, the first decode row) is
padded to the bucket and copied into the graph's own input tensor in one copy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine.llama import LlamaRunner
    from engine.plan import Plan

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIXED_BUCKETS = (16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 1024)

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# One capture at a time in a process (two engines starting together, or an engine's
# start-up timing captures, engine/skinny_calibrate.py); each in "thread_local" mode, so work
# another thread queues meanwhile cannot invalidate it.
CAPTURE_LOCK = threading.Lock()


def capture(fn: Callable[[], torch.Tensor], pool: Any) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """fn's work as a CUDA graph in `pool`, and the tensor it returns (the graph's
    output, rewritten by each replay). Two eager calls on a side stream first: Triton
    compiles, cuBLAS picks its kernels."""
    stream = torch.cuda.Stream()
    with CAPTURE_LOCK:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = fn()
    return graph, out


class _Graphs:
    """One step's CUDA graphs, one per size bucket, in one memory pool (replayed one at
    a time, so they can share it)."""

    def __init__(self, buckets: list[int]) -> None:
        self.buckets = buckets
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def bucket(self, size: int) -> int | None:
        return next((b for b in self.buckets if b >= size), None)

    @property
    def captured(self) -> bool:
        return len(self._graphs) == len(self.buckets)

    def capture_all(self) -> None:
        for size in self.buckets:
            self._graph(size)

    def _graph(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if size not in self._graphs:
            self._graphs[size] = capture(self._step(size), self._pool)
            log.debug("captured %s for %d", type(self).__name__, size)
        return self._graphs[size]

    def _step(self, size: int) -> Callable[[], torch.Tensor]:
        """The step of this bucket, on its static inputs."""
        raise NotImplementedError


class DecodeGraphs(_Graphs):
    def __init__(self, decode: DecodeFn, max_batch: int, scratch_slot: int, device: torch.device):
        super().__init__([b for b in BUCKETS if b < max_batch] + [max_batch])
        self._decode = decode
        self._scratch = scratch_slot
        size = self.buckets[-1]
        self._tokens = torch.zeros(size, dtype=torch.long, device=device)
        self._slots = torch.full((size,), scratch_slot, dtype=torch.long, device=device)
        self._positions = torch.zeros(size, dtype=torch.long, device=device)

    def _step(self, size: int) -> Callable[[], torch.Tensor]:
        args = (self._tokens[:size], self._slots[:size], self._positions[:size])
        return lambda: self._decode(*args)

    def run(
        self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Inputs (B,) on the device -> logits (B, V); a view into the graph's output,
        valid until the next call."""
        batch = tokens.shape[0]
        size = self.bucket(batch)
        assert size is not None, (batch, self.buckets)
        graph, logits = self._graph(size)
        self._tokens[:batch].copy_(tokens)
        self._slots[:batch].copy_(slots)
        self._positions[:batch].copy_(positions)
        if batch < size:  # padding rows: scratch slot, position 0
            self._slots[batch:size].fill_(self._scratch)
            self._positions[batch:size].zero_()
        graph.replay()
        return logits[:batch]


def mixed_buckets(max_rows: int) -> list[int]:
    """MIXED_BUCKETS below max_rows, then every 256 rows up to it (a larger
    prefill_chunk), then max_rows itself."""
    sizes = [b for b in MIXED_BUCKETS if b < max_rows]
    while sizes and sizes[-1] + 256 < max_rows:
        sizes.append(sizes[-1] + 256)
    return sizes + [max_rows]


class MixedGraphs(_Graphs):
    """Mixed steps of up to `max_rows` rows (prompt tokens plus decode rows) replayed
    from CUDA graphs, one per bucket of rows."""

    def __init__(self, runner: LlamaRunner, max_rows: int, scratch_slot: int) -> None:
        from engine.plan import Pad

        super().__init__(mixed_buckets(max_rows))
        self._runner = runner
        # Each sequence of a step holds a slot and at least one row: at most
        # min(rows, slots) sequences and returned rows.
        self._pads = {
            size: Pad(size, min(size, runner.slots), scratch_slot) for size in self.buckets
        }
        self._plans: dict[int, Plan] = {}

    def _step(self, size: int) -> Callable[[], torch.Tensor]:
        plan = self._runner.plan([], [], self._pads[size])  # all padding: scratch rows
        self._plans[size] = plan
        return lambda: self._runner.run_plan(plan)

    def run(
        self,
        chunks: list[tuple[int, list[int], int]],
        decode: Sequence[tuple[int, int, int]] = (),
    ) -> torch.Tensor:
        """LlamaRunner.forward's result, replayed (or computed eagerly when the rows
        outgrow the largest bucket); a view into the graph's output, valid until the
        next call."""
        rows = sum(len(ids) for _, ids, _ in chunks) + len(decode)
        size = self.bucket(rows)
        if size is None:
            return self._runner.forward(chunks, decode)
        graph, logits = self._graph(size)
        plan = self._runner.plan(chunks, decode, self._pads[size])
        self._plans[size].ids.copy_(plan.ids)
        graph.replay()
        return logits[: len(chunks) + len(decode)]
