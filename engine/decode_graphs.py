"""The decode step and the mixed step captured as CUDA graphs, one per size bucket.

A decode step is ~10 kernels per layer; replaying a graph launches them all at once,
so a small batch runs at the speed of memory instead of the speed of Python. Batches
are padded up to the next bucket with rows that write only to a scratch slot.

A mixed step (prompt chunks plus every decoding row, engine/llama.LlamaRunner.run_plan)
is bound by the host when run eagerly: ~14 launches per layer take longer to issue
than a 512-row pass takes to run. Its graphs are keyed by the number of rows; the
plan (tokens, positions, slots, the flash call's sequence layout) is padded to the
bucket and copied into the graph's own input tensor in one copy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.llama import LlamaRunner, Plan

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIXED_BUCKETS = (16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 1024)

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# One capture at a time in a process (two engines starting together, or an engine's
# start-up timing captures, engine/skinny_gemm.py); each in "thread_local" mode, so work
# another thread queues meanwhile cannot invalidate it.
CAPTURE_LOCK = threading.Lock()


class DecodeGraphs:
    def __init__(self, decode: DecodeFn, max_batch: int, scratch_slot: int, device: torch.device):
        self._decode = decode
        self._scratch = scratch_slot
        self._device = device
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        size = self.buckets[-1]
        self._tokens = torch.zeros(size, dtype=torch.long, device=device)
        self._slots = torch.full((size,), scratch_slot, dtype=torch.long, device=device)
        self._positions = torch.zeros(size, dtype=torch.long, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        args = (self._tokens[:size], self._slots[:size], self._positions[:size])
        stream = torch.cuda.Stream()
        with CAPTURE_LOCK:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: Triton compiles, cuBLAS picks its kernels
                    self._decode(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._decode(*args)
        log.debug("captured the decode graph for batch %d", size)
        return graph, logits

    @property
    def captured(self) -> bool:
        return len(self._graphs) == len(self.buckets)

    def capture_all(self) -> None:
        for size in self.buckets:
            if size not in self._graphs:
                self._graphs[size] = self._capture(size)

    def run(
        self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Inputs (B,) on the device -> logits (B, V); a view into the graph's output,
        valid until the next call."""
        batch = tokens.shape[0]
        size = self.bucket(batch)
        if size not in self._graphs:
            self._graphs[size] = self._capture(size)
        graph, logits = self._graphs[size]
        self._tokens[:batch].copy_(tokens)
        self._slots[:batch].copy_(slots)
        self._positions[:batch].copy_(positions)
        if batch < size:  # padding rows: scratch slot, position 0
            self._slots[batch:size].fill_(self._scratch)
            self._positions[batch:size].zero_()
        graph.replay()
        return logits[:batch]


class MixedGraphs:
    """Mixed steps of up to `max_rows` rows (prompt tokens plus decode rows) replayed
    from CUDA graphs, one per bucket of rows."""

    def __init__(self, runner: LlamaRunner, max_rows: int, scratch_slot: int) -> None:
        from engine.llama import Pad

        self._runner = runner
        self.buckets = [b for b in MIXED_BUCKETS if b < max_rows] + [max_rows]
        # Every sequence of a step holds a slot: at most `slots` sequences and outputs.
        self._pads = {size: Pad(size, runner.slots, scratch_slot) for size in self.buckets}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Plan, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    @property
    def captured(self) -> bool:
        return len(self._graphs) == len(self.buckets)

    def capture_all(self) -> None:
        for size in self.buckets:
            if size not in self._graphs:
                self._graphs[size] = self._capture(size)

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, Plan, torch.Tensor]:
        runner = self._runner
        plan = runner.plan([], [], self._pads[size])  # all padding: scratch-slot rows
        stream = torch.cuda.Stream()
        with CAPTURE_LOCK:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                runner.run_plan(plan)  # warm up: cuBLAS picks its kernels
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = runner.run_plan(plan)
        log.debug("captured the mixed-step graph for %d rows", size)
        return graph, plan, logits

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
        if size not in self._graphs:
            self._graphs[size] = self._capture(size)
        graph, static, logits = self._graphs[size]
        plan = self._runner.plan(chunks, decode, self._pads[size])
        static.ids.copy_(plan.ids)
        graph.replay()
        return logits[: len(chunks) + len(decode)]
