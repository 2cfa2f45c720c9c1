"""GET /metrics: the Prometheus text format of the app's metrics (serai.observability.metrics),
behind a bearer token when `metrics_token` is set, and on its own port when `metrics_port` is."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import PlainTextResponse, Response

from serai.api.deps import ServicesDep, bearer_token
from serai.api.errors import json_response, openai_error_body

router = APIRouter(tags=["Operations"])

PATH = "/metrics"


# Documented as the text it is (the Prometheus exposition format), not the JSON of the API.
@router.get(PATH, response_class=PlainTextResponse)
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
