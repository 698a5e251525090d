"""Fused Triton kernels for the decode step: each replaces 5-10 small PyTorch kernels.

A decode step at small batch is bound by how many kernels it launches, not by math:
RMSNorm is 8 elementwise kernels in PyTorch, RoPE on q and k plus the two cache writes
about 12. Each kernel here reproduces transformers' arithmetic (fp32 statistics, bf16
rounding where HF rounds) so greedy outputs stay the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine import pdl


@triton.jit
def _rmsnorm_kernel(X, W, Y, stride_x, stride_y, N, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.start(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    normed = (x * rstd).to(Y.dtype.element_ty)  # HF casts back before the weight
    w = tl.load(W + cols, mask=ok, other=0.0)
    y = (normed.to(tl.float32) * w.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, y, mask=ok)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(N, E) -> (N, E), like transformers' LlamaRMSNorm."""
    y = torch.empty_like(x)
    n = x.shape[-1]
    _rmsnorm_kernel[(x.shape[0],)](
        x, weight, y, x.stride(0), y.stride(0), n, eps, BLOCK=triton.next_power_of_2(n),
        **pdl.launch(x.device),
    )  # fmt: skip
    return y


@triton.jit
def hf_rope(x, x_rot, cos, sin):
    """(x * cos) + (rotate_half(x) * sin) with transformers' roundings: each product,
    then the sum, rounded to x's dtype. Only in a kernel launched with
    enable_fp_fusion=False (NO_FMA): otherwise the compiler fuses a product into the
    sum (fma.rn.bf16 in the PTX), one rounding fewer, and 1 element in 71,680 came out
    one step off HF's on an H200."""
    return ((x * cos).to(x.dtype) + (x_rot * sin).to(x.dtype)).to(x.dtype)


# Launch options of kernels that round as transformers does (hf_rope).
NO_FMA = {"enable_fp_fusion": False}


@triton.jit
def fp8_rows(x):
    """(R, D) -> (x / scale as float8 e4m3, scale (R,) fp32): one scale per row (a
    cached key or value of one head), its largest magnitude over 448, float8 e4m3's
    largest finite value."""
    x = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-30) / 448.0
    scaled = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
    return scaled.to(tl.float8e4nv), scale


@triton.jit
def _rope_cache_kernel(
    QKV, Cos, Sin, Pos, Slots, Q, KC, VC, KS, VS,
    stride_qkv, stride_q, stride_q_head,
    stride_cs, stride_ct, stride_ch, stride_ss, stride_st,
    H: tl.constexpr, K: tl.constexpr, D: tl.constexpr, HEADS: tl.constexpr,
    FP8: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program per (row, block of HEADS heads among H + K): rotate q heads into Q;
    rotate k heads and copy their v into the caches at (slot, position). FP8: the
    caches hold float8 e4m3, each head's key and value scaled by its own factor, kept
    in KS and VS (S, T, K) at the same place."""
    pdl.start(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0)
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    half = D // 2
    d = tl.arange(0, D)
    pos = tl.load(Pos + row).to(tl.int64)
    cos = tl.load(Cos + pos * D + d)[None, :]
    sin = tl.load(Sin + pos * D + d)[None, :]
    partner = tl.where(d < half, d + half, d - half)[None, :]
    sign = tl.where(d < half, -1.0, 1.0)[None, :]
    live = (heads < H + K)[:, None]
    base = QKV + row * stride_qkv + heads[:, None] * D
    x = tl.load(base + d[None, :], mask=live)
    x_rot = tl.load(base + partner, mask=live) * sign.to(x.dtype)
    y = hf_rope(x, x_rot, cos, sin)
    is_q = (heads < H)[:, None]
    tl.store(Q + row * stride_q + heads[:, None] * stride_q_head + d[None, :], y, mask=is_q)
    is_k = live & ~is_q
    slot = tl.load(Slots + row).to(tl.int64)
    cached = slot * stride_cs + pos * stride_ct + (heads - H)[:, None] * stride_ch + d[None, :]
    v = tl.load(base + K * D + d[None, :], mask=is_k)  # k head i's v is K heads on
    if FP8:
        scale_at = slot * stride_ss + pos * stride_st + heads - H
        k_ok = (heads >= H) & (heads < H + K)
        key, k_scale = fp8_rows(y)
        value, v_scale = fp8_rows(v)
        tl.store(KC + cached, key, mask=is_k)
        tl.store(VC + cached, value, mask=is_k)
        tl.store(KS + scale_at, k_scale, mask=k_ok)
        tl.store(VS + scale_at, v_scale, mask=k_ok)
    else:
        tl.store(KC + cached, y, mask=is_k)
        tl.store(VC + cached, v, mask=is_k)


def rope_heads(rows: int) -> int:
    """Heads per program of the RoPE/cache kernel: one for a few rows (enough programs
    to fill the GPU), 16 for a prompt chunk (a 512-row chunk of LLaMA-7B: 41 us with one
    head a program, 6 with 16, on an H200)."""
    return 1 if rows <= 8 else 4 if rows < 64 else 16


def rope_into_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
    kv_heads: int,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """qkv (B, (H+2K)*D) -> rotated q (B, H, D); rotated k and v written to the caches
    (S, T, K, D) at (slot, position) of each row. scales: with float8 caches, the
    (S, T, K) fp32 factors of each cached key and value (written there too)."""
    batch = qkv.shape[0]
    dim = k_cache.shape[-1]
    check_cache(k_cache, v_cache, scales)
    q = torch.empty((batch, heads, dim), dtype=qkv.dtype, device=qkv.device)
    block = rope_heads(batch)
    k_scale, v_scale = scales if scales is not None else (positions, positions)  # unread
    _rope_cache_kernel[(batch, triton.cdiv(heads + kv_heads, block))](
        qkv, cos, sin, positions, slots, q, k_cache, v_cache, k_scale, v_scale,
        qkv.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_scale.stride(0), k_scale.stride(1) if scales is not None else 0,
        H=heads, K=kv_heads, D=dim, HEADS=block, FP8=scales is not None,
        **pdl.launch(qkv.device), **NO_FMA,
    )  # fmt: skip
    return q


def check_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None
) -> None:
    """A float8 cache comes with its scales, (S, T, K) fp32 with unit head stride; a
    half-precision one without."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 != (scales is not None) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"a {k_cache.dtype} cache with scales={scales is not None}")
    if scales is not None:
        for scale in scales:
            if scale.shape != k_cache.shape[:-1] or scale.dtype != torch.float32:
                raise ValueError(f"scales must be {tuple(k_cache.shape[:-1])} fp32")
            if not scale.is_contiguous():  # the kernels index both with one set of strides
                raise ValueError("scales must be contiguous over slots, tokens and heads")


@triton.jit
def _silu_mul_kernel(GU, Y, stride_gu, stride_y, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.start(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    gate = tl.load(GU + row * stride_gu + cols, mask=ok, other=0.0)
    up = tl.load(GU + row * stride_gu + N + cols, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # F.silu rounds to the input dtype
    tl.store(Y + row * stride_y + cols, (act * up).to(gate.dtype), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(B, 2I) -> silu(gate) * up, (B, I)."""
    batch, width = gate_up.shape
    n = width // 2
    y = torch.empty((batch, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(batch, triton.cdiv(n, block))](
        gate_up, y, gate_up.stride(0), y.stride(0), n, BLOCK=block, **pdl.launch(y.device)
    )
    return y
