"""GPU paths: the Triton decode-attention kernel and the engine under CUDA graphs.
Skipped without CUDA (run on the GPU machine)."""

from __future__ import annotations

import asyncio
import copy
import os
from typing import Any

import pytest
import torch

from tests.engine.hf import hf_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_programmatic_dependent_launch_is_on_for_hopper_and_newer() -> None:
    """The decode kernels' PDL (engine/pdl.py) switches itself off when Triton or the GPU
    cannot do it; on compute capability 9+ with this Triton it must be on, or a new
    Triton would quietly cost the single-chat speed."""
    from engine import pdl

    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert pdl.enabled(torch.device("cuda")) == hopper


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(32, 32, 128), (9, 3, 64), (8, 2, 128)])
def test_triton_decode_attention_matches_reference(heads: int, kv_heads: int, dim: int) -> None:
    from engine.attention import Settings, kernel_settings, reference_attention
    from engine.attention_triton import triton_decode_attention

    torch.manual_seed(heads)
    slots, tokens = 6, 700
    k = torch.randn(slots, tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(5, heads, dim, device="cuda", dtype=torch.bfloat16)
    slot_ids = torch.tensor([5, 0, 3, 1, 2], device="cuda")
    lengths = torch.tensor([700, 1, 129, 128, 333], device="cuda")
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), slot_ids.cpu(), lengths.cpu())
    # Each batch size's kernel settings, and equal splits with the grid heads first.
    variants = [kernel_settings(batch) for batch in (1, 8, 64)]
    variants += [Settings(0, 32, 2, 3, parts=parts, heads_first=True) for parts in (1, 4, 16)]
    for settings in variants:
        out = triton_decode_attention(q, k, v, slot_ids, lengths, settings)
        assert torch.isfinite(out).all()
        error = (out.float().cpu() - ref.float()).norm() / ref.float().norm()
        assert error < 1e-2, (settings, error)


def gpu_tokenizer() -> Any:
    from transformers import AutoTokenizer

    folder = os.environ.get("LORABOT_TEST_TOKENIZER")
    if not folder:
        pytest.skip("set LORABOT_TEST_TOKENIZER to a tokenizer folder")
    return AutoTokenizer.from_pretrained(folder)


def rope_tables(tokens: int, dim: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, D) in bf16 for RoPE kernel tests."""
    angles = torch.arange(tokens, device="cuda")[:, None] / 100 ** (
        torch.arange(dim // 2, device="cuda") / (dim // 2)
    )
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)


@pytest.mark.parametrize(
    ("dtype", "kv_cache", "heads", "balanced"),
    [
        (torch.float32, "auto", 8, False),
        (torch.bfloat16, "auto", 8, False),
        (torch.bfloat16, "fp8", 8, False),  # head size 32: Triton's float8 kernels
        (torch.bfloat16, "fp8", 4, False),  # head size 64: engine/attention_fp8.py's CUDA
        (torch.bfloat16, "fp8", 4, True),  # kernels: split (few sequences), balanced
    ],
)
def test_graph_engine_greedy_matches_hf_generate(
    dtype: torch.dtype,
    kv_cache: str,
    heads: int,
    balanced: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fp32: HF's greedy tokens exactly. bf16 (and bf16 with the float8 KV cache, which
    takes half the memory): as close to fp32's tokens as HF's own bf16 is. balanced: the
    float8 CUDA kernel's balanced form serves every step (its workspace in the graphs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.chat_format import make_chat_format
    from engine.types import SamplingParams
    from engine.worker import LocalEngine
    from tests.engine.test_fp8_cache import count_cuda_kernel_calls

    torch.backends.cuda.matmul.allow_tf32 = False
    tokenizer = gpu_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to("cuda", dtype).eval()
    # The CUDA float8 kernel's calls (in the warm-up before each graph capture too).
    calls = count_cuda_kernel_calls(monkeypatch)
    if heads == 4:  # its decode steps too (at most 4 rows go to the RoPE-fused kernel)
        monkeypatch.setattr("engine.llama.FUSED_ROPE_ROWS", 0)
    if balanced:  # (four sequences would take the split form)
        monkeypatch.setattr("engine.attention_fp8.schedule", lambda *_: 0)
    fmt = make_chat_format("alpaca", tokenizer)
    fmt.stop_token_ids = frozenset()
    prompts = [[int(t) for t in torch.randint(100, 40000, (n,))] for n in (5, 40, 300, 17)]

    async def run() -> tuple[list[list[int]], Any]:
        engine = LocalEngine(
            model, tokenizer, fmt, context_window=1024, slots=4, slot_tokens=1024,
            kv_cache=kv_cache,  # type: ignore[arg-type]
        )  # fmt: skip
        params = SamplingParams(max_new_tokens=24, temperature=0)
        streams = [engine.stream_tokens(p, params) for p in prompts]
        for s in streams:
            await s.collect()
        assert engine._scheduler is not None
        runner = engine._scheduler.runner
        engine.close()
        return [list(s.completion.token_ids) for s in streams], runner

    ours, runner = asyncio.run(run())
    if kv_cache == "fp8":
        assert runner.k_cache.dtype == runner.v_cache.dtype == torch.float8_e4m3fn
        head_dim = 256 // heads  # each row: head_dim bytes and a 4-byte factor (bf16: 2 a dim)
        assert runner.kv_bytes_per_token() == 2 * 2 * 2 * (head_dim + 4)
    assert bool(calls) == (kv_cache == "fp8" and heads == 4)
    if dtype == torch.float32:
        for prompt, tokens in zip(prompts, ours, strict=True):
            assert tokens == hf_greedy(model, prompt, 24)
        return
    # bf16: greedy paths part where logits nearly tie, wherever the roundings differ.
    # The engine's bf16 must stay as close to the fp32 tokens as HF's own bf16 does.
    exact = copy.deepcopy(model).float()
    ours_agree = hf_agree = total = 0
    for prompt, tokens in zip(prompts, ours, strict=True):
        ref, hf_tokens = hf_greedy(exact, prompt, 24), hf_greedy(model, prompt, 24)
        ours_agree += sum(a == b for a, b in zip(tokens, ref, strict=True))
        hf_agree += sum(a == b for a, b in zip(hf_tokens, ref, strict=True))
        total += len(ref)
    print(
        f"bf16 greedy tokens equal to fp32's: engine ({kv_cache} cache) {ours_agree}/{total},"
        f" HF {hf_agree}/{total}"
    )
    assert ours_agree >= hf_agree - total // (4 if kv_cache == "fp8" else 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [5, 70])  # one head a program; blocks of 16 (a partial one)
def test_fused_kernels_match_pytorch(dtype: torch.dtype, rows: int) -> None:
    import torch.nn.functional as F

    from engine.fused_triton import rmsnorm, rope_into_cache, silu_mul

    torch.manual_seed(1)
    x = torch.randn(rows, 4096, device="cuda", dtype=dtype)
    w = torch.randn(4096, device="cuda", dtype=dtype)
    h = x.float()
    ref = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    # Same arithmetic up to summation order: within one rounding step of the dtype.
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}
    torch.testing.assert_close(rmsnorm(x, w, 1e-5), ref, **tol)
    gate_up = torch.randn(rows, 2 * 11008, device="cuda", dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.allclose(
        silu_mul(gate_up).float(), (F.silu(gate) * up).float(), atol=1e-2, rtol=1e-2
    )
    heads, kv_heads, dim = 8, 2, 128
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, device="cuda", dtype=dtype)
    cos = torch.randn(128, dim, device="cuda", dtype=dtype)
    sin = torch.randn(128, dim, device="cuda", dtype=dtype)
    # distinct (slot, position) pairs, scattered over the cache
    positions = (torch.arange(rows, device="cuda") * 37) % 128
    slots = torch.arange(rows, device="cuda") % 4
    kc = torch.zeros(4, 128, kv_heads, dim, device="cuda", dtype=dtype)
    vc = torch.zeros_like(kc)
    q = rope_into_cache(qkv, cos, sin, positions, slots, kc, vc, heads, kv_heads)

    def rope(t: torch.Tensor) -> torch.Tensor:
        half = dim // 2
        rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        return t * cos[positions][:, None] + rotated * sin[positions][:, None]

    ref_q = rope(qkv[:, : heads * dim].view(rows, heads, dim))
    ref_k = rope(qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, dim))
    # HF's roundings exactly (each product, then the sum), in both dtypes: no fused
    # multiply-add (fused_triton.NO_FMA)
    torch.testing.assert_close(q, ref_q, rtol=0, atol=0)
    torch.testing.assert_close(kc[slots, positions], ref_k, rtol=0, atol=0)
    assert torch.equal(
        vc[slots, positions], qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim)
    )


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_mixed_step_with_varlen_kernels_matches_separate_sdpa_steps(kv_heads: int) -> None:
    """One forward of prompt chunks (fresh, and continuing a cached prefix) with decode
    rows gives the logits of the per-chunk SDPA prefill and a decode step alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.llama import LlamaRunner

    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=500, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=kv_heads,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    ids = [[int(t) for t in torch.randint(5, 500, (n,))] for n in (300, 40, 90, 7)]
    results = []
    for varlen in (True, False):
        runner = LlamaRunner(model, slots=4, slot_tokens=512)
        assert runner.varlen  # bf16 on an sm80+ GPU
        runner.varlen = varlen
        with torch.inference_mode():
            # Slots 0 and 1 hold a cached prefix; slot 1 is then decoding.
            runner.forward([(0, ids[0][:200], 0), (1, ids[1], 0)])
            logits = runner.forward(
                [(0, ids[0][200:], 200), (2, ids[2], 0), (3, ids[3], 0)],  # continued, fresh
                [(17, 1, 40)],  # slot 1's next token at position 40
            )
        results.append(logits.float())
    varlen_logits, sdpa_logits = results
    assert varlen_logits.shape == (4, 500)
    error = (varlen_logits - sdpa_logits).norm() / sdpa_logits.norm()
    assert error < 2e-2, error
    assert (varlen_logits.argmax(-1) == sdpa_logits.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads"), [(32, 32), (8, 2)])
def test_rope_decode_attention_matches_the_separate_kernels(
    heads: int, kv_heads: int, fp8: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 on the GPU: one kernel for RoPE, the cache write, attention and the merge
    gives what the RoPE + cache kernel then the split and merge kernels give, twice in
    a row (its counters go back to zero); with a float8 cache, the same rows and
    factors written. (The split programs compared are Triton's: a float8 cache's other
    reader, engine/attention_fp8.py, rounds its products in f16, not bf16; its own
    test is in test_fp8_cache.py.)"""
    from engine import attention_fp8
    from engine.attention import FUSED_ROPE_ROWS, kernel_settings
    from engine.attention_triton import triton_decode_attention, triton_rope_decode_attention
    from engine.fused_triton import rope_into_cache
    from tests.engine.test_fp8_cache import random_fp8_cache

    monkeypatch.setattr(attention_fp8, "ENABLED", False)
    torch.manual_seed(4)
    dim, slots, tokens = 128, 6, 1024
    shape = (slots, tokens, kv_heads, dim)
    if fp8:  # keys, values, their factors
        caches = list(random_fp8_cache(shape))
    else:
        caches = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    cos, sin = rope_tables(tokens)
    counters = torch.zeros(FUSED_ROPE_ROWS * kv_heads, dtype=torch.int32, device="cuda")
    for lengths in ([1], [64, 200], [129, 1, 64, 1000]):
        batch = len(lengths)
        length = torch.tensor(lengths, device="cuda")
        slot = torch.tensor([4, 0, 2, 5][:batch], device="cuda")
        qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, device="cuda").to(torch.bfloat16)
        refs = [cache.clone() for cache in caches]
        q = rope_into_cache(
            qkv, cos, sin, length - 1, slot, refs[0], refs[1], heads, kv_heads,
            (refs[2], refs[3]) if fp8 else None,
        )  # fmt: skip
        settings = kernel_settings(batch)
        ref = triton_decode_attention(
            q, refs[0], refs[1], slot, length, settings, (refs[2], refs[3]) if fp8 else None
        )
        for _ in range(2):
            out = triton_rope_decode_attention(
                qkv, cos, sin, caches[0], caches[1], slot, length, heads, counters, settings,
                (caches[2], caches[3]) if fp8 else None,
            )  # fmt: skip
            # The key: RoPE, the same roundings; the value copied (or scaled) the same.
            for cache, expected in zip(caches, refs, strict=True):
                assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8)), lengths
            error = (out.float() - ref.float()).norm() / ref.float().norm()
            assert error < 1e-3, (lengths, error)
        assert not counters.any()


def test_a_head_size_the_kernels_do_not_take_is_served_one_request_at_a_time() -> None:
    """Head size 24 (as OpenLLaMA 3B's 100): the Triton kernels need a power of two, so
    on a GPU the engine serves the model through its own forward, one request at a time,
    and answers as HF's greedy decoding does (it used to fail to compile)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.chat_format import make_chat_format
    from engine.llama import supports
    from engine.types import SamplingParams
    from engine.worker import LocalEngine

    tokenizer = gpu_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to("cuda", torch.float32).eval()
    assert not supports(model) and supports(model.to("cpu")) and not supports(model.to("cuda"))
    fmt = make_chat_format("alpaca", tokenizer)
    fmt.stop_token_ids = frozenset()
    prompt = [int(t) for t in torch.randint(100, 40000, (30,))]

    async def run() -> list[int]:
        engine = LocalEngine(model, tokenizer, fmt, context_window=512)
        assert engine._scheduler is None
        stream = engine.stream_tokens(prompt, SamplingParams(max_new_tokens=12, temperature=0))
        await stream.collect()
        engine.close()
        assert stream.completion is not None
        return list(stream.completion.token_ids)

    assert asyncio.run(run()) == hf_greedy(model, prompt, 12)
