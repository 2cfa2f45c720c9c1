"""The Engine seam: one async generator from a neutral request to neutral chunks.

An engine knows nothing of wire protocols, keys or prices. Errors it raises before its first
chunk (a prompt longer than the context, say) are domain errors from serai.errors, which the API
turns into 4xx responses; once chunks flow, the consumer owns the outcome. Closing the generator
early (a client that went away) must stop the generation.

A request may carry tools, a tool_choice and a response_format. An engine either honours them
(the embedded engine constrains its decoding with a grammar; an upstream passes them on) or
refuses the request with InvalidRequest before its first chunk; it never ignores them.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from serai.types import Chunk, GenerationRequest


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What an engine tells the world about the model it serves."""

    name: str
    context_length: int
    created: int
    owned_by: str = "serai"


@dataclass(frozen=True, slots=True)
class Measure:
    """A request's size before it runs: what admission reserves against the limits."""

    prompt_tokens: int
    max_tokens: int  # the completion's limit: asked for, or what the context leaves


@runtime_checkable
class Engine(Protocol):
    @property
    def model(self) -> ModelInfo: ...

    async def measure(self, request: GenerationRequest) -> Measure:
        """Count the prompt and settle max_tokens; raises ContextLengthExceeded (and other
        InvalidRequest errors) for a request that cannot run."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Stream the completion of `request`; the last chunk carries a finish_reason. An async
        generator, so the caller can close it (aclose) to stop the model at once."""
        ...

    async def aclose(self) -> None:
        """Stop accepting work and release the model."""
        ...


@runtime_checkable
class Probed(Protocol):
    """An engine whose server can be asked, cheaply, whether it is up (an upstream). Engines of
    this process are healthy while loaded and need not implement it."""

    async def probe(self) -> None:
        """Return if the server answers; raise EngineUnavailable (a message with no secret in
        it) if it does not."""
        ...


@dataclass(frozen=True, slots=True)
class EngineStats:
    """What an engine of this process knows about its load, for the metrics."""

    waiting: int  # requests admitted, waiting for a free sequence
    running: int  # sequences being decoded
    kv_cache_usage: float  # share of the KV cache holding tokens, 0 to 1


@runtime_checkable
class Reporting(Protocol):
    """An engine that can tell its load (the embedded one). Upstream engines do not: what they
    hold is the deployment's outstanding count, which the router keeps."""

    def stats(self) -> EngineStats:
        """A cheap, current reading; called from the event loop at each metrics scrape."""
        ...
