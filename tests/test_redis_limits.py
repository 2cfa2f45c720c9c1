"""Admission through Redis shared by several Serai processes (RELIABILITY.md rows 1, 2, 8, 9, 10),
against PostgreSQL and Redis.

Each test gets its own PostgreSQL schema and its own Redis key prefix. Real uvicorn servers serve
Serai with a fast fake engine; every figure is read back from the database the servers wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serai.app import create_app
from serai.config import Settings
from tests.support.fake_engine import FakeEngine
from tests.support.serving import serving
from tests.test_admission import REPLY, Served, fire
from tests.test_admission import (
    test_a_thousand_concurrent_requests_on_a_hundred_request_quota as test_row_1_with_redis,
)
from tests.test_admission import (
    test_fifty_concurrent_priced_requests_never_spend_past_the_balance as test_row_2_with_redis,
)
from tests.test_admission import (
    test_the_sixty_first_request_in_a_minute_is_rate_limited as test_row_9_with_redis,
)

__all__ = ["test_row_1_with_redis", "test_row_2_with_redis", "test_row_9_with_redis"]


def redis_settings(tmp_path: Path, postgres_url: str, redis_url: str, prefix: str) -> Settings:
    return Settings(data_dir=tmp_path, database_url=postgres_url, redis_url=redis_url,
                    redis_prefix=prefix)


@pytest.fixture
def served(postgres_url: str, redis_url: str, redis_prefix: str,
           tmp_path: Path) -> Iterator[Served]:
    """test_admission's server, admitting through Redis (its tests run here as rows 1, 2, 9)."""
    engine = FakeEngine(reply=REPLY, context_length=4096, delay=0.002)
    app = create_app(redis_settings(tmp_path, postgres_url, redis_url, redis_prefix),
                     engines=[engine])
    with serving(app) as base_url:
        yield Served(base_url, app.state.services.database, engine)


@pytest.fixture
def two_served(postgres_url: str, redis_url: str, redis_prefix: str,
               tmp_path: Path) -> Iterator[tuple[Served, Served]]:
    """Two Serai apps, each with its own engine, database pool, ledger writer and Redis client,
    sharing one PostgreSQL schema and one Redis prefix (RELIABILITY.md row 8)."""
    with contextlib.ExitStack() as stack:
        served = []
        for n in range(2):
            engine = FakeEngine(reply=REPLY, context_length=4096, delay=0.002)
            app = create_app(redis_settings(tmp_path / f"app{n}", postgres_url, redis_url,
                                            redis_prefix), engines=[engine])
            base_url = stack.enter_context(serving(app))
            served.append(Served(base_url, app.state.services.database, engine))
        yield served[0], served[1]


async def fire_at_both(first: Served, second: Served, key: str, count: int,
                       **kwargs: Any) -> list[httpx.Response]:
    halves = await asyncio.gather(fire(first.base_url, key, count // 2, **kwargs),
                                  fire(second.base_url, key, count - count // 2, **kwargs))
    return halves[0] + halves[1]


def test_two_processes_admit_exactly_a_hundred_on_a_hundred_request_quota(
        two_served: tuple[Served, Served]) -> None:
    first, second = two_served
    _, key = first.org_with_key(plan={"windows": [
        {"metric": "requests", "limit": 100, "seconds": 3600}]})
    responses = asyncio.run(fire_at_both(first, second, key, 1000))

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 100, 429: 900}
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {
        "insufficient_quota"}
    # Both processes took part: neither could have admitted all hundred alone.
    assert first.engine.requests and second.engine.requests
    assert len(first.engine.requests) + len(second.engine.requests) == 100
    rows = first.settled(100)
    assert len(rows) == 100 and {r.status for r in rows} == {"ok"}


def test_two_processes_never_spend_past_one_balance(two_served: tuple[Served, Served]) -> None:
    first, second = two_served
    # 30 micro-units per request, worst case and real alike (see test_admission row 2).
    org_id, key = first.org_with_key(balance=1000, prices=(1_000_000, 2_000_000))
    prompt = " ".join(["word"] * 10)
    responses = asyncio.run(fire_at_both(first, second, key, 60, max_tokens=10, prompt=prompt))

    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) == 1000 // 30 and len(refused) == 60 - len(ok)
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    rows = first.settled(len(ok))
    spent = sum(r.cost_micros for r in rows)
    assert len(rows) == len(ok) and spent == 30 * len(ok) <= 1000
    assert first.balance(org_id) == 1000 - spent
