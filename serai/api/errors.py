"""Rendering errors in OpenAI's envelope: {"error": {"message", "type", "param", "code"}}.

Every error a client can cause becomes a 4xx with a message a person can act on; anything
else is a bug, logged with its request id and answered with a generic 500.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from serai.errors import SeraiError

log = logging.getLogger("serai.api")


def openai_error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def error_response(error: SeraiError) -> Response:
    body = openai_error_body(error.message, type=error.error_type, param=error.param,
                             code=error.code)
    return json_response(error.status_code, body, headers=error.headers or None)


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union members show up as a loc part like 'str' or 'list[...]'; drop them from the path.
    loc = [part for part in loc if not part.startswith(("str", "list[", "function-", "tagged-"))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return ("We could not parse the JSON body of your request. The body must be valid JSON "
                "with Content-Type: application/json.", None)
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    msg = first.get("msg", "invalid value")
    if param is None:
        return f"Invalid request body: {msg}.", None
    return f"Invalid value for '{param}': {msg}.", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SeraiError)
    async def _domain(_request: Request, exc: SeraiError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> Response:
        message, param = _describe_validation_error(exc)
        return json_response(400, openai_error_body(message, type="invalid_request_error",
                                                    param=param, code=None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else None
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 404:
            message = "Unknown URL. The API lives under /v1 (see /docs)."
        elif exc.status_code == 405:
            message = "This method is not allowed on this URL."
        return json_response(exc.status_code,
                             openai_error_body(message, type="invalid_request_error", code=kind))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        request_id = getattr(request.state, "request_id", "-")
        log.error("unhandled error in request %s", request_id, exc_info=exc)
        return json_response(500, openai_error_body(
            f"The server had an error while processing your request (request id {request_id}).",
            type="server_error"))
