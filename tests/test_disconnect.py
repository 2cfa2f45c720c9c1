"""A client that goes away stops its generation and is billed for what it received.

A real uvicorn server (in this process, on an ephemeral port) serves a fake engine whose chunks
come slowly, so the test controls exactly when the client leaves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serai import accounts, ledger
from serai.api.deps import Services
from serai.app import create_app
from serai.config import Settings
from serai.storage.tables import UsageRow
from tests.support.fake_engine import FakeEngine
from tests.support.serving import serving

LONG_REPLY = " ".join(f"word{i}" for i in range(200))


@dataclass
class Served:
    base_url: str
    engine: FakeEngine
    key: str
    services: Services

    def row(self, request_id: str, timeout: float = 10) -> UsageRow:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.services.database.session() as session:
                rows = ledger.recent_usage(session=session, request_id=request_id)
            if rows:
                return rows[0]
            time.sleep(0.05)
        raise AssertionError(f"no usage row for {request_id}")

    def wait_closed_early(self, request_id: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while request_id not in self.engine.closed_early:
            assert time.monotonic() < deadline, "the engine kept generating for a gone client"
            time.sleep(0.05)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    engine = FakeEngine(reply=LONG_REPLY, context_length=4096, delay=0.05)
    app = create_app(Settings(data_dir=tmp_path), engines=[engine])
    with serving(app) as base_url:
        services: Services = app.state.services
        with services.database.session() as session:
            _, key = accounts.create_key(session=session, name="t")
        yield Served(base_url.removesuffix("/v1"), engine, key, services)


@pytest.mark.parametrize("after_chunks", [0, 1, 5])
def test_stream_abandoned_after_n_chunks(served: Served, after_chunks: int) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "count"}],
            "stream": True, "max_tokens": 150}
    content_chunks = 0
    with httpx.stream("POST", f"{served.base_url}/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {served.key}"}, timeout=30) as response:
        request_id = response.headers["x-request-id"]
        if after_chunks:
            for line in response.iter_lines():
                if '"content":"word' in line:
                    content_chunks += 1
                    if content_chunks == after_chunks:
                        break
    served.wait_closed_early(request_id)
    row = served.row(request_id)
    assert row.status == "cancelled"
    # Billed for what was generated before the disconnect was seen: at least what the client
    # received, and far from the 150 it asked for.
    assert max(after_chunks, 1) <= row.completion_tokens < 150


def test_non_streaming_request_abandoned_stops_generation(served: Served) -> None:
    async def leave_early() -> None:
        async with httpx.AsyncClient(base_url=served.base_url) as http:
            request = http.post("/v1/chat/completions", headers={
                "authorization": f"Bearer {served.key}"}, json={
                "model": "fake-model", "messages": [{"role": "user", "content": "count"}],
                "max_tokens": 150})
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(request, timeout=0.5)

    asyncio.run(leave_early())
    deadline = time.monotonic() + 10
    while not served.engine.closed_early:
        assert time.monotonic() < deadline, "the engine kept generating for a gone client"
        time.sleep(0.05)
    [request_id] = served.engine.closed_early
    row = served.row(request_id)
    assert row.status == "cancelled"
    assert 1 <= row.completion_tokens < 150
