"""Mixed steps on the GPU: the chunk-attention kernel reading keys in place from the
slot cache (the decode rows take the Triton decode kernel), and the step replayed from
CUDA graphs. Skipped without CUDA (run on the GPU machine)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float64 causal attention of the last len(q) positions over keys (T, K, D)."""
    length, stop = q.shape[0], keys.shape[0]
    group = q.shape[1] // keys.shape[1]
    keys = keys.double().repeat_interleave(group, dim=1)
    values = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys) / q.shape[-1] ** 0.5
    allowed = torch.ones(length, stop, dtype=torch.bool, device=q.device).tril(stop - length)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_chunk_attention_reads_each_slot_in_place(kv_heads: int) -> None:
    """Chunks continuing a cached prefix, fresh chunks and one-token chunks, in slots out
    of order, with empty padded sequences and padding rows (left as they were)."""
    from engine.chunk_triton import triton_chunk_attention

    torch.manual_seed(0)
    slots, tokens, heads, dim = 6, 256, 8, 64
    k_cache = torch.randn(slots, tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    # (slot, start, length): queries at positions start .. start+length-1
    seqs = [(4, 100, 30), (1, 0, 57), (3, 200, 1), (0, 9, 1), (5, 0, 128)]
    rows = sum(length for *_, length in seqs)
    q = torch.randn(rows + 11, heads, dim, device="cuda", dtype=torch.bfloat16)
    cu_q = [0]
    for *_, length in seqs:
        cu_q.append(cu_q[-1] + length)
    cu_q += [cu_q[-1]] * 3  # three empty sequences
    cu_k = [slot * tokens for slot, *_ in seqs] + [0] * 4
    used = [start + length for _, start, length in seqs] + [0] * 3

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device="cuda")

    out = torch.full_like(q, 7.0)
    triton_chunk_attention(q, k_cache, v_cache, ints(cu_q), ints(cu_k), ints(used), out)
    assert (out[rows:] == 7.0).all()
    for i, (slot, start, length) in enumerate(seqs):
        stop = start + length
        expected = reference(q[cu_q[i] : cu_q[i + 1]], k_cache[slot, :stop], v_cache[slot, :stop])
        got = out[cu_q[i] : cu_q[i + 1]].double()
        assert (got - expected).abs().max() < 2e-2, (slot, start, length)


def tiny_runner(slots: int = 5, slot_tokens: int = 512, seed: int = 1) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.llama import LlamaRunner

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=500, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    return model, LlamaRunner(model, slots=slots, slot_tokens=slot_tokens)


def test_mixed_graph_replays_match_the_eager_step() -> None:
    """The same steps, replayed from graphs of four buckets (16, 192 twice, 256: one of
    them all but full), give the eager step's logits and write the same KV into the
    slots."""
    from engine.decode_graphs import MixedGraphs

    _model, runner = tiny_runner()
    ids = [[int(t) for t in torch.randint(5, 500, (n,))] for n in (300, 40, 90, 7, 130)]
    steps = [
        ([(0, ids[0][:200], 0), (1, ids[1], 0)], []),  # fresh prompts
        ([(0, ids[0][200:], 200), (2, ids[2], 0)], [(17, 1, 40)]),  # continued, decoding
        ([(3, ids[3], 0)], [(5, 0, 300), (9, 1, 41), (11, 2, 90)]),  # small: bucket 16
        ([(1, ids[4], 42)], [(6, 0, 301), (7, 2, 91), (8, 3, 7)]),  # 133 rows: bucket 192
    ]
    results, caches = [], []
    for graphs in (False, True):
        runner.k_cache.zero_()
        runner.v_cache.zero_()
        mixed = MixedGraphs(runner, max_rows=256, scratch_slot=runner.slots - 1)
        for chunks, decode in steps:  # every step replays a graph (none runs eagerly)
            assert mixed.bucket(sum(len(c[1]) for c in chunks) + len(decode)) is not None
        step_logits = []
        with torch.inference_mode():
            if graphs:
                mixed.capture_all()
            for chunks, decode in steps:
                run = mixed.run if graphs else runner.forward
                step_logits.append(run(chunks, decode).float().clone())
        results.append(step_logits)
        # The scratch slot holds padding rows' garbage; compare the real slots.
        caches.append((runner.k_cache[:, :-1].clone(), runner.v_cache[:, :-1].clone()))
    for eager, replayed in zip(*results, strict=True):
        assert eager.shape == replayed.shape
        error = (replayed - eager).norm() / eager.norm()
        assert error < 1e-2, error
        assert (replayed.argmax(-1) == eager.argmax(-1)).all()
    for eager, replayed in zip(*caches, strict=True):
        torch.testing.assert_close(replayed, eager, atol=2e-2, rtol=2e-2)


def test_eager_mixed_steps_of_one_token_chunks_or_no_chunk_match_sdpa() -> None:
    """Eager mixed steps (no CUDA graph pads them) whose prompt chunks are one token (a
    prompt all but one token of which is cached) or that have none: the chunk kernel
    sees only the chunks while q also holds the decode rows. (Torch's flash attention,
    which served the chunks before, took all of q for one sequence here.)"""
    from engine.llama import LlamaRunner

    model, varlen_runner = tiny_runner(slots=3, slot_tokens=128, seed=3)
    sdpa_runner = LlamaRunner(model, slots=3, slot_tokens=128)
    sdpa_runner.varlen = False
    prefix = [int(t) for t in torch.randint(5, 500, (60,))]
    steps = [
        ([(0, [7], 60), (1, [8], 60)], [(17, 2, 60)]),  # one-token chunks, a decode row
        ([], [(9, 0, 61), (10, 1, 61), (11, 2, 61)]),  # decode rows only
    ]
    results = []
    for runner in (varlen_runner, sdpa_runner):
        with torch.inference_mode():
            runner.forward([(slot, prefix, 0) for slot in range(3)])
            results.append([runner.forward(c, d).float() for c, d in steps])
    for got, expected in zip(*results, strict=True):
        assert got.shape == expected.shape
        error = (got - expected).norm() / expected.norm()
        assert error < 2e-2, error


def test_rows_beyond_the_largest_bucket_run_eagerly() -> None:
    from engine.decode_graphs import MixedGraphs

    _model, runner = tiny_runner()
    mixed = MixedGraphs(runner, max_rows=64, scratch_slot=runner.slots - 1)
    chunk = [int(t) for t in torch.randint(5, 500, (100,))]
    with torch.inference_mode():
        eager = runner.forward([(0, chunk, 0)]).float().clone()
        replayed = mixed.run([(0, chunk, 0)]).float()
    assert not mixed.captured and mixed.bucket(100) is None
    torch.testing.assert_close(replayed, eager)
