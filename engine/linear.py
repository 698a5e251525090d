"""The decode step's matrix products as one call: y = prologue(x) @ W.T (+ bias).

A prologue is what happens to the rows first (RMSNorm, or silu(gate) * up): run as its
own kernel here, or fused into the product by engine/skinny_gemm.py where that measured
faster. Nothing here needs Triton (the CPU path is plain PyTorch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Prologue:
    """What happens to the rows before the product: RMSNorm with this weight and eps,
    or (glu) silu(gate) * up of rows holding [gate | up]."""

    norm: torch.Tensor | None = None
    eps: float = 1e-6
    glu: bool = False

    @property
    def kind(self) -> str:
        return "norm" if self.norm is not None else "glu" if self.glu else ""


def torch_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, into_bias: bool = False
) -> torch.Tensor:
    """x @ w.T (+ bias); into_bias: the sum is written into `bias` itself (the residual
    stream, which the caller replaces by the result), which spares cuBLAS a copy of it
    into a new tensor first (~3 us a product at 512 rows, on an H200)."""
    if bias is None:
        return x @ w.T
    return bias.addmm_(x, w.T) if into_bias else torch.addmm(bias, x, w.T)


def apply_prologue(x: torch.Tensor, prologue: Prologue) -> torch.Tensor:
    """The rows as the product takes them: the prologue as its own kernel on CUDA,
    plain PyTorch elsewhere."""
    if prologue.norm is not None:
        if x.is_cuda:
            from engine.fused_triton import rmsnorm

            return rmsnorm(x, prologue.norm, prologue.eps)
        # Same arithmetic as transformers' LlamaRMSNorm (fp32 statistics).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + prologue.eps)
        return prologue.norm * h.to(x.dtype)
    if prologue.glu:
        if x.is_cuda:
            from engine.fused_triton import silu_mul

            return silu_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    return x


def unfused(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    prologue: Prologue,
    into_bias: bool = False,
) -> torch.Tensor:
    """The prologue as its own kernel, then cuBLAS (what the fused kernel must beat);
    plain PyTorch off CUDA."""
    return torch_linear(apply_prologue(x, prologue), w, bias, into_bias)


# x (M, K), w (N, K), bias (M, N) or None, prologue -> prologue(x) @ w.T (+ bias). An
# implementation may add into `bias` in place and return it (residual_linear,
# SkinnyGemm(into_bias=True)): callers pass a residual stream they replace by the result.
Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, Prologue | None], torch.Tensor]


def plain_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    prologue: Prologue | None = None,
) -> torch.Tensor:
    return unfused(x, w, bias, prologue or Prologue())


def residual_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    prologue: Prologue | None = None,
) -> torch.Tensor:
    """plain_linear, adding into `bias` in place (torch_linear's into_bias): for a
    residual stream that the result replaces."""
    return unfused(x, w, bias, prologue or Prologue(), into_bias=True)
