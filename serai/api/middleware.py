"""ASGI middleware every request passes: a request id and its record (one log line, the
metrics), the size limits, JSON bodies, and ports that serve some paths only. (The middleware
that keeps responses for Idempotency-Key replays is in serai.api.idempotency.)"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serai.api.errors import error_body
from serai.observability import request_log
from serai.observability.metrics import Metrics
from serai.observability.request_log import RequestRecord


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


class RequestContext:
    """Gives every request an id (`x-request-id` on the response, and `request-id` as Anthropic
    names it; in the logs and the ledger) and a RequestRecord (`state["record"]`) the layers
    below fill in. When the response is fully sent (a stream included), the record is counted
    in the metrics and written as the request's one log line."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        record = RequestRecord(request_id, scope["method"], scope["path"])
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["record"] = record

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                headers.append((b"request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        # Nothing sent: a bug (the server answers 500), or a client gone before its answer
        # (499, as the API itself says then; a cancelled request too).
        unanswered = 499
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            unanswered = 500
            raise
        finally:
            record.end(record.status or unanswered)
            if self.metrics is not None:
                self.metrics.observe(record)
            request_log.write(record)


class SizeLimits:
    """Answers 431 for headers and 413 for bodies over their limits before anyone parses them
    (the HTTP parser itself takes headers of any size).

    The body is read here (up to the limit) and handed on in one piece; later `receive()` calls
    go straight to the server, so the disconnect watch still works.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and sum(
                len(k) + len(v) for k, v in scope["headers"]) > self.max_header_bytes:
            await _refuse(scope, send, 431, f"Request headers too large: the limit is "
                          f"{self.max_header_bytes} bytes (SERAI_MAX_HEADER_BYTES).",
                          "headers_too_large")
            return
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._reject(scope, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        await _refuse(scope, send, 413, f"Request body too large: the limit is {self.max_bytes} "
                      "bytes (SERAI_MAX_BODY_BYTES).", "request_too_large")


async def _refuse(scope: Scope, send: Send, status: int, message: str, code: str, *,
                  close: bool = True) -> None:
    """An error in the client's own format; with `close`, the connection is closed (the rest
    of an oversized request is not read)."""
    body = orjson.dumps(error_body(scope["path"], status, message, type="invalid_request_error",
                                   code=code))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            *([(b"connection", b"close")] if close else [])]})
    await send({"type": "http.response.body", "body": body})


class JsonBodies:
    """Reads every API body as JSON whatever content type it declares.

    `curl -d '{...}'` labels its body application/x-www-form-urlencoded; OpenAI's API reads it
    as JSON anyway, and so must a drop-in replacement. The console's pages post real forms.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST"
                and not scope["path"].startswith("/console/")):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            declared = dict(scope["headers"]).get(b"content-type", b"")
            if not declared.startswith(b"multipart/"):
                headers.append((b"content-type", b"application/json"))
                scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


class PortListener:
    """A listening port of its own for some paths: they answer only on `port`, and `port`
    answers nothing else but the health checks (scope["server"] is the listening socket's own
    address). The admin API on `admin_port` (an admin key is then useless from wherever the
    public port is reachable) and /metrics on `metrics_port` are served this way."""

    SHARED = ("/health", "/ready")

    def __init__(self, app: ASGIApp, *, port: int, serves: Callable[[str], bool],
                 refusal: str) -> None:
        self.app = app
        self.port = port
        self.serves = serves
        self.refusal = refusal  # what the port says of a path it does not serve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.SHARED:
            server = scope.get("server")
            on_port = server is not None and server[1] == self.port
            if self.serves(scope["path"]) != on_port:
                await not_found(scope, send, self.refusal if on_port else "Not found.")
                return
        await self.app(scope, receive, send)


async def not_found(scope: Scope, send: Send, message: str) -> None:
    """A 404 in the client's format for a path this listening port does not serve."""
    await _refuse(scope, send, 404, message, "not_found", close=False)
