"""Admission through Redis shared by several Serai processes (RELIABILITY.md rows 1, 2, 8, 9, 10),
against PostgreSQL and Redis.

Each test gets its own PostgreSQL schema and its own Redis key prefix. Real uvicorn servers serve
Serai with a fast fake engine; every figure is read back from the database the servers wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select

from serai.app import create_app
from serai.billing.base import Admission, UsageRecord
from serai.billing.redis_limits import RedisLimiter
from serai.config import Settings
from serai.errors import LimitsUnavailable, QuotaExceeded, RateLimited
from serai.governance import accounts
from serai.governance.accounts import KeyInfo
from serai.storage.db import Database, db_now_ms
from serai.storage.tables import Organization, Reservation, UsageRow
from serai.testing.processes import free_port
from tests.conftest import _missing
from tests.support import tenants
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


class OwnRedis:
    """A redis-server of this test's own, without persistence, to stop and start again empty."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            wait_for(lambda: _answers(client), "the test's redis-server to answer")
        finally:
            client.close()

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=20)
        self.process = None


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        _missing("redis-server is not installed: this test stops and restarts a Redis of its own")
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    if server.process is not None:
        server.stop()


def test_redis_stopped_under_load_refuses_with_503_and_recovers_without_restart(
        own_redis: OwnRedis, postgres_url: str, tmp_path: Path) -> None:
    limit = 40
    engine = FakeEngine(reply=REPLY, context_length=4096, delay=0.01)
    app = create_app(redis_settings(tmp_path, postgres_url, own_redis.url, "serai"),
                     engines=[engine])
    seen: list[tuple[str, httpx.Response]] = []
    phase = "before"
    stop = threading.Event()

    async def worker(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            response = await client.post("/chat/completions", json={
                "model": "fake-model", "max_tokens": 5,
                "messages": [{"role": "user", "content": "hello"}]})
            seen.append((phase, response))
            if response.status_code != 200:
                await asyncio.sleep(0.02)  # refusals come back at once; do not spin

    async def load(base_url: str, key: str) -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=60,
                                     headers={"authorization": f"Bearer {key}"}) as client:
            await asyncio.gather(*[worker(client) for _ in range(4)])

    def count(status: int, in_phase: str | None = None) -> int:
        return sum(1 for p, r in list(seen)
                   if r.status_code == status and in_phase in (None, p))

    with serving(app) as base_url:
        served = Served(base_url, app.state.services.database, engine)
        _, key = served.org_with_key(plan={"windows": [
            {"metric": "requests", "limit": limit, "seconds": 3600}]})
        loader = threading.Thread(target=asyncio.run, args=(load(base_url, key),))
        loader.start()
        try:
            wait_for(lambda: count(200) >= 10, "ten admitted requests")
            phase = "down"
            own_redis.stop()
            wait_for(lambda: count(503, "down") >= 10, "refusals while Redis is down")
            # Back, and empty: what was used must come back from the database.
            own_redis.start()
            phase = "after"
            wait_for(lambda: count(429, "after") >= 5, "the quota to run out after Redis is back")
        finally:
            stop.set()
            loader.join(timeout=60)
        rows = served.settled(limit)

    assert {r.status_code for _, r in seen} <= {200, 429, 503}
    down = [r for p, r in seen if r.status_code == 503]
    assert down and all(p == "down" for p, r in seen if r.status_code == 503)
    for response in down:
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "limits_unavailable")
        assert int(response.headers["retry-after"]) >= 1
    assert count(200, "after") > 0  # admitted again with no restart of Serai
    # Never a 200 past the limit, through the cut and an empty Redis.
    assert count(200) == limit
    assert {r.json()["error"]["code"] for _, r in seen if r.status_code == 429} == {
        "insufficient_quota"}
    # Requests admitted before the cut, some finishing while Redis was down, all have their row.
    assert len(rows) == limit and {r.status for r in rows} == {"ok"}
    assert len(engine.requests) == limit


# -- the Redis limiter on its own, without HTTP ----------------------------------------------


@pytest.fixture
def limiter(postgres_url: str, redis_url: str, redis_prefix: str) -> Iterator[RedisLimiter]:
    database = Database(postgres_url)
    database.upgrade()
    limits = RedisLimiter(database, redis_url, prefix=redis_prefix)
    yield limits
    limits.close()
    database.dispose()


def customer(limiter: RedisLimiter, *, plan: dict[str, Any] | None = None,
             prices: tuple[int, int] | None = None) -> KeyInfo:
    with limiter._database.session() as session:
        return tenants.customer(session, model="m", plan=plan, prices=prices).key


def reserve(limiter: RedisLimiter, key: KeyInfo, *, model: str = "m", prompt: int = 10,
            max_tokens: int = 10) -> tuple[str, Admission]:
    request_id = f"req_{uuid.uuid4().hex}"
    return request_id, limiter.reserve(key=key, request_id=request_id, model=model,
                                       endpoint="chat.completions", prompt_tokens=prompt,
                                       max_tokens=max_tokens)


def finished(key: KeyInfo, request_id: str, admission: Admission, *, prompt: int = 10,
             completion: int = 10) -> UsageRecord:
    return UsageRecord(request_id=request_id, key_id=key.id, model="m",
                       endpoint="chat.completions", prompt_tokens=prompt,
                       completion_tokens=completion, status="ok", ttft_ms=1.0, latency_ms=2.0,
                       admission=admission)


def usage_rows(limiter: RedisLimiter) -> list[UsageRow]:
    with limiter._database.session() as session:
        return list(session.scalars(select(UsageRow)))


def test_settling_twice_counts_once_and_a_release_gives_back(limiter: RedisLimiter) -> None:
    key = customer(limiter, plan={"windows": [
        {"metric": "requests", "limit": 2, "seconds": 3600}]})
    first, admitted = reserve(limiter, key)
    # The ledger writer retries a batch whose write failed: the same record comes again.
    limiter.settle([finished(key, first, admitted)])
    limiter.settle([finished(key, first, admitted)])
    assert [r.request_id for r in usage_rows(limiter)] == [first]

    _, second = reserve(limiter, key)
    with pytest.raises(QuotaExceeded):
        reserve(limiter, key)
    limiter.release(second)  # never ran: its request goes back to the window
    reserve(limiter, key)
    with pytest.raises(QuotaExceeded):
        reserve(limiter, key)


def test_a_week_window_counts_real_usage_from_six_days_ago_with_multipliers(
        limiter: RedisLimiter) -> None:
    # 1,000 tokens a week; "big" counts double. Each request holds (50 + 50) x 2 = 200.
    key = customer(limiter, plan={"windows": [{"metric": "tokens", "limit": 1000,
                                               "seconds": 7 * 86400}],
                                  "model_multipliers": {"big": 2}})
    with limiter._database.session() as session:
        now = db_now_ms(session)
        for request_id, days, tokens in (("six-days-ago", 6, 300), ("eight-days-ago", 8, 5000)):
            session.add(UsageRow(request_id=request_id, key_id=key.id, org_id=key.org_id,
                                 model="big", endpoint="chat.completions", prompt_tokens=tokens,
                                 completion_tokens=0, status="ok", ttft_ms=None, latency_ms=1.0,
                                 tokens_milli=tokens * 1000, requests_milli=1000,
                                 created_ms=now - days * 86400 * 1000))

    held = [reserve(limiter, key, model="big", prompt=50, max_tokens=50) for _ in range(3)]
    # 300 + 3 x 200 = 900 used or held. The first request really used 50 tokens (100 counted):
    first_id, first = held[0]
    limiter.settle([finished(key, first_id, first, prompt=50, completion=0)])
    # 300 + 100 + 2 x 200 + 200 = 1,000: exactly the limit, so admitted,
    reserve(limiter, key, model="big", prompt=50, max_tokens=50)
    # and nothing more fits.
    with pytest.raises(QuotaExceeded, match="1000 tokens per 168h0m0s"):
        reserve(limiter, key, model="big", prompt=1, max_tokens=1)


def test_a_top_up_counts_from_the_next_request(limiter: RedisLimiter) -> None:
    key = customer(limiter, prices=(1_000_000, 2_000_000))  # 10 + 2 x 10 = 30 per request
    with pytest.raises(QuotaExceeded, match="balance"):
        reserve(limiter, key)
    with limiter._database.session() as session:
        assert key.org_id is not None
        accounts.adjust_balance(session=session, org_id=key.org_id, amount_micros=60,
                                kind="topup", reason="test")
    request_id, admission = reserve(limiter, key)
    assert admission.charged and admission.amount_micros == 30
    reserve(limiter, key)
    with pytest.raises(QuotaExceeded, match="0 are available"):
        reserve(limiter, key)
    limiter.settle([finished(key, request_id, admission, completion=5)])  # cost 20 of 30 held
    with limiter._database.session() as session:
        assert session.get(Organization, key.org_id).balance_micros == 40  # type: ignore[union-attr]
    with pytest.raises(QuotaExceeded, match="10 are available"):
        reserve(limiter, key)


def test_the_sweeper_releases_what_a_crashed_process_held(limiter: RedisLimiter) -> None:
    key = customer(limiter, plan={"max_concurrency": 1})
    crashed, _ = reserve(limiter, key)  # its process dies: never settled, never released
    with pytest.raises(RateLimited, match="running"):
        reserve(limiter, key)
    time.sleep(0.01)  # so the hold is older than a timeout of 0 s by both clocks
    assert limiter.sweep(0) >= 1
    reserve(limiter, key)
    rows = usage_rows(limiter)
    assert [(r.request_id, r.status, r.cost_micros) for r in rows] == [(crashed, "interrupted", 0)]


def test_unreachable_redis_refuses_instead_of_admitting(postgres_url: str,
                                                        tmp_path: Path) -> None:
    database = Database(postgres_url)
    database.upgrade()
    nowhere = RedisLimiter(database, f"redis://127.0.0.1:{free_port()}/0")
    key = customer(nowhere, plan={"rpm": 1000})
    try:
        with pytest.raises(LimitsUnavailable) as refused:
            reserve(nowhere, key)
    finally:
        nowhere.close()
        database.dispose()
    assert refused.value.status_code == 503 and refused.value.code == "limits_unavailable"
    assert int(refused.value.headers["retry-after"]) >= 1
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Reservation)) == 0
