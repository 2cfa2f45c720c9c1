"""A client that goes away stops its generation and is billed for what was generated (RELIABILITY.md
row 3), on SQLite and PostgreSQL.

A real uvicorn server (in this process, on an ephemeral port) serves a fake engine whose chunks
come slowly, so the test controls exactly when the client leaves, and the engine counts the
tokens it really produced. The organization pays per token from a prepaid balance.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from serai.api.deps import Services
from serai.app import create_app
from serai.billing import settlement
from serai.config import Settings
from serai.storage.tables import Organization, Reservation, UsageRow
from serai.types import Chunk, GenerationRequest
from tests.support.fake_engine import FakeEngine
from tests.support.serving import serving
from tests.support.tenants import customer

LONG_REPLY = " ".join(f"word{i}" for i in range(200))
# Per million tokens: 1.5 micro-units per prompt token, 2.5 per completion token, so the cost of
# an odd number of tokens must round.
INPUT_MICROS, OUTPUT_MICROS = 1_500_000, 2_500_000
BALANCE = 1_000_000
PROMPT = "count slowly please"  # three prompt tokens for the fake engine


def price(prompt_tokens: int, completion_tokens: int) -> int:
    """Micro-units for this usage, rounded up, worked out apart from serai.billing.plans."""
    return -(-(prompt_tokens * INPUT_MICROS + completion_tokens * OUTPUT_MICROS) // 1_000_000)


@dataclass
class CountingEngine(FakeEngine):
    """The fake engine, also counting the tokens each generation actually produced."""

    generated: dict[str, int] = field(default_factory=dict)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        # aclosing: closing this stream closes the engine's at once, as a real stop would.
        async with contextlib.aclosing(super().generate(request)) as chunks:
            async for chunk in chunks:
                self.generated[request.request_id] = chunk.usage.completion_tokens
                yield chunk


@dataclass
class Served:
    base_url: str
    engine: CountingEngine
    key: str
    org_id: int
    services: Services

    def row(self, request_id: str, timeout: float = 10) -> UsageRow:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.services.database.session() as session:
                rows = settlement.recent_usage(session=session, request_id=request_id)
            if rows:
                time.sleep(0.2)  # a second row, if one were coming, would be written by now
                with self.services.database.session() as session:
                    rows = settlement.recent_usage(session=session, request_id=request_id)
                assert len(rows) == 1, f"{len(rows)} usage rows for {request_id}"
                return rows[0]
            time.sleep(0.05)
        raise AssertionError(f"no usage row for {request_id}")

    def wait_closed_early(self, request_id: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while request_id not in self.engine.closed_early:
            assert time.monotonic() < deadline, "the engine kept generating for a gone client"
            time.sleep(0.05)

    def balance_and_held(self) -> tuple[int, int]:
        with self.services.database.session() as session:
            balance = session.scalar(select(Organization.balance_micros)
                                     .where(Organization.id == self.org_id))
            held = session.scalar(select(func.count()).select_from(Reservation))
        assert balance is not None and held is not None
        return balance, held

    def assert_billed_for_what_was_generated(self, request_id: str) -> UsageRow:
        self.wait_closed_early(request_id)  # its stream closed before the end: it cannot go on
        row = self.row(request_id)
        generated = self.engine.generated[request_id]
        assert row.status == "cancelled"
        assert (row.prompt_tokens, row.completion_tokens) == (3, generated)
        assert row.charged and row.cost_micros == price(3, generated)
        assert self.balance_and_held() == (BALANCE - row.cost_micros, 0)
        return row


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[Served]:
    engine = CountingEngine(reply=LONG_REPLY, context_length=4096, delay=0.05)
    app = create_app(Settings(data_dir=tmp_path, database_url=database_url), engines=[engine])
    with serving(app) as base_url:
        services: Services = app.state.services
        with services.database.session() as session:
            made = customer(session, prices=(INPUT_MICROS, OUTPUT_MICROS), balance=BALANCE)
        yield Served(base_url.removesuffix("/v1"), engine, made.secret, made.org_id, services)


@pytest.mark.parametrize("after_chunks", [0, 1, 5])
def test_stream_abandoned_after_n_chunks(served: Served, after_chunks: int) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": PROMPT}],
            "stream": True, "max_tokens": 150}
    content_chunks = 0
    with httpx.stream("POST", f"{served.base_url}/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {served.key}"}, timeout=30) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        if after_chunks:
            for line in response.iter_lines():
                if '"content":"word' in line:
                    content_chunks += 1
                    if content_chunks == after_chunks:
                        break
    row = served.assert_billed_for_what_was_generated(request_id)
    # At least what the client received, and far from the 150 it asked for.
    assert max(after_chunks, 1) <= row.completion_tokens < 150


def test_non_streaming_request_abandoned_stops_generation(served: Served) -> None:
    async def leave_early() -> None:
        async with httpx.AsyncClient(base_url=served.base_url) as http:
            request = asyncio.ensure_future(http.post("/v1/chat/completions", headers={
                "authorization": f"Bearer {served.key}"}, json={
                "model": "fake-model", "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 150}))
            # The client leaves once the engine generates (leaving after a fixed 0.5 s raced a
            # loaded server: a request that had not reached the engine yet left nothing to
            # stop), and a few chunks into the answer.
            deadline = time.monotonic() + 10
            while not served.engine.generated:
                assert time.monotonic() < deadline and not request.done(), "never generated"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(leave_early())
    deadline = time.monotonic() + 10
    while not served.engine.closed_early:
        assert time.monotonic() < deadline, "the engine kept generating for a gone client"
        time.sleep(0.05)
    [request_id] = served.engine.closed_early
    row = served.assert_billed_for_what_was_generated(request_id)
    assert 1 <= row.completion_tokens < 150
