"""y = x @ W.T (+ bias) for a few rows of x: the decode step's matrix products.

At small batch a decode step streams every weight once and does little math per byte,
so its speed is memory bandwidth. The Triton kernel splits the output columns over
programs (and, when N is too narrow to fill the SMs, the K axis too: each split stores
an fp32 partial and takes a ticket from its column tile's counter; the last one sums
the partials in split order and adds the bias, so no second kernel runs). Each program
walks K in wide, unmasked, vectorised tiles; rows past M and columns past N re-read the
last valid row instead of masking the loads.

Whether it beats cuBLAS depends on the GPU, the shape and the row count, so
engine/skinny_calibrate.py times both at engine start (and cuBLASLt's other heuristic
picks, engine/cublaslt.py), and `SkinnyGemm` sends each call to the winner. Anything
not measured (the CPU, other dtypes, more than 64 rows, a kernel that failed or lost)
goes to torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from engine import pdl
from engine.linear import Prologue, apply_prologue, torch_linear, unfused

if TYPE_CHECKING:
    from engine.cublaslt import Matmul
    from engine.skinny_calibrate import Decision, LtDecision

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Tile:
    block_m: int  # 1: a multiply-add reduction for one row; >= 16: tensor cores
    block_n: int
    block_k: int
    warps: int
    stages: int


@dataclass(frozen=True)
class Kernel:
    tile: Tile
    split: int  # K is cut into this many parts (fp32 partials when > 1)

    def __str__(self) -> str:
        t = self.tile
        return f"m{t.block_m} n{t.block_n} k{t.block_k} w{t.warps} s{t.stages} split{self.split}"


@triton.jit
def _load_w(w_ptrs, k, K, rk, EVEN_K: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) weight tile at K offset k, streamed past L2; masked only
    when K is not a whole number of tiles (split ends fall on whole tiles, so only K
    itself can cut one)."""
    if EVEN_K:
        return tl.load(w_ptrs, eviction_policy="evict_first")
    return tl.load(w_ptrs, mask=(k + rk)[None, :] < K, other=0.0, eviction_policy="evict_first")


@triton.jit
def _load_x(x_ptrs, k, K, rk, EVEN_K: tl.constexpr):
    """The (BLOCK_M, BLOCK_K) row tile at K offset k."""
    if EVEN_K:
        return tl.load(x_ptrs)
    return tl.load(x_ptrs, mask=(k + rk)[None, :] < K, other=0.0)


@triton.jit
def _prologue(x, x_ptrs, k, K, rk, NormW, NORM: tl.constexpr, GLU: tl.constexpr):
    """The row tile as the product sees it. NORM: x * norm weight, rounded once to x's
    dtype; the row's 1/rms is a per-row factor of the result, applied after the product
    (`_epilogue`), so no pass over the row has to come first. This differs from
    transformers' RMSNorm (which rounds x * 1/rms to the dtype before the weight) by
    about one rounding step. GLU: silu(gate) * up with `up` K columns to the right, the
    rounding of F.silu(gate) * up (engine/fused_triton.py), step by step."""
    if NORM:
        nw = tl.load(NormW + k + rk, mask=(k + rk) < K, other=0.0)
        x = (x.to(tl.float32) * nw.to(tl.float32)[None, :]).to(x.dtype)
    if GLU:
        up = tl.load(x_ptrs + K, mask=(k + rk)[None, :] < K, other=0.0)
        g = x.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(x.dtype)
        x = (act.to(tl.float32) * up.to(tl.float32)).to(x.dtype)  # one rounding, as torch
    return x


@triton.jit
def _epilogue(
    acc, squares, Bias, Y, rm, rn, ok, stride_bm, stride_ym, has_bias, K, eps,
    NORM: tl.constexpr,
):  # fmt: skip
    """acc (BLOCK_N, BLOCK_M), summed over all of K: times each row's 1/rms (NORM, from
    its fp32 sum of squares, as LlamaRMSNorm), plus bias, stored in Y's dtype."""
    if NORM:
        acc = acc * (1.0 / tl.sqrt(squares / K + eps))[None, :]
    if has_bias:
        bias = tl.load(Bias + rm[None, :] * stride_bm + rn[:, None], mask=ok, other=0.0)
        acc += bias.to(tl.float32)
    tl.store(Y + rm[None, :] * stride_ym + rn[:, None], acc.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _row_step(
    lanes, square_lanes, w, x, x_ptrs, k, K, rk, NormW, NORM: tl.constexpr, GLU: tl.constexpr
):
    """One K tile of the one-row product: products (and squares) summed per lane."""
    if NORM:
        square_lanes += x.to(tl.float32) * x.to(tl.float32)
    x = _prologue(x, x_ptrs, k, K, rk, NormW, NORM, GLU)
    lanes += w.to(tl.float32) * x.to(tl.float32)
    return lanes, square_lanes


@triton.jit
def _dot_step(acc, squares, w, x, x_ptrs, k, K, rk, NormW, NORM: tl.constexpr, GLU: tl.constexpr):
    """One K tile on tensor cores (W is the wide operand: y.T = W x.T)."""
    if NORM:  # a row sum per tile: lanes of BLOCK_M rows would cost registers
        squares += tl.sum(x.to(tl.float32) * x.to(tl.float32), axis=1)
    x = _prologue(x, x_ptrs, k, K, rk, NormW, NORM, GLU)
    return tl.dot(w, tl.trans(x), acc), squares


@triton.jit(do_not_specialize=["M", "k_per_split", "has_bias"])
def _skinny_kernel(
    X, W, Bias, Y, Part, Squares, Counters, NormW, M, N, K,
    stride_xm, stride_wn, stride_bm, stride_ym, k_per_split, has_bias, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    NORM: tl.constexpr, GLU: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (n, s): columns n*BLOCK_N.. over K range s*k_per_split.. for all M rows;
    the result (plus bias) in Y. When K is split, each program stores an fp32 partial
    in Part (and, NORM, its rows' partial sums of squares in Squares), and the last of
    the column tile's programs to finish, counted in Counters[n], sums them all and
    writes Y. NORM: the rows are RMS-normalised (their sums of squares gathered from the
    same tiles the product reads); GLU: X holds [gate | up], the rows are silu(gate) * up.
    PDL (engine/pdl.py): the first weight tile is loaded before waiting for the kernel
    that writes X, so it streams while that kernel drains."""
    pdl.start(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    k_start = tl.multiple_of(pid_k * k_per_split, BLOCK_K)
    k_end = tl.minimum(k_start + k_per_split, K)
    # Clamped, not masked: the loads stay whole 16-byte vectors; extra rows never land.
    w_rows = tl.minimum(rn, N - 1).to(tl.int64)
    x_rows = tl.minimum(rm, M - 1)
    w_ptrs = W + w_rows[:, None] * stride_wn + (k_start + rk)[None, :]  # (BLOCK_N, BLOCK_K)
    x_ptrs = X + x_rows[:, None] * stride_xm + (k_start + rk)[None, :]  # (BLOCK_M, BLOCK_K)
    # Every split has at least one K tile: the first is taken out of the loop, its
    # weights loaded before the wait (they are not written by any kernel).
    w = _load_w(w_ptrs, k_start, K, rk, EVEN_K)
    pdl.wait(PDL)
    x = _load_x(x_ptrs, k_start, K, rk, EVEN_K)
    squares = tl.zeros((BLOCK_M,), tl.float32)  # NORM: sum of x² over this K range, fp32
    if BLOCK_M == 1:
        # One row: products (and squares) summed per lane, reduced across K once at the end.
        lanes = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        square_lanes = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        lanes, square_lanes = _row_step(
            lanes, square_lanes, w, x, x_ptrs, k_start, K, rk, NormW, NORM, GLU
        )
        for k in range(k_start + BLOCK_K, k_end, BLOCK_K):
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w = _load_w(w_ptrs, k, K, rk, EVEN_K)
            x = _load_x(x_ptrs, k, K, rk, EVEN_K)
            lanes, square_lanes = _row_step(
                lanes, square_lanes, w, x, x_ptrs, k, K, rk, NormW, NORM, GLU
            )
        acc = tl.sum(lanes, axis=1)[:, None]  # (BLOCK_N, 1)
        if NORM:
            squares = tl.sum(square_lanes, axis=1)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        acc, squares = _dot_step(acc, squares, w, x, x_ptrs, k_start, K, rk, NormW, NORM, GLU)
        for k in range(k_start + BLOCK_K, k_end, BLOCK_K):
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w = _load_w(w_ptrs, k, K, rk, EVEN_K)
            x = _load_x(x_ptrs, k, K, rk, EVEN_K)
            acc, squares = _dot_step(acc, squares, w, x, x_ptrs, k, K, rk, NormW, NORM, GLU)
    ok = (rn < N)[:, None] & (rm < M)[None, :]
    splits = tl.num_programs(1)
    if splits == 1:
        _epilogue(acc, squares, Bias, Y, rm, rn, ok, stride_bm, stride_ym, has_bias, K, eps, NORM)
    else:
        tl.store(Part + (pid_k * M + rm[None, :]) * N + rn[:, None], acc, mask=ok)
        if NORM:
            tl.store(Squares + (pid_n * splits + pid_k) * M + rm, squares, mask=rm < M)
        # The ticket is taken by one thread: the barrier puts every thread's stores
        # before it, and its release (acq_rel, gpu scope) publishes them to the program
        # that draws the last ticket, whose acquire comes before its reads.
        tl.debug_barrier()
        ticket = tl.atomic_add(Counters + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == splits - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            row_squares = tl.zeros((BLOCK_M,), tl.float32)
            for s in range(0, splits):  # split order, whoever finished last: deterministic
                # .cg: from L2, where the other SMs' stores are, never a stale L1 line.
                total += tl.load(
                    Part + (s * M + rm[None, :]) * N + rn[:, None],
                    mask=ok, other=0.0, cache_modifier=".cg",
                )  # fmt: skip
                if NORM:
                    row_squares += tl.load(
                        Squares + (pid_n * splits + s) * M + rm,
                        mask=rm < M, other=0.0, cache_modifier=".cg",
                    )  # fmt: skip
            _epilogue(
                total, row_squares, Bias, Y, rm, rn, ok, stride_bm, stride_ym, has_bias, K, eps,
                NORM,
            )  # fmt: skip
            # Back to zero for the next call (or the next replay of a captured graph):
            # the counters are never cleared by a separate kernel.
            tl.store(Counters + pid_n, 0)


def column_tiles(n: int, kernel: Kernel) -> int:
    """How many column tiles (programs along N, each with its own counter) kernel has."""
    return triton.cdiv(n, kernel.tile.block_n)


def skinny_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: Kernel,
    counters: torch.Tensor,
    prologue: Prologue | None = None,
) -> torch.Tensor:
    """x (M, K) @ w (N, K).T (+ bias (M, N)) -> (M, N) in x's dtype, fp32 accumulation.
    1 <= M <= tile.block_m; x and bias unit-stride along their last axis; w contiguous.
    With a prologue, x is first RMS-normalised, or (glu) x (M, 2K) becomes
    silu(x[:, :K]) * x[:, K:].

    counters: int32 zeros on x's device, at least `column_tiles(N, kernel)` of them,
    used when K is split and left at zero again by the kernel. Kernels on one stream run
    one after another, so successive calls (and every graph captured with them) can
    share one buffer; calls that may overlap (other streams) need their own."""
    prologue = prologue or Prologue()
    assert prologue.norm is None or not prologue.glu, "one prologue at a time"
    m, k = x.shape
    if prologue.glu:
        k //= 2
    n = w.shape[0]
    tile = kernel.tile
    assert 0 < m <= tile.block_m and w.shape[1] == k and w.is_contiguous(), (x.shape, w.shape)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, tile.block_k), kernel.split) * tile.block_k
    splits = triton.cdiv(k, k_per_split)
    tiles = column_tiles(n, kernel)
    if splits > 1 and (
        counters.dtype != torch.int32 or counters.numel() < tiles or counters.device != x.device
    ):
        raise ValueError(
            f"counters must be {tiles} or more int32 zeros on {x.device}, got "
            f"{counters.numel()} {counters.dtype} on {counters.device}"
        )
    norm = prologue.norm is not None
    part = torch.empty((splits, m, n) if splits > 1 else (1,), dtype=torch.float32, device=x.device)
    squares = part
    if norm and splits > 1:
        squares = torch.empty((tiles, splits, m), dtype=torch.float32, device=x.device)
    b = y if bias is None else bias
    _skinny_kernel[(tiles, splits)](
        x, w, b, y, part, squares, counters, prologue.norm if norm else w, m, n, k,
        x.stride(0), w.stride(0), b.stride(0), y.stride(0), k_per_split, int(bias is not None),
        prologue.eps,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        EVEN_K=k % tile.block_k == 0, NORM=norm, GLU=prologue.glu,
        num_warps=tile.warps, num_stages=tile.stages, **pdl.launch(x.device),
    )  # fmt: skip
    return y


def row_bucket(rows: int) -> int | None:
    return next((b for b in ROW_BUCKETS if b >= rows), None)


Key = tuple[int, int, bool, int, str]  # (N, K, with bias, row bucket, prologue kind)
# cuBLASLt's picks are per row count: (N, K, with bias, rows, prologue kind)
LtKey = tuple[int, int, bool, int, str]


class SkinnyGemm:
    """x @ w.T (+ bias), after an optional prologue, through the kernel measured fastest
    for this shape, row bucket and prologue; else, where one was measured faster than
    torch's own for these exact rows, another cuBLASLt algorithm (the prologue as its own
    kernel); torch for everything else. Safe inside CUDA-graph capture (no host sync).

    The plans run on `device`, where the split-K kernels' counters live: allocated once
    here, zero between calls, shared by every call (and every captured graph), which is
    safe as long as the calls run on one stream, one after another, as decode steps do.
    The cuBLASLt picks share this dispatcher's workspace on the same terms.
    """

    def __init__(
        self,
        plans: dict[Key, Kernel],
        decisions: Sequence[Decision] = (),
        seconds: float = 0.0,
        device: torch.device | None = None,
        into_bias: bool = False,
        lt: dict[LtKey, tuple[Matmul, int]] | None = None,
        lt_decisions: Sequence[LtDecision] = (),
    ) -> None:
        self.plans = plans
        self.lt = lt or {}  # (a Matmul, which of its algorithms) by LtKey
        self.lt_decisions = list(lt_decisions)
        self.lt_space: torch.Tensor | None = None  # their workspace, this dispatcher's own
        if self.lt:
            from engine.cublaslt import workspace

            matmul = next(iter(self.lt.values()))[0]
            self.lt_space = workspace(torch.device("cuda", matmul.device_index))
        # torch's products add into the bias in place (engine/linear.torch_linear)
        self.into_bias = into_bias
        self.decisions = list(decisions)  # what was measured, for logs and benchmarks
        self.seconds = seconds  # what calibration cost
        self.counters: torch.Tensor | None = None
        if plans and device is not None:
            tiles = max(column_tiles(key[0], kernel) for key, kernel in plans.items())
            self.counters = torch.zeros(tiles, dtype=torch.int32, device=device)

    def __call__(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        bias: torch.Tensor | None = None,
        prologue: Prologue | None = None,
    ) -> torch.Tensor:
        prologue = prologue or Prologue()
        kernel = self._kernel(x, w, bias, prologue)
        if kernel is not None:
            assert self.counters is not None  # a kernel is chosen only with counters
            return skinny_matmul(x, w, bias, kernel, self.counters, prologue)
        if self.lt and x.is_cuda:
            choice = self.lt.get(
                (w.shape[0], w.shape[1], bias is not None, x.shape[0], prologue.kind)
            )
            if choice is not None:
                rows = apply_prologue(x, prologue)
                matmul, algo = choice
                if matmul.fits(rows, w, bias) and self.lt_space is not None:
                    if self.into_bias and bias is not None:
                        out = bias  # in place, as torch's products here
                    else:
                        out = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
                    return matmul(algo, rows, w, bias, out, self.lt_space)
                return torch_linear(rows, w, bias, self.into_bias)
        return unfused(x, w, bias, prologue, self.into_bias)

    def _kernel(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, prologue: Prologue
    ) -> Kernel | None:
        if not self.plans or not x.is_cuda:
            return None
        if self.counters is None or x.device != self.counters.device:
            return None
        if x.dim() != 2 or x.stride(1) != 1:
            return None
        m, n, k = x.shape[0], w.shape[0], w.shape[1]
        bucket = row_bucket(m)
        if bucket is None or m == 0 or not w.is_contiguous():
            return None
        if x.shape[1] != (2 * k if prologue.glu else k):
            return None
        if prologue.norm is not None and (
            prologue.norm.shape != (k,) or prologue.norm.dtype != x.dtype
        ):
            return None
        if x.dtype != w.dtype or (
            bias is not None
            and (bias.shape != (m, n) or bias.stride(1) != 1 or bias.dtype != x.dtype)
        ):
            return None
        return self.plans.get((n, k, bias is not None, bucket, prologue.kind))
