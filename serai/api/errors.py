"""Rendering errors in the envelope of the wire protocol a request came in on: OpenAI's
{"error": {"message", "type", "param", "code"}} everywhere, and Anthropic's
{"type": "error", "error": {"type", "message"}} on the Anthropic paths (/v1/messages…).

Every error a client can cause becomes a 4xx with a message a person can act on; anything
else is a bug, logged with its request id and answered with a generic 500.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from serai.errors import EngineOverloaded, SeraiError
from serai.observability.request_log import is_anthropic

log = logging.getLogger("serai.api")


def openai_error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """OpenAI's error envelope, which every path but Anthropic's answers an error with."""

    error: OpenAIErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    """Anthropic's error envelope, on the Anthropic paths."""

    type: Literal["error"]
    error: AnthropicErrorDetail


def documented_errors(envelope: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The error responses /openapi.json states for a route: any 4xx, in `envelope`. Stating
    them also keeps FastAPI from documenting its own 422 body, which Serai never sends (its
    validation errors are 400s in the wire protocol's envelope)."""
    return {"4XX": {"model": envelope, "description": "The request cannot be served as sent "
                    "(invalid, unauthenticated, refused, not found, limited)."}}


# Anthropic's error type for each status; Anthropic's clients branch on these.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 529: "overloaded_error"}
ANTHROPIC_OVERLOADED = 529


def anthropic_error_body(message: str, *, status: int) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


_TOOL_SCHEMA = re.compile(r"tools\.\[(\d+)\]")


def anthropic_field(param: str | None) -> str | None:
    """The field of an Anthropic request that an engine's `param` names, for the schemas an
    engine refuses (it names them as the neutral request does: response_format, tools.[i])."""
    if param == "response_format":
        return "output_config.format.schema"
    if param is not None and (tool := _TOOL_SCHEMA.fullmatch(param)):
        return f"tools.{tool[1]}.input_schema"
    return None


def anthropic_status(error: SeraiError) -> int:
    """A full engine is Anthropic's 529 overloaded_error; other statuses are shared."""
    return ANTHROPIC_OVERLOADED if isinstance(error, EngineOverloaded) else error.status_code


def error_body(path: str, status: int, message: str, *, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The error envelope of the wire protocol that serves `path`."""
    if is_anthropic(path):
        # No param in Anthropic's envelope: its messages begin with the field instead.
        field = anthropic_field(param)
        return anthropic_error_body(f"{field}: {message}" if field else message, status=status)
    return openai_error_body(message, type=type, param=param, code=code)


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def error_response(error: SeraiError, path: str = "") -> Response:
    status = anthropic_status(error) if is_anthropic(path) else error.status_code
    body = error_body(path, status, error.message, type=error.error_type, param=error.param,
                      code=error.code)
    return json_response(status, body, headers=error.headers or None)


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    # The first part says where the value was (the body, the query, the path): the name is
    # what a client recognizes.
    loc = [str(part) for part in first.get("loc", ())][1:]
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
    async def _domain(request: Request, exc: SeraiError) -> Response:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        message, param = _describe_validation_error(exc)
        return json_response(400, error_body(request.url.path, 400, message,
                                             type="invalid_request_error", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else None
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 404:
            message = "Unknown URL. The API lives under /v1 (see /docs)."
        elif exc.status_code == 405:
            message = "This method is not allowed on this URL."
        return json_response(exc.status_code,
                             error_body(request.url.path, exc.status_code, message,
                                        type="invalid_request_error", code=kind))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        request_id = getattr(request.state, "request_id", "-")
        log.error("unhandled error in request %s", request_id, exc_info=exc)
        return json_response(500, error_body(
            request.url.path, 500,
            f"The server had an error while processing your request (request id {request_id}).",
            type="server_error"))
