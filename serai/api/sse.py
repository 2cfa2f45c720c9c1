"""Server-sent events and the client-disconnect watch every generation runs under.

Starlette's StreamingResponse notices a client that went away differently depending on the
ASGI spec version the server announces, and a plain JSON endpoint never notices. Generation is
expensive, so Serai watches `receive()` for `http.disconnect` itself: when it arrives, the work
is cancelled, which closes the engine stream and stops the model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

log = logging.getLogger("serai.api")

# How /openapi.json states the answer of a route that may stream: JSON, or events with `stream`.
STREAMS: dict[int | str, dict[str, Any]] = {200: {
    "description": "The answer: JSON, or server-sent events when `stream` is true.",
    "content": {"text/event-stream": {}}}}


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was complete."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Run `work`; cancel it and raise ClientDisconnected if the client goes away first."""
    work_task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
    if work_task.cancelled():
        raise ClientDisconnected()
    return work_task.result()


def sse_event(payload: Any, event: str | None = None) -> bytes:
    """One server-sent event; `event` names it (`event: <name>` line, as Anthropic's are)."""
    data = b"data: " + orjson.dumps(payload) + b"\n\n"
    return data if event is None else b"event: " + event.encode() + b"\n" + data


SSE_DONE = b"data: [DONE]\n\n"


class EventStreamResponse(Response):
    """A text/event-stream response that stops producing when the client disconnects.

    `on_close` runs exactly once when the stream ends for any reason (finished, client gone,
    error), so the caller can settle what the stream cost.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        *,
        on_close: Callable[[], Awaitable[None]],
        headers: dict[str, str] | None = None,
        deadline_s: float | None = None,
    ) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        self._events = events
        self._on_close = on_close
        self._extra_headers = headers or {}
        self._deadline_s = deadline_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ] + [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self._extra_headers.items()]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            # The deadline covers sending too: a client that reads slowly holds the stream (and
            # its engine slot) only this long; what it was sent until then is billed.
            await until_disconnect(receive, asyncio.wait_for(self._pump(send), self._deadline_s))
        except TimeoutError:
            log.warning("stream cut after its maximum duration of %ss", self._deadline_s)
        except (ClientDisconnected, OSError):
            pass
        finally:
            await self._on_close()

    async def _pump(self, send: Send) -> None:
        async for event in self._events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
