"""Continuous batching on the real bundled model: many requests share one llama.cpp context.

These tests drive the embedded engine directly (no HTTP) and assert what users would notice:
every stream completes, a newcomer is served while others are mid-stream, an abandoned stream
frees its sequence, a full waiting line is refused, and a shared prefix is read only once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from serai.engines.llamacpp import LlamaCppEngine
from serai.errors import EngineOverloaded
from serai.types import Chunk, GenerationRequest, Message, SamplingParams

PROMPTS = ["The history of Rome", "def fibonacci(n):", "A recipe for bread:",
           "Dear Sir, I am writing", "The capital of Japan is", "1, 2, 3, 4,",
           "In a galaxy far away", "Photosynthesis is the process"]


def request(prompt: str, max_tokens: int, rid: str = "r") -> GenerationRequest:
    return GenerationRequest(rid, "m", prompt=prompt,
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0))


@pytest.fixture
async def engine(bundled_gguf: Path, request: pytest.FixtureRequest) -> AsyncIterator[LlamaCppEngine]:
    options = getattr(request, "param", {})
    built = LlamaCppEngine(bundled_gguf, name="m", context_length=1024,
                           **{"parallel": 8, "queue_size": 8, **options})
    yield built
    await built.aclose()


async def collect(chunks: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in chunks]


async def test_eight_concurrent_requests_all_complete(engine: LlamaCppEngine) -> None:
    results = await asyncio.gather(*[collect(engine.generate(request(p, 40, f"r{i}")))
                                     for i, p in enumerate(PROMPTS)])
    for chunks in results:
        assert chunks[-1].finish_reason in ("stop", "length")
        assert all(c.finish_reason is None for c in chunks[:-1])
        text = "".join(c.text for c in chunks)
        assert text.strip()
        assert 0 < chunks[-1].usage.completion_tokens <= 40


async def test_each_greedy_answer_is_the_same_alone_or_in_a_batch_of_eight(
    engine: LlamaCppEngine,
) -> None:
    async def text(i: int, prompt: str) -> str:
        chunks = await collect(engine.generate(request(prompt, 64, f"r{i}")))
        assert chunks[-1].finish_reason in ("stop", "length")
        return "".join(c.text for c in chunks)

    together = await asyncio.gather(*[text(i, p) for i, p in enumerate(PROMPTS)])
    alone = [await text(i, p) for i, p in enumerate(PROMPTS)]
    assert all(len(t) > 40 for t in together)  # long enough for a rounding difference to show
    for prompt, a, b in zip(PROMPTS, alone, together, strict=True):
        assert a == b, f"{prompt!r}: alone {a!r} batched {b!r}"


async def test_a_newcomer_gets_its_first_token_while_others_are_mid_stream(
    engine: LlamaCppEngine,
) -> None:
    events: list[str] = []

    async def long_one(i: int) -> None:
        async for chunk in engine.generate(request("1, 2, 3, 4,", 200, f"long{i}")):
            if chunk.finish_reason:
                events.append(f"long{i} done")

    async def newcomer() -> None:
        async for chunk in engine.generate(request("The capital of Japan is", 5, "new")):
            if chunk.text:
                events.append("newcomer first token")
                return

    longs = [asyncio.create_task(long_one(i)) for i in range(3)]
    await asyncio.sleep(0.5)  # the long ones are streaming by now
    await newcomer()
    await asyncio.gather(*longs)
    assert events.index("newcomer first token") < events.index("long0 done")
    assert [e for e in events if e.endswith("done")] != []


@pytest.mark.parametrize("engine", [{"parallel": 2, "queue_size": 0}], indirect=True)
async def test_abandoned_stream_frees_its_sequence_and_spares_the_others(
    engine: LlamaCppEngine,
) -> None:
    abandoned = engine.generate(request("1, 2, 3, 4,", 500, "gone"))
    other = asyncio.create_task(collect(engine.generate(request("In a galaxy far away", 60, "b"))))
    seen = 0
    async for _chunk in abandoned:
        seen += 1
        if seen == 2:
            break
    await abandoned.aclose()
    # Both sequences were taken; the abandoned one is free again, so a third request fits.
    third = await collect(engine.generate(request("The capital of Japan is", 8, "c")))
    assert third[-1].finish_reason is not None
    finished = await other
    assert finished[-1].finish_reason is not None
    assert "".join(c.text for c in finished).strip()


@pytest.mark.parametrize("engine", [{"parallel": 1, "queue_size": 1}], indirect=True)
async def test_full_waiting_line_is_refused_and_admitted_requests_complete(
    engine: LlamaCppEngine,
) -> None:
    first = engine.generate(request("1, 2, 3, 4,", 60, "a"))
    first_chunk = await anext(first)  # running
    second = asyncio.create_task(collect(engine.generate(request("The history of Rome", 20, "b"))))
    await asyncio.sleep(0.1)  # waiting
    with pytest.raises(EngineOverloaded) as refused:
        await anext(engine.generate(request("Dear Sir", 5, "c")))
    assert refused.value.status_code == 503
    assert refused.value.headers["retry-after"]
    rest = await collect(first)
    assert (rest or [first_chunk])[-1].finish_reason is not None
    assert (await second)[-1].finish_reason is not None


async def test_shared_prefix_is_reused_not_recomputed(engine: LlamaCppEngine) -> None:
    system = Message("system", "You are a helpful assistant for a national railway. " * 20)
    first = GenerationRequest("p1", "m", messages=(system, Message("user", "Hello")),
                              sampling=SamplingParams(max_tokens=4, temperature=0))
    second = GenerationRequest("p2", "m", messages=(system, Message("user", "When is the train?")),
                               sampling=SamplingParams(max_tokens=4, temperature=0))
    cold = (await collect(engine.generate(first)))[-1].usage
    warm = (await collect(engine.generate(second)))[-1].usage
    assert cold.cached_tokens == 0
    assert warm.cached_tokens > 0.8 * cold.prompt_tokens


async def test_same_seed_gives_the_same_sample(engine: LlamaCppEngine) -> None:
    sampled = GenerationRequest("s", "m", prompt="Once upon a time", sampling=SamplingParams(
        max_tokens=30, temperature=0.9, top_k=40, min_p=0.05, seed=42, repetition_penalty=1.1))
    first = "".join(c.text for c in await collect(engine.generate(sampled)))
    second = "".join(c.text for c in await collect(engine.generate(sampled)))
    assert first == second and first
