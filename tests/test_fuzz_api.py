"""Property-based fuzzing of every operation in Serai's own OpenAPI document (RELIABILITY.md
row 15): schemathesis generates valid and invalid requests from /openapi.json and sends them
in process to an app serving a fake engine and an upstream (an in-process mock), authenticated
(a customer's key on /v1, a platform operator's on /admin/v1). Whatever it sends, no answer is
a 5xx, none takes longer than a bound, no request leaves money held once it is answered, and
every answer is what the document states: its status, its content type, and for an error the
envelope of its wire protocol (OpenAI's, Anthropic's on /v1/messages).

The examples are derandomized (Hypothesis seeds them from the test's name), so a run repeats
the last one; SERAI_TEST_FUZZ_EXAMPLES sets how many each operation gets.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import func, select

from serai.app import create_app
from serai.billing import plans
from serai.config import Settings, UpstreamSettings
from serai.engines.upstream import UpstreamEngine
from serai.governance import accounts
from serai.storage.db import Database
from serai.storage.tables import Reservation
from serai.testing.mock_upstream import MockConfig, MockUpstream
from tests.support.fake_engine import FakeEngine
from tests.support.tenants import customer

# The embedded-like fake refuses what does not fit its context; the upstream relays whatever
# max_tokens it is given (it cannot know the upstream's limits), so both are fuzzed.
MODELS = ("fake-model", "up")
# A generous bound for one request in process on a busy 2-core machine; a hang is far beyond it.
ANSWER_WITHIN_S = 10.0
# Examples per operation: enough for the whole file to run in a minute or two on 2 cores;
# SERAI_TEST_FUZZ_EXAMPLES=500 digs deeper.
EXAMPLES = int(os.environ.get("SERAI_TEST_FUZZ_EXAMPLES", "25"))
SECRET_KEY = base64.b64encode(b"f" * 32).decode()


def _app(settings: Settings) -> FastAPI:
    upstream = UpstreamEngine(UpstreamSettings(name="up", base_url="http://mock/v1"),
                              transport=httpx.ASGITransport(app=MockUpstream(MockConfig()).app))
    # A deployments reload re-reads these settings, not the environment the tests run in.
    return create_app(settings, engines=[FakeEngine(context_length=4096), upstream],
                      reread=lambda: settings)


def _served_models(document: dict[str, Any]) -> dict[str, Any]:
    """The document, with the model of each request body one the app serves: a random name is
    a 404 before anything else runs (tests/test_api_openai.py covers that)."""
    for body in document["components"]["schemas"].values():
        if "model" in body.get("properties", {}):
            body["properties"]["model"] = {"type": "string", "enum": list(MODELS)}
    return document


# The document is built without starting anything: it does not depend on the settings.
schema = schemathesis.openapi.from_dict(
    _served_models(_app(Settings(data_dir=Path("/nonexistent"))).openapi()))


@dataclass
class Tenancy:
    """The database every operation's app shares, and the customer calling /v1."""

    database: Database
    settings: Settings
    customer_key: str

    def operator_key(self) -> str:
        """A new platform operator's key: the fuzzer may revoke or restrict the one before."""
        with self.database.session() as session:
            _, secret = accounts.create_key(session=session, name="fuzz-ops", is_admin=True)
        return secret

    def held(self) -> int:
        with self.database.session() as session:
            return int(session.scalar(select(func.count()).select_from(Reservation)) or 0)


@pytest.fixture(scope="module")
def tenancy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenancy]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("fuzz"), secret_key=SECRET_KEY)
    database = Database(settings.resolved_database_url)
    database.upgrade()
    with database.session() as session:
        # Priced, on a plan that counts requests but does not draw the balance: every request
        # computes its worst-case cost and holds it, whatever its size.
        acme = customer(session, prices=(1_000_000, 2_000_000), balance=10**12,
                        plan={"draws_balance": False, "windows": [
                            {"metric": "requests", "limit": 10**6, "seconds": 3600}]})
        org = accounts.find_org(session=session, ref=acme.org_id)
        assert org.price_book_id is not None
        plans.set_price(session=session, price_book_id=org.price_book_id, model="up",
                        input_micros=1_000_000, output_micros=2_000_000)
        accounts.update_org(session=session, org_id=acme.org_id, retention="store",
                            retention_days=30)
    yield Tenancy(database, settings, acme.secret)
    database.dispose()


@pytest.fixture
def app(tenancy: Tenancy) -> FastAPI:
    """A new app for each operation: schemathesis ends an app's lifespan after each test, and
    that closes its engines."""
    return _app(tenancy.settings)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


# Every operation, none excluded: a stream ends with the fake engine's short answer, and a
# reload of the deployments re-reads the same settings. `app` is made once per operation, not
# per example, which is what Hypothesis's function-scoped fixture check warns about.
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_no_operation_answers_a_5xx_or_hangs(case: schemathesis.Case, app: FastAPI,
                                            tenancy: Tenancy) -> None:
    key = tenancy.operator_key() if case.path.startswith("/admin/") else tenancy.customer_key
    started = time.perf_counter()
    case.call_and_validate(app=app, headers={"authorization": f"Bearer {key}"},
                           timeout=ANSWER_WITHIN_S, checks=CHECKS)
    # A stream still going at the timeout is cut there rather than failed: the clock says.
    assert time.perf_counter() - started < ANSWER_WITHIN_S
    deadline = time.monotonic() + 5
    while tenancy.held() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tenancy.held() == 0, "a reservation outlived its request"
