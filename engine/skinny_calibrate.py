"""Which of engine/skinny_gemm.py's kernels serves each decode product, measured at
engine start: for every weight shape, row bucket and prologue, cuBLAS (the prologue as
its own kernel) and each candidate tile are timed inside CUDA graphs, rotating over the
real layers' weights so L2 holds what it would hold in a decode step; Triton keeps a
product only where it wins by WIN_MARGIN. Where torch keeps it, at the decode graphs'
row counts from LT_ROWS_FROM, cuBLASLt's other heuristic picks (engine/cublaslt.py) are
timed against torch's own, and one that wins by LT_MARGIN serves those rows.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import triton
from triton.runtime.errors import OutOfResources

from engine import cublaslt
from engine.decode_graphs import BUCKETS, CAPTURE_LOCK
from engine.linear import Prologue, torch_linear, unfused
from engine.skinny_gemm import (
    ROW_BUCKETS,
    Kernel,
    Key,
    LtKey,
    SkinnyGemm,
    Tile,
    column_tiles,
    row_bucket,
    skinny_matmul,
)

log = logging.getLogger(__name__)

WIN_MARGIN = 0.97  # Triton must be 3% faster: a near tie stays with cuBLAS
LT_MARGIN = 0.99  # another cuBLASLt pick must be 1% faster than torch's
LT_ROWS_FROM = 16  # fewer rows: Triton serves most products, cuBLASLt's picks tie

# (N, K, warps, stages). The deep-pipelined two won at 32 rows on an H200 (o: 16.3 us in
# cuBLAS, 12.6 here; gate_up 52.4 -> 50.1; lm_head 71.4 -> 66.6). Some deep tiles do not
# fit in shared memory at 64 rows for some prologues: `search` skips those quietly.
DOT_TILES = (
    (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 8, 3), (64, 128, 4, 6), (128, 64, 8, 4),
)  # fmt: skip
# One-row tiles: each holds BLOCK_N x BLOCK_K fp32 lanes (64 registers a thread).
ROW_TILES = (
    (64, 128, 4, 3), (32, 256, 4, 3), (16, 512, 4, 3), (16, 256, 2, 4),
    (32, 512, 8, 3), (64, 256, 8, 3), (128, 128, 8, 3),
)  # fmt: skip


def candidates(n: int, k: int, bucket: int, sms: int) -> list[Kernel]:
    """Tiles for this row bucket, each with the K splits that put between half a wave
    and eight waves of programs on the SMs (each split walking at least 4 K tiles);
    a tile that needs more than eight waves unsplit is left out."""
    tiles = [Tile(max(16, bucket), bn, bk, wp, st) for bn, bk, wp, st in DOT_TILES]
    if bucket == 1:
        tiles += [Tile(1, bn, bk, wp, st) for bn, bk, wp, st in ROW_TILES]
    kernels = []
    for tile in tiles:
        if tile.block_k > k:
            continue
        blocks, k_tiles = triton.cdiv(n, tile.block_n), triton.cdiv(k, tile.block_k)
        splits = [s for s in (1, 2, 4, 8, 16) if s == 1 or k_tiles >= 4 * s]
        if blocks > 8 * sms:
            continue  # too narrow a tile for this many columns
        fitting = [s for s in splits if sms / 2 <= blocks * s <= 8 * sms] or [splits[-1]]
        kernels += [Kernel(tile, s) for s in fitting]
    return kernels


def time_graph(
    fn: Callable[[torch.Tensor], torch.Tensor],
    weights: Sequence[torch.Tensor],
    stream: torch.cuda.Stream,
) -> float:
    """Microseconds per call of fn(w), replayed as one CUDA graph over `weights` in
    turn (no launch overhead, as in the decode graphs); the median of 5 replays."""
    graph = torch.cuda.CUDAGraph()
    with CAPTURE_LOCK:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for w in weights[:2]:  # warm up: Triton loads its kernel, cuBLAS its workspace
                fn(w)
            # capture_begin, not torch.cuda.graph: that empties the allocator cache each time.
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                for w in weights:
                    fn(w)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(weights))
    return statistics.median(times)


def rotation(weights: Sequence[torch.Tensor], calls: int = 8) -> list[torch.Tensor]:
    """The weights to cycle through when timing: enough distinct ones to outgrow L2
    (or all there are: a model smaller than L2 keeps its weights there when serving)."""
    props = torch.cuda.get_device_properties(weights[0].device)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    distinct, total = [], 0
    for w in weights:
        distinct.append(w)
        total += w.numel() * w.element_size()
        if total >= 4 * l2:
            break
    return [distinct[i % len(distinct)] for i in range(max(calls, len(distinct)))]


@dataclass(frozen=True)
class Trial:
    kernel: Kernel | None  # None: torch
    us: float


def search(
    weights: Sequence[torch.Tensor],
    rows: int,
    with_bias: bool,
    kind: str,
    stream: torch.cuda.Stream,
    into_bias: bool = False,
) -> list[Trial]:
    """Time torch (the first trial: the prologue as its own kernel, then cuBLAS, adding
    into the bias in place where the engine will) and every candidate kernel that
    computes the same result (relative error < 1e-2) for `rows` rows; failures are
    logged, left out."""
    w0 = weights[0]
    n, k = w0.shape
    gen = torch.Generator(device=w0.device).manual_seed(rows)
    width = 2 * k if kind == "glu" else k
    x = torch.randn((rows, width), generator=gen, device=w0.device).to(w0.dtype)
    b = torch.randn((rows, n), generator=gen, device=w0.device).to(w0.dtype) if with_bias else None
    prologue = Prologue()
    if kind == "norm":
        scale = 1 + 0.1 * torch.randn(k, generator=gen, device=w0.device)
        prologue = Prologue(norm=scale.to(w0.dtype), eps=1e-5)
    elif kind == "glu":
        prologue = Prologue(glu=True)
    turns = rotation(weights)
    expected = unfused(x, w0, b, prologue).float()
    # In place, the timed calls keep adding into b: only its values change, not the time.
    scratch = None if b is None else b.clone()
    torch_us = time_graph(lambda w: unfused(x, w, scratch, prologue, into_bias), turns, stream)
    trials = [Trial(None, torch_us)]
    if kind == "norm" and w0.dtype != torch.bfloat16:
        # The fused norm rounds x * weight to the input dtype before the 1/rms scale: in
        # fp16 a large residual times a large weight could pass 65504. torch serves it.
        return trials
    sms = torch.cuda.get_device_properties(w0.device).multi_processor_count
    for kernel in candidates(n, k, row_bucket(rows) or rows, sms):
        try:
            # Its own counters: a candidate that fails half-way cannot spoil the next.
            counters = torch.zeros(column_tiles(n, kernel), dtype=torch.int32, device=w0.device)
            out = skinny_matmul(x, w0, b, kernel, counters, prologue).float()
            error = ((out - expected).norm() / expected.norm()).item()
            if not error < 1e-2:
                log.warning("skinny gemm %s on (%d, %d): error %.2g, left out", kernel, n, k, error)
                continue
            fused = partial(
                skinny_matmul, x, bias=b, kernel=kernel, counters=counters, prologue=prologue
            )
            us = time_graph(fused, turns, stream)
        # A deep tile may not fit in shared memory: how much Triton asks depends on the
        # prologue (on an H200, m64 n64 k256 in 3 stages fits with RMSNorm, not without
        # or with silu(gate) * up), so it is tried, and told only at debug level.
        except OutOfResources as exc:
            log.debug("skinny gemm %s on (%d, %d) does not fit: %s", kernel, n, k, exc)
            continue
        # Whatever else a candidate raises (compile error, a capture failure), cuBLAS
        # serves this shape instead; the reason is logged.
        except Exception as exc:  # noqa: BLE001
            log.warning("skinny gemm %s on (%d, %d) failed: %s", kernel, n, k, exc)
            continue
        trials.append(Trial(kernel, us))
    return trials


def product_label(key: Key | LtKey) -> str:
    """A product's weight shape, residual and prologue, for the logs: "(N, K) +bias glu"."""
    n, k, with_bias, _rows, kind = key
    return f"({n}, {k}){' +bias' if with_bias else ''}{' ' + kind if kind else ''}"


@dataclass(frozen=True)
class Decision:
    key: Key
    torch_us: float
    best: Trial | None  # the fastest Triton kernel, if any ran

    @property
    def triton(self) -> bool:
        return self.best is not None and self.best.us < WIN_MARGIN * self.torch_us

    def __str__(self) -> str:
        best = f"{self.best.us:.1f} us [{self.best.kernel}]" if self.best else "none"
        return (
            f"{product_label(self.key)} M<={self.key[3]}: torch {self.torch_us:.1f} us,"
            f" triton {best}"
            f" -> {'triton' if self.triton else 'torch'}"
        )


@dataclass(frozen=True)
class Group:
    """One product of every layer: its same-shaped weights, whether a residual is added
    (bias), and its prologue kind ("", "norm" or "glu")."""

    weights: Sequence[torch.Tensor]
    with_bias: bool = False
    kind: str = ""


@dataclass(frozen=True)
class LtDecision:
    key: LtKey
    torch_us: float
    algo: int  # which of the Matmul's heuristic picks measured fastest (-1: none ran)
    us: float

    @property
    def wins(self) -> bool:
        return self.algo >= 0 and self.us < LT_MARGIN * self.torch_us

    def __str__(self) -> str:
        return (
            f"{product_label(self.key)} M={self.key[3]}: torch {self.torch_us:.1f} us,"
            f" cuBLASLt pick {self.algo} "
            f"{self.us:.1f} us -> {'cuBLASLt' if self.wins else 'torch'}"
        )


def lt_search(
    weights: Sequence[torch.Tensor],
    rows: int,
    with_bias: bool,
    stream: torch.cuda.Stream,
    into_bias: bool = False,
) -> tuple[cublaslt.Matmul, float, int, float]:
    """(the Matmul, torch's microseconds, the fastest other pick, its microseconds) for
    the product without its prologue (both run it as its own kernel); picks that fail
    or compute another result (relative error >= 1e-2, checked the way the engine will
    call them: in place into the bias with `into_bias`) are left out."""
    w0 = weights[0]
    n, k = w0.shape
    gen = torch.Generator(device=w0.device).manual_seed(rows)
    x = torch.randn((rows, k), generator=gen, device=w0.device).to(w0.dtype)
    b = torch.randn((rows, n), generator=gen, device=w0.device).to(w0.dtype) if with_bias else None
    turns = rotation(weights)
    expected = torch_linear(x, w0, b).float()
    scratch = None if b is None else b.clone()
    torch_us = time_graph(lambda w: torch_linear(x, w, scratch, into_bias), turns, stream)
    matmul = cublaslt.Matmul(rows, n, k, w0.dtype, with_bias, w0.device)
    space = cublaslt.workspace(w0.device)
    in_place = into_bias and b is not None
    best, best_us = -1, float("inf")
    for algo in range(len(matmul.algos)):
        try:
            out = torch.empty((rows, n), dtype=w0.dtype, device=w0.device)
            bias = None if b is None else b.clone()
            target = bias if in_place and bias is not None else out
            got = matmul(algo, x, w0, bias, target, space).float()
            error = ((got - expected).norm() / expected.norm()).item()
            if not error < 1e-2:
                log.warning("cuBLASLt pick %d on (%d, %d): error %.2g, left out", algo, n, k, error)
                continue
            target = scratch if in_place and scratch is not None else out
            us = time_graph(lambda w: matmul(algo, x, w, scratch, target, space), turns, stream)  # noqa: B023
        except RuntimeError as exc:
            log.warning("cuBLASLt pick %d on (%d, %d) failed: %s", algo, n, k, exc)
            continue
        if us < best_us:
            best, best_us = algo, us
    return matmul, torch_us, best, best_us


def measure(
    group: Group, top: int, done: Iterable[Key], into_bias: bool = False
) -> tuple[dict[Key, Decision], dict[LtKey, tuple[LtDecision, cublaslt.Matmul]]]:
    """The decision for each row bucket up to `top` of this product (not in done), and
    where torch keeps it, cuBLASLt's best pick at each decode graph's row count."""
    w0 = group.weights[0]
    decisions = {}
    picks: dict[LtKey, tuple[LtDecision, cublaslt.Matmul]] = {}
    with torch.no_grad(), torch.cuda.device(w0.device):
        stream = torch.cuda.Stream(w0.device)
        for bucket in (b for b in ROW_BUCKETS if b <= top):
            key = (w0.shape[0], w0.shape[1], group.with_bias, bucket, group.kind)
            if key not in done:
                trials = search(
                    group.weights, bucket, group.with_bias, group.kind, stream, into_bias
                )
                best = min(trials[1:], key=lambda t: t.us, default=None)
                decisions[key] = Decision(key, trials[0].us, best)
        if not cublaslt.available(w0.device):
            return decisions, picks
        for rows in (r for r in BUCKETS if LT_ROWS_FROM <= r <= top):
            bucket_key = (
                w0.shape[0],
                w0.shape[1],
                group.with_bias,
                row_bucket(rows) or 0,
                group.kind,
            )
            if bucket_key in done or decisions[bucket_key].triton:
                continue  # measured with an earlier group, or Triton serves these rows
            try:
                matmul, torch_us, algo, us = lt_search(
                    group.weights, rows, group.with_bias, stream, into_bias
                )
            # Never a reason not to start, nor to lose the Triton decisions above: torch
            # serves what could not be measured.
            except Exception as exc:  # noqa: BLE001
                log.warning(
                    "cuBLASLt picks for %s at %d rows not measured: %s", w0.shape, rows, exc
                )
                continue
            key = (w0.shape[0], w0.shape[1], group.with_bias, rows, group.kind)
            picks[key] = (LtDecision(key, torch_us, algo, us), matmul)
    return decisions, picks


def calibrate(groups: Sequence[Group], max_rows: int, into_bias: bool = False) -> SkinnyGemm:
    """Measures each product's row buckets up to max_rows (at most 64) once, at start,
    and keeps Triton where it wins by WIN_MARGIN. All torch off CUDA or for fp32
    weights. into_bias: torch's products add into the bias in place (SkinnyGemm)."""
    top = row_bucket(min(max_rows, ROW_BUCKETS[-1])) or ROW_BUCKETS[-1]
    started = time.perf_counter()
    decisions: dict[Key, Decision] = {}
    picks: dict[LtKey, tuple[LtDecision, cublaslt.Matmul]] = {}
    device = None  # a model's decode weights live on one GPU; others' products go to torch
    for group in groups:
        w0 = group.weights[0]
        if not w0.is_cuda or w0.dtype not in (torch.bfloat16, torch.float16):
            continue
        if device is None:
            device = w0.device
        if w0.device != device:
            continue
        try:
            measured, lt_measured = measure(group, top, decisions.keys(), into_bias)
            decisions |= measured
            picks |= lt_measured
        # Measuring must never stop the engine from starting: what it could not measure,
        # torch serves. (A failing Triton candidate alone is handled inside `search`.)
        except Exception as exc:  # noqa: BLE001
            log.warning("skinny gemm: measuring %s failed, torch serves it: %s", w0.shape, exc)
    plans = {
        key: d.best.kernel
        for key, d in decisions.items()
        if d.triton and d.best is not None and d.best.kernel is not None
    }
    lt = {key: (matmul, d.algo) for key, (d, matmul) in picks.items() if d.wins}
    seconds = time.perf_counter() - started
    if decisions:
        log.info(
            "skinny gemm: Triton for %d of %d (weight, batch) products, another cuBLASLt"
            " pick for %d of %d, measured in %.1f s",
            len(plans), len(decisions), len(lt), len(picks), seconds,
        )  # fmt: skip
        log.debug("skinny gemm decisions:\n  %s", "\n  ".join(map(str, decisions.values())))
        log.debug("cuBLASLt picks:\n  %s", "\n  ".join(str(d) for d, _ in picks.values()))
    return SkinnyGemm(
        plans, list(decisions.values()), seconds, device, into_bias, lt,
        [d for d, _ in picks.values()],
    )  # fmt: skip
