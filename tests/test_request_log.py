"""Every request writes one line on the `serai.requests` logger when its response is fully sent:
JSON for machines, key=value text on a terminal, never the content of a request or its answer.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serai.api.deps import Services
from serai.app import create_app
from serai.config import Settings
from serai.observability.request_log import JsonLines, formatter, use_json
from tests.conftest import LiveServer
from tests.support.admin_api import sdk
from tests.support.fake_engine import FakeEngine
from tests.support.tenants import Customer, customer

MODEL = "fake-model"
SECRET_PROMPT = "Remember the passphrase PAPAYA-SUNRISE-42 please"


class Lines(logging.Handler):
    """Collects what the JSON formatter makes of each record."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonLines())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def requests(self) -> list[dict[str, Any]]:
        return [line for line in map(json.loads, self.lines) if line["logger"] == "serai.requests"]


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("serai.requests")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@dataclass
class Api:
    http: httpx.AsyncClient
    acme: Customer  # an organization under zero retention, the default
    services: Services

    def client(self) -> openai.AsyncOpenAI:
        return sdk(self.http, self.acme.secret)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    app = create_app(Settings(data_dir=tmp_path), engines=[FakeEngine()])
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        with services.database.session() as session:
            acme = customer(session)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://serai") as http:
            yield Api(http, acme, services)


async def test_a_request_line_matches_the_response_and_holds_no_content(
        api: Api, lines: Lines) -> None:
    assert api.acme.key.effective_retention.policy == "zero"
    raw = await api.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": SECRET_PROMPT}])
    completion = raw.parse()
    assert completion.usage is not None

    [line] = lines.requests()
    assert line["request_id"] == raw.headers["x-request-id"]
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/chat/completions",
                                                               200)
    assert (line["org_id"], line["key_prefix"]) == (api.acme.org_id, api.acme.key.prefix)
    assert (line["model"], line["protocol"], line["deployment"]) == (MODEL, "openai",
                                                                     f"{MODEL}@local")
    assert line["input_tokens"] == completion.usage.prompt_tokens
    assert line["output_tokens"] == completion.usage.completion_tokens
    assert 0 < line["ttft_ms"] <= line["duration_ms"]
    assert line["level"] == "info" and line["time"].endswith("+00:00")
    text = lines.lines[0]
    for content in ("PAPAYA", "passphrase", "Tokyo", api.acme.secret):
        assert content not in text, content


async def test_a_stream_is_logged_once_when_it_ends(api: Api, lines: Lines) -> None:
    stream = await api.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": SECRET_PROMPT}], stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None

    [line] = lines.requests()
    assert line["status"] == 200
    assert line["output_tokens"] == chunks[-1].usage.completion_tokens == 6
    assert "PAPAYA" not in lines.lines[0]


async def test_refused_requests_are_logged_with_their_error(api: Api, lines: Lines) -> None:
    missing_key = await api.http.post("/v1/messages", json={
        "model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    unknown = await api.http.post(
        "/v1/chat/completions", headers={"authorization": f"Bearer {api.acme.secret}"},
        json={"model": SECRET_PROMPT, "messages": [{"role": "user", "content": "hi"}]})
    other = await api.http.get("/health")

    first, second, third = lines.requests()
    assert (first["status"], first["protocol"], first["org_id"]) == (
        missing_key.status_code, "anthropic", None) == (401, "anthropic", None)
    assert first["request_id"] == missing_key.headers["request-id"]
    # A model name the server does not serve is a client's text: it is not logged.
    assert (second["status"], second["model"], second["error"]) == (
        unknown.status_code, None, "model_not_found") == (404, None, "model_not_found")
    assert second["input_tokens"] is None and "PAPAYA" not in lines.lines[1]
    assert (third["path"], third["status"], third["protocol"]) == ("/health", other.status_code,
                                                                   None)


def test_json_lines_mask_keys_and_carry_exceptions() -> None:
    key = "sk-serai-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
    logger = logging.getLogger("serai.test_request_log")
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "plain %s", ("words",),
                               None, extra={"request": {"method": "GET", "path": "/x",
                                                        "status": 200, "key_prefix": key}})
    line = json.loads(JsonLines().format(record))
    assert line["key_prefix"] == "sk-serai-abcdef…"
    assert (line["level"], line["logger"], line["message"]) == (
        "warning", "serai.test_request_log", "GET /x 200")
    try:
        raise ValueError(f"bad {key}")
    except ValueError:
        failed = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "failed", (),
                                   sys.exc_info())
    line = json.loads(JsonLines().format(failed))
    assert line["message"] == "failed" and "ValueError: bad sk-serai-abcdef…" in line["exception"]
    assert key not in json.dumps(line)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_text_on_a_terminal_and_json_elsewhere() -> None:
    assert use_json("auto", io.StringIO()) and not use_json("auto", Terminal())
    assert use_json("json", Terminal()) and not use_json("text", io.StringIO())
    record = logging.makeLogRecord({"name": "serai", "msg": "hello", "levelname": "INFO"})
    assert formatter("auto", Terminal()).format(record).endswith("INFO serai: hello")
    assert json.loads(formatter("auto", io.StringIO()).format(record))["message"] == "hello"


@pytest.mark.live
def test_serve_writes_json_request_lines(live_server: LiveServer, api_key: str) -> None:
    """stderr is a file here, so `serai serve` logs JSON (log_format auto)."""
    oai = openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key=api_key, max_retries=0)
    raw = oai.chat.completions.with_raw_response.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": SECRET_PROMPT}],
        max_tokens=5, temperature=0)
    completion = raw.parse()
    assert completion.usage is not None
    request_id = raw.headers["x-request-id"]

    def logged() -> dict[str, Any] | None:
        for text in live_server.log().splitlines():
            if text.startswith("{") and request_id in text:
                entry: dict[str, Any] = json.loads(text)
                if entry["logger"] == "serai.requests":
                    return entry
        return None

    # The line is written once the response is sent, so it may trail the answer a moment.
    deadline = time.monotonic() + 10
    while (line := logged()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert line is not None, live_server.log()[-2000:]
    assert (line["status"], line["model"], line["protocol"]) == (200, "gemma-3-270m", "openai")
    assert line["input_tokens"] == completion.usage.prompt_tokens
    assert line["output_tokens"] == completion.usage.completion_tokens
    assert "PAPAYA" not in live_server.log()
