"""The Anthropic surface: POST /v1/messages and /v1/messages/count_tokens.

Requests are parsed into the same neutral GenerationRequests as OpenAI's, run through the same
gateway (auth, admission, engine, ledger), and rendered as Anthropic's Messages API renders
them, so the official anthropic SDK and Claude Code work unchanged. Protocol models accept
unknown fields; what would change the answer and is not implemented (images, server tools) is
refused with a 400. Errors on these paths use Anthropic's envelope (serai.api.errors).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from serai.api.bounds import INT32_MAX, TokenCount
from serai.api.deps import KeyDep, ServicesDep
from serai.api.errors import (
    AnthropicError,
    anthropic_error_body,
    anthropic_status,
    documented_errors,
    json_response,
)
from serai.api.idempotency import IdempotencyDep
from serai.api.serving import Answer, serve
from serai.api.sse import STREAMS, sse_event
from serai.errors import InvalidRequest, SeraiError
from serai.gateway import Run
from serai.types import (
    Chunk,
    GenerationRequest,
    Message,
    ResponseFormat,
    SamplingParams,
    Tool,
    ToolCall,
    ToolChoice,
    Usage,
)

router = APIRouter(tags=["Anthropic"], responses=documented_errors(AnthropicError))
log = logging.getLogger("serai.api.anthropic")

MAX_STOP_SEQUENCES = 32
# Text that may begin a stop is held back from the stream, and each stop is compiled for the
# request: no sensible stop needs more.
MAX_STOP_CHARS = 256
TEXT_ONLY = ("This model reads text only: '{kind}' content blocks are not supported. Send the "
             "content as text blocks.")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentBlock(_Lenient):
    """Any content block; which fields matter depends on `type` (checked when mapped)."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[ContentBlock] | None = None
    is_error: bool | None = None


class InputMessage(_Lenient):
    # Not in Anthropic's documented API, but Claude Code sends its environment as a system
    # message after the first user turn; it is read as part of the system prompt.
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class ToolDefinition(_Lenient):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom", or a server tool such as web_search_20250305


class ToolChoiceParam(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(_Lenient):
    type: Literal["json_schema"]
    schema_: Annotated[dict[str, Any], Field(alias="schema")]


class OutputConfig(_Lenient):
    format: OutputFormat | None = None  # structured output; `effort` is accepted and ignored


class _Conversation(_Lenient):
    model: str
    messages: Annotated[list[InputMessage], Field(min_length=1)]
    system: str | list[ContentBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoiceParam | None = None
    # Accepted and ignored: Serai's models do not think aloud, whether it is enabled or not.
    thinking: dict[str, Any] | None = None
    output_config: OutputConfig | None = None

    def generation(self, request_id: str, sampling: SamplingParams) -> GenerationRequest:
        if (self.model_extra or {}).get("mcp_servers"):
            raise InvalidRequest("MCP servers (mcp_servers) are not supported by this server.")
        tools = _neutral_tools(self.tools or [])
        output = self.output_config.format if self.output_config else None
        return GenerationRequest(
            request_id=request_id, model=self.model,
            messages=_neutral_messages(self.system, self.messages), sampling=sampling,
            tools=tools, tool_choice=_neutral_tool_choice(self.tool_choice, tools),
            response_format=None if output is None else ResponseFormat("json_schema",
                                                                       output.schema_))


class MessagesRequest(_Conversation):
    max_tokens: TokenCount
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    stream: bool | None = False

    @property
    def stops(self) -> tuple[str, ...]:
        stops = tuple(s for s in self.stop_sequences or () if s)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(f"stop_sequences: at most {MAX_STOP_SEQUENCES} are accepted.")
        for i, stop in enumerate(self.stop_sequences or ()):
            if len(stop) > MAX_STOP_CHARS:
                raise InvalidRequest(f"stop_sequences.{i}: a stop sequence may be at most "
                                     f"{MAX_STOP_CHARS} characters long.")
        return stops

    def to_generation(self, request_id: str) -> GenerationRequest:
        # max_tokens is clamped to what the context leaves: Anthropic's clients send one large
        # value whatever the model, and Anthropic's API caps it per model as well.
        sampling = SamplingParams(
            max_tokens=self.max_tokens, clamp_max_tokens=True,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            stop=self.stops)
        return self.generation(request_id, sampling)


class CountTokensRequest(_Conversation):
    def to_generation(self, request_id: str) -> GenerationRequest:
        return self.generation(request_id, SamplingParams(clamp_max_tokens=True))


# --- mapping onto neutral types ---------------------------------------------------------------

def _text_of(blocks: str | list[ContentBlock], where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    texts = []
    for j, block in enumerate(blocks):
        if block.type in ("image", "document"):
            raise InvalidRequest(f"{where}.{j}: " + TEXT_ONLY.format(kind=block.type))
        if block.type != "text" or block.text is None:
            raise InvalidRequest(f"{where}.{j}: expected a text block, got '{block.type}'.")
        texts.append(block.text)
    return "\n".join(texts)


def _neutral_messages(system: str | list[ContentBlock] | None,
                      messages: list[InputMessage]) -> tuple[Message, ...]:
    out: list[Message] = []
    if system:
        out.append(Message(role="system", content=_text_of(system, "system")))
    for i, message in enumerate(messages):
        if isinstance(message.content, str):
            out.append(Message(role=message.role, content=message.content))
            continue
        texts: list[str] = []
        calls: list[ToolCall] = []
        for j, block in enumerate(message.content):
            where = f"messages.{i}.content.{j}"
            if block.type == "text":
                if block.text is None:
                    raise InvalidRequest(f"{where}.text: a text block needs its text.")
                texts.append(block.text)
            elif block.type in ("thinking", "redacted_thinking") and message.role == "assistant":
                continue  # earlier turns' thinking: Serai's models neither make nor read it
            elif block.type == "tool_use" and message.role == "assistant":
                if not block.id or not block.name:
                    raise InvalidRequest(f"{where}: a tool_use block needs an id and a name.")
                calls.append(ToolCall(id=block.id, name=block.name,
                                      arguments=json.dumps(block.input or {})))
            elif block.type == "tool_result" and message.role == "user":
                if not block.tool_use_id:
                    raise InvalidRequest(f"{where}.tool_use_id: a tool_result block needs the id "
                                         "of the tool_use it answers.")
                if texts:  # text before a result stays before it
                    out.append(Message(role="user", content="\n".join(texts)))
                    texts = []
                result = _text_of(block.content or "", f"{where}.content")
                if block.is_error:
                    result = f"Error: {result}"
                out.append(Message(role="tool", content=result, tool_call_id=block.tool_use_id))
            elif block.type in ("image", "document"):
                raise InvalidRequest(f"{where}: " + TEXT_ONLY.format(kind=block.type))
            else:
                raise InvalidRequest(f"{where}: content blocks of type '{block.type}' are not "
                                     f"supported in {message.role} messages by this server.")
        if texts or calls:
            out.append(Message(role=message.role, content="\n".join(texts),
                               tool_calls=tuple(calls)))
    return tuple(out)


def _neutral_tools(tools: list[ToolDefinition]) -> tuple[Tool, ...]:
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        if tool.type not in (None, "custom"):
            raise InvalidRequest(
                f"tools.{i}: '{tool.type}' is a tool Anthropic runs on its own servers; this "
                "server does not. Send client tools: a name, a description and an input_schema.")
        if tool.input_schema is None:
            raise InvalidRequest(f"tools.{i}.input_schema: Field required.")
        if any(t.name == tool.name for t in out):
            raise InvalidRequest(f"tools.{i}.name: two tools are named '{tool.name}'; tool names "
                                 "must be unique.")
        out.append(Tool(name=tool.name, description=tool.description or "",
                        parameters=tool.input_schema))
    return tuple(out)


def _neutral_tool_choice(choice: ToolChoiceParam | None, tools: tuple[Tool, ...]) -> ToolChoice:
    if choice is None or choice.type == "auto":
        return ToolChoice("auto")
    if choice.type == "none":
        return ToolChoice("none")
    if not tools:
        raise InvalidRequest(f"tool_choice.type '{choice.type}' needs tools.")
    if choice.type == "any":
        return ToolChoice("required")
    if not choice.name or choice.name not in {t.name for t in tools}:
        raise InvalidRequest("tool_choice.name must name one of the request's tools.")
    return ToolChoice("tool", choice.name)


# --- rendering --------------------------------------------------------------------------------

def _usage(usage: Usage) -> dict[str, int]:
    # Anthropic's input_tokens are the prompt tokens that were not read from the cache: a client
    # adds input, cache read and cache creation tokens to know the prompt's size.
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens,
            "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens,
            "cache_creation_input_tokens": 0}


def _tool_input(call: ToolCall) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments)
        kind = f"a JSON {type(value).__name__}"
    except ValueError:
        value, kind = None, "not JSON"
    if not isinstance(value, dict):
        # The arguments are model output: only their size and kind may reach the log.
        log.warning("tool call %s has arguments that are not a JSON object (%d characters, %s)",
                    call.id, len(call.arguments), kind)
        return {}
    return value


def _tool_use(call: ToolCall, input: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": input}


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return sse_event({"type": kind, **payload}, event=kind)


@dataclass(frozen=True, slots=True)
class MessageRenderer:
    """How /v1/messages answers a run (serai.api.serving.Renderer): Anthropic's stream of
    events, or one message."""

    id: str
    model: str  # the name the client asked for, an alias included
    stops: tuple[str, ...]

    @classmethod
    def of(cls, generation: GenerationRequest) -> MessageRenderer:
        return cls(id="msg_" + generation.request_id.removeprefix("req_"),
                   model=generation.model, stops=generation.sampling.stop)

    def stop_reason(self, last: Chunk | None) -> tuple[str | None, str | None]:
        """(stop_reason, stop_sequence). Only the request's own stop sequences are a
        stop_sequence; the prompt format's (the next turn beginning) end the turn."""
        if last is None:
            return None, None
        if last.finish_reason == "length":
            return "max_tokens", None
        if last.finish_reason == "tool_calls":
            return "tool_use", None
        if last.stop_sequence is not None and last.stop_sequence in self.stops:
            return "stop_sequence", last.stop_sequence
        return "end_turn", None

    def message(self, content: list[dict[str, Any]], last: Chunk | None,
                usage: Usage) -> dict[str, Any]:
        stop_reason, stop_sequence = self.stop_reason(last)
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": _usage(usage)}

    async def stream(self, run: Run) -> AsyncIterator[bytes]:
        """Anthropic's stream: message_start, then per content block content_block_start, its
        deltas and content_block_stop (a ping after the first start), message_delta,
        message_stop."""
        yield _event("message_start", {"message": self.message(
            [], None, Usage(run.usage.prompt_tokens, 0, run.usage.cached_tokens))})
        index, text_open, pinged = -1, False, False
        last: Chunk | None = None

        def start(block: dict[str, Any]) -> list[bytes]:
            nonlocal index, pinged
            index += 1
            events = [_event("content_block_start", {"index": index, "content_block": block})]
            if not pinged:
                pinged = True
                events.append(_event("ping", {}))
            return events

        try:
            async for chunk in run:
                if chunk.text:
                    if not text_open:
                        text_open = True
                        for event in start({"type": "text", "text": ""}):
                            yield event
                    yield _event("content_block_delta", {
                        "index": index, "delta": {"type": "text_delta", "text": chunk.text}})
                for call in chunk.tool_calls:
                    if text_open:
                        text_open = False
                        yield _event("content_block_stop", {"index": index})
                    for event in start(_tool_use(call, {})):
                        yield event
                    yield _event("content_block_delta", {"index": index, "delta": {
                        "type": "input_json_delta", "partial_json": json.dumps(_tool_input(call))}})
                    yield _event("content_block_stop", {"index": index})
                if chunk.finish_reason is not None:
                    last = chunk
        except SeraiError as exc:
            yield _event("error", anthropic_error_body(exc.message, status=anthropic_status(exc)))
            return
        if text_open:
            yield _event("content_block_stop", {"index": index})
        if not pinged:
            yield _event("ping", {})
        stop_reason, stop_sequence = self.stop_reason(last)
        yield _event("message_delta", {"delta": {"stop_reason": stop_reason,
                                                 "stop_sequence": stop_sequence},
                                       "usage": _usage(run.usage)})
        yield _event("message_stop", {})

    async def whole(self, run: Run, answer: Answer) -> dict[str, Any]:
        content = [{"type": "text", "text": answer.text}] if answer.text else []
        content += [_tool_use(call, _tool_input(call)) for call in answer.tool_calls]
        return self.message(content, answer.last, run.usage)


@router.post("/v1/messages", responses=STREAMS)
async def create_message(
    body: MessagesRequest, request: Request, key: KeyDep, services: ServicesDep,
    idempotency: IdempotencyDep,
) -> Response:
    """Creates a model response for the given conversation (Anthropic Messages API)."""
    generation = body.to_generation(request.state.request_id)
    return await serve(request, services.gateway, key=key, generation=generation,
                       endpoint="messages", renderer=MessageRenderer.of(generation),
                       stream=bool(body.stream), idempotency=idempotency)


@router.post("/v1/messages/count_tokens")
async def count_message_tokens(
    body: CountTokensRequest, request: Request, key: KeyDep, services: ServicesDep,
) -> Response:
    """Counts the tokens of a conversation's prompt without running it (nothing is billed),
    on a deployment in the key's regions."""
    measure = await services.gateway.measure(body.to_generation(request.state.request_id),
                                             key=key)
    return json_response(200, {"input_tokens": measure.prompt_tokens})
