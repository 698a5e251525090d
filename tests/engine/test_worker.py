"""The generation worker, with a tiny random LLaMA and a scripted model."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

from engine.types import ChatMessage, EngineBusy, EngineError, EngineStalled, SamplingParams

ASK = [ChatMessage("user", "Hello there")]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)


async def test_stream_arrives_in_pieces_and_matches_completion(tiny_engine: Any) -> None:
    stream = tiny_engine.stream(ASK, GREEDY)
    deltas = [d async for d in stream]
    assert len(deltas) > 1
    assert stream.completion is not None
    assert "".join(deltas) == stream.completion.text
    assert stream.completion.completion_tokens == len(stream.completion.token_ids) > 0
    assert stream.completion.prompt_tokens == tiny_engine.count_tokens(ASK)


async def test_greedy_tokens_match_hf_generate(tiny_engine: Any, tiny_model: Any) -> None:
    stream = tiny_engine.stream(ASK, GREEDY)
    await stream.collect()
    assert stream.completion is not None
    prompt = torch.tensor([tiny_engine.chat_format.encode(ASK)])
    with torch.inference_mode():
        reference = tiny_model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=len(stream.completion.token_ids),
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert list(stream.completion.token_ids) == reference[0, prompt.shape[1] :].tolist()


async def test_same_seed_same_text_and_top_k_1_is_greedy(tiny_engine: Any) -> None:
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    first = await tiny_engine.stream(ASK, sampled).collect()
    again = await tiny_engine.stream(ASK, sampled).collect()
    assert first == again
    greedy = await tiny_engine.stream(
        ASK, SamplingParams(max_new_tokens=16, temperature=0)
    ).collect()
    top1 = await tiny_engine.stream(
        ASK, SamplingParams(max_new_tokens=16, temperature=1.0, top_k=1, seed=3)
    ).collect()
    assert top1 == greedy


async def test_stops_at_end_of_turn_token(scripted_engine: Any) -> None:
    engine, _model = scripted_engine("Short answer.")
    stream = engine.stream(ASK, SamplingParams(max_new_tokens=100, temperature=0))
    assert await stream.collect() == "Short answer."
    assert stream.completion.finish_reason == "stop"


async def test_stop_string_is_never_shown(scripted_engine: Any) -> None:
    engine, _model = scripted_engine("Hello world. User: next question")
    stream = engine.stream(ASK, SamplingParams(max_new_tokens=50, temperature=0, stop=("User:",)))
    deltas = [d async for d in stream]
    assert "".join(deltas) == "Hello world. "
    assert not any("User" in d for d in deltas)
    assert stream.completion.finish_reason == "stop"


@pytest.mark.parametrize(
    "text", ["你好，世界！今天天气很好。", "ok 🙂👍🏽 👨‍👩‍👧 done", "مرحبا بالعالم"]
)
async def test_multibyte_text_never_streams_replacement_chars(
    scripted_engine: Any, text: str
) -> None:
    engine, _model = scripted_engine(text)
    deltas = [
        d async for d in engine.stream(ASK, SamplingParams(max_new_tokens=200, temperature=0))
    ]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


async def test_queue_full_is_immediate_error(scripted_engine: Any) -> None:
    engine, model = scripted_engine("x " * 50, max_queue=1)
    model.gate.clear()  # hold the worker inside the first request
    first = engine.stream(ASK, GREEDY)
    for _ in range(100):  # wait until the worker has taken it off the queue
        if engine.queue_depth == 1 and engine._queue.qsize() == 0:
            break
        await asyncio.sleep(0.01)
    second = engine.stream(ASK, GREEDY)  # waits in the queue
    started = time.perf_counter()
    with pytest.raises(EngineBusy):
        engine.stream(ASK, GREEDY)
    assert time.perf_counter() - started < 0.1
    model.gate.set()
    assert await first.collect()
    assert await second.collect()


async def test_cancel_stops_generation_in_the_worker(scripted_engine: Any) -> None:
    engine, model = scripted_engine("word " * 400, delay_s=0.005)
    stream = engine.stream(ASK, SamplingParams(max_new_tokens=400, temperature=0))
    async for _delta in stream:
        break  # the consumer leaves: the request must be aborted
    await asyncio.sleep(0.2)
    steps = model.steps
    await asyncio.sleep(0.2)
    assert model.steps == steps, "worker kept generating after cancellation"
    assert steps < 200
    # The worker is free for the next request.
    assert await engine.stream(ASK, SamplingParams(max_new_tokens=3, temperature=0)).collect()


async def test_cancel_of_a_queued_request_never_runs_it(scripted_engine: Any) -> None:
    engine, model = scripted_engine("abc", max_queue=4)
    model.gate.clear()
    running = engine.stream(ASK, GREEDY)
    queued = engine.stream(ASK, GREEDY)
    queued.cancel()
    model.gate.set()
    await running.collect()
    steps = model.steps
    done = await engine.stream(ASK, GREEDY).collect()
    assert done == "abc"
    assert model.steps == steps + len(engine.tokenizer("abc")["input_ids"]) + 1


async def test_model_failure_reaches_the_caller(scripted_engine: Any) -> None:
    engine, _model = scripted_engine("never", fail_at=0)
    with pytest.raises(EngineError, match="generation failed"):
        await engine.stream(ASK, GREEDY).collect()


async def test_stalled_engine_is_an_error(scripted_engine: Any) -> None:
    engine, model = scripted_engine("late", stall_timeout_s=0.3)
    model.gate.clear()
    with pytest.raises(EngineStalled):
        await engine.stream(ASK, GREEDY).collect()
    model.gate.set()


async def test_event_loop_stays_responsive_while_generating(scripted_engine: Any) -> None:
    engine, _model = scripted_engine("tick " * 40, delay_s=0.01)
    stream = engine.stream(ASK, SamplingParams(max_new_tokens=80, temperature=0))
    gaps = []

    async def heartbeat() -> None:
        last = time.perf_counter()
        for _ in range(20):
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    await asyncio.gather(stream.collect(), heartbeat())
    assert max(gaps) < 0.1
