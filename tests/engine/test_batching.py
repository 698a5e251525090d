"""Continuous batching on the CPU with the tiny LLaMA: what users would notice is that
answers are the same however many chats share the model, that the next turn of a chat
starts faster, and that a cancelled chat frees its place."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from engine.chat_format import make_chat_format
from engine.types import ChatMessage, SamplingParams
from engine.worker import LocalEngine
from tests.engine.hf import hf_greedy

GREEDY = SamplingParams(max_new_tokens=20, temperature=0)


@pytest.fixture(params=[False, True], ids=["synchronous", "pipelined"])
def make_engine(tiny_model: Any, tokenizer: Any, request: pytest.FixtureRequest) -> Any:
    engines: list[LocalEngine] = []

    def make(**kw: Any) -> LocalEngine:
        engine = LocalEngine(
            tiny_model,
            tokenizer,
            make_chat_format("template", tokenizer),
            context_window=1024,
            **kw,
        )
        assert engine._scheduler is not None
        engine._scheduler.pipelined = request.param  # on the CPU it is off by default
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


def chat(text: str) -> list[ChatMessage]:
    return [ChatMessage("system", "Be brief."), ChatMessage("user", text)]


async def test_answers_are_the_same_alone_and_in_a_crowd(make_engine: Any) -> None:
    questions = [f"Question number {i}: {'why ' * i}?" for i in range(7)]
    # Seeded sampling gives each chat its own varied answer (a random model's greedy
    # answers are all alike); a seed must mean the same answer whoever shares the batch.
    params = [SamplingParams(max_new_tokens=20, temperature=1.0, seed=i) for i in range(7)]
    solo_engine = make_engine(slots=1)
    alone = [
        await solo_engine.stream(chat(q), p).collect()
        for q, p in zip(questions, params, strict=True)
    ]
    assert len(set(alone)) > 3
    crowd_engine = make_engine(slots=3)  # 7 chats share 3 slots: some wait their turn
    streams = [crowd_engine.stream(chat(q), p) for q, p in zip(questions, params, strict=True)]
    together = await asyncio.gather(*(s.collect() for s in streams))
    assert together == alone


async def test_next_turn_reuses_the_previous_turns(make_engine: Any) -> None:
    engine = make_engine(slots=2)
    scheduler = engine._scheduler
    first_turn = chat("Tell me about the sea.")
    stream = engine.stream(first_turn, GREEDY)
    reply = await stream.collect()
    before = scheduler.prefill_tokens
    second_turn = first_turn + [ChatMessage("assistant", reply), ChatMessage("user", "More!")]
    second = await engine.stream(second_turn, GREEDY).collect()
    computed = scheduler.prefill_tokens - before
    assert computed < len(engine.chat_format.encode(second_turn)) // 2
    fresh = make_engine(slots=1)
    assert second == await fresh.stream(second_turn, GREEDY).collect()


async def test_a_cancelled_chat_frees_its_slot(make_engine: Any) -> None:
    engine = make_engine(slots=1, max_queue=4)
    long_one = engine.stream(chat("go on"), SamplingParams(max_new_tokens=900, temperature=0))
    async for _delta in long_one:
        break  # the user went away
    answer = await asyncio.wait_for(engine.stream(chat("hi"), GREEDY).collect(), timeout=10)
    assert answer
    assert engine.queue_depth == 0
    assert engine.tokens_generated < 900


async def test_answering_chats_count_against_the_prefill_chunk(make_engine: Any) -> None:
    """While a prompt is computed, each chat already answering takes one of the step's
    `prefill_chunk` rows (a step's size, which sets everyone's gap between tokens, stays
    put as chats join), and prompts keep at least half of them."""
    engine = make_engine(slots=4, prefill_chunk=16)
    runner = engine._scheduler.runner
    steps: list[tuple[int, int]] = []  # (prompt rows, decode rows) of each mixed step
    forward = runner.forward

    def recording(chunks: Any, decode: Any = ()) -> Any:
        steps.append((sum(len(ids) for _, ids, _ in chunks), len(decode)))
        return forward(chunks, decode)

    runner.forward = recording
    engine.chat_format.stop_token_ids = frozenset()  # the answers run their full length
    long = SamplingParams(max_new_tokens=200, temperature=0)
    talking = [
        asyncio.create_task(engine.stream(chat(f"Tell me a story {i}."), long).collect())
        for i in range(3)
    ]
    async with asyncio.timeout(30):  # all three answering before the long prompt comes
        while len(engine._scheduler.decoding) < 3:
            await asyncio.sleep(0.005)
    late = await engine.stream(chat("Summarise: " + "the sea is wide " * 20), GREEDY).collect()
    assert late and all(await asyncio.gather(*talking))
    busy = [(prompt, decode) for prompt, decode in steps if decode == 3]
    assert len(busy) >= 2, steps  # the late prompt took more than one step
    assert all(prompt + decode <= 16 for prompt, decode in busy), steps
    assert any(prompt == 13 for prompt, _ in busy), steps  # full steps: 13 + 3 rows


async def test_the_cpu_computes_a_long_prompt_512_rows_a_step_by_default(make_engine: Any) -> None:
    """prefill_chunk = 0 (the default) is 512 rows on the CPU (768 on a GPU)."""
    engine = make_engine(slots=2)
    runner = engine._scheduler.runner
    rows: list[int] = []
    forward = runner.forward

    def recording(chunks: Any, decode: Any = ()) -> Any:
        rows.append(sum(len(ids) for _, ids, _ in chunks) + len(decode))
        return forward(chunks, decode)

    runner.forward = recording
    short = SamplingParams(max_new_tokens=2, temperature=0)
    assert await engine.stream(chat("Summarise: " + "the sea is wide " * 150), short).collect()
    assert rows[0] == 512 and len(rows) >= 2 and max(rows) == 512, rows


async def test_a_head_size_the_gpu_kernels_do_not_take_still_batches_on_the_cpu(
    tokenizer: Any,
) -> None:
    """Head size 24 (as OpenLLaMA 3B's 100, not a power of two): the CPU path is plain
    PyTorch and serves it with continuous batching, with the answers of HF's own greedy
    decoding. (On a GPU the engine serves it one request at a time: test_gpu.py.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.attention import triton_head_dim

    assert [triton_head_dim(d) for d in (8, 16, 24, 64, 100, 128)] == [
        False, True, False, True, False, True,
    ]  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    fmt = make_chat_format("template", tokenizer)
    fmt.stop_token_ids = frozenset()  # fixed lengths, as hf_greedy's
    engine = LocalEngine(model, tokenizer, fmt, context_window=512)
    try:
        assert engine._scheduler is not None
        prompt = [int(t) for t in torch.randint(100, 40000, (30,))]
        stream = engine.stream_tokens(prompt, GREEDY)
        await stream.collect()
        assert stream.completion is not None
        assert list(stream.completion.token_ids) == hf_greedy(model, prompt, 20)
    finally:
        engine.close()
