"""Admission under concurrency (RELIABILITY.md rows 1, 2 and 9), on SQLite and PostgreSQL.

A real uvicorn serves Serai with a fast fake engine: these tests are about who gets in and what
is billed, not inference. Every figure is read back from the database the server wrote.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from serai.app import create_app
from serai.config import Settings
from serai.storage.db import Database
from serai.storage.tables import Organization, Reservation, UsageRow
from tests.support.fake_engine import FakeEngine
from tests.support.serving import serving
from tests.support.tenants import customer

REPLY = " ".join(f"w{i}" for i in range(40))


class Served:
    def __init__(self, base_url: str, database: Database, engine: FakeEngine) -> None:
        self.base_url, self.database, self.engine = base_url, database, engine

    def org_with_key(self, *, plan: dict[str, Any] | None = None, balance: int = 0,
                     prices: tuple[int, int] | None = None) -> tuple[int, str]:
        with self.database.session() as session:
            made = customer(session, plan=plan, prices=prices, balance=balance)
        return made.org_id, made.secret

    def settled(self, expected_rows: int) -> list[UsageRow]:
        """The usage rows, once the ledger writer has written `expected_rows` of them."""
        deadline = time.monotonic() + 20
        while True:
            with self.database.session() as session:
                rows = list(session.scalars(select(UsageRow).order_by(UsageRow.id)))
                held = session.scalar(select(func.count()).select_from(Reservation))
            if (len(rows) >= expected_rows and held == 0) or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)

    def balance(self, org_id: int) -> int:
        with self.database.session() as session:
            org = session.get(Organization, org_id)
            assert org is not None
            return org.balance_micros


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[Served]:
    engine = FakeEngine(reply=REPLY, context_length=4096, delay=0.002)
    app = create_app(Settings(data_dir=tmp_path, database_url=database_url), engines=[engine])
    with serving(app) as base_url:
        yield Served(base_url, app.state.services.database, engine)


async def fire(base_url: str, key: str, count: int, *, max_tokens: int = 5,
               prompt: str = "hello there") -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=120,
                                 headers={"authorization": f"Bearer {key}"}) as client:
        return await asyncio.gather(*[
            client.post("/chat/completions", json={
                "model": "fake-model", "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": prompt}]})
            for _ in range(count)])


def test_a_thousand_concurrent_requests_on_a_hundred_request_quota(served: Served) -> None:
    org_id, key = served.org_with_key(plan={"windows": [
        {"metric": "requests", "limit": 100, "seconds": 3600}]})
    responses = asyncio.run(fire(served.base_url, key, 1000))

    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert (len(ok), len(refused)) == (100, 900)
    for response in refused:
        assert response.json()["error"]["code"] == "insufficient_quota"
        assert "retry-after" not in response.headers  # SDKs must not retry in a storm
    rows = served.settled(100)
    assert len(rows) == 100 and {r.status for r in rows} == {"ok"}
    assert sum(r.requests_milli for r in rows) == 100 * 1000
    assert len(served.engine.requests) == 100  # refused requests never reached the engine


def test_fifty_concurrent_priced_requests_never_spend_past_the_balance(served: Served) -> None:
    # 1 micro-unit per input token, 2 per output token; each request: 10 prompt words and
    # 10 completion tokens = 30 micro-units, worst case and real alike.
    org_id, key = served.org_with_key(balance=1000, prices=(1_000_000, 2_000_000))
    prompt = " ".join(["word"] * 10)
    responses = asyncio.run(fire(served.base_url, key, 50, max_tokens=10, prompt=prompt))

    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == 50
    assert len(ok) == 1000 // 30
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    rows = served.settled(len(ok))
    spent = sum(r.cost_micros for r in rows)
    assert all(r.cost_micros == 30 and r.charged for r in rows)
    assert spent <= 1000
    assert served.balance(org_id) == 1000 - spent  # the ledger and the balance agree
    with served.database.session() as session:
        assert session.scalar(select(func.count()).select_from(Reservation)) == 0


def test_the_sixty_first_request_in_a_minute_is_rate_limited(served: Served) -> None:
    _, key = served.org_with_key(plan={"rpm": 60})
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": "fake-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=served.base_url, headers=headers, timeout=30) as client:
        remaining = []
        for _ in range(60):
            response = client.post("/chat/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.headers["x-ratelimit-limit-requests"] == "60"
            remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert remaining == list(range(59, -1, -1))
        limited = client.post("/chat/completions", json=body)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.headers["x-ratelimit-reset-requests"].endswith("s")


def test_a_prompt_too_long_holds_nothing(served: Served) -> None:
    org_id, key = served.org_with_key(plan={"windows": [
        {"metric": "requests", "limit": 1, "seconds": 3600}]})
    with httpx.Client(base_url=served.base_url, headers={"authorization": f"Bearer {key}"},
                      timeout=30) as client:
        too_long = client.post("/chat/completions", json={
            "model": "fake-model", "max_tokens": 5000,
            "messages": [{"role": "user", "content": "hi"}]})
        assert too_long.status_code == 400
        # The quota's single request is still there to use.
        assert client.post("/chat/completions", json={
            "model": "fake-model", "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert len(served.settled(1)) == 1
