"""Triton flash-decoding: split-K attention of one query per sequence over its cache.

Grid (batch, kv_head, split). Each program takes the `group` query heads that share a
KV head (GQA), walks its split of the sequence in blocks of BLOCK_N keys with an online
softmax, and writes a partial (max, sum, weighted values). A second kernel merges the
splits. Splits past a sequence's length exit at once, so the cost follows the real
lengths, and nothing depends on host values: the step can live in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _split_kernel(
    Q, K, V, Slots, Lens, Acc, Stats,
    stride_qb, stride_qh,
    stride_ks, stride_kt, stride_kh,
    stride_vs, stride_vt, stride_vh,
    scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(Lens + b)
    slot = tl.load(Slots + b).to(tl.int64)
    start = split * SPLIT
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kvh * GROUP + g
    g_ok = g < GROUP
    out_rows = (b * tl.num_programs(1) * GROUP + heads) * NSPLIT + split  # (GROUP_PAD,)
    if start >= length:
        tl.store(Stats + out_rows * 2, tl.full([GROUP_PAD], float("-inf"), tl.float32), mask=g_ok)
        tl.store(Stats + out_rows * 2 + 1, tl.zeros([GROUP_PAD], tl.float32), mask=g_ok)
        return
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    s = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    end = tl.minimum(start + SPLIT, length)
    for block in range(start, end, BLOCK_N):
        n = block + tl.arange(0, BLOCK_N)
        n_ok = n < end
        k = tl.load(
            K + slot * stride_ks + n[:, None] * stride_kt + kvh * stride_kh + d[None, :],
            mask=n_ok[:, None],
            other=0.0,
        ).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (G, N)
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        correction = tl.exp(m - m_new)
        v = tl.load(
            V + slot * stride_vs + n[:, None] * stride_vt + kvh * stride_vh + d[None, :],
            mask=n_ok[:, None],
            other=0.0,
        ).to(tl.float32)
        acc = acc * correction[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        s = s * correction + tl.sum(p, axis=1)
        m = m_new
    tl.store(Acc + out_rows[:, None] * D + d[None, :], acc, mask=g_ok[:, None])
    tl.store(Stats + out_rows * 2, m, mask=g_ok)
    tl.store(Stats + out_rows * 2 + 1, s, mask=g_ok)


@triton.jit
def _merge_kernel(Acc, Stats, Out, stride_ob, stride_oh, H, D: tl.constexpr, NSPLIT: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = (b * H + h) * NSPLIT
    splits = tl.arange(0, NSPLIT)
    m = tl.load(Stats + (row + splits) * 2)
    s = tl.load(Stats + (row + splits) * 2 + 1)
    m_all = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)
    total = tl.sum(w * s, axis=0)
    d = tl.arange(0, D)
    acc = tl.load(
        Acc + (row + splits)[:, None] * D + d[None, :], mask=(m > float("-inf"))[:, None], other=0.0
    )
    out = tl.sum(acc * w[:, None], axis=0) / total
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty))


def triton_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    split_tokens: int,
    block_n: int,
    warps: int = 4,
    stages: int = 3,
) -> torch.Tensor:
    """q (B, H, D); caches (S, T, K, D); slots, lengths (B,) int -> (B, H, D)."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    nsplit = triton.next_power_of_2(triton.cdiv(k_cache.shape[1], split_tokens))
    acc = torch.empty((batch, heads, nsplit, dim), dtype=torch.float32, device=q.device)
    stats = torch.empty((batch, heads, nsplit, 2), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    _split_kernel[(batch, kv_heads, nsplit)](
        q, k_cache, v_cache, slots, lengths, acc, stats,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        1.0 / math.sqrt(dim),
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 1), D=dim,
        SPLIT=split_tokens, BLOCK_N=block_n, NSPLIT=nsplit, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _merge_kernel[(batch, heads)](
        acc, stats, out, out.stride(0), out.stride(1), heads, D=dim, NSPLIT=nsplit
    )
    return out
