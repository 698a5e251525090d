"""The decode step captured as CUDA graphs, one per batch-size bucket.

A decode step is ~15 kernels per layer; replaying a graph launches them all at once,
so a small batch runs at the speed of memory instead of the speed of Python. Batches
are padded up to the next bucket with rows that write only to a scratch slot.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)

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
