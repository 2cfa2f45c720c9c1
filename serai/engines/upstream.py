"""An engine that forwards to an OpenAI-compatible server (vLLM, SGLang, llama-server, another
Serai) and relays its stream as neutral chunks.

The upstream's word on usage is checked, not trusted: counts that cannot be true are replaced
by what was actually relayed, and a stream without a usage frame is billed on what was relayed
(one completion token per delta, since no tokenizer of the upstream's model is at hand). The
upstream's API key goes in the Authorization header and nowhere else: not in logs, not in
errors, not in responses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from serai.config import UpstreamSettings
from serai.engines.base import Measure, ModelInfo
from serai.errors import ContextLengthExceeded, EngineUnavailable, InvalidRequest
from serai.types import Chunk, FinishReason, GenerationRequest, Message, ToolCall, Usage

log = logging.getLogger("serai.engines.upstream")

CHARS_PER_TOKEN = 4  # the prompt estimate: no tokenizer of the upstream's model is at hand
BYTES_PER_TOKEN_OTHER = 2  # of text outside ASCII: see estimate_prompt_tokens
# Template tokens an upstream may add around a prompt beyond its characters (roles, specials).
PROMPT_OVERHEAD_TOKENS = 256
ERROR_BODY_BYTES = 4096
# Seconds to read the end of a body after its [DONE]: closing a response before its end closes its
# connection, and every request would then open a new one.
DRAIN_S = 1.0
PROBE_TIMEOUT_S = 3.0  # a health probe is a cheap request: slower than this is unhealthy
FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length",
                                           "tool_calls": "tool_calls",
                                           "function_call": "tool_calls"}


def read_api_key(config: UpstreamSettings) -> str | None:
    """The upstream's API key from the variable or file the config names (None: no key)."""
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise ValueError(f"upstream {config.name}: the variable {config.api_key_env} "
                             "holding its API key is not set")
        return key.strip()
    if config.api_key_file:
        try:
            return config.api_key_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"upstream {config.name}: cannot read its API key file "
                             f"{config.api_key_file}: {exc.strerror}") from None
    return None


def estimate_prompt_tokens(request: GenerationRequest) -> int:
    """The tokens of what is sent as the prompt (texts, tool calls, tool schemas, the response
    format), estimated from its UTF-8 bytes without the upstream's tokenizer.

    ASCII text takes CHARS_PER_TOKEN characters a token, about right for English with BPE
    vocabularies. Other scripts take far fewer bytes a token (a CJK character is 3 bytes and
    often a token of its own), so each of their bytes counts BYTES_PER_TOKEN_OTHER: the
    estimate then errs high for every script rather than letting Chinese or Thai prompts
    through at a third of their size. Whatever the upstream counts is billed in the end."""
    texts = [request.prompt or ""]
    for message in request.messages or ():
        texts.append(message.content)
        texts += [part for call in message.tool_calls for part in (call.name, call.arguments)]
    for tool in request.tools:
        texts += [tool.name, tool.description, json.dumps(tool.parameters, ensure_ascii=False)]
    if request.response_format is not None and request.response_format.schema is not None:
        texts.append(json.dumps(request.response_format.schema, ensure_ascii=False))
    ascii_chars = other_bytes = 0
    for text in texts:
        size = len(text.encode("utf-8", "surrogatepass"))
        ascii_here = len(text.encode("ascii", "ignore"))
        ascii_chars += ascii_here
        other_bytes += size - ascii_here
    return max(1, math.ceil(ascii_chars / CHARS_PER_TOKEN + other_bytes / BYTES_PER_TOKEN_OTHER))


def _message(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [{"id": call.id, "type": "function",
                              "function": {"name": call.name, "arguments": call.arguments}}
                             for call in message.tool_calls]
        out["content"] = message.content or None
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def request_body(request: GenerationRequest, *, model: str, max_tokens: int) -> dict[str, Any]:
    """The OpenAI request for `request`: a streamed chat or completion, usage included."""
    sampling = request.sampling
    body: dict[str, Any] = {"model": model, "stream": True,
                            "stream_options": {"include_usage": True},
                            "max_tokens": max_tokens, "temperature": sampling.temperature,
                            "top_p": sampling.top_p}
    if request.messages is not None:
        body["messages"] = [_message(m) for m in request.messages]
    else:
        body["prompt"] = request.prompt
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.frequency_penalty:
        body["frequency_penalty"] = sampling.frequency_penalty
    if sampling.presence_penalty:
        body["presence_penalty"] = sampling.presence_penalty
    # Not OpenAI's, but vLLM, SGLang and llama-server take them; sent only when asked for.
    if sampling.top_k:
        body["top_k"] = sampling.top_k
    if sampling.min_p:
        body["min_p"] = sampling.min_p
    if sampling.repetition_penalty != 1.0:
        body["repetition_penalty"] = sampling.repetition_penalty
    if request.tools:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in request.tools]
        choice = request.tool_choice
        body["tool_choice"] = ({"type": "function", "function": {"name": choice.name}}
                               if choice.mode == "tool" else choice.mode)
    if request.response_format is not None:
        fmt = request.response_format
        body["response_format"] = {"type": "json_object"} if fmt.type == "json_object" else {
            "type": "json_schema",
            "json_schema": {"name": fmt.name or "response", "schema": fmt.schema or {}}}
    return body


@dataclass
class _Relay:
    """What has been relayed of one stream, to check the upstream's usage against."""

    prompt_estimate: int
    max_tokens: int
    deltas: int = 0
    chars: int = 0
    calls: dict[int, dict[str, str]] = field(default_factory=dict)

    def usage(self) -> Usage:
        return Usage(self.prompt_estimate, self.deltas)

    def checked(self, reported: dict[str, Any] | None, *, model: str, prompt_chars: int) -> Usage:
        """The usage to bill: the upstream's, unless it cannot be true."""
        relayed = min(self.deltas, self.max_tokens)
        if reported is None:
            log.warning("upstream of %s sent no usage; billing the %d deltas relayed",
                        model, relayed)
            return Usage(self.prompt_estimate, relayed)
        prompt = _int(reported.get("prompt_tokens"))
        completion = _int(reported.get("completion_tokens"))
        details = reported.get("prompt_tokens_details") or {}
        cached = _int(details.get("cached_tokens") if isinstance(details, dict) else None) or 0
        # Each delta relayed holds a token at least, and each token a character at most (or
        # none, as a special token may): fewer than the deltas or more than this cannot be.
        ceiling = min(self.max_tokens, self.chars + self.deltas)
        if completion is None or completion < relayed or completion > ceiling:
            log.warning("upstream of %s reported %s completion tokens (at most %d possible); "
                        "billing the %d relayed", model, _shown(reported.get("completion_tokens")),
                        ceiling, relayed)
            completion = relayed
        if prompt is None or prompt < 0 or prompt > prompt_chars + PROMPT_OVERHEAD_TOKENS:
            log.warning("upstream of %s reported %s prompt tokens for %d characters; billing "
                        "the estimate of %d", model, _shown(reported.get("prompt_tokens")),
                        prompt_chars, self.prompt_estimate)
            prompt = self.prompt_estimate
        cached = min(max(cached, 0), prompt)
        return Usage(prompt, completion, cached)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _shown(value: object) -> str:
    """A reported count as the log may show it: the number, or only the kind of what came in
    its place (an upstream could send any text there, the answer's among them)."""
    return str(value) if _int(value) is not None else f"a {type(value).__name__}"


def _upstream_message(response: httpx.Response, body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message:
            return message
    except (ValueError, AttributeError):
        pass
    return f"The upstream refused the request ({response.status_code})."


class UpstreamEngine:
    """Serves `config.name` by forwarding to an OpenAI-compatible server.

    `transport` replaces the network (tests pass an httpx.ASGITransport over a mock upstream).
    """

    def __init__(self, config: UpstreamSettings, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._config = config
        self._upstream_model = config.model or config.name
        self._api_key = read_api_key(config)
        headers = {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            base_url=config.api_root.rstrip("/"), headers=headers, transport=transport,
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s,
                                  pool=config.connect_timeout_s))
        self._info = ModelInfo(name=config.name, context_length=config.context_length,
                               created=int(time.time()))
        log.info("serving %s from the upstream %s (model %s)", config.name, config.api_root,
                 self._upstream_model)

    @property
    def model(self) -> ModelInfo:
        return self._info

    async def measure(self, request: GenerationRequest) -> Measure:
        """An estimate (see estimate_prompt_tokens) without asking the upstream; max_tokens as
        asked, or the configured default, within what the context leaves."""
        if request.prompt is not None and (request.tools or request.response_format):
            raise InvalidRequest("Tools and response_format need messages, not a prompt.",
                                 param="prompt")
        prompt = estimate_prompt_tokens(request)
        room = max(self._info.context_length - prompt, 1)
        wanted = request.sampling.max_tokens
        if wanted is None:
            wanted = min(self._config.default_max_tokens, room)
        elif request.sampling.clamp_max_tokens:
            wanted = min(wanted, room)
        elif wanted > self._info.context_length:
            # More than the whole context can never be generated: refused here, before a
            # reservation of that size (a number no column or Redis counter can hold) is made.
            # The prompt is only estimated, so a max_tokens that fits the context with the
            # estimate's error is left for the upstream to judge.
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self._info.context_length} tokens. "
                f"However, you requested {wanted} tokens in the completion. Please reduce "
                "max_tokens.", param="max_tokens")
        return Measure(prompt, wanted)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[redacted]") if self._api_key else text

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        size = await self.measure(request)
        chat = request.messages is not None
        body = request_body(request, model=self._upstream_model, max_tokens=size.max_tokens)
        # A token is one byte at least: more prompt tokens than bytes sent cannot be true.
        prompt_chars = len(json.dumps(body.get("messages") or body.get("prompt"),
                                      ensure_ascii=False).encode()) + len(
            json.dumps(body.get("tools", ""), ensure_ascii=False).encode())
        relay = _Relay(size.prompt_tokens, size.max_tokens)
        name = self._info.name
        http = self._client.build_request("POST", "/chat/completions" if chat else "/completions",
                                          json=body)
        try:
            response = await self._client.send(http, stream=True)
        except httpx.HTTPError as exc:
            log.warning("upstream of %s at %s unreachable: %s", name, self._config.api_root,
                        type(exc).__name__)
            raise EngineUnavailable(f"The upstream serving `{name}` cannot be reached; "
                                    "retry later.") from None
        try:
            await self._check_status(response)
            finish: FinishReason | None = None
            stop_sequence: str | None = None
            reported: dict[str, Any] | None = None
            lines = self._lines(response)
            async for line in lines:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    await _drain(lines)
                    break
                frame = self._frame(data)
                if isinstance(frame.get("usage"), dict):
                    reported = frame["usage"]
                for choice in frame.get("choices") or ():
                    text = self._delta(choice, chat, relay)
                    if choice.get("finish_reason"):
                        finish = FINISH_REASONS.get(choice["finish_reason"], "stop")
                        reason = choice.get("stop_reason")
                        if isinstance(reason, str) and reason in request.sampling.stop:
                            stop_sequence = reason
                    if text:  # tool call pieces are relayed whole, with the finishing chunk
                        yield Chunk(text, relay.usage())
            if finish is None:
                raise EngineUnavailable(f"The upstream serving `{name}` ended its answer "
                                        "before finishing it.")
            calls = tuple(ToolCall(c["id"] or f"call_{request.request_id}_{i}", c["name"],
                                   c["arguments"] or "{}")
                          for i, c in sorted(relay.calls.items()))
            if calls:
                finish = "tool_calls"
            usage = relay.checked(reported, model=name, prompt_chars=prompt_chars)
            yield Chunk("", usage, finish, tool_calls=calls,
                        stop_sequence=stop_sequence if finish == "stop" else None)
        finally:
            await response.aclose()

    async def _check_status(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        name, status = self._info.name, response.status_code
        try:
            body = b""
            async for part in response.aiter_bytes():
                body += part
                if len(body) >= ERROR_BODY_BYTES:
                    break
        except httpx.HTTPError:
            body = b""
        if status == 429 or status >= 500:
            log.warning("upstream of %s answered %d", name, status)
            retry = response.headers.get("retry-after")
            raise EngineUnavailable(
                f"The upstream serving `{name}` is unavailable ({status}); retry later.",
                headers={"retry-after": retry} if retry and retry.isdigit() else None)
        if status in (401, 403):
            # Serai's credentials, not the client's request: an operator must fix the config.
            log.error("upstream of %s refused Serai's API key (%d)", name, status)
            raise EngineUnavailable(f"The upstream serving `{name}` refused Serai's "
                                    "credentials; tell the operator.")
        raise InvalidRequest(self._redact(_upstream_message(response, body)))

    async def _lines(self, response: httpx.Response) -> AsyncIterator[bytes]:
        # Split the bytes ourselves: httpx's aiter_lines decodes to text and re-splits through
        # two more generators, a visible share of the gateway's CPU per relayed chunk.
        pending = b""
        try:
            async for part in response.aiter_bytes():
                *lines, pending = (pending + part).split(b"\n")
                for line in lines:
                    yield line.rstrip(b"\r")
            if pending:
                yield pending
        except httpx.HTTPError as exc:
            log.warning("upstream stream of %s broke: %s", self._info.name, type(exc).__name__)
            raise EngineUnavailable(f"The upstream serving `{self._info.name}` broke off "
                                    "its answer.") from None

    def _frame(self, data: bytes) -> dict[str, Any]:
        try:
            frame = orjson.loads(data)
        except ValueError:
            raise EngineUnavailable(f"The upstream serving `{self._info.name}` sent a frame "
                                    "that is not JSON.") from None
        if not isinstance(frame, dict):
            raise EngineUnavailable(f"The upstream serving `{self._info.name}` sent a frame "
                                    "that is not an object.")
        if "error" in frame:
            log.warning("upstream of %s failed mid-stream", self._info.name)
            raise EngineUnavailable(f"The upstream serving `{self._info.name}` failed while "
                                    "generating.")
        return frame

    @staticmethod
    def _delta(choice: dict[str, Any], chat: bool, relay: _Relay) -> str:
        """The text of one choice's delta; tool call pieces are assembled in `relay.calls`.
        Each delta with text or a piece of a call counts as one relayed token."""
        if not chat:
            text = choice.get("text") or ""
            calls = False
        else:
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
            calls = False
            for piece in delta.get("tool_calls") or ():
                call = relay.calls.setdefault(piece.get("index", 0),
                                              {"id": "", "name": "", "arguments": ""})
                call["id"] = call["id"] or piece.get("id") or ""
                function = piece.get("function") or {}
                call["name"] += function.get("name") or ""
                arguments = function.get("arguments") or ""
                call["arguments"] += arguments
                relay.chars += len(arguments)
                calls = True
        if text or calls:
            relay.deltas += 1
            relay.chars += len(text)
        return text

    async def probe(self) -> None:
        """Ask the upstream for its model list, the cheapest request every OpenAI-compatible
        server answers; EngineUnavailable (naming only the status or the kind of failure,
        never the key) if it does not answer 2xx within a few seconds."""
        timeout = httpx.Timeout(min(PROBE_TIMEOUT_S, self._config.read_timeout_s),
                                connect=min(PROBE_TIMEOUT_S, self._config.connect_timeout_s))
        try:
            response = await self._client.get("/models", timeout=timeout)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"unreachable ({type(exc).__name__})") from None
        if not response.is_success:
            raise EngineUnavailable(f"GET /models answered {response.status_code}")

    async def aclose(self) -> None:
        await self._client.aclose()


async def _drain(lines: AsyncIterator[bytes]) -> None:
    """Read what follows [DONE] (normally nothing but the body's end), for DRAIN_S at most, so
    the connection goes back to the pool."""
    try:
        async with asyncio.timeout(DRAIN_S):
            async for _ in lines:
                pass
    except (TimeoutError, EngineUnavailable):
        pass  # the connection is dropped instead; the answer is complete anyway
