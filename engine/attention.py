"""Decode attention: one query token per sequence against that sequence's cached keys,
each sequence reading only up to its own length.

On CUDA a Triton split-K kernel (flash-decoding) does it without host syncs, so a
decode step can be captured in a CUDA graph and its cost follows the real lengths,
not the longest. Elsewhere (the CPU, or no Triton) the keys are gathered up to the
batch's longest length and masked, through SDPA.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

_HAS_TRITON = importlib.util.find_spec("triton") is not None
SPLIT_TOKENS = 128  # keys per program: more splits = more parallelism for short batches
BLOCK_N = 32


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """q (B, H, D); caches (S, T, K, D); slots, lengths (B,) -> (B, H, D)."""
    if q.is_cuda and _HAS_TRITON:
        from engine.attention_triton import triton_decode_attention

        return triton_decode_attention(q, k_cache, v_cache, slots, lengths, SPLIT_TOKENS, BLOCK_N)
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
