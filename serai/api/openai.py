"""The OpenAI surface: /v1/chat/completions, /v1/completions and /v1/models.

Requests are parsed into neutral GenerationRequests, run through the gateway, and rendered back
exactly as OpenAI's API renders them, so the official SDKs work unchanged. Protocol models accept
unknown fields (new SDK versions add them), but a field that would change the answer and that
Serai does not implement is refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from serai.api.bounds import INT32_MAX, Seed, TokenCount
from serai.api.deps import KeyDep, Services, ServicesDep
from serai.api.errors import json_response, openai_error_body
from serai.api.idempotency import IdempotencyDep
from serai.api.serving import Answer, serve
from serai.api.sse import (
    SSE_DONE,
    STREAMS,
    sse_event,
)
from serai.engines.base import ModelInfo
from serai.errors import ContentKeyMissing, InvalidRequest, SeraiError, UnknownModel
from serai.gateway import Run
from serai.governance import stored
from serai.governance.accounts import KeyInfo
from serai.governance.crypto import ContentKeys
from serai.storage.db import Database
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

router = APIRouter(tags=["OpenAI"])
log = logging.getLogger("serai.openai")

MAX_STOP_SEQUENCES = 4
# Text that may begin a stop is held back from the stream, and each stop is compiled for the
# request: no sensible stop needs more.
MAX_STOP_CHARS = 256
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: str
    text: str | None = None


class FunctionCall(_Lenient):
    name: str
    arguments: str = "{}"


class MessageToolCall(_Lenient):
    id: str
    type: str = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Lenient):
    type: str
    function: FunctionDefinition


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: str
    max_tokens: TokenCount | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    # Not OpenAI's, but what vLLM and llama.cpp servers accept; -1 turns top_k off there.
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def _refuse_unsupported(self, fields: tuple[str, ...]) -> None:
        if self.n not in (None, 1):
            raise InvalidRequest("Serai returns one choice per request: n must be 1.", param="n")
        extras = self.model_extra or {}
        for name in fields:
            value = extras.get(name)
            if value not in (None, False, 0, [], {}):
                raise InvalidRequest(f"'{name}' is not supported by this server yet.", param=name)

    def _stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences.",
                                 param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise InvalidRequest(f"Each 'stop' sequence may be at most {MAX_STOP_CHARS} "
                                 "characters long.", param="stop")
        return tuple(s for s in stops if s)

    def _sampling(self, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=self._stops(),
            repetition_penalty=self.repetition_penalty or 1.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: TokenCount | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # Accepted either way: Serai makes at most one call per answer.
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    # Stored completions: kept only when the key's retention policy is `store`.
    store: bool | None = None
    metadata: dict[str, Any] | None = None

    def to_generation(self, request_id: str) -> GenerationRequest:
        extras = self.model_extra or {}
        for legacy in ("functions", "function_call"):
            if extras.get(legacy) is not None:
                raise InvalidRequest(f"'{legacy}' is the deprecated form of function calling; "
                                     "use 'tools' and 'tool_choice'.", param=legacy)
        self._refuse_unsupported(("logprobs", "top_logprobs", "logit_bias", "audio",
                                  "prediction"))
        messages = tuple(_neutral_message(i, m) for i, m in enumerate(self.messages))
        max_tokens = self.max_completion_tokens or self.max_tokens
        tools = _tools(self.tools or [])
        return GenerationRequest(request_id=request_id, model=self.model, messages=messages,
                                 sampling=self._sampling(max_tokens), tools=tools,
                                 tool_choice=_tool_choice(self.tool_choice, tools),
                                 response_format=_response_format(self.response_format))


def _tools(definitions: list[ToolDefinition]) -> tuple[Tool, ...]:
    tools: list[Tool] = []
    for i, d in enumerate(definitions):
        if d.type != "function":
            raise InvalidRequest(f"tools[{i}] is of type '{d.type}'; only 'function' tools are "
                                 "supported.", param=f"tools.[{i}].type")
        name = d.function.name
        if not TOOL_NAME.match(name):
            raise InvalidRequest(f"Invalid 'tools[{i}].function.name': '{name}'. Expected a "
                                 "string that matches the pattern '^[a-zA-Z0-9_-]{1,64}$'.",
                                 param=f"tools.[{i}].function.name")
        if any(t.name == name for t in tools):
            raise InvalidRequest(f"Two tools are named '{name}'; tool names must be unique.",
                                 param=f"tools.[{i}].function.name")
        parameters = d.function.parameters if d.function.parameters is not None else {
            "type": "object", "properties": {}}
        if parameters.get("type", "object") != "object":
            raise InvalidRequest(f"Invalid schema for function '{name}': the parameters must be "
                                 "a JSON Schema of type 'object'.",
                                 param=f"tools.[{i}].function.parameters")
        tools.append(Tool(name=name, description=d.function.description or "",
                          parameters=parameters))
    return tuple(tools)


def _tool_choice(value: str | dict[str, Any] | None, tools: tuple[Tool, ...]) -> ToolChoice:
    if value is None or value == "auto":
        return ToolChoice("auto")
    if value == "none":
        return ToolChoice("none")
    if value == "required":
        choice = ToolChoice("required")
    elif isinstance(value, dict) and value.get("type") == "function" and isinstance(
            value.get("function"), dict) and isinstance(value["function"].get("name"), str):
        name = value["function"]["name"]
        if not any(t.name == name for t in tools):
            raise InvalidRequest(f"Invalid value for 'tool_choice': no function named '{name}' "
                                 "was specified in the 'tools' parameter.", param="tool_choice")
        choice = ToolChoice("tool", name)
    else:
        raise InvalidRequest("'tool_choice' must be 'none', 'auto', 'required' or "
                             '{"type": "function", "function": {"name": ...}}.',
                             param="tool_choice")
    if not tools:
        raise InvalidRequest("Invalid value for 'tool_choice': 'tool_choice' is only allowed "
                             "when 'tools' are specified.", param="tool_choice")
    return choice


def _response_format(value: dict[str, Any] | None) -> ResponseFormat | None:
    kind = None if value is None else value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind != "json_schema":
        raise InvalidRequest(f"Invalid value for 'response_format.type': '{kind}'. Supported "
                             "values are 'text', 'json_object' and 'json_schema'.",
                             param="response_format.type")
    assert value is not None
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise InvalidRequest("'response_format.json_schema' must be an object with a 'name' and "
                             "a 'schema'.", param="response_format.json_schema")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict | bool):
        raise InvalidRequest("'response_format.json_schema.schema' must be a JSON Schema.",
                             param="response_format.json_schema.schema")
    # A boolean schema (true: anything) is valid JSON Schema; the grammar converter reads it.
    return ResponseFormat("json_schema", schema=schema, name=spec["name"])  # type: ignore[arg-type]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    # The legacy completions API answers with 16 tokens unless told otherwise.
    max_tokens: TokenCount | None = 16

    def to_generation(self, request_id: str) -> GenerationRequest:
        self._refuse_unsupported(("echo", "logprobs", "logit_bias", "suffix"))
        if (self.model_extra or {}).get("best_of") not in (None, 1):
            raise InvalidRequest("best_of must be 1.", param="best_of")
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidRequest("'prompt' must be a string or a list of exactly one string.",
                                     param="prompt")
            prompt = self.prompt[0]
        else:
            prompt = self.prompt
        return GenerationRequest(request_id=request_id, model=self.model, prompt=prompt,
                                 sampling=self._sampling(self.max_tokens))


def _neutral_message(index: int, message: ChatMessage) -> Message:
    role = "system" if message.role == "developer" else message.role
    content = message.content
    calls = tuple(ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
                  for c in message.tool_calls or ()) if role == "assistant" else ()
    if role == "tool" and not message.tool_call_id:
        raise InvalidRequest(f"messages[{index}] has role 'tool' but no 'tool_call_id'.",
                             param=f"messages.[{index}].tool_call_id")
    if content is None and calls:
        content = ""
    if content is None:
        raise InvalidRequest(f"messages[{index}].content must not be empty.",
                             param=f"messages.[{index}].content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise InvalidRequest(
                    f"messages[{index}].content[{j}] is of type '{part.type}', but this model "
                    "only reads text parts.", param=f"messages.[{index}].content.[{j}].type")
            texts.append(part.text)
        content = "\n".join(texts)
    return Message(role=role, content=content, tool_calls=calls,
                   tool_call_id=message.tool_call_id if role == "tool" else None)


def _usage(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


class _Renderer(ABC):
    """How one OpenAI endpoint answers a run (serai.api.serving.Renderer): streamed chunk by
    chunk, or whole. The subclasses say what a chunk and a whole answer look like."""

    id_prefix: ClassVar[str]
    object: ClassVar[str]
    chunk_object: ClassVar[str]

    def __init__(self, generation: GenerationRequest, *, include_usage: bool,
                 store: StoredCompletion | None = None) -> None:
        self.id = self.id_prefix + generation.request_id
        self.model = generation.model  # the name the client asked for, an alias included
        self.created = int(time.time())
        self.include_usage = include_usage
        self.store = store  # where the whole answer is kept, when it asked to be

    def head(self, object: str) -> dict[str, Any]:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    @abstractmethod
    def answer(self, text: str, finish: str | None, usage: Usage,
               calls: tuple[ToolCall, ...] = ()) -> dict[str, Any]:
        """The whole answer's body."""

    @abstractmethod
    def start(self) -> dict[str, Any] | None:
        """The choice a stream opens with, if it opens with one."""

    @abstractmethod
    def pieces(self, chunk: Chunk) -> list[dict[str, Any]]:
        """The choices one chunk is streamed as."""

    async def stream(self, run: Run) -> AsyncIterator[bytes]:
        def event(choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
            payload = {**self.head(self.chunk_object), "choices": choices}
            if self.include_usage:
                payload["usage"] = None if usage is None else _usage(usage)
            return sse_event(payload)

        start = self.start()
        if start is not None:
            yield event([start])
        texts: list[str] = []
        calls: tuple[ToolCall, ...] = ()
        try:
            async for chunk in run:
                if self.store is not None:
                    texts.append(chunk.text)
                    calls += chunk.tool_calls
                if chunk.text or chunk.finish_reason:
                    for piece in self.pieces(chunk):
                        yield event([piece])
        except SeraiError as exc:
            yield sse_event(openai_error_body(exc.message, type=exc.error_type, code=exc.code))
            return
        if self.store is not None:  # the whole answer, stored before the stream says it is done
            await self.store.keep(self.id, self.answer("".join(texts), run.finish_reason,
                                                       run.usage, calls))
        if self.include_usage:
            yield event([], run.usage)
        yield SSE_DONE

    async def whole(self, run: Run, answer: Answer) -> dict[str, Any]:
        body = self.answer(answer.text, run.finish_reason, run.usage, answer.tool_calls)
        if self.store is not None:
            await self.store.keep(self.id, body)
        return body


def _call_object(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


class ChatRenderer(_Renderer):
    id_prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def answer(self, text: str, finish: str | None, usage: Usage,
               calls: tuple[ToolCall, ...] = ()) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if calls:
            message["content"] = text or None
            message["tool_calls"] = [_call_object(c) for c in calls]
        return {**self.head(self.object), "choices": [{
            "index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(usage)}

    def start(self) -> dict[str, Any] | None:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def pieces(self, chunk: Chunk) -> list[dict[str, Any]]:
        def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        if not chunk.tool_calls:
            return [choice({"content": chunk.text} if chunk.text else {}, chunk.finish_reason)]
        # As OpenAI streams a call: its id and name first, then the arguments, then the end.
        out = [choice({"content": chunk.text})] if chunk.text else []
        for i, call in enumerate(chunk.tool_calls):
            out.append(choice({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                               "function": {"name": call.name,
                                                            "arguments": ""}}]}))
            out.append(choice({"tool_calls": [{"index": i,
                                               "function": {"arguments": call.arguments}}]}))
        out.append(choice({}, chunk.finish_reason))
        return out


class CompletionRenderer(_Renderer):
    id_prefix = "cmpl-"
    object = "text_completion"
    chunk_object = "text_completion"

    def answer(self, text: str, finish: str | None, usage: Usage,
               calls: tuple[ToolCall, ...] = ()) -> dict[str, Any]:
        return {**self.head(self.object), "choices": [{
            "index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(usage)}

    def start(self) -> dict[str, Any] | None:
        return None

    def pieces(self, chunk: Chunk) -> list[dict[str, Any]]:
        return [{"index": 0, "text": chunk.text, "logprobs": None,
                 "finish_reason": chunk.finish_reason}]


@dataclass(frozen=True, slots=True)
class StoredCompletion:
    """Where a chat completion that asked to be stored is kept once it is whole: sealed, in
    its organization, for its retention's days (serai.governance.stored)."""

    database: Database
    keys: ContentKeys
    org_id: int
    key_id: int
    model: str
    metadata: dict[str, str]
    messages: list[dict[str, Any]]
    days: int

    async def keep(self, completion_id: str, response: dict[str, Any]) -> None:
        """Save the answer. A failure is logged (never the content) and the answer is still
        sent: it was generated and billed."""
        def save() -> None:
            with self.database.session() as session:
                stored.save(session=session, keys=self.keys, org_id=self.org_id,
                            key_id=self.key_id, completion_id=completion_id, model=self.model,
                            metadata=self.metadata, messages=self.messages, response=response,
                            days=self.days)

        try:
            await asyncio.shield(asyncio.to_thread(save))
        except Exception as exc:
            log.error("could not store completion %s: %s", completion_id, type(exc).__name__)


def _stored_completion(body: ChatCompletionRequest, key: KeyInfo,
                       services: Services) -> StoredCompletion | None:
    """Where this completion is kept, when it asks to be stored and its policy allows it.

    Refused before anything runs: `store: true` under zero retention (400), or with no key to
    encrypt it with (503)."""
    if not body.store:
        return None
    retention = key.effective_retention
    if not retention.stores or retention.days is None:
        raise InvalidRequest(
            "'store': true is refused: the retention policy of your organization (or of this "
            "API key) is zero retention, which forbids storing prompts or completions.",
            param="store")
    keys = services.content_keys
    if keys is None:
        raise ContentKeyMissing(
            "This server cannot store completions: it has no key to encrypt them with. Its "
            "operator must set SERAI_SECRET_KEY or SERAI_SECRET_KEY_FILE.", param="store")
    metadata = stored.check_metadata(body.metadata)
    assert key.org_id is not None  # a key under a store policy belongs to an organization
    return StoredCompletion(
        database=services.database, keys=keys, org_id=key.org_id, key_id=key.id,
        model=body.model, metadata=metadata,
        messages=[m.model_dump(exclude_none=True) for m in body.messages], days=retention.days)


@router.post("/v1/chat/completions", responses=STREAMS)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, key: KeyDep, services: ServicesDep,
    idempotency: IdempotencyDep,
) -> Response:
    """Creates a model response for the given chat conversation (OpenAI-compatible)."""
    generation = body.to_generation(request.state.request_id)
    renderer = ChatRenderer(generation, include_usage=body.include_usage,
                            store=_stored_completion(body, key, services))
    return await serve(request, services.gateway, key=key, generation=generation,
                       endpoint="chat.completions", renderer=renderer,
                       stream=bool(body.stream), idempotency=idempotency)


@router.post("/v1/completions", responses=STREAMS)
async def create_completion(
    body: CompletionRequest, request: Request, key: KeyDep, services: ServicesDep,
    idempotency: IdempotencyDep,
) -> Response:
    """Creates a completion for the provided prompt (OpenAI's legacy completions API)."""
    generation = body.to_generation(request.state.request_id)
    renderer = CompletionRenderer(generation, include_usage=body.include_usage)
    return await serve(request, services.gateway, key=key, generation=generation,
                       endpoint="completions", renderer=renderer, stream=bool(body.stream),
                       idempotency=idempotency)


def _model_object(info: ModelInfo) -> dict[str, Any]:
    return {"id": info.name, "object": "model", "created": info.created,
            "owned_by": info.owned_by, "context_length": info.context_length}


@router.get("/v1/models")
async def list_models(key: KeyDep, services: ServicesDep) -> Response:
    """Lists the models this key may use: those with a deployment in a region the key's
    organization may use, and among its allowed models if it has a list of them."""
    router = services.gateway.router
    models = [m for m in router.models(regions=key.allowed_regions)
              if key.may_use(m.name, canonical=router.canonical)]
    return json_response(200, {"object": "list", "data": [_model_object(m) for m in models]})


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, key: KeyDep, services: ServicesDep) -> Response:
    """Describes one model (404 if no deployment of it is in the key's regions, or the key may
    not use it)."""
    if not key.may_use(model_id, canonical=services.gateway.router.canonical):
        raise UnknownModel(f"The model {model_id!r} is not one this key may use; it may use: "
                           f"{key.usable_models}.", param="model")
    model = services.gateway.router.model(model_id, regions=key.allowed_regions)
    return json_response(200, _model_object(model))
