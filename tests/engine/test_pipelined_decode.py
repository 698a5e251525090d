"""Pipelined decoding: each decode step starts from the previous step's ids while they are
still on the device, before the host has read them. What a user would notice if it went
wrong: another answer than without pipelining, text after a stop, one token too many, a
seeded answer that changed, or a next turn gone wrong after its slot was reused."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.chat_format import make_chat_format
from engine.types import ChatMessage, Completion, SamplingParams
from engine.worker import LocalEngine

GREEDY = SamplingParams(max_new_tokens=30, temperature=0)
SEEDED = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, top_k=40, seed=5)


def varied_llama(tokenizer: Any, device: str = "cpu") -> Any:
    """A tiny random LLaMA with larger weights than the shared one, so its greedy replies
    change from token to token (the shared one repeats one token) and a stop can fall
    mid-reply."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.3,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(device).eval()


class Engines:
    """Makes engines over one model, pipelined or not (None: the device's default);
    closes them at the end."""

    def __init__(self, model: Any, tokenizer: Any, chat_format: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.made: list[LocalEngine] = []

    def make(
        self,
        pipelined: bool | None,
        *,
        stop_ids: Sequence[int] | None = None,
        slots: int = 1,
        slot_tokens: int = 0,
        prefill_chunk: int = 0,
    ) -> LocalEngine:
        fmt = make_chat_format(self.chat_format, self.tokenizer)
        if stop_ids is not None:
            fmt.stop_token_ids = frozenset(stop_ids)
        engine = LocalEngine(
            self.model,
            self.tokenizer,
            fmt,
            context_window=1024,
            slots=slots,
            slot_tokens=slot_tokens,
            prefill_chunk=prefill_chunk,
            max_queue=16,
        )
        assert engine._scheduler is not None
        if pipelined is not None:  # before any request, while the worker waits for one
            engine._scheduler.pipelined = pipelined
        self.made.append(engine)
        return engine

    def close(self) -> None:
        for engine in self.made:
            engine.close()


@pytest.fixture(scope="module")
def varied_model(tokenizer: Any) -> Any:
    return varied_llama(tokenizer)


@pytest.fixture
def engines(varied_model: Any, tokenizer: Any) -> Iterator[Engines]:
    made = Engines(varied_model, tokenizer, "template")
    yield made
    made.close()


def chat(text: str) -> list[ChatMessage]:
    return [ChatMessage("system", "Be brief."), ChatMessage("user", text)]


async def answer(
    engine: LocalEngine, messages: list[ChatMessage], params: SamplingParams
) -> tuple[str, Completion]:
    """The text as streamed (deltas merge when the consumer is slow, so joined) and the
    completion without its timings."""
    stream = engine.stream(messages, params)
    streamed = "".join([d async for d in stream])
    assert stream.completion is not None
    return streamed, replace(stream.completion, ttft_s=0.0, total_s=0.0)


def first_new_token(ids: Sequence[int], start: int) -> int:
    """Index of the first token at or after `start` that has not appeared before it."""
    return next(k for k in range(start, len(ids)) if ids[k] not in ids[:k])


async def ended(stream: Any) -> Completion | None:
    """The stream's completion once the engine has ended it (a few seconds at most)."""
    for _ in range(500):
        if stream.completion is not None:
            break
        await asyncio.sleep(0.01)
    return stream.completion


def recorded(engine: LocalEngine) -> list[list[int]]:
    """What each slot says its KV holds (what prefix reuse trusts)."""
    assert engine._scheduler is not None
    return [list(slot.tokens) for slot in engine._scheduler.slots]


QUESTIONS = ["Tell me about the sea.", "hi", "Question 3: why why?"]


async def test_greedy_answers_are_the_same_pipelined_or_not(engines: Engines) -> None:
    sync, piped = engines.make(False), engines.make(True)
    for question in QUESTIONS:
        plain = await answer(sync, chat(question), GREEDY)
        ours = await answer(piped, chat(question), GREEDY)
        assert ours == plain
        assert ours[1].finish_reason == "length" and ours[1].completion_tokens == 30
        assert recorded(piped) == recorded(sync)
    assert piped._scheduler.overlapped_steps > 20 * len(QUESTIONS)
    assert sync._scheduler.overlapped_steps == 0
    # Nothing past the budget was ever run, counted or recorded.
    assert piped.tokens_generated == sync.tokens_generated == 30 * len(QUESTIONS)


async def test_a_stop_token_mid_reply_ends_it_exactly_there(engines: Engines) -> None:
    _, full = await answer(engines.make(False), chat(QUESTIONS[0]), GREEDY)
    k = first_new_token(full.token_ids, 8)
    stop = full.token_ids[k]
    sync = engines.make(False, stop_ids=[stop])
    piped = engines.make(True, stop_ids=[stop])
    plain = await answer(sync, chat(QUESTIONS[0]), GREEDY)
    streamed, done = await answer(piped, chat(QUESTIONS[0]), GREEDY)
    assert (streamed, done) == plain
    assert done.finish_reason == "stop"
    assert done.token_ids == full.token_ids[:k]
    assert piped.tokens_generated == k
    # The step already launched past the stop token wrote its KV, but the slot's record
    # ends before it: the stop token is not part of what a next turn may reuse.
    prompt = piped.chat_format.encode(chat(QUESTIONS[0]))
    assert recorded(piped) == recorded(sync) == [prompt + list(full.token_ids[:k])]


async def test_a_stop_string_ends_the_reply_with_nothing_after_it(engines: Engines) -> None:
    _, full = await answer(engines.make(False), chat(QUESTIONS[2]), GREEDY)
    cut = len(full.text) // 2
    stop = full.text[cut : cut + 4]
    assert full.text.find(stop) == cut and stop.strip()
    params = replace(GREEDY, stop=(stop,))
    sync, piped = engines.make(False), engines.make(True)
    plain = await answer(sync, chat(QUESTIONS[2]), params)
    streamed, done = await answer(piped, chat(QUESTIONS[2]), params)
    assert streamed == done.text == full.text[:cut]
    assert (streamed, done) == plain
    assert done.finish_reason == "stop" and done.completion_tokens < 30
    assert piped.tokens_generated == sync.tokens_generated == done.completion_tokens
    assert recorded(piped) == recorded(sync)


async def test_a_reply_that_fills_its_slot_ends_the_same(engines: Engines) -> None:
    params = replace(GREEDY, max_new_tokens=500)
    sync, piped = engines.make(False, slot_tokens=48), engines.make(True, slot_tokens=48)
    plain = await answer(sync, chat(QUESTIONS[0]), params)
    ours = await answer(piped, chat(QUESTIONS[0]), params)
    assert ours == plain
    assert ours[1].finish_reason == "length"
    assert ours[1].prompt_tokens + ours[1].completion_tokens == 48
    assert recorded(piped) == recorded(sync)


async def test_cancelling_mid_reply_frees_the_slot_and_the_next_answer_is_right(
    engines: Engines,
) -> None:
    engine = engines.make(True)
    long_one = engine.stream(chat("go on"), replace(GREEDY, max_new_tokens=900))
    async for delta in long_one:
        if delta:
            break  # the user went away
    done = await ended(long_one)
    assert done is not None and done.finish_reason == "cancelled"
    assert done.completion_tokens < 900
    # The slot records the prompt and the reply up to the last token whose KV was written.
    prompt = engine.chat_format.encode(chat("go on"))
    assert recorded(engine) == [prompt + list(done.token_ids[:-1])]
    after = await asyncio.wait_for(answer(engine, chat("hi"), GREEDY), timeout=30)
    assert after == await answer(engines.make(False), chat("hi"), GREEDY)
    assert engine.queue_depth == 0


async def test_seeded_sampling_is_reproducible_and_unchanged(engines: Engines) -> None:
    sync, piped = engines.make(False), engines.make(True)
    plain = await answer(sync, chat(QUESTIONS[1]), SEEDED)
    first = await answer(piped, chat(QUESTIONS[1]), SEEDED)
    again = await answer(piped, chat(QUESTIONS[1]), SEEDED)
    assert first == again == plain
    assert len(set(first[1].token_ids)) > 10


async def test_repetition_penalty_counts_the_token_still_in_flight(
    tiny_model: Any, tokenizer: Any
) -> None:
    # The shared tiny model repeats one token; a strong penalty makes it move on each
    # step, so a penalty blind to the last token (not yet read) would stutter.
    made = Engines(tiny_model, tokenizer, "template")
    params = replace(GREEDY, max_new_tokens=20, repetition_penalty=5.0)
    try:
        plain = await answer(made.make(False), chat("hi"), params)
        ours = await answer(made.make(True), chat("hi"), params)
    finally:
        made.close()
    assert ours == plain
    assert len(set(ours[1].token_ids)) == 20


# Every sampling feature, sequences ending at different steps, more chats than slots.
MIXED = [
    (QUESTIONS[0], GREEDY),
    (QUESTIONS[1], replace(SEEDED, max_new_tokens=7)),
    (QUESTIONS[2], replace(GREEDY, repetition_penalty=1.3, max_new_tokens=25)),
    ("Name a colour.", replace(SEEDED, seed=11, repetition_penalty=1.2)),
    ("And a number?", replace(SEEDED, seed=2, top_p=1.0, top_k=0, max_new_tokens=12)),
    ("Why?", replace(GREEDY, max_new_tokens=3)),
]


async def compare_crowd(engines: Engines, stop_ids: Sequence[int] | None) -> None:
    """Each chat alone without pipelining, then all together pipelined: same answers."""
    alone_engine = engines.make(False, stop_ids=stop_ids)
    alone = [await answer(alone_engine, chat(q), p) for q, p in MIXED]
    crowd = engines.make(True, stop_ids=stop_ids, slots=3)
    together = await asyncio.gather(*(answer(crowd, chat(q), p) for q, p in MIXED))
    assert list(together) == alone
    assert crowd.tokens_generated == sum(c.completion_tokens for _, c in alone)
    assert crowd._scheduler.overlapped_steps > 0


async def test_a_crowd_pipelined_answers_as_each_chat_alone(engines: Engines) -> None:
    await compare_crowd(engines, None)


async def test_a_crowd_with_stop_tokens_mid_reply(engines: Engines) -> None:
    _, full = await answer(engines.make(False), chat(QUESTIONS[0]), GREEDY)
    await compare_crowd(engines, [full.token_ids[first_new_token(full.token_ids, 5)]])


async def test_a_reply_that_ends_at_its_first_token_is_not_held_back(engines: Engines) -> None:
    """Its only token comes from the prompt's step, and no step follows it to stream it
    behind: it must still arrive, as without pipelining."""
    one = replace(GREEDY, max_new_tokens=1)
    plain = await answer(engines.make(False), chat(QUESTIONS[1]), one)
    ours = await asyncio.wait_for(answer(engines.make(True), chat(QUESTIONS[1]), one), 30)
    assert ours == plain and ours[1].completion_tokens == 1


async def test_a_crowd_with_stop_strings_found_after_the_next_step_was_queued(
    engines: Engines,
) -> None:
    """A stop string is seen only once a token is detokenized, which for a token of a
    mixed step (every first token, and every token while others' prompts are computed)
    happens after the next step was queued: nothing past the stop is streamed, counted
    or recorded, as without pipelining."""
    base = engines.make(False)
    _, full = await answer(base, chat(QUESTIONS[2]), GREEDY)
    _, opening = await answer(base, chat("Name a colour."), replace(GREEDY, max_new_tokens=1))
    middle = full.text[len(full.text) // 2 :][:3]
    stops = tuple(t for t in (middle, opening.text.strip()[:2]) if t.strip())
    assert stops
    crowd_params = [(q, replace(p, stop=stops)) for q, p in MIXED]
    alone_engine = engines.make(False)
    alone = [await answer(alone_engine, chat(q), p) for q, p in crowd_params]
    crowd = engines.make(True, slots=3)
    together = await asyncio.gather(*(answer(crowd, chat(q), p) for q, p in crowd_params))
    assert list(together) == alone
    assert sum(c.finish_reason == "stop" for _, c in alone) >= 2
    assert crowd.tokens_generated == sum(c.completion_tokens for _, c in alone)


LONG = "Read this: " + "the sea is wide and " * 12


async def test_stop_strings_met_while_prompts_are_still_computed(
    engines: Engines,
) -> None:
    """Long prompts in 16-row steps keep mixed steps going while the first chats answer,
    so stop strings fall on tokens streamed only after the next mixed step was queued:
    the same answers, counts and slot records as each chat alone."""
    base = engines.make(False)
    _, full = await answer(base, chat(LONG + QUESTIONS[2]), GREEDY)
    stops = (full.text[len(full.text) // 3 :][:3],)
    crowd_params = [(LONG + q, replace(p, stop=stops)) for q, p in MIXED]
    alone_engine = engines.make(False)
    alone, records = [], {}
    for q, p in crowd_params:
        alone.append(await answer(alone_engine, chat(q), p))
        records[q] = recorded(alone_engine)[0]
    crowd = engines.make(True, slots=3, prefill_chunk=16)
    scheduler = crowd._scheduler
    assert scheduler is not None
    finished, finish = [], scheduler._finish

    def noting(seq: Any, reason: Any) -> bool:
        finished.append((reason, bool(scheduler.prefilling)))
        return finish(seq, reason)

    scheduler._finish = noting  # type: ignore[method-assign]
    together = await asyncio.gather(*(answer(crowd, chat(q), p) for q, p in crowd_params))
    assert list(together) == alone
    assert crowd.tokens_generated == sum(c.completion_tokens for _, c in alone)
    assert ("stop", True) in finished, finished  # a stop met while prompts still waited
    for record in recorded(crowd):  # each slot: the last chat it served, as alone
        owner = [q for q, _ in crowd_params if record[: len(crowd.chat_format.encode(chat(q)))]
                 == crowd.chat_format.encode(chat(q))]  # fmt: skip
        assert len(owner) == 1 and record == records[owner[0]]


async def test_cancelling_while_prompts_are_computed_ends_the_reply_once(
    engines: Engines,
) -> None:
    engine = engines.make(True, slots=2, prefill_chunk=16)
    talking = engine.stream(chat("go on"), replace(GREEDY, max_new_tokens=900))
    async for delta in talking:
        if delta:
            break
    # A long prompt keeps the steps mixed (its 16-row pieces) while the first is cancelled.
    waiting = asyncio.create_task(answer(engine, chat(LONG * 3 + "hi"), GREEDY))
    await asyncio.sleep(0)
    talking.cancel()
    done = await ended(talking)
    assert done is not None and done.finish_reason == "cancelled"
    later = await asyncio.wait_for(waiting, timeout=30)
    assert later == await answer(engines.make(False), chat(LONG * 3 + "hi"), GREEDY)
    prompt = engine.chat_format.encode(chat("go on"))
    records = recorded(engine)
    assert prompt + list(done.token_ids[:-1]) in records or prompt + list(done.token_ids) in records


async def test_next_turn_after_a_pipelined_reply_reuses_the_slot_correctly(
    engines: Engines,
) -> None:
    _, full = await answer(engines.make(False), chat(QUESTIONS[0]), GREEDY)
    stop = [full.token_ids[first_new_token(full.token_ids, 8)]]
    engine = engines.make(True, stop_ids=stop)
    first_turn = chat(QUESTIONS[0])
    _, reply = await answer(engine, first_turn, GREEDY)
    assert reply.finish_reason == "stop"
    before = engine._scheduler.prefill_tokens
    second_turn = first_turn + [ChatMessage("assistant", reply.text), ChatMessage("user", "More!")]
    second = await answer(engine, second_turn, GREEDY)
    computed = engine._scheduler.prefill_tokens - before
    new = len(engine.chat_format.encode(second_turn)) - len(engine.chat_format.encode(first_turn))
    assert computed <= new  # the first turn's prompt came from the slot
    fresh = engines.make(False, stop_ids=stop)
    assert second == await answer(fresh, second_turn, GREEDY)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pipelined_cuda_graphs_answer_as_the_synchronous_path() -> None:
    # Synchronous, with its own loop: the GPU machine has no pytest-asyncio.
    from transformers import AutoTokenizer

    folder = os.environ.get("LORABOT_TEST_TOKENIZER")
    if not folder:
        pytest.skip("set LORABOT_TEST_TOKENIZER to a tokenizer folder")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = Engines(varied_llama(tokenizer, "cuda"), tokenizer, "alpaca")

    async def run() -> None:
        default = gpu.make(None)._scheduler
        assert default.pipelined and default.graphs is not None
        await compare_crowd(gpu, None)
        _, full = await answer(gpu.make(False), chat(QUESTIONS[0]), GREEDY)
        await compare_crowd(gpu, [full.token_ids[first_new_token(full.token_ids, 5)]])

    try:
        asyncio.run(run())
    finally:
        gpu.close()
