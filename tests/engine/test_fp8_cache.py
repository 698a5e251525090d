"""The float8 KV cache ([engine] kv_cache = "fp8"): each cached key and value row (one
token, one KV head) stored as float8 e4m3 scaled by its own fp32 factor. The kernels
that write and read it run on the GPU (the Triton interpreter's float8 rounding is not
the GPU's; the engine and the RoPE-fused decode kernel with it: tests/engine/test_gpu.py);
on the CPU the setting falls back, with a warning, to the model's dtype."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import torch

from engine.chat_format import make_chat_format
from engine.config import ConfigError, EngineConfig, parse_sections
from engine.types import SamplingParams
from engine.worker import LocalEngine


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) -> float8 rows and their factors (largest magnitude / 448), in torch."""
    scale = x.float().abs().amax(-1).clamp(min=1e-30) / 448
    return (x.float() / scale[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def dequantize(cache: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return cache.double() * scale.double()[..., None]


def random_fp8_cache(shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Keys and values with rows of very different sizes (as real models' heads are)."""
    k = torch.randn(shape, device="cuda") * torch.rand(shape[:-1], device="cuda")[..., None] * 8
    v = torch.randn(shape, device="cuda")
    k8, ks = quantize(k)
    v8, vs = quantize(v)
    return k8, v8, ks, vs


NAN = 0x7F  # a float8 e4m3fn NaN's byte


def poison_past(
    caches: tuple[torch.Tensor, ...], slot_ids: torch.Tensor, lengths: torch.Tensor
) -> None:
    """NaN in each sequence's slot past its length, in the keys, the values and their
    factors (the runner's are never zeroed): the kernels must never let it in."""
    for slot, length in zip(slot_ids.tolist(), lengths.tolist(), strict=True):
        for cache in caches:
            if cache.dtype == torch.float32:
                cache[slot, length:] = float("nan")
            else:
                cache[slot, length:].view(torch.uint8).fill_(NAN)


def count_cuda_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The calls engine/attention_fp8.py's kernel takes from now on (a list that grows)."""
    from engine import attention_fp8

    calls: list[tuple[Any, ...]] = []
    original = attention_fp8.decode_attention

    def counted(*args: Any) -> None:
        calls.append(args)
        original(*args)

    monkeypatch.setattr(attention_fp8, "decode_attention", counted)
    return calls


def mixed_step_decode_rows(
    q: torch.Tensor,
    caches: tuple[torch.Tensor, ...],
    slot_ids: torch.Tensor,
    lengths: torch.Tensor,
    capacity: int,
    settings: Any,
) -> torch.Tensor:
    """A mixed step's attention output: 3 prompt rows (left at 7.0), then q's rows as
    its decode rows (positions lengths - 1), the first found on the device."""
    from engine.attention_triton import triton_decode_rows_attention

    k8, v8, ks, vs = caches
    heads, dim = q.shape[1:]
    rows_q = torch.cat([torch.randn(3, heads, dim, device="cuda").to(q.dtype), q])
    rows_slots = torch.cat([torch.zeros(3, dtype=slot_ids.dtype, device="cuda"), slot_ids])
    rows_positions = torch.cat([torch.zeros(3, dtype=lengths.dtype, device="cuda"), lengths - 1])
    out = torch.full_like(rows_q, 7.0)
    first = torch.tensor([3], dtype=torch.int32, device="cuda")
    triton_decode_rows_attention(
        rows_q, k8, v8, rows_slots, rows_positions, first, capacity, out, settings, (ks, vs)
    )
    return out


# CPU: configuration and the fallback ------------------------------------------------
def test_kv_cache_setting_takes_auto_or_fp8() -> None:
    assert (
        parse_sections({"engine": {"kv_cache": "fp8"}}, {"engine": EngineConfig})["engine"].kv_cache
        == "fp8"
    )
    with pytest.raises(ConfigError, match="kv_cache = 'int4': must be one of 'auto', 'fp8'"):
        parse_sections({"engine": {"kv_cache": "int4"}}, {"engine": EngineConfig})


def test_fp8_cache_on_the_cpu_falls_back_to_the_model_dtype_with_a_warning(
    tiny_model: Any, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A config written for a GPU box still starts on a laptop, says why the setting is
    not used, and answers as it would without it."""
    fmt = make_chat_format("template", tokenizer)
    prompt = [
        int(t) for t in torch.randint(100, 40000, (12,), generator=torch.Generator().manual_seed(3))
    ]

    def answer(kv_cache: str) -> tuple[list[int], Any]:
        async def go() -> tuple[list[int], Any]:
            engine = LocalEngine(
                tiny_model, tokenizer, fmt, context_window=256, slots=2, slot_tokens=256,
                kv_cache=kv_cache,  # type: ignore[arg-type]
            )  # fmt: skip
            stream = engine.stream_tokens(prompt, SamplingParams(max_new_tokens=8, temperature=0))
            await stream.collect()
            scheduler = engine._scheduler
            engine.close()
            assert stream.completion is not None and scheduler is not None
            return list(stream.completion.token_ids), scheduler.runner.k_cache.dtype

        return asyncio.run(go())

    with caplog.at_level(logging.WARNING, logger="engine.worker"):
        tokens, dtype = answer("fp8")
    assert "kv_cache = 'fp8' needs a GPU with float8" in caplog.text
    assert dtype == torch.float32
    assert tokens == answer("auto")[0]


def test_the_cache_size_counts_one_byte_an_element_and_a_factor_a_row(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `slots = 0` fits on a GPU: a float8 row is D bytes and a 4-byte factor,
    so about twice the chats of a bf16 cache (the tiny model's head size is 16)."""
    from engine.llama import kv_bytes_per_token
    from engine.worker import auto_slots

    assert kv_bytes_per_token(32, 32, 128, torch.bfloat16) == 524_288  # LLaMA-7B
    assert kv_bytes_per_token(32, 32, 128, torch.float8_e4m3fn) == 270_336  # 52%
    assert kv_bytes_per_token(2, 2, 16, torch.float32) == 512
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * 2**20, 8 * 2**20))
    gpu = torch.device("cuda")
    bf16 = tiny_model.to(torch.bfloat16)
    try:
        plain = auto_slots(bf16, 256, gpu)  # 85% of 2 MiB // (256 tokens * 256 bytes) - 1
        small = auto_slots(bf16, 256, gpu, kv_fp8=True)  # ... // (256 tokens * 160 bytes) - 1
    finally:
        tiny_model.float()
    assert (plain, small) == (26, 42)


def test_a_float8_cache_is_refused_where_the_kernels_are_not(
    tiny_model: Any, tokenizer: Any
) -> None:
    from engine.llama import LlamaRunner

    with pytest.raises(ValueError, match="needs the Triton kernels on an sm_89"):
        LlamaRunner(tiny_model, slots=2, slot_tokens=64, kv_fp8=True)
    with pytest.raises(ValueError, match="kv_cache must be 'auto' or 'fp8', got 'FP8'"):
        LocalEngine(
            tiny_model, tokenizer, make_chat_format("template", tokenizer),
            context_window=256, kv_cache="FP8",  # type: ignore[arg-type]
        )  # fmt: skip


def test_a_model_served_one_request_at_a_time_says_the_float8_cache_is_not_used(
    tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.conftest import ScriptedLM

    model = ScriptedLM(len(tokenizer), [1, 2], tokenizer.eos_token_id)  # not a LLaMA
    with caplog.at_level(logging.WARNING, logger="engine.worker"):
        LocalEngine(
            model, tokenizer, make_chat_format("template", tokenizer), context_window=256,
            kv_cache="fp8",
        ).close()  # fmt: skip
    assert "kv_cache = 'fp8' applies to continuous batching only: not used" in caplog.text


# GPU: the kernels --------------------------------------------------------------------
@pytest.mark.parametrize("rows", [5, 70])  # one head a program; blocks of 4 and 16 heads
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cache_write_keeps_each_row_within_a_float8_step(rows: int) -> None:
    """The RoPE/cache kernel's float8 rows dequantize to the bf16 kernel's keys and
    values within e4m3's rounding (3 mantissa bits), each row's factor its largest
    magnitude over 448; q is the same as with a bf16 cache."""
    from engine.fused_triton import rope_into_cache

    torch.manual_seed(5)
    heads, kv_heads, dim, slots, tokens = 8, 4, 128, 4, 160
    qkv = (torch.randn(rows, (heads + 2 * kv_heads) * dim, device="cuda") * 3).to(torch.bfloat16)
    qkv[0, heads * dim : (heads + 1) * dim] = 0  # an all-zero key row stays zero
    cos = torch.randn(tokens, dim, device="cuda").to(torch.bfloat16)
    sin = torch.randn(tokens, dim, device="cuda").to(torch.bfloat16)
    positions = (torch.arange(rows, device="cuda") * 37) % tokens
    slot_ids = torch.arange(rows, device="cuda") % slots
    shape = (slots, tokens, kv_heads, dim)
    kc = torch.zeros(shape, device="cuda", dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    q_ref = rope_into_cache(qkv, cos, sin, positions, slot_ids, kc, vc, heads, kv_heads)
    k8 = torch.zeros(shape, device="cuda", dtype=torch.float8_e4m3fn)
    v8 = torch.zeros_like(k8)
    ks = torch.zeros(shape[:-1], device="cuda")
    vs = torch.zeros_like(ks)
    q = rope_into_cache(qkv, cos, sin, positions, slot_ids, k8, v8, heads, kv_heads, (ks, vs))
    assert torch.equal(q, q_ref)
    for cache, scale, ref in ((k8, ks, kc), (v8, vs, vc)):
        exact = ref[slot_ids, positions].double()  # (rows, K, D)
        got = dequantize(cache[slot_ids, positions], scale[slot_ids, positions])
        factor = scale[slot_ids, positions].double()
        torch.testing.assert_close(factor, exact.abs().amax(-1) / 448, rtol=1e-6, atol=1e-30)
        # Half a float8 step: normal numbers, then subnormals (plus the division's ulp).
        bound = (exact.abs() / 16 + factor[..., None] / 512) * 1.0001 + 1e-30
        assert ((got - exact).abs() <= bound).all()
    assert not dequantize(k8[slot_ids[0], positions[0], 0], ks[slot_ids[0], positions[0], 0]).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("heads", "kv_heads"), [(32, 32), (8, 2)])
def test_decode_attention_over_a_float8_cache_matches_the_dequantized_reference(
    heads: int, kv_heads: int
) -> None:
    """Every batch size's settings, and a mixed step's decode rows, read the float8
    cache as the float64 attention over its dequantized keys and values."""
    from engine.attention import kernel_settings, reference_attention
    from engine.attention_triton import triton_decode_attention

    torch.manual_seed(6)
    dim, slots, tokens = 128, 6, 700
    k8, v8, ks, vs = random_fp8_cache((slots, tokens, kv_heads, dim))
    q = torch.randn(5, heads, dim, device="cuda", dtype=torch.bfloat16)
    slot_ids = torch.tensor([5, 0, 3, 1, 2], device="cuda")
    lengths = torch.tensor([700, 1, 129, 128, 333], device="cuda")
    poison_past((k8, v8, ks, vs), slot_ids, lengths)
    ref = reference_attention(
        q.cpu(), dequantize(k8, ks).cpu(), dequantize(v8, vs).cpu(), slot_ids.cpu(), lengths.cpu()
    ).double()
    for batch in (1, 8, 32, 64):
        out = triton_decode_attention(
            q, k8, v8, slot_ids, lengths, kernel_settings(batch, fp8=True), (ks, vs)
        )
        error = (out.double().cpu() - ref).norm() / ref.norm()
        assert error < 1e-2, (batch, error)
    settings = kernel_settings(8, fp8=True)
    out = mixed_step_decode_rows(q, (k8, v8, ks, vs), slot_ids, lengths, 8, settings)
    assert (out[:3] == 7.0).all()
    error = (out[3:].double().cpu() - ref).norm() / ref.norm()
    assert error < 1e-2, error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_chunk_attention_over_a_float8_cache_matches_the_dequantized_reference() -> None:
    from engine.chunk_triton import triton_chunk_attention
    from tests.engine.test_mixed_graphs import reference

    torch.manual_seed(8)
    slots, tokens, heads, kv_heads, dim = 6, 256, 8, 2, 64
    k8, v8, ks, vs = random_fp8_cache((slots, tokens, kv_heads, dim))
    keys, values = dequantize(k8, ks), dequantize(v8, vs)
    seqs = [(4, 100, 30), (1, 0, 57), (3, 200, 1), (5, 0, 128)]  # (slot, start, length)
    rows = sum(length for *_, length in seqs)
    q = torch.randn(rows, heads, dim, device="cuda", dtype=torch.bfloat16)
    cu_q = [0]
    for *_, length in seqs:
        cu_q.append(cu_q[-1] + length)
    cu_k = [slot * tokens for slot, *_ in seqs]
    used = [start + length for _, start, length in seqs]
    poison_past((k8, v8, ks, vs), torch.tensor([slot for slot, *_ in seqs]), torch.tensor(used))

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device="cuda")

    out = torch.empty_like(q)
    triton_chunk_attention(q, k8, v8, ints(cu_q), ints(cu_k), ints(used), out, (ks, vs))
    for i, (slot, start, length) in enumerate(seqs):
        stop = start + length
        expected = reference(q[cu_q[i] : cu_q[i + 1]], keys[slot, :stop], values[slot, :stop])
        got = out[cu_q[i] : cu_q[i + 1]].double()
        error = (got - expected).norm() / expected.norm()
        assert error < 1e-2, (i, error)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "dtype", "schedule", "index"),
    [
        (32, 32, 128, torch.bfloat16, ("warps", 1), torch.int64),  # every sequence whole
        (32, 32, 128, torch.bfloat16, ("warps", 4), torch.int64),  # LLaMA-7B's, cut
        (32, 32, 128, torch.bfloat16, ("splits", 4), torch.int64),  # few sequences
        (9, 3, 64, torch.bfloat16, ("splits", 1), torch.int64),  # SmolLM2's 3 a KV head
        (9, 3, 64, torch.bfloat16, ("warps", 48), torch.int64),  # a warp a block: 22 pieces
        (32, 4, 128, torch.float16, ("warps", 7), torch.int64),  # 8 a KV head, the most
        (32, 4, 128, torch.float16, ("splits", 2), torch.int64),
        (32, 2, 128, torch.bfloat16, ("splits", 2), torch.int64),  # 16: Triton's kernel
        (32, 32, 128, torch.float16, None, torch.int32),  # the GPU's own choice; fp16
        (9, 3, 64, torch.bfloat16, ("warps", 5), torch.int32),  # a mixed step's int32
    ],
)
def test_the_cuda_kernel_reads_a_float8_cache_as_the_reference(
    heads: int,
    kv_heads: int,
    dim: int,
    dtype: torch.dtype,
    schedule: tuple[str, int] | None,
    index: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """engine/attention_fp8.py (compiled by NVRTC): the float64 attention over the
    dequantized cache, sequence by sequence, from both kernels: the balanced one (a KV
    head's keys shared among `warps` warps, whole sequences or cut between warps and
    merged) and the split one (each sequence in `splits`, merged by Triton's merge
    kernel), for a step's sequences and for a mixed step's decode rows (rows before them
    untouched); called again, the same output (each merge leaves its ticket ready); the
    groups it cannot take go to the Triton kernel."""
    from engine import attention_fp8
    from engine.attention import kernel_settings, reference_attention
    from engine.attention_triton import triton_decode_attention

    if schedule is not None:
        kind, count = schedule
        monkeypatch.setattr(attention_fp8, "schedule", lambda *_: 0 if kind == "warps" else count)
        monkeypatch.setattr(attention_fp8, "warps", lambda *_: count)
        monkeypatch.setattr(attention_fp8, "MIN_WARP_BLOCKS", 1)
    calls = count_cuda_kernel_calls(monkeypatch)
    torch.manual_seed(7)
    lengths = torch.tensor([700, 1, 31, 32, 33, 129, 333, 64, 65], device="cuda", dtype=index)
    batch, slots, tokens = len(lengths), len(lengths) + 2, 740
    k8, v8, ks, vs = random_fp8_cache((slots, tokens, kv_heads, dim))
    q = (torch.randn(batch, heads, dim, device="cuda") * 2).to(dtype)
    slot_ids = torch.randperm(slots, device="cuda")[:batch].to(index)
    poison_past((k8, v8, ks, vs), slot_ids, lengths)
    ref = reference_attention(
        q.cpu(), dequantize(k8, ks).cpu(), dequantize(v8, vs).cpu(), slot_ids.cpu(), lengths.cpu()
    ).double()

    def errors(out: torch.Tensor) -> list[float]:
        diff = (out.double().cpu() - ref).flatten(1).norm(dim=1)
        return (diff / ref.flatten(1).norm(dim=1)).tolist()  # type: ignore[no-any-return]

    settings = kernel_settings(batch, fp8=True)
    out = triton_decode_attention(q, k8, v8, slot_ids, lengths, settings, (ks, vs))
    assert max(errors(out)) < 5e-3, errors(out)  # the kernel measured 1.7e-3, Triton's 2.3e-3
    again = triton_decode_attention(q, k8, v8, slot_ids, lengths, settings, (ks, vs))
    assert torch.equal(again, out)
    rows = mixed_step_decode_rows(q, (k8, v8, ks, vs), slot_ids, lengths, batch + 4, settings)
    assert (rows[:3] == 7.0).all()
    assert max(errors(rows[3:])) < 5e-3, errors(rows[3:])
    assert len(calls) == (3 if heads // kv_heads <= 8 else 0)
