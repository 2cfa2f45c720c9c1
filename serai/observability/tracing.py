"""Tracing of model requests: what the gateway asks for when it times admission, routing,
engine time and settlement. With `otel_endpoint` set, serai.observability.otlp turns these into OpenTelemetry
spans; unset, every span is one shared object that does nothing and neither the OpenTelemetry SDK
nor its exporter is imported ("off and free").

A span's attributes are named by the gateway without the `serai.` prefix, which is added on
export. Only ids, counts, codes and names go into them: never prompt or completion text, never
a full key, never an upstream's credentials (see docs/tracing.md).
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI


Attribute = str | int | float | bool | None  # None: not set

OTEL_MISSING = ("SERAI_OTEL_ENDPOINT is set, but OpenTelemetry is not installed: "
                "pip install 'serai[otel]' (or unset SERAI_OTEL_ENDPOINT).")


def error_code(error: BaseException) -> str:
    """What a span says of an error: its code, never its message (which may quote content)."""
    code = getattr(error, "code", None)
    return code if isinstance(code, str) and code else type(error).__name__


class Span:
    """One timed step of a request. This class is the span of tracing that is off: it records
    nothing, and `NO_SPAN` is its one instance."""

    __slots__ = ()
    recording = False

    def set(self, **attributes: Attribute) -> None:
        """Set attributes (named without the `serai.` prefix); None values are left out."""

    def event(self, name: str, **attributes: Attribute) -> None:
        """Mark a moment within the span (`first_token`)."""

    def fail(self, code: str) -> None:
        """End in error: the status says `code` (an error code, never a message)."""

    def end(self) -> None:
        """Stop the clock; later calls do nothing."""

    def __enter__(self) -> Span:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if error is not None:
            self.fail(error_code(error))
        self.end()


NO_SPAN = Span()


class Tracing:
    """Starts the spans of the request being served. This class is tracing that is off."""

    def span(self, name: str, **attributes: Attribute) -> Span:
        """A span in the current request's trace, started now (ended by the caller)."""
        return NO_SPAN

    def annotate(self, **attributes: Attribute) -> None:
        """Set attributes on the request's own span (the model, the organization)."""

    def install(self, app: FastAPI) -> None:
        """Add the middleware that opens a span per model-API request (call it just before
        RequestContext is added, so the request id is known inside it)."""

    def open(self) -> None:
        """Start exporting (the app's lifespan begins)."""

    async def aclose(self) -> None:
        """Export what is left and stop (the app's lifespan ends)."""


OFF = Tracing()
