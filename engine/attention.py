"""Attention over the engine's slot KV cache.

Decode attention: one query token per sequence against that sequence's cached keys,
each sequence reading only up to its own length.

On CUDA a Triton split-K kernel (flash-decoding) does it without host syncs, so a
decode step can be captured in a CUDA graph and its cost follows the real lengths,
not the longest. Elsewhere (the CPU, or no Triton) the keys are gathered up to the
batch's longest length and masked, through SDPA.

Mixed-step attention (prompt chunks and decode rows together), on a GPU: a Triton
kernel for the chunks (engine/chunk_triton.py), reading the keys in place from the slot
cache, and the Triton decode kernel for the decode rows after them. The trainer's
packed rows: torch's variable-length flash attention (`varlen_causal`).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_HAS_ATEN_FLASH = hasattr(torch.ops.aten, "_flash_attention_forward")


class Settings(NamedTuple):
    """How the Triton decode-attention kernel (engine/attention_triton.py) cuts its work."""

    split: int  # keys per split (with parts = 0)
    block_n: int  # keys per block of the online softmax
    warps: int = 4
    stages: int = 3
    parts: int = 0  # > 0: each sequence cut into this many equal splits (a power of two)
    heads_first: bool = False  # grid (kv head, batch, split) instead of (batch, kv head, split)
    dot: bool = False  # scores and values through tensor-core products (pipelined loads)


# Batches up to this size take attention_triton.triton_rope_decode_attention (one kernel
# for RoPE, the cache write, attention and the merge, launched with PDL); above it, every
# split program's barrier and atomic cost more than a merge kernel (batch 64: 145 -> 162
# us per layer on an H200).
FUSED_ROPE_ROWS = 4


def triton_head_dim(dim: int) -> bool:
    """Whether the engine's Triton attention and RoPE kernels take this head size: a
    power of two (tl.arange), at least 16 (tensor-core products). LLaMA, Mistral and
    SmolLM2 use 64 or 128; OpenLLaMA 3B uses 100."""
    return dim >= 16 and dim & (dim - 1) == 0


def kernel_settings(batch: int, fp8: bool = False) -> Settings:
    """How to cut decode attention for a batch of this size, measured on an H200 with
    benchmarks/attention_bench.py (results in benchmarks/results/attention-bench-*.json).
    Every size takes the tensor-core variant: its key and value blocks stream through
    shared memory several deep (batch 64, 300-500 keys: 144.5 -> 105.3 us per layer,
    2.96 -> 4.06 TB/s). A few sequences: each cut into 16 equal splits of whole blocks
    (batch 1, 128 keys: 6.6 -> 5.3 us). Larger batches fill the GPU with sequences: each
    cut in halves (or every 256 keys), the grid heads first, so programs that start
    together read neighbouring heads of the same tokens. fp8: a float8 cache read by
    Triton's kernel (the RoPE-fused variant, or more than 8 query heads a KV head; the
    CUDA kernel of engine/attention_fp8.py takes the rest and cuts its own splits),
    which is bound by its instructions (conversions, byte-wise value loads), not by
    memory; past 32 sequences it takes blocks of 32 keys (batch 64, 300-600 keys: 148.9
    -> 133.7 us per layer, where bf16 takes 115.9;
    benchmarks/results/notes-2026-11-29-gpu-session9.md)."""
    if batch <= FUSED_ROPE_ROWS:
        return Settings(0, 32, 4, 3, parts=16, dot=True)
    if batch <= 16:
        return Settings(0, 64, 4, 2, parts=2, heads_first=True, dot=True)
    if batch <= 32:
        return Settings(256, 64, 4, 2, heads_first=True, dot=True)
    return Settings(0, 32 if fp8 else 64, 4, 3, parts=2, heads_first=True, dot=True)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q (B, H, D); caches (S, T, K, D); slots, lengths (B,) -> (B, H, D). scales: a
    float8 cache's (S, T, K) factors (only the GPU kernels read one)."""
    if q.is_cuda and _HAS_TRITON:
        from engine.attention_triton import triton_decode_attention

        settings = kernel_settings(q.shape[0], fp8=scales is not None)
        return triton_decode_attention(q, k_cache, v_cache, slots, lengths, settings, scales)
    if scales is not None:
        raise ValueError("a float8 KV cache is read by the Triton kernels only")
    return gathered_decode_attention(q, k_cache, v_cache, slots, lengths)


def gathered_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """The reference path: gather each sequence's keys up to the longest length."""
    batch, heads, dim = q.shape
    if batch == 1:  # a view of one slot's cache: no gather, no mask
        n = int(lengths[0])
        slot = int(slots[0])
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],
            k_cache[slot, :n].transpose(0, 1)[None],
            v_cache[slot, :n].transpose(0, 1)[None],
            enable_gqa=heads != k_cache.shape[2],
        )
        return out[:, :, 0, :]
    longest = int(lengths.max())
    positions = torch.arange(longest, device=q.device)
    valid = positions[None, :] < lengths[:, None]  # (B, L)
    # The cache past a sequence's length is uninitialised memory: zero it in the gathered
    # copy, or a NaN there would poison the masked softmax (0 * NaN = NaN).
    keep = valid[:, :, None, None]
    keys = torch.where(keep, k_cache[slots, :longest], 0).transpose(1, 2)  # (B, K, L, D)
    values = torch.where(keep, v_cache[slots, :longest], 0).transpose(1, 2)
    mask = valid[:, None, None, :]  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],
        keys,
        values,
        attn_mask=mask,
        enable_gqa=heads != keys.shape[1],
    )
    return out[:, :, 0, :]


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """Plain float64 math, one sequence at a time (for tests)."""
    outputs = []
    group = q.shape[1] // k_cache.shape[2]
    for b in range(q.shape[0]):
        n = int(lengths[b])
        keys = k_cache[int(slots[b]), :n].double().repeat_interleave(group, dim=1)  # (n, H, D)
        values = v_cache[int(slots[b]), :n].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), keys) / math.sqrt(q.shape[-1])
        outputs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values))
    return torch.stack(outputs).to(q.dtype)


# the mixed step's GPU kernels; training: torch's variable-length flash attention ----
@functools.cache
def _varlen() -> tuple[Any, frozenset[str]] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def flash_capable(x: torch.Tensor) -> bool:
    """Whether torch's varlen flash attention serves this tensor (the trainer's packed
    rows): fp16/bf16 on an Ampere or newer GPU, with a torch that has
    torch.nn.attention.varlen (2.10+)."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
        and _varlen() is not None
    )


def varlen_capable(x: torch.Tensor) -> bool:
    """Whether the mixed step's GPU kernels serve this tensor: the chunks' attention
    (engine/chunk_triton.py) and the decode rows' (attention_triton), Triton kernels
    with tensor-core products: fp16/bf16 on an Ampere or newer GPU."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
        and _HAS_TRITON
    )


def fp8_cache_capable(x: torch.Tensor) -> bool:
    """Whether a float8 e4m3 KV cache can serve this model tensor: bf16 weights (the
    kernels fold each value's factor into the attention weights, which fp16's range
    would push into subnormals) through the mixed step's Triton kernels
    (varlen_capable), on a GPU with float8 conversions (sm_89+: Ada, Hopper, newer)."""
    return (
        x.dtype == torch.bfloat16
        and varlen_capable(x)
        and torch.cuda.get_device_capability(x.device) >= (8, 9)
    )


def varlen_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Packed sequences q (Tq, H, D), k/v (Tk, Hkv, D), sequence i in rows
    cu[i]:cu[i+1] (int32) -> (Tq, H, D). Causal; where a sequence has fewer queries
    than keys, the queries are its last positions (the mask is aligned bottom right,
    as flash attention does). Needs `flash_capable(q)`."""
    if not (torch.is_grad_enabled() and q.requires_grad) and _HAS_ATEN_FLASH:
        # Serving: the aten kernel behind varlen_attn, without its Python custom-op
        # wrapper (~0.2 ms of host time per call, paid 32 times in every prefill step).
        # Flash attention handles grouped KV heads itself.
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale
        )[0]
    found = _varlen()
    assert found is not None
    function, params = found
    kwargs: dict[str, Any] = {"scale": scale}
    if "is_causal" in params:  # torch 2.10/2.11
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return function(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)  # type: ignore[no-any-return]
