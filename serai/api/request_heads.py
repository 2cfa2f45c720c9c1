"""Request heads (the request line and headers) as `serai serve` reads them: each must arrive
within `header_timeout_s` and fit in `max_header_bytes`, or the connection is cut.

uvicorn waits for a head as long as a client takes to send it and buffers it whole before any
ASGI middleware sees it, so a client that sends headers a byte at a time (slowloris) holds a
connection forever, and one that sends a megabyte of headers costs a megabyte of memory. This
protocol is uvicorn's httptools one with two bounds added where the bytes arrive, so Serai is
safe without a proxy in front. SizeLimits (serai.api.middleware) still answers 431 for an app
served some other way.
"""

from __future__ import annotations

import asyncio
import http

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serai.api.errors import error_body

# Seconds a refused connection is still read (and what arrives dropped) after its answer, so the
# client reads the answer: closing with its unread bytes pending would send it a reset instead.
LINGER_S = 1.0


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, cutting heads that come too slowly or grow too large.

    The clock starts when the connection opens and when the first byte of each later request
    arrives, and stops once its headers are complete; it is paused while the server itself
    holds the connection (a response in progress, pipelined requests waiting). Head bytes are
    counted as they arrive; a head still incomplete past the limit gets 431 in the client's
    error format, and one past its time 408, each with the connection closed (after a short
    linger, see LINGER_S).
    """

    header_timeout_s: float = 10.0
    max_header_bytes: int = 32 * 1024

    # uvicorn's protocol narrows asyncio's BaseTransport to Transport; so must this override.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # waiting for a request's head (a silent new connection too)
        self._head_begun = False  # a byte of it has arrived
        self._refused = False  # answered 408 or 431: what still arrives is dropped
        self._start_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            room = self.max_header_bytes - self._head_bytes
            if len(data) > room:
                # Parse what fits; if the head is still incomplete, it is too large.
                self._head_bytes += room
                super().data_received(data[:room])
                if self._in_head:
                    if not self._refused and not self.transport.is_closing():
                        self._refuse(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                     f"Request headers too large: the limit is "
                                     f"{self.max_header_bytes} bytes (SERAI_MAX_HEADER_BYTES).",
                                     "headers_too_large")
                    return
                data = data[room:]
            else:
                self._head_bytes += len(data)
        super().data_received(data)

    # Parser callbacks (httptools calls them from within data_received).
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True
        if not self._in_head:
            # A later request on the connection: its bytes count from here (at most one read
            # of them arrived uncounted, in the chunk that ended the previous request).
            self._in_head, self._head_bytes = True, 0
            self._start_head_clock()

    def on_headers_complete(self) -> None:
        self._in_head, self._head_begun, self._head_bytes = False, False, 0
        self._stop_head_clock()
        super().on_headers_complete()

    def _start_head_clock(self) -> None:
        self._stop_head_clock()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self._refused or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # The server is busy with an earlier request and may have paused reading: the
            # client is not the one making this head late.
            self._start_head_clock()
            return
        if not self._head_begun:
            self.transport.close()  # a connection that never began a request: nothing to say
            return
        self._refuse(http.HTTPStatus.REQUEST_TIMEOUT, f"Request headers not received within "
                     f"{self.header_timeout_s:g} s (SERAI_HEADER_TIMEOUT_S).", "header_timeout")

    def _refuse(self, status: http.HTTPStatus, message: str, code: str) -> None:
        """Answer in the client's error format (known from the path, if it arrived) and close:
        the rest of the head is never parsed."""
        path = self.url.split(b"?", 1)[0].decode("latin-1") if getattr(self, "url", b"") else "/"
        body = orjson.dumps(error_body(path, status, message, type="invalid_request_error",
                                       code=code))
        self.transport.write(b"".join([
            f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode(),
            b"content-type: application/json\r\n",
            f"content-length: {len(body)}\r\n".encode(),
            b"connection: close\r\n\r\n", body]))
        self._stop_head_clock()
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer, then end of stream: the client stops
            self.loop.call_later(LINGER_S, self.transport.close)
        else:  # TLS: no half close
            self.transport.close()


def bounded_head_protocol(*, header_timeout_s: float,
                          max_header_bytes: int) -> type[BoundedHeadProtocol]:
    """The protocol class for uvicorn.Config(http=...), with these bounds (uvicorn builds each
    connection's protocol itself, so the bounds travel as class attributes)."""
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,), {
        "header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes})
