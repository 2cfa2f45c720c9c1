"""Out-of-range numbers and dates sent to the model APIs and the admin API (RELIABILITY.md row
15): each class the fuzzer (tests/test_fuzz_api.py) or a reading of the code found answering a
500, or reaching an engine or the ledger it could break, is refused with a 400 in the wire
protocol's own envelope, naming the parameter, before anything is admitted or held.

The model calls run on SQLite, and on PostgreSQL with Redis (whose INTEGER columns and Lua
numbers are narrower than Python's ints); the admin calls on SQLite and on PostgreSQL. The
upstream deployment matters: unlike an embedded engine, it cannot know the upstream's limits
and relays whatever max_tokens it is given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select

from serai.app import create_app
from serai.config import UpstreamSettings
from serai.engines.upstream import UpstreamEngine
from serai.storage.db import Database
from serai.storage.tables import AuditRecord, Reservation, UsageRow
from serai.testing.mock_upstream import MockConfig, MockUpstream
from tests.support.admin_api import Admin
from tests.support.fake_engine import FakeEngine
from tests.support.tenants import customer
from tests.support.traces import Backend

CHAT = [{"role": "user", "content": "What is the capital of Japan?"}]
INT32_OVER = 2**31  # one past PostgreSQL INTEGER, llama.cpp's int32 and OpenAI's own bound
HUGE = 10**40


@dataclass
class Model:
    http: httpx.AsyncClient
    database: Database
    upstream: MockUpstream
    backend: Backend
    key: str  # a free organization's: nothing prices or caps its requests

    async def post(self, path: str, body: dict[str, Any] | str) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.key}"}
        if isinstance(body, str):  # JSON only Python's parser reads (NaN); POSTs read as JSON
            return await self.http.post(path, content=body, headers=headers)
        return await self.http.post(path, json=body, headers=headers)

    async def get(self, path: str) -> httpx.Response:
        return await self.http.get(path, headers={"authorization": f"Bearer {self.key}"})

    def held(self) -> int:
        """Reservations in the database, and holds in Redis when it admits."""
        with self.database.session() as session:
            rows = int(session.scalar(select(func.count()).select_from(Reservation)) or 0)
        if self.backend.redis_url is None:
            return rows
        client = redis.Redis.from_url(self.backend.redis_url)
        try:
            holds = client.zcard(f"{self.backend.settings.redis_prefix}:holds-by-time")
        finally:
            client.close()
        return rows + int(holds)

    def usage_rows(self) -> int:
        with self.database.session() as session:
            return int(session.scalar(select(func.count()).select_from(UsageRow)) or 0)


@pytest.fixture
async def model(backend: Backend) -> AsyncIterator[Model]:
    mock = MockUpstream(MockConfig())
    upstream = UpstreamEngine(UpstreamSettings(name="up", base_url="http://mock/v1"),
                              transport=httpx.ASGITransport(app=mock.app))
    app = create_app(backend.settings, engines=[FakeEngine(context_length=4096), upstream])
    async with app.router.lifespan_context(app):
        database: Database = app.state.services.database
        with database.session() as session:
            free = customer(session, name="free")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://serai") as http:
            yield Model(http, database, mock, backend, free.secret)


def refusal(response: httpx.Response, param: str, *, anthropic: bool = False) -> str:
    """The refusal's message, once its status, its envelope and the param it names are
    checked."""
    assert response.status_code == 400, response.text
    body = response.json()
    if anthropic:
        assert body["type"] == "error", body
        assert body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error"]["type"] == "invalid_request_error", body
        assert body["error"]["param"] == param, body
    message: str = body["error"]["message"]
    assert param in message, message
    return message


async def assert_refused_before_admission(model: Model, path: str, body: dict[str, Any] | str,
                                          param: str) -> None:
    refusal(await model.post(path, body), param, anthropic=path.startswith("/v1/messages"))
    assert model.held() == 0
    assert model.usage_rows() == 0
    assert model.upstream.stats.requests == 0


@pytest.mark.parametrize("path,field", [
    ("/v1/chat/completions", "max_tokens"),
    ("/v1/chat/completions", "max_completion_tokens"),
    ("/v1/completions", "max_tokens"),
    ("/v1/messages", "max_tokens"),
])
@pytest.mark.parametrize("value", [INT32_OVER, HUGE])
@pytest.mark.parametrize("stream", [False, True])
async def test_token_counts_past_32_bits_are_refused_before_admission(
        model: Model, path: str, field: str, value: int, stream: bool) -> None:
    # Before: a 500 from the reservation's INSERT (SQLite past 64 bits, PostgreSQL past 32),
    # or the upstream asked for 2**31 tokens; /v1/messages clamped 10**40 and ran it.
    body: dict[str, Any] = {"model": "up", field: value, "stream": stream}
    body.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": CHAT})
    await assert_refused_before_admission(model, path, body, field)


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"seed": 2**63}, "seed"),
    ("/v1/chat/completions", {"seed": -(2**63) - 1}, "seed"),
    ("/v1/completions", {"seed": HUGE}, "seed"),
    ("/v1/chat/completions", {"top_k": INT32_OVER}, "top_k"),
    ("/v1/completions", {"top_k": HUGE}, "top_k"),
    ("/v1/messages", {"top_k": INT32_OVER}, "top_k"),
    ("/v1/chat/completions", {"logit_bias": {"1": HUGE}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"50256": -100}}, "logit_bias"),
])
async def test_sampling_numbers_an_engine_cannot_take_are_refused_before_admission(
        model: Model, path: str, extra: dict[str, Any], param: str) -> None:
    # Before: sent on to the engine (llama.cpp takes top_k as an int32, and a request it
    # cannot start fails with a 503 after admission, counted against the deployment) or
    # silently ignored (logit_bias would change the answer, and nothing implements it).
    body: dict[str, Any] = {"model": "up", "max_tokens": 5, **extra}
    body.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": CHAT})
    await assert_refused_before_admission(model, path, body, param)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
async def test_non_finite_numbers_are_refused(model: Model, literal: str) -> None:
    # A guard rather than a fix: Python's JSON parser reads these literals, and the ranges
    # refused them already.
    body = ('{"model": "up", "messages": [{"role": "user", "content": "Hi"}], '
            f'"temperature": {literal}}}')
    await assert_refused_before_admission(model, "/v1/chat/completions", body, "temperature")


@pytest.mark.parametrize("query,param", [
    ("end_date=0001-01-01", "end_date"),
    ("start_date=2026-01-01&end_date=9999-12-31", "end_date"),
    ("start_date=0001-01-01&end_date=2026-01-02", "start_date"),
])
async def test_usage_dates_off_the_calendar_are_refused(model: Model, query: str,
                                                        param: str) -> None:
    # Before: OverflowError (a 500) computing the default start or the end's next day.
    refusal(await model.get(f"/v1/usage?{query}"), param)


@pytest.mark.parametrize("month", ["0000-01", "9999-12"])
async def test_invoice_months_off_the_calendar_are_refused(model: Model, month: str) -> None:
    # Before: ValueError (a 500) making the month's first day or the next month's.
    refusal(await model.get(f"/v1/invoices/{month}"), "month")


# -- the admin API ---------------------------------------------------------------------------

PAST_ID = 2**31  # past any row id: PostgreSQL INTEGER (SQLite raised past 2**63)
FAR_OFFSET = "9999-12-31T23:59:59-23:00"  # a valid ISO 8601 time whose UTC is in year 10000


@pytest.mark.parametrize("method,path,body,param", [
    # ids, in the path, the query and the body
    ("GET", f"/admin/v1/organizations/{HUGE}", None, "org_id"),
    ("GET", f"/admin/v1/organizations/{PAST_ID}/balance", None, "org_id"),
    ("GET", f"/admin/v1/plans/{HUGE}", None, "plan_id"),
    ("GET", f"/admin/v1/price_books/{HUGE}", None, "book_id"),
    ("GET", f"/admin/v1/keys?org_id={HUGE}", None, "org_id"),
    ("GET", f"/admin/v1/audit?after={HUGE}", None, "after"),
    ("GET", f"/admin/v1/audit?org_id={HUGE}", None, "org_id"),
    ("PATCH", "/admin/v1/organizations/1", {"plan_id": 2**63}, "plan_id"),
    ("POST", "/admin/v1/organizations", {"name": "o", "price_book_id": HUGE}, "price_book_id"),
    ("POST", "/admin/v1/keys", {"name": "k", "org_id": PAST_ID}, "org_id"),
    # limits a 32-bit column holds
    ("POST", "/admin/v1/organizations", {"name": "o", "tpm": HUGE}, "tpm"),
    ("POST", "/admin/v1/organizations", {"name": "o", "rpm": INT32_OVER}, "rpm"),
    ("PATCH", "/admin/v1/organizations/1", {"max_concurrency": INT32_OVER}, "max_concurrency"),
    ("POST", "/admin/v1/keys", {"name": "k", "rpm": INT32_OVER}, "rpm"),
    ("POST", "/admin/v1/plans", {"name": "p", "tpm": HUGE}, "tpm"),
    ("POST", "/admin/v1/plans", {"name": "p", "price_ratio_milli": HUGE}, "price_ratio_milli"),
    # plan windows and multipliers, kept as JSON and multiplied on every admission
    ("POST", "/admin/v1/plans", {"name": "p", "windows": [
        {"metric": "requests", "limit": HUGE, "seconds": 60}]}, "windows.0.limit"),
    ("POST", "/admin/v1/plans", {"name": "p", "windows": [
        {"metric": "tokens", "limit": 1, "seconds": HUGE}]}, "windows.0.seconds"),
    ("POST", "/admin/v1/plans", {"name": "p", "model_multipliers": {"m": 1e300}},
     "model_multipliers.m"),
    ("POST", "/admin/v1/plans", '{"name": "p", "model_multipliers": {"m": Infinity}}',
     "model_multipliers.m"),
    ("POST", "/admin/v1/price_books", {"name": "b", "peak_hours": [
        {"start_hour": 1, "end_hour": 2, "multiplier_milli": HUGE}]},
     "peak_hours.0.multiplier_milli"),
    # times whose UTC falls off the calendar
    ("POST", "/admin/v1/keys", {"name": "k", "expires_at": FAR_OFFSET}, "expires_at"),
    ("POST", "/admin/v1/redemption_codes", {"count": 1, "amount_micros": 1, "batch": "b",
                                            "expires_at": FAR_OFFSET}, "expires_at"),
    # dates off the calendar
    ("GET", "/admin/v1/organizations/1/usage?end_date=0001-01-01", None, "end_date"),
    ("GET", "/admin/v1/organizations/1/invoices/9999-12", None, "month"),
])
async def test_admin_numbers_and_times_out_of_range_are_refused(
        admin: Admin, method: str, path: str, body: dict[str, Any] | str | None,
        param: str) -> None:
    # Before: a 500 (an overflow in the database driver, in orjson rendering what was stored,
    # or converting to UTC), or stored as given (a multiplier of Infinity became null).
    org = await admin.ok("POST", "/admin/v1/organizations", json={"name": "acme"})
    path = path.replace("/organizations/1", f"/organizations/{org['id']}")
    written = audit_entries(admin)
    if isinstance(body, str):  # JSON only Python's parser reads (Infinity); POSTs read as JSON
        response = await admin.call(method, path, content=body)
    else:
        response = await admin.call(method, path, json=body)
    refusal(response, param)
    assert audit_entries(admin) == written  # nothing was changed


def audit_entries(admin: Admin) -> int:
    with admin.services.database.session() as session:
        return int(session.scalar(select(func.count()).select_from(AuditRecord)) or 0)


async def test_a_key_for_organization_zero_is_refused_not_made_for_an_organization_named_0(
        admin: Admin) -> None:
    # Before: id 0 found no row, the lookup fell back to names and found the organization
    # named "0", and the INSERT with org_id 0 failed its foreign key (a 500). `false` reads
    # as 0.
    await admin.ok("POST", "/admin/v1/organizations", json={"name": "0"})
    for org_id in (0, False):
        response = await admin.call("POST", "/admin/v1/keys", json={"name": "k",
                                                                    "org_id": org_id})
        refusal(response, "org_id")
