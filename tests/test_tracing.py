"""Tracing as an operator sees it in a collector: the spans a model request leaves, exported over
OTLP/HTTP to a real receiver, and nothing at all (not even an import) when tracing is off.

The receiver is a small HTTP server in this process that decodes what the exporter posts to
/v1/traces with OpenTelemetry's own protobuf classes; an app's spans are all there once its
lifespan has ended (shutting down flushes them).
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from serai.api.deps import Services
from serai.app import create_app
from serai.config import Settings
from serai.governance import accounts
from tests.support.admin_api import sdk
from tests.support.fake_engine import FakeEngine
from tests.support.serving import serving
from tests.support.tenants import customer

ROOT = Path(__file__).resolve().parent.parent
MODEL = "fake-model"
# Words no span may ever carry: the prompt and the answer are content.
PROMPT = "Which zanzibarian pelicans nest near Tokyo?"
REPLY = "Marbled quokkas answer slowly."
INPUT_MICROS, OUTPUT_MICROS = 1_500_000, 2_500_000


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


@dataclass
class Exported:
    """One span as the collector received it."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    status: int
    status_message: str
    events: list[tuple[str, dict[str, Any]]]
    start: int
    end: int
    service: str

    @classmethod
    def of(cls, span: SpanProto, service: str) -> Exported:
        return cls(span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                   span.kind, {a.key: _value(a.value) for a in span.attributes},
                   span.status.code, span.status.message,
                   [(e.name, {a.key: _value(a.value) for a in e.attributes}) for e in span.events],
                   span.start_time_unix_nano, span.end_time_unix_nano, service)


@dataclass
class Collector:
    """What an OTLP/HTTP collector at `url` received."""

    url: str
    spans: list[Exported] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # of each export request

    def server_span(self, request_id: str) -> Exported:
        [span] = [s for s in self.spans if s.attributes.get("serai.request_id") == request_id]
        return span

    def children(self, parent: Exported) -> dict[str, Exported]:
        found = [s for s in self.spans if s.parent_id == parent.span_id]
        assert all(s.trace_id == parent.trace_id for s in found)
        named = {s.name: s for s in found}
        assert len(named) == len(found), [s.name for s in found]
        return named

    def trace(self, trace_id: str) -> list[Exported]:
        return [s for s in self.spans if s.trace_id == trace_id]


@contextmanager
def collector() -> Iterator[Collector]:
    received = Collector("")

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["content-length"]))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            received.headers.append({k.lower(): v for k, v in self.headers.items()})
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                service = {a.key: _value(a.value)
                           for a in resource_spans.resource.attributes}["service.name"]
                for scope_spans in resource_spans.scope_spans:
                    received.spans += [Exported.of(s, service) for s in scope_spans.spans]
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    received.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Traced:
    http: httpx.AsyncClient
    key: str  # of an organization that pays per token
    key_prefix: str
    org_id: int
    services: Services

    def client(self, key: str | None = None) -> openai.AsyncOpenAI:
        return sdk(self.http, key or self.key)


@asynccontextmanager
async def traced_app(tmp_path: Path, spans: Collector) -> AsyncIterator[Traced]:
    """An app tracing to `spans`; its spans are all exported once this exits."""
    settings = Settings(data_dir=tmp_path, otel_endpoint=spans.url,
                        otel_service_name="serai-under-test")
    app = create_app(settings, engines=[FakeEngine(reply=REPLY)])
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        with services.database.session() as session:
            made = customer(session, prices=(INPUT_MICROS, OUTPUT_MICROS), balance=10**9)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serai") as http:
            yield Traced(http, made.secret, made.key.prefix, made.org_id, services)


def price(prompt_tokens: int, completion_tokens: int) -> int:
    return -(-(prompt_tokens * INPUT_MICROS + completion_tokens * OUTPUT_MICROS) // 1_000_000)


def assert_no_content_or_key(spans: Collector, *secrets: str) -> None:
    """No name, attribute, event or status of any span carries content or a key."""
    needles = ["zanzibarian", "pelicans", "quokkas", *secrets]
    for span in spans.spans:
        values = [span.name, span.status_message, *map(str, span.attributes.values())]
        for name, attributes in span.events:
            values += [name, *map(str, attributes.values())]
        for needle in needles:
            assert not any(needle in value for value in values), (needle, span)


async def test_a_request_is_one_trace_of_admission_routing_engine_and_settlement(
        tmp_path: Path) -> None:
    with collector() as spans:
        async with traced_app(tmp_path, spans) as traced:
            raw = await traced.client().chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}])
            completion = raw.parse()
            request_id = raw.headers["x-request-id"]
            key = traced.key
            key_prefix, org_id = traced.key_prefix, traced.org_id

        assert completion.usage is not None
        usage = completion.usage
        request = spans.server_span(request_id)
        assert request.name == "POST /v1/chat/completions"
        assert request.kind == SpanProto.SPAN_KIND_SERVER
        assert request.parent_id == ""  # no traceparent came: a trace of its own
        assert request.service == "serai-under-test"
        assert request.attributes["http.response.status_code"] == 200
        assert request.attributes["serai.model"] == MODEL
        assert request.attributes["serai.protocol"] == "openai"
        assert request.attributes["serai.org_id"] == org_id
        assert request.attributes["serai.key_prefix"] == key_prefix
        assert request.status != Status.STATUS_CODE_ERROR

        steps = spans.children(request)
        assert set(steps) == {"routing", "admission", "engine", "settlement"}
        assert len(spans.trace(request.trace_id)) == 5
        assert steps["routing"].attributes["serai.deployment"] == f"{MODEL}@local"
        assert steps["routing"].attributes["serai.region"] == "default"
        assert steps["routing"].attributes["serai.attempt"] == 1
        assert steps["admission"].attributes["serai.outcome"] == "admitted"
        engine = steps["engine"]
        assert engine.attributes["serai.deployment"] == f"{MODEL}@local"
        assert engine.attributes["serai.input_tokens"] == usage.prompt_tokens
        assert engine.attributes["serai.output_tokens"] == usage.completion_tokens
        assert engine.attributes["serai.finish_reason"] == "stop"
        assert engine.attributes["serai.ttft_ms"] >= 0
        assert [name for name, _ in engine.events] == ["first_token"]
        assert "serai.client_disconnected" not in engine.attributes
        settlement = steps["settlement"]
        assert settlement.attributes["serai.status"] == "ok"
        assert settlement.attributes["serai.cost_micros"] == price(usage.prompt_tokens,
                                                                   usage.completion_tokens)
        # Steps happen in order, within the request.
        assert steps["routing"].end <= steps["admission"].start
        assert steps["admission"].end <= engine.start
        assert engine.end <= settlement.start
        assert request.start <= steps["routing"].start and settlement.end <= request.end
        assert_no_content_or_key(spans, key)


async def test_a_stream_is_traced_until_its_last_event_and_each_request_has_its_trace(
        tmp_path: Path) -> None:
    with collector() as spans:
        async with traced_app(tmp_path, spans) as traced:
            ids, usages = [], []
            for _ in range(2):
                raw = await traced.client().chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": PROMPT}], stream=True,
                    stream_options={"include_usage": True})
                chunks = [chunk async for chunk in raw.parse()]
                ids.append(raw.headers["x-request-id"])
                usages.append(chunks[-1].usage)
            anthropic = await traced.http.post("/v1/messages", headers={"x-api-key": traced.key},
                                               json={"model": MODEL, "max_tokens": 20,
                                                     "messages": [{"role": "user",
                                                                   "content": PROMPT}]})
            assert anthropic.status_code == 200
            key = traced.key

        requests = [spans.server_span(request_id) for request_id in ids]
        assert len({r.trace_id for r in requests}) == 2
        for request, usage in zip(requests, usages, strict=True):
            steps = spans.children(request)
            assert set(steps) == {"routing", "admission", "engine", "settlement"}
            engine = steps["engine"]
            assert (engine.attributes["serai.input_tokens"],
                    engine.attributes["serai.output_tokens"]) == (usage.prompt_tokens,
                                                                  usage.completion_tokens)
            # The handler returned long before the stream ended; the spans follow the stream.
            assert engine.end <= request.end
            assert steps["settlement"].end <= request.end
        messages = spans.server_span(anthropic.headers["request-id"])
        assert messages.name == "POST /v1/messages"
        assert messages.attributes["serai.protocol"] == "anthropic"
        assert set(spans.children(messages)) == {"routing", "admission", "engine", "settlement"}
        assert_no_content_or_key(spans, key)


async def test_a_refused_request_says_why_in_its_admission_span(tmp_path: Path) -> None:
    with collector() as spans:
        async with traced_app(tmp_path, spans) as traced:
            with traced.services.database.session() as session:
                _, limited = accounts.create_key(session=session, name="limited", rpm=1,
                                                 org_id=traced.org_id)
            client = traced.client(limited)
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}])
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": PROMPT}])
            request_id = refused.value.response.headers["x-request-id"]

        request = spans.server_span(request_id)
        assert request.attributes["http.response.status_code"] == 429
        steps = spans.children(request)
        assert set(steps) == {"routing", "admission"}  # nothing ran, nothing was settled
        admission = steps["admission"]
        assert admission.attributes["serai.outcome"] == "refused"
        assert admission.attributes["serai.reason"] == "rate_limit_exceeded"
        assert admission.status == Status.STATUS_CODE_ERROR
        assert admission.status_message == "rate_limit_exceeded"
        assert_no_content_or_key(spans, limited)


async def test_the_clients_traceparent_becomes_the_parent(tmp_path: Path) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with collector() as spans:
        async with traced_app(tmp_path, spans) as traced:
            response = await traced.http.post(
                "/v1/chat/completions",
                headers={"authorization": f"Bearer {traced.key}",
                         "traceparent": f"00-{trace_id}-{parent_id}-01"},
                json={"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]})
            assert response.status_code == 200

        request = spans.server_span(response.headers["x-request-id"])
        assert (request.trace_id, request.parent_id) == (trace_id, parent_id)
        assert {s.trace_id for s in spans.children(request).values()} == {trace_id}


async def test_a_failover_shows_both_deployments(tmp_path: Path) -> None:
    with collector() as spans:
        full = FakeEngine(overloaded=True)
        app = create_app(Settings(data_dir=tmp_path, otel_endpoint=spans.url), engines=[full])
        async with app.router.lifespan_context(app):
            services: Services = app.state.services
            [local] = services.gateway.router.deployments(MODEL)
            local.weight = 1000  # picked first
            services.gateway.router.add(FakeEngine(), deployment="spare")
            with services.database.session() as session:
                _, key = accounts.create_key(session=session, name="user")
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://serai") as http:
                response = await http.post(
                    "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                    json={"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]})
            assert response.status_code == 200

        request = spans.server_span(response.headers["x-request-id"])
        steps = sorted((s for s in spans.spans if s.parent_id == request.span_id),
                       key=lambda s: s.start)
        assert [(s.name, s.attributes.get("serai.deployment"), s.attributes.get("serai.attempt"))
                for s in steps] == [
            ("routing", local.id, 1), ("admission", None, None), ("engine", local.id, 1),
            ("routing", "spare", 2), ("engine", "spare", 2), ("settlement", None, None)]
        [first, second] = [s for s in steps if s.name == "engine"]
        assert first.attributes["serai.failed_over"] is True
        assert (first.status, first.status_message) == (Status.STATUS_CODE_ERROR,
                                                        "engine_overloaded")
        assert second.attributes["serai.finish_reason"] == "stop"
        assert steps[3].attributes["serai.failover_from"] == local.id


async def test_the_standard_otlp_headers_variable_reaches_the_collector(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20collector-token")
    with collector() as spans:
        async with traced_app(tmp_path, spans) as traced:
            await traced.client().models.list()
        assert spans.headers
        assert {h.get("authorization") for h in spans.headers} == {"Bearer collector-token"}
        assert [s.name for s in spans.spans] == ["GET /v1/models"]


def test_a_client_that_leaves_mid_stream_ends_the_engine_span(tmp_path: Path) -> None:
    engine = FakeEngine(reply=" ".join(f"word{i}" for i in range(200)), context_length=4096,
                        delay=0.05)
    with collector() as spans:
        app = create_app(Settings(data_dir=tmp_path, otel_endpoint=spans.url), engines=[engine])
        with serving(app) as base_url:
            services: Services = app.state.services
            with services.database.session() as session:
                _, key = accounts.create_key(session=session, name="user")
            body = {"model": MODEL, "stream": True, "max_tokens": 150,
                    "messages": [{"role": "user", "content": PROMPT}]}
            with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=30,
                              headers={"authorization": f"Bearer {key}"}) as response:
                request_id = response.headers["x-request-id"]
                for line in response.iter_lines():
                    if '"content":"word' in line:
                        break  # leave after the first word
            deadline = time.monotonic() + 10
            while request_id not in engine.closed_early:
                assert time.monotonic() < deadline, "the engine kept generating for a gone client"
                time.sleep(0.05)

        request = spans.server_span(request_id)
        engine_span = spans.children(request)["engine"]
        assert engine_span.attributes["serai.client_disconnected"] is True
        assert "serai.finish_reason" not in engine_span.attributes
        assert 1 <= engine_span.attributes["serai.output_tokens"] < 150
        assert spans.children(request)["settlement"].attributes["serai.status"] == "cancelled"


def _python(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("SERAI_", "OTEL_"))}
    environment.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, text=True,
                          capture_output=True, env=environment, timeout=120)


# The part both subprocess scripts below share: an app on the fake engine in process, a key,
# and `send(http, headers)` run against it.
_SERVE = """
import asyncio
import httpx
from serai.governance import accounts
from serai.app import create_app
from serai.config import Settings
from tests.support.fake_engine import FakeEngine

async def serve(data_dir, send):
    app = create_app(Settings(data_dir=data_dir), engines=[FakeEngine()])
    async with app.router.lifespan_context(app):
        with app.state.services.database.session() as session:
            _, key = accounts.create_key(session=session, name="user")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as http:
            await send(http, {"authorization": "Bearer " + key})
"""


def test_tracing_off_imports_nothing_of_opentelemetry(tmp_path: Path) -> None:
    """Nothing beyond what FastAPI itself imports: since 0.16x FastAPI depends on and imports
    opentelemetry-api for its own (unconfigured, hence idle) telemetry."""
    result = _python("""
import sys
import fastapi
fastapis = {m for m in sys.modules if m.split(".")[0] == "opentelemetry"}
""" + _SERVE + f"""
async def send(http, auth):
    response = await http.post("/v1/chat/completions", headers=auth, json={{
        "model": "fake-model", "messages": [{{"role": "user", "content": "hi"}}]}})
    assert response.status_code == 200, response.text

asyncio.run(serve({str(tmp_path)!r}, send))
print(sorted(m for m in sys.modules if m == "serai.observability.otlp" or (
    m.split(".")[0] == "opentelemetry" and m not in fastapis)))
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_fastapis_own_telemetry_records_nothing_even_under_a_global_provider(
        tmp_path: Path) -> None:
    """FastAPI's native spans may carry a refused request's values (content). With a global
    tracer provider set by something else in the process, and Serai's tracing off, a request
    with a malformed body still yields no span at all."""
    result = _python("""
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
""" + _SERVE + f"""
async def send(http, auth):
    for body in ({{"model": "fake-model", "messages": "CANARY-CONTENT"}},
                 {{"model": "fake-model", "messages": [{{"role": "user", "content": "CANARY"}}]}}):
        await http.post("/v1/chat/completions", json=body, headers=auth)
    await http.get("/console/login")

asyncio.run(serve({str(tmp_path)!r}, send))
print(len(exporter.get_finished_spans()))
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_an_endpoint_without_the_otel_extra_stops_start_up_saying_what_to_install(
        tmp_path: Path) -> None:
    # As if the otel extra were not installed (opentelemetry-api comes with FastAPI).
    result = _python(f"""
        import sys
        sys.modules["opentelemetry.sdk"] = sys.modules["opentelemetry.exporter"] = None
        from serai.cli import app
        app(["serve", "--data-dir", {str(tmp_path)!r}])
    """, SERAI_OTEL_ENDPOINT="http://127.0.0.1:4318", COLUMNS="200")
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "Traceback" not in message
    assert ("Error: SERAI_OTEL_ENDPOINT is set, but OpenTelemetry is not installed: "
            "pip install 'serai[otel]'") in message
