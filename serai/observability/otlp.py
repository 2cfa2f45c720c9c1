"""Tracing that is on: the gateway's spans as OpenTelemetry spans, exported over OTLP/HTTP to
`<otel_endpoint>/v1/traces`, and a server span per model-API request that joins the client's
trace when it sends a W3C `traceparent`. Imported only when `otel_endpoint` is set.

Each app has its own TracerProvider, never the global one: the process (or a test run building
many apps) may trace something else, and shutting one app down flushes only its own spans.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from starlette.types import ASGIApp, Receive, Scope, Send

from serai import __version__
from serai.observability.request_log import RequestRecord, is_anthropic
from serai.observability.tracing import Attribute, Span, Tracing, error_code

# The W3C header itself, whatever propagator the process may have set globally.
_W3C = TraceContextTextMapPropagator()
_CARRIED = (b"traceparent", b"tracestate")


def _named(attributes: dict[str, Attribute]) -> dict[str, AttributeValue]:
    return {f"serai.{name}": value for name, value in attributes.items() if value is not None}


class OtlpSpan(Span):
    __slots__ = ("_span",)
    recording = True

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def set(self, **attributes: Attribute) -> None:
        self._span.set_attributes(_named(attributes))

    def event(self, name: str, **attributes: Attribute) -> None:
        self._span.add_event(name, _named(attributes))

    def fail(self, code: str) -> None:
        self._span.set_attribute("error.type", code)
        self._span.set_status(Status(StatusCode.ERROR, code))

    def end(self) -> None:
        self._span.end()


class OtlpTracing(Tracing):
    def __init__(self, *, endpoint: str, service_name: str) -> None:
        self.traces_url = endpoint.rstrip("/") + "/v1/traces"
        self._resource = Resource.create({"service.name": service_name,
                                          "service.version": __version__})
        self._provider: TracerProvider | None = None
        self.tracer: trace.Tracer = trace.NoOpTracer()  # until the lifespan opens it

    def open(self) -> None:
        provider = TracerProvider(resource=self._resource)
        # The exporter reads OTEL_EXPORTER_OTLP_HEADERS (and the other standard variables)
        # itself; only the URL is Serai's.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=self.traces_url)))
        self._provider = provider
        self.tracer = provider.get_tracer("serai", __version__)

    async def aclose(self) -> None:
        provider, self._provider = self._provider, None
        self.tracer = trace.NoOpTracer()
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)  # exports what is still batched

    def span(self, name: str, **attributes: Attribute) -> Span:
        return OtlpSpan(self.tracer.start_span(name, attributes=_named(attributes)))

    def annotate(self, **attributes: Attribute) -> None:
        trace.get_current_span().set_attributes(_named(attributes))

    def install(self, app: FastAPI) -> None:
        app.add_middleware(RequestSpans, tracing=self)


class RequestSpans:
    """Opens the server span of each model-API request (under /v1/) and makes it the current
    span, so the gateway's spans become its children; it ends when the response has been sent,
    the last event of a stream included."""

    def __init__(self, app: ASGIApp, *, tracing: OtlpTracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        carried = {k.decode("latin-1"): v.decode("latin-1")
                   for k, v in scope["headers"] if k in _CARRIED}
        parent = _W3C.extract(carried) if carried else None
        state = scope.setdefault("state", {})
        path = scope["path"]
        span = self.tracing.tracer.start_span(
            f"{scope['method']} {path}", context=parent, kind=SpanKind.SERVER, attributes={
                "http.request.method": scope["method"], "url.path": path,
                "serai.protocol": "anthropic" if is_anthropic(path) else "openai",
                **({"serai.request_id": state["request_id"]} if "request_id" in state else {})})
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        # RequestContext, outside this layer, keeps the request's record (serai/observability/request_log.py):
        # its status is set as the response starts, its key prefix by authentication.
        record: RequestRecord = state["record"]
        try:
            await self.app(scope, receive, send)
        except BaseException as error:
            span.set_status(Status(StatusCode.ERROR, error_code(error)))
            raise
        finally:
            if status := record.status:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:  # a 4xx is the client's doing, not the server's failure
                    span.set_status(Status(StatusCode.ERROR, str(status)))
            if record.key_prefix is not None:
                span.set_attribute("serai.key_prefix", record.key_prefix)
            span.end()
            otel_context.detach(token)
