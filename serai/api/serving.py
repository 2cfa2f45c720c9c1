"""Running one model request for a wire protocol: start it, then stream it or answer it whole.

Each wire format brings a `Renderer`, which names the two ways an answer leaves: as a stream of
server-sent events, or whole as one JSON body. Around it every surface does the same: the
request is started through the gateway while `receive()` is watched (a client that leaves gets
no run), a stream is handed to an EventStreamResponse that closes the run when it ends, and a
whole answer is collected under the same watch and its run closed however collecting ends. The
request's record (serai.observability.request_log) learns the model, and once the run is closed its tokens
and timings.

A request with an Idempotency-Key claims it here, before its run starts
(serai.api.idempotency): a finished twin's response is sent again instead of running, and the
gateway never sees the key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request
from starlette.responses import Response

from serai.api.errors import json_response
from serai.api.idempotency import IdempotentCall, ReplayedResponse, Stored
from serai.api.sse import ClientDisconnected, EventStreamResponse, until_disconnect
from serai.errors import SeraiError
from serai.gateway import Gateway, Run
from serai.governance.accounts import KeyInfo
from serai.observability.request_log import RequestRecord
from serai.types import Chunk, GenerationRequest, ToolCall


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole generation: its text, its tool calls and the chunk that ended it."""

    text: str
    tool_calls: tuple[ToolCall, ...]
    last: Chunk | None


class Renderer(Protocol):
    """How one wire format answers a run: the two ways an answer leaves."""

    def stream(self, run: Run) -> AsyncIterator[bytes]:
        """The run as server-sent events, sent as it generates. An error after the first
        event is an event of the stream: the response has already begun."""
        ...

    async def whole(self, run: Run, answer: Answer) -> dict[str, Any]:
        """The finished run as one JSON body. Whatever must happen before the client has it
        (a stored completion is kept) is done here."""
        ...


async def collect(run: Run) -> Answer:
    texts: list[str] = []
    calls: tuple[ToolCall, ...] = ()
    last = None
    async for chunk in run:
        texts.append(chunk.text)
        calls += chunk.tool_calls
        if chunk.finish_reason is not None:
            last = chunk
    return Answer("".join(texts), calls, last)


async def serve(
    request: Request, gateway: Gateway, *, key: KeyInfo, generation: GenerationRequest,
    endpoint: str, renderer: Renderer, stream: bool, idempotency: IdempotentCall | None,
) -> Response:
    """Run `generation` and answer as `renderer` renders it: a stream of events when `stream`,
    else one JSON body once the answer is whole; or, under an Idempotency-Key a finished twin
    holds, send the twin's response again. A client gone before the answer is ready gets a
    499."""
    record: RequestRecord = request.state.record
    # Only a name this server serves becomes a label or a log field.
    record.model = generation.model if gateway.router.serves(generation.model) else None
    try:
        started = await until_disconnect(request.receive, _start(
            gateway, key=key, generation=generation, endpoint=endpoint, idempotency=idempotency))
    except ClientDisconnected:
        return Response(status_code=499)
    except SeraiError as error:
        record.error = error.code
        raise
    if isinstance(started, Stored):
        return ReplayedResponse(started)
    run = started
    record.ran = True

    async def close() -> None:
        try:
            await run.close()
        finally:
            _note(record, run)

    headers = run.admission.headers or None
    if stream:
        return EventStreamResponse(renderer.stream(run), on_close=close, headers=headers,
                                   deadline_s=gateway.max_stream_s)
    try:
        answer = await until_disconnect(request.receive, collect(run))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await close()
    return json_response(200, await renderer.whole(run, answer), headers=headers)


async def _start(gateway: Gateway, *, key: KeyInfo, generation: GenerationRequest,
                 endpoint: str, idempotency: IdempotentCall | None) -> Run | Stored:
    """The started run of `generation`, or the response to send again instead of running it.

    The Idempotency-Key is claimed once the checks that need no engine have passed (a refusal
    that costs nothing holds no key) and before admission. A twin still running or another
    payload under the key is refused here, and a run refused before it started frees the key
    for a retry.
    """
    admissible = gateway.admissible(key, generation)
    if idempotency is None:
        return await gateway.start(admissible, endpoint=endpoint)
    replay = await idempotency.claim(database=gateway.database, key_id=key.id,
                                     request_id=generation.request_id,
                                     in_memory=not key.effective_retention.stores)
    if replay is not None:
        return replay
    try:
        run = await gateway.start(admissible, endpoint=endpoint)
    except BaseException:
        await idempotency.release()
        raise
    idempotency.ran(run)
    return run


def _note(record: RequestRecord, run: Run) -> None:
    """What the finished run tells the request's record: tokens, first token, deployment."""
    record.input_tokens = run.usage.prompt_tokens
    record.output_tokens = run.usage.completion_tokens
    record.first_token_at = run.first_token_at
    if run.ticket is not None:
        record.deployment = run.ticket.deployment.id
