"""A scripted engine implementing the real Engine interface, for API tests that must control
timing and failures. Never used instead of the real model on a user-facing path."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from serai.engines.base import Measure, ModelInfo
from serai.errors import ContextLengthExceeded, EngineOverloaded, EngineUnavailable
from serai.types import Chunk, GenerationRequest, ToolCall, Usage


@dataclass
class FakeEngine:
    """Answers every request with `reply`, one word per chunk.

    `delay` pauses before each chunk; `fail_after` raises EngineUnavailable after that many
    chunks. With `tool_calls`, the answer ends with a chunk carrying them (finish_reason
    "tool_calls"), as an engine that honours tools ends one. A stop sequence of the request that
    is one of the reply's words cuts the reply before it. While `gate` is given and not set,
    generations pause after their first chunk (a call held in flight). `requests` records what
    was asked and `closed_early` which generations were stopped before their end.
    """

    name: str = "fake-model"
    reply: str = "The capital of Japan is Tokyo."
    context_length: int = 64
    delay: float = 0.0
    fail_after: int | None = None
    overloaded: bool = False
    gate: threading.Event | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    requests: list[GenerationRequest] = field(default_factory=list)
    closed_early: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(name=self.name, context_length=self.context_length, created=1700000000)

    def prompt_tokens(self, request: GenerationRequest) -> int:
        text = request.prompt if request.prompt is not None else " ".join(
            m.content for m in request.messages or ())
        return len(text.split())

    async def measure(self, request: GenerationRequest) -> Measure:
        prompt = self.prompt_tokens(request)
        limit = request.sampling.max_tokens
        if limit is not None and request.sampling.clamp_max_tokens:
            limit = min(limit, max(self.context_length - prompt, 1))
        if prompt + (limit or 1) > self.context_length:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens.",
                param="max_tokens")
        return Measure(prompt, limit if limit is not None else self.context_length - prompt)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if self.overloaded:
            raise EngineOverloaded("The fake engine is full.", headers={"retry-after": "1"})
        self.requests.append(request)
        measured = await self.measure(request)
        prompt = measured.prompt_tokens
        limit = None if request.sampling.max_tokens is None else measured.max_tokens
        words = [w + " " for w in self.reply.split()]
        words[-1] = words[-1].rstrip()
        finish, stop = "tool_calls" if self.tool_calls else "stop", None
        for n, word in enumerate(words):
            if word.strip() in request.sampling.stop:
                words, finish, stop = words[:n] or [""], "stop", word.strip()
                break
        if limit is not None and limit < len(words):
            words, finish, stop = words[:limit], "length", None
        done = False
        try:
            for n, word in enumerate(words, start=1):
                if self.fail_after is not None and n > self.fail_after:
                    raise EngineUnavailable("The fake engine failed on purpose.")
                # Polled: the test sets the gate from its own thread, outside this event loop.
                while n > 1 and self.gate is not None and not self.gate.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                await asyncio.sleep(self.delay)
                last = n == len(words)
                done = last  # a consumer stops reading once it sees the finish reason
                if last and finish == "tool_calls":
                    yield Chunk(word, Usage(prompt, n))
                    yield Chunk("", Usage(prompt, n), "tool_calls", tool_calls=self.tool_calls)
                    break
                yield Chunk(word, Usage(prompt, n), finish if last else None,  # type: ignore[arg-type]
                            stop_sequence=stop if last else None)
        finally:
            (self.finished if done else self.closed_early).append(request.request_id)

    async def aclose(self) -> None:
        pass
