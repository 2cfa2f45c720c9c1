"""What is known about one HTTP request when it ends, and the one log line it becomes.

RequestContext (serai.api.middleware) starts a RequestRecord for every request; the API layer
fills in who asked, which model answered and what it cost as it learns them; when the response
is fully sent, the same record feeds the metrics (serai.observability.metrics) and this log line. The record
holds no prompt or completion text, so no organization's content can reach the logs through it.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson

from serai.governance.accounts import KEY_SCHEME
from serai.observability import redaction

log = logging.getLogger("serai.requests")

Protocol = Literal["openai", "anthropic"]

# The model requests, by the wire protocol they speak; other paths have no protocol.
MODEL_PATHS: dict[str, Protocol] = {
    "/v1/chat/completions": "openai",
    "/v1/completions": "openai",
    "/v1/messages": "anthropic",
}

ANTHROPIC_PATHS = ("/v1/messages",)


def is_anthropic(path: str) -> bool:
    """Whether `path` speaks Anthropic's wire (its errors, its span attribute), whatever the
    method: /v1/messages and what lies under it."""
    return path.startswith(ANTHROPIC_PATHS)


@dataclass(slots=True)
class RequestRecord:
    """One request as operators see it: identifiers, outcome, tokens and timings, never content.

    `model` is a name this server serves (or None): a client cannot put arbitrary text in it.
    `started` and `first_token_at` are time.perf_counter() readings.
    """

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    org_id: int | None = None
    key_prefix: str | None = None
    model: str | None = None
    deployment: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    first_token_at: float | None = None
    duration_s: float | None = None
    ran: bool = False  # an engine generated for it (a run was opened)
    error: str | None = None  # code of the domain error that stopped it before it ran

    @property
    def protocol(self) -> Protocol | None:
        return MODEL_PATHS.get(self.path) if self.method == "POST" else None

    @property
    def ttft_s(self) -> float | None:
        """Seconds from the request's arrival to its first generated token."""
        return None if self.first_token_at is None else self.first_token_at - self.started

    def end(self, status: int) -> None:
        self.status = status
        self.duration_s = time.perf_counter() - self.started

    def fields(self) -> dict[str, Any]:
        """The log line's fields, in a fixed order (absent values are null)."""
        ttft = self.ttft_s
        return {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "org_id": self.org_id,
            "key_prefix": self.key_prefix,
            "model": self.model,
            "protocol": self.protocol,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
            "duration_ms": None if self.duration_s is None else round(self.duration_s * 1000, 1),
            "deployment": self.deployment,
            "error": self.error,
        }


def write(record: RequestRecord) -> None:
    """Log the request's line: key=value text for people; the JSON formatter renders the same
    fields (attached to the log record as `request`) as one object."""
    fields = record.fields()
    text = " ".join(f"{name}={'-' if value is None else value}" for name, value in fields.items()
                    if value is not None or name == "key_prefix")
    log.info("%s", text, extra={"request": fields})


class JsonLines(logging.Formatter):
    """Every log record as one JSON object on one line: time, level, logger, message (and the
    exception), plus the fields of a request line. Keys are masked in the whole line again."""

    def format(self, record: logging.LogRecord) -> str:
        request = getattr(record, "request", None)
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            # A request line's fields say it all; its message just names it.
            "message": f"{request['method']} {request['path']} {request['status']}"
            if isinstance(request, dict) else record.getMessage(),
        }
        if isinstance(request, dict):
            line.update(request)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        text = orjson.dumps(line, default=str).decode()
        # The request fields never went through the record factory's masking.
        return redaction.mask(text) if KEY_SCHEME in text else text


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def use_json(log_format: str, stream: TextIO = sys.stderr) -> bool:
    """`auto`: JSON for machines (a file, a pipe, journald), text on a terminal."""
    if log_format == "auto":
        return not stream.isatty()
    return log_format == "json"


def formatter(log_format: str, stream: TextIO = sys.stderr) -> logging.Formatter:
    return JsonLines() if use_json(log_format, stream) else logging.Formatter(TEXT_FORMAT)
