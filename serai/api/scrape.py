"""GET /metrics: the Prometheus text format of the app's metrics (serai.metrics), behind a bearer
token when `metrics_token` is set, and on its own port when `metrics_port` is."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from serai.api.deps import ServicesDep, bearer_token
from serai.api.errors import json_response, openai_error_body
from serai.api.middleware import not_found

router = APIRouter(tags=["Operations"])

PATH = "/metrics"


@router.get(PATH)
async def metrics(request: Request, services: ServicesDep) -> Response:
    """Prometheus metrics (see docs/metrics.md)."""
    token = services.settings.metrics_token
    if token is not None:
        given = bearer_token(request) or ""
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            return json_response(401, openai_error_body(
                "/metrics needs `Authorization: Bearer <token>` with the token of the server's "
                "SERAI_METRICS_TOKEN setting.", type="invalid_request_error",
                code="invalid_metrics_token"), headers={"www-authenticate": "Bearer"})
    assert services.metrics is not None
    return Response(services.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


class MetricsListener:
    """With a separate metrics port, /metrics answers only there, and that port answers nothing
    else but the health checks (scope["server"] is the listening socket's own address)."""

    SHARED = ("/health", "/ready")

    def __init__(self, app: ASGIApp, *, metrics_port: int) -> None:
        self.app = app
        self.metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.SHARED:
            server = scope.get("server")
            on_metrics_port = server is not None and server[1] == self.metrics_port
            if (scope["path"] == PATH) != on_metrics_port:
                await not_found(scope, send, "This is the metrics port: it serves only /metrics."
                                if on_metrics_port else "Not found.")
                return
        await self.app(scope, receive, send)
