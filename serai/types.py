"""Neutral request and result types shared by the wire protocols and the engines.

The API layer parses OpenAI and Anthropic requests into these; engines only ever see these.
Tools, tool calls and structured output are neutral too: each wire protocol maps its own shapes
onto them, so one engine and one ledger serve both and a request costs the same on either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
# "tool_calls": the answer is a call of one of the request's tools (Anthropic's "tool_use").
FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call of a tool by the model. `arguments` is JSON text of an object, as generated."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Message:
    """One turn. An assistant turn may carry tool calls (its content may then be empty); a
    `tool` turn is the result of the call whose id is `tool_call_id`."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; `parameters` is the JSON Schema of its arguments object."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """auto: the model decides; none: never call; required: call one of the tools; tool: call
    the tool named `name`."""

    mode: Literal["auto", "none", "required", "tool"] = "auto"
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Structured output: any JSON object (`json_object`) or one matching `schema`."""

    type: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0  # 1: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # max_tokens is a ceiling, not a demand: a request whose max_tokens exceeds what the context
    # leaves after the prompt gets the room instead of a ContextLengthExceeded. Anthropic's
    # clients send one large max_tokens whatever the model (Anthropic's API caps it per model).
    clamp_max_tokens: bool = False


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A chat (`messages`) or a plain completion (`prompt`): exactly one of the two is set."""

    request_id: str
    model: str
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerationRequest has either messages or a prompt")


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused, not recomputed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of generated text.

    `usage` is cumulative: the tokens generated up to and including this chunk, so whoever stops
    reading early still knows what was delivered. The last chunk of a generation carries a
    `finish_reason` (its text may be empty).

    `tool_calls` holds the calls completed with this chunk; the chunk that ends an answer which
    calls tools has finish_reason "tool_calls". `stop_sequence` is the stop string that ended
    the answer (finish_reason "stop"), whether the request's own or the prompt format's.
    """

    text: str
    usage: Usage
    finish_reason: FinishReason | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    stop_sequence: str | None = None
