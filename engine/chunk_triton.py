"""Causal attention of a mixed step's prompt chunks over the slot cache, in Triton.

A mixed step packs its chunks' queries (N, H, D) and describes them as varlen
sequences (engine/plan.VarlenPlan): chunk i's queries are rows cu_q[i]:cu_q[i+1], its
keys the first used[i] rows of the flattened cache (S * T, K, D) from row cu_k[i],
and its queries are its last positions (bottom-right causal). Torch's varlen flash
attention (aten._flash_attention_forward with seqused_k), which served this before,
took 41 us a layer on an H200 for a 449-row chunk in a CUDA graph padded to 66
sequences, 16 here; a 10th turn's 101 rows over 1,316 keys 72 against 35
(benchmarks/results/chunk-attention-2026-11-29.json). Here each program takes BLOCK_M queries
of one chunk and one query head; the programs are numbered over the blocks the chunks
really have (a cumulative sum of cu_q on the device, so a graph replays any layout),
and those past the last block return at once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine import pdl
from engine.fused_triton import check_cache

BLOCK_M = 64
BLOCK_N = 64
# Three stages of loads in flight, not two: on an H200, 2-18% faster for chunks over
# long prefixes and 449-row chunks, within 4% either way for short ones
# (benchmarks/results/chunk-sweep-2026-11-29-s12.json).
STAGES = 3


@triton.jit
def _chunk_kernel(
    Q, KC, VC, KS, VS, CuQ, CuK, Used, Out, chunks,
    stride_qn, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_on, stride_oh,
    stride_sr, scale_log2,
    GROUP: tl.constexpr, D: tl.constexpr, CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (head, b): the b-th block of BLOCK_M queries, counting every chunk's
    blocks in order, for query head `head` (KV head head // GROUP). FP8: float8 e4m3
    caches, each cached key and value scaled by its factor in KS and VS (rows of
    stride_sr, one factor a KV head)."""
    pdl.start(PDL)
    pdl.wait(PDL)
    head = tl.program_id(0)
    b = tl.program_id(1)
    idx = tl.arange(0, CHUNKS)
    live = idx < chunks
    starts = tl.load(CuQ + idx, mask=live, other=0)
    ends = tl.load(CuQ + idx + 1, mask=live, other=0)
    blocks = (ends - starts + BLOCK_M - 1) // BLOCK_M
    ends_at = tl.cumsum(blocks, 0)  # blocks up to and including chunk i
    chunk = tl.sum((ends_at <= b).to(tl.int32), 0)
    if chunk < chunks:
        m = b - tl.sum(tl.where(idx < chunk, blocks, 0), 0)  # block within the chunk
        q_start = tl.load(CuQ + chunk)
        length = tl.load(CuQ + chunk + 1) - q_start
        used = tl.load(Used + chunk)
        key_row = tl.load(CuK + chunk).to(tl.int64)
        rows = m * BLOCK_M + tl.arange(0, BLOCK_M)  # queries within the chunk
        row_ok = rows < length
        positions = used - length + rows  # each query's position in its sequence
        d = tl.arange(0, D)
        q_ptrs = Q + (q_start + rows).to(tl.int64)[:, None] * stride_qn + head * stride_qh
        q = tl.load(q_ptrs + d[None, :], mask=row_ok[:, None], other=0.0)
        kv_head = head // GROUP
        k_base = KC + key_row * stride_kr + kv_head * stride_kh
        v_base = VC + key_row * stride_vr + kv_head * stride_vh
        top = tl.max(tl.where(row_ok, positions, 0), 0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        for start in range(0, top + 1, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_ok = keys < used
            k = tl.load(
                k_base + keys.to(tl.int64)[None, :] * stride_kr + d[:, None],
                mask=key_ok[None, :], other=0.0,
            )  # fmt: skip
            if FP8:
                scale_at = (key_row + keys) * stride_sr + kv_head
                k_scale = tl.load(KS + scale_at, mask=key_ok, other=0.0)
                v_scale = tl.load(VS + scale_at, mask=key_ok, other=0.0)
                k = k.to(q.dtype)  # exact: e4m3 fits in bf16 and fp16
                scores = tl.dot(q, k) * (k_scale * scale_log2)[None, :]
            else:
                scores = tl.dot(q, k) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
            scores = tl.where(keys[None, :] <= positions[:, None], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            # Key 0 is every query's (rows past the chunk score zeros, never stored):
            # each row's max is finite from the first block on.
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + keys.to(tl.int64)[:, None] * stride_vr + d[None, :],
                mask=key_ok[:, None], other=0.0,
            )  # fmt: skip
            if FP8:
                acc = acc * alpha[:, None] + tl.dot(
                    (p * v_scale[None, :]).to(q.dtype), v.to(q.dtype)
                )
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        o_ptrs = Out + (q_start + rows).to(tl.int64)[:, None] * stride_on + head * stride_oh
        tl.store(o_ptrs + d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def triton_chunk_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    used: torch.Tensor,
    out: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of packed chunks q (N, H, D) over keys read in place from a slot
    cache (S, T, K, D) (float8: with its (S, T, K) scales), laid out as
    engine/plan.VarlenPlan (cu_q, cu_k, used: int32 on q's device); the chunks' rows of
    `out` (N, H, D) are written, the rest left as they are. No host sync: it can be
    captured in a CUDA graph."""
    rows, heads, dim = q.shape
    slots, tokens, kv_heads, _ = k_cache.shape
    for cache in (k_cache, v_cache):
        if cache.stride(0) != tokens * cache.stride(1) or cache.stride(3) != 1:
            raise ValueError("the cache must be contiguous over slots and tokens")
    if q.stride(2) != 1 or out.stride(2) != 1 or heads % kv_heads:
        raise ValueError(f"unsupported layout: q {q.stride()}, out {out.stride()}")
    check_cache(k_cache, v_cache, scales)
    k_scale, v_scale = scales if scales is not None else (used, used)  # unread
    chunks = cu_q.shape[0] - 1
    if chunks < 1 or rows == 0:
        return out
    grid = (heads, triton.cdiv(rows, BLOCK_M) + chunks)  # each chunk: at most one part block
    _chunk_kernel[grid](
        q, k_cache, v_cache, k_scale, v_scale, cu_q, cu_k, used, out, chunks,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        k_scale.stride(1) if scales is not None else 0, math.log2(math.e) / math.sqrt(dim),
        GROUP=heads // kv_heads, D=dim, CHUNKS=max(16, triton.next_power_of_2(chunks)),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, FP8=scales is not None, num_warps=4, num_stages=STAGES,
        **pdl.launch(q.device),
    )  # fmt: skip
    return out
