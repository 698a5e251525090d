"""Triton flash-decoding: split-K attention of one query per sequence over its cache.

Grid (batch, kv_head, split), or (kv_head, batch, split) with `heads_first`. A split is
a fixed number of keys, or (`parts`) an equal share of its sequence in whole blocks.
Each program takes the `group` query heads that share a KV head (GQA), walks its split
of the sequence in blocks of BLOCK_N keys with an online softmax, and writes a partial
(max, sum, weighted values). Splits past a sequence's length do no work, so the cost
follows the real lengths, and nothing depends on host values: the step can live in a
CUDA graph.

Two ways to merge the splits: a second kernel (`triton_decode_attention`), or, for a
few sequences, the last split program of each (sequence, KV head) to finish, counted in
a zeroed counter it sets back to zero (`triton_rope_decode_attention`). That variant
also takes the q/k/v product's row as it comes: it applies RoPE to the queries, and
the program whose split holds the new position writes the rotated key and the value
into the cache first. At batch 1 it replaces three kernels per layer with one; at
large batches every program's barrier and atomic cost more than the merge kernel
(benchmarks/results/notes-2026-11-29-gpu-session4.md).

The engine's settings take the tensor-core variant (`Settings.dot`): the queries padded
to 16 rows, so scores and values are tl.dot products and Triton pipelines the key and
value blocks through shared memory (cp.async), which the elementwise variant's loads
into registers never were (an H200 at batch 64: 2.96 -> 4.06 TB/s). A mixed step's
decode rows (`triton_decode_rows_attention`) start at a row the device holds, so one
CUDA graph serves any number of prompt rows before them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine import attention_fp8, pdl
from engine.attention import Settings
from engine.fused_triton import NO_FMA, check_cache, fp8_rows, hf_rope


@triton.jit
def _rotate(base, d, cos, sin, partner, sign):
    """RoPE of the D-wide rows at `base` (a tensor of row starts) with transformers'
    roundings (engine/fused_triton.hf_rope: the kernel launches with NO_FMA)."""
    x = tl.load(base[:, None] + d[None, :])
    x_rot = tl.load(base[:, None] + partner[None, :]) * sign.to(x.dtype)[None, :]
    return hf_rope(x, x_rot, cos[None, :], sin[None, :])


@triton.jit
def _split_kernel(
    Q, K, V, KS, VS, Slots, Lens, Acc, Stats, Out, Counters, Cos, Sin, First, rows,
    stride_qb, stride_qh,
    stride_ks, stride_kt, stride_kh,
    stride_vs, stride_vt, stride_vh,
    stride_ss, stride_st,
    stride_ob, stride_oh,
    scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr, PARTS: tl.constexpr,
    HEADS_FIRST: tl.constexpr, ROPE: tl.constexpr, MERGE: tl.constexpr, PDL: tl.constexpr,
    DOT: tl.constexpr, BASED: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    """SPLIT keys per split, or (PARTS) each sequence cut into NSPLIT equal splits of
    whole blocks. HEADS_FIRST: the grid is (kv head, batch, split), so programs that
    start together read neighbouring heads of the same tokens. ROPE: Q is the
    (B, (H + 2K) * D) q/k/v row, un-rotated, and this sequence's new key and value (at
    position length - 1) are not in the cache yet. MERGE: the last split program of
    (b, kv head) merges the splits into Out. DOT: scores and values through tensor-core
    products, the query heads padded to GROUP_PAD >= 16 rows, so Triton's pipeliner
    streams the key and value blocks into shared memory NUM_STAGES deep. BASED: program
    b serves row First[0] + b of Q, Slots, Lens and Out when that is below `rows`, and
    Lens holds positions (the length is one more). FP8 (with DOT): the caches hold
    float8 e4m3, each head's key and value scaled by its factor in KS and VS (S, T, K):
    the scores are multiplied by the keys' factors, the weights by the values'."""
    pdl.start(PDL)
    if HEADS_FIRST:
        kvh = tl.program_id(0)
        pb = tl.program_id(1)
        kv_heads = tl.num_programs(0)
    else:
        pb = tl.program_id(0)
        kvh = tl.program_id(1)
        kv_heads = tl.num_programs(1)
    split = tl.program_id(2)
    pdl.wait(PDL)
    if BASED:  # rows First.. of the step; past `rows`, nothing to attend
        b = pb + tl.load(First)
        real = b < rows
        b = tl.where(real, b, 0)
        length = tl.where(real, tl.load(Lens + b) + 1, 0)
    else:
        b = pb
        length = tl.load(Lens + b)
    slot = tl.load(Slots + b).to(tl.int64)
    if PARTS:
        span = tl.cdiv(tl.cdiv(length, NSPLIT), BLOCK_N) * BLOCK_N
    else:
        span = SPLIT
    start = split * span
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kvh * GROUP + tl.minimum(g, GROUP - 1)  # padded heads re-read the last one
    g_ok = g < GROUP
    out_rows = (pb * kv_heads * GROUP + heads) * NSPLIT + split  # (GROUP_PAD,)
    if start < length:
        if ROPE:
            pos = length - 1
            cos = tl.load(Cos + pos * D + d)
            sin = tl.load(Sin + pos * D + d)
            partner = tl.where(d < D // 2, d + D // 2, d - D // 2)
            sign = tl.where(d < D // 2, -1.0, 1.0)
            row = Q + b * stride_qb
            q = _rotate(row + heads * D, d, cos, sin, partner, sign).to(tl.float32)
            if pos < start + span:  # this split holds the new position: cache it first
                one = tl.zeros([1], tl.int32)  # (1, D) rows for _rotate
                k_row = row + (kv_heads * GROUP + kvh) * D + one
                key = _rotate(k_row, d, cos, sin, partner, sign)
                value = tl.load(k_row[:, None] + kv_heads * D + d[None, :])
                k_at = K + slot * stride_ks + pos * stride_kt + kvh * stride_kh
                v_at = V + slot * stride_vs + pos * stride_vt + kvh * stride_vh
                if FP8:
                    key, k_scale = fp8_rows(key)
                    value, v_scale = fp8_rows(value)
                    scale_at = slot * stride_ss + pos * stride_st + kvh + one
                    tl.store(KS + scale_at, k_scale)
                    tl.store(VS + scale_at, v_scale)
                tl.store(k_at + one[:, None] + d[None, :], key)
                tl.store(v_at + one[:, None] + d[None, :], value)
                tl.debug_barrier()  # the block loop below reads them back
        else:
            q = tl.load(
                Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None],
                other=0.0,
            ).to(tl.float32)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        s = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        end = tl.minimum(start + span, length)
        if DOT:
            q = q.to(Out.dtype.element_ty)  # the model's half precision
        for block in range(start, end, BLOCK_N):
            n = block + tl.arange(0, BLOCK_N)
            n_ok = n < end
            k = tl.load(
                K + slot * stride_ks + n[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                mask=n_ok[:, None],
                other=0.0,
            )
            if FP8:
                scale_at = slot * stride_ss + n * stride_st + kvh
                k_scale = tl.load(KS + scale_at, mask=n_ok, other=0.0)
                v_scale = tl.load(VS + scale_at, mask=n_ok, other=0.0)
                k = k.to(Out.dtype.element_ty)  # exact: e4m3 fits in bf16 and fp16
                scores = tl.dot(q, tl.trans(k)) * (k_scale * scale)[None, :]
            elif DOT:
                scores = tl.dot(q, tl.trans(k)) * scale  # (G, N)
            else:
                scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale
            scores = tl.where(n_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            correction = tl.exp(m - m_new)
            v = tl.load(
                V + slot * stride_vs + n[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                mask=n_ok[:, None],
                other=0.0,
            )
            if FP8:
                # Half the bytes of bf16, yet slower on an H200 (batch 64: 133.7 against
                # 115.9 us per layer): bound by instructions, not memory (168 registers;
                # the values go from shared memory into the product's layout a byte at
                # a time, since 8-bit operands have no transposing matrix load). Loading
                # them whole (keys-fastest, or as int16 pairs converted first) was no
                # faster: benchmarks/results/notes-2026-11-29-gpu-session{8,9}.md. So
                # _launch sends float8 caches to engine/attention_fp8.py (69.6 us) where
                # it can: this path serves the RoPE-fused variant and large groups.
                weights = (p * v_scale[None, :]).to(Out.dtype.element_ty)
                weighted = tl.dot(weights, v.to(Out.dtype.element_ty))
            elif DOT:
                weighted = tl.dot(p.to(v.dtype), v)
            else:
                weighted = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            acc = acc * correction[:, None] + weighted
            s = s * correction + tl.sum(p, axis=1)
            m = m_new
        tl.store(Acc + out_rows[:, None] * D + d[None, :], acc, mask=g_ok[:, None])
        tl.store(Stats + out_rows * 2, m, mask=g_ok)
        tl.store(Stats + out_rows * 2 + 1, s, mask=g_ok)
    else:
        tl.store(Stats + out_rows * 2, tl.full([GROUP_PAD], float("-inf"), tl.float32), mask=g_ok)
        tl.store(Stats + out_rows * 2 + 1, tl.zeros([GROUP_PAD], tl.float32), mask=g_ok)
    if MERGE:
        # One thread takes the ticket: the barrier puts every thread's stores before it,
        # and its release (acq_rel, gpu scope) publishes them to the program that draws
        # the last ticket, whose acquire comes before its reads.
        tl.debug_barrier()
        ticket = tl.atomic_add(Counters + pb * kv_heads + kvh, 1, sem="acq_rel", scope="gpu")
        if ticket == NSPLIT - 1:
            for i in tl.static_range(GROUP):
                head = kvh * GROUP + i
                row = (pb * kv_heads * GROUP + head) * NSPLIT
                out = _merge_head(Acc, Stats, row, d, D, NSPLIT, ".cg")  # .cg: from L2
                tl.store(Out + b * stride_ob + head * stride_oh + d, out.to(Out.dtype.element_ty))
            tl.store(Counters + pb * kv_heads + kvh, 0)  # zero again for the next call


@triton.jit
def _merge_head(Acc, Stats, row, d, D: tl.constexpr, NSPLIT: tl.constexpr, CACHE: tl.constexpr):
    """One query head's output from its NSPLIT partials, rows row.. of Acc and Stats
    (a split without keys has max -inf and weighs nothing)."""
    splits = tl.arange(0, NSPLIT)
    m = tl.load(Stats + (row + splits) * 2, cache_modifier=CACHE)
    s = tl.load(Stats + (row + splits) * 2 + 1, cache_modifier=CACHE)
    m_all = tl.max(m, axis=0)
    used = m > float("-inf")
    w = tl.where(used, tl.exp(m - m_all), 0.0)
    total = tl.sum(w * s, axis=0)
    acc = tl.load(
        Acc + (row + splits)[:, None] * D + d[None, :],
        mask=used[:, None],
        other=0.0,
        cache_modifier=CACHE,
    )
    return tl.sum(acc * w[:, None], axis=0) / total


@triton.jit
def _merge_kernel(
    Acc, Stats, Out, First, rows, stride_ob, stride_oh, H,
    D: tl.constexpr, NSPLIT: tl.constexpr, BASED: tl.constexpr,
):  # fmt: skip
    pb = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    b = pb + tl.load(First) if BASED else pb
    out = _merge_head(Acc, Stats, (pb * H + h) * NSPLIT, d, D, NSPLIT, "")
    keep = (d * 0 + b) < rows  # (D,): the rows past `rows` are not this step's
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=keep)


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    heads: int,
    out: torch.Tensor,
    settings: Settings,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    counters: torch.Tensor | None = None,
    based: tuple[torch.Tensor, int] | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """based: (first, batch): programs for `batch` rows from row first[0] of q, slots,
    lengths (then positions) and out, those below q's rows. scales: a float8 cache's
    (S, T, K) factors (engine/fused_triton.check_cache); such a cache goes to the CUDA
    kernel of engine/attention_fp8.py where it can (all but the RoPE variant)."""
    check_cache(k_cache, v_cache, scales)
    batch, dim = based[1] if based else lengths.shape[0], k_cache.shape[-1]
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    first = based[0] if based else lengths  # (unread without `based`)
    if (
        scales is not None
        and rope is None
        and attention_fp8.usable(q, (k_cache, v_cache), out, group, slots, lengths, first)
    ):
        attention_fp8.decode_attention(q, k_cache, v_cache, scales, slots, lengths, out, based)
        return
    if settings.parts > 0:
        nsplit = settings.parts
        if nsplit != triton.next_power_of_2(nsplit):
            raise ValueError(f"parts must be a power of two, got {settings}")
    elif settings.split > 0:
        nsplit = triton.next_power_of_2(triton.cdiv(k_cache.shape[1], settings.split))
    else:
        raise ValueError(f"settings need split > 0 or parts > 0, got {settings}")
    acc = torch.empty((batch, heads, nsplit, dim), dtype=torch.float32, device=q.device)
    stats = torch.empty((batch, heads, nsplit, 2), dtype=torch.float32, device=q.device)
    if rope is not None and counters is None:
        raise ValueError("the RoPE variant merges its own splits: it needs counters")
    cos, sin = rope if rope is not None else (q, q)
    if based and counters is not None:
        raise ValueError("the rows variant merges in a second kernel: no counters")
    if settings.dot and settings.block_n < 16:
        raise ValueError(f"tensor-core blocks need block_n >= 16, got {settings}")
    rows = q.shape[0]
    # Tensor-core products want at least 16 rows and half-precision operands (float32
    # would run as TF32).
    dot = settings.dot and out.dtype in (torch.float16, torch.bfloat16)
    if scales is not None and not dot:
        raise ValueError("a float8 cache is read through tensor-core products (Settings.dot)")
    k_scale, v_scale = scales if scales is not None else (lengths, lengths)  # unread
    grid = (kv_heads, batch, nsplit) if settings.heads_first else (batch, kv_heads, nsplit)
    # PDL (engine/pdl.py) where one kernel does all (few sequences); for the split and
    # merge pair it measured slower at batch 64 (156.8 against 144.3 us per layer), so
    # that pair launches as usual.
    launch = pdl.launch(q.device, wanted=counters is not None)
    if rope is not None:
        # RoPE with HF's roundings (fused_triton.hf_rope). The option is the kernel's:
        # its softmax rescaling runs without fused multiply-adds too.
        launch |= NO_FMA
    _split_kernel[grid](
        q, k_cache, v_cache, k_scale, v_scale, slots, lengths, acc, stats, out,
        counters if counters is not None else lengths, cos, sin, first, rows,
        q.stride(0), 0 if rope is not None else q.stride(1),  # RoPE: heads are D apart
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_scale.stride(0), k_scale.stride(1) if scales is not None else 0,
        out.stride(0), out.stride(1),
        1.0 / math.sqrt(dim),
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 16 if dot else 1), D=dim,
        SPLIT=settings.split, BLOCK_N=settings.block_n, NSPLIT=nsplit,
        PARTS=settings.parts > 0, HEADS_FIRST=settings.heads_first,
        ROPE=rope is not None, MERGE=counters is not None, DOT=dot, BASED=based is not None,
        FP8=scales is not None,
        num_warps=settings.warps, num_stages=settings.stages, **launch,
    )  # fmt: skip
    if counters is None:
        merge_splits(acc, stats, out, first, rows, based is not None)


def merge_splits(
    acc: torch.Tensor,
    stats: torch.Tensor,
    out: torch.Tensor,
    first: torch.Tensor,
    rows: int,
    based: bool,
) -> None:
    """Each (sequence, head)'s output from its splits' partials: acc (B, H, S, D) and
    stats (B, H, S, 2) (max, sum); based: row b of them is row first[0] + b of out."""
    batch, heads, nsplit, dim = acc.shape
    _merge_kernel[(batch, heads)](
        acc, stats, out, first, rows, out.stride(0), out.stride(1), heads,
        D=dim, NSPLIT=nsplit, BASED=based,
    )  # fmt: skip


def triton_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    settings: Settings,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q (B, H, D); caches (S, T, K, D) (float8: with their (S, T, K) scales); slots,
    lengths (B,) int -> (B, H, D)."""
    out = torch.empty_like(q)
    _launch(q, k_cache, v_cache, slots, lengths, q.shape[1], out, settings, scales=scales)
    return out


def triton_decode_rows_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    first: torch.Tensor,
    batch: int,
    out: torch.Tensor,
    settings: Settings,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """The decode rows of a mixed step, found on the device: rows first[0] ..
    first[0] + batch - 1 of q (N, H, D) that are below N attend over their slot's first
    position + 1 keys (slots, positions: (N,)), written into the same rows of out
    (N, H, D); out's other rows are left as they are. The step's shapes fix `batch`
    (a CUDA graph replays it) while the number of prompt rows before it varies."""
    if out.shape != q.shape or slots.shape[0] != q.shape[0] or positions.shape != slots.shape:
        raise ValueError("q, out, slots and positions must cover the same rows")
    if q.stride(-1) != 1 or out.stride(-1) != 1 or out.dtype != q.dtype:
        raise ValueError("q and out must be unit-stride rows of one dtype")
    if batch > 0:
        _launch(
            q, k_cache, v_cache, slots, positions, q.shape[1], out, settings,
            based=(first, batch), scales=scales,
        )  # fmt: skip


def triton_rope_decode_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    heads: int,
    counters: torch.Tensor,
    settings: Settings,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The decode step's attention straight from the q/k/v product's rows qkv
    (B, (H + 2K) * D): RoPE at position length - 1 (cos, sin: (T, D) tables), the new
    key and value written into the caches (S, T, K, D) at (slot, length - 1), then
    attention over the first `length` positions -> (B, H, D). counters: B * K int32
    zeros (left at zero); settings: engine.attention.kernel_settings."""
    batch, dim = qkv.shape[0], k_cache.shape[-1]
    if qkv.stride(1) != 1 or counters.numel() < batch * k_cache.shape[2]:
        raise ValueError(
            f"qkv must be unit-stride rows and counters at least {batch * k_cache.shape[2]}"
        )
    out = torch.empty((batch, heads, dim), dtype=qkv.dtype, device=qkv.device)
    _launch(
        qkv, k_cache, v_cache, slots, lengths, heads, out, settings, (cos, sin), counters,
        scales=scales,
    )  # fmt: skip
    return out
