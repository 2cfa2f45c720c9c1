"""Retention (issue 7): organizations' and keys' retention policies, the zero-retention proof
(RELIABILITY.md row 13) and stored completions."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from serai import accounts
from serai.app import create_app
from serai.cli import app as cli_app
from serai.config import Settings
from serai.errors import InvalidRequest
from serai.retention import ZERO, Retention
from serai.storage.db import Database
from serai.storage.tables import Base, UsageRow
from tests.support.fake_engine import FakeEngine
from tests.support.serving import serving
from tests.support.tenants import customer

# --- policies -------------------------------------------------------------------------------


def _authenticated(database: Database, secret: str) -> accounts.KeyInfo:
    with database.session() as session:
        return accounts.authenticate(session=session, secret=secret)


def test_a_new_organization_keeps_nothing(database: Database) -> None:
    with database.session() as session:
        acme = customer(session)
        assert accounts.find_org(session=session, ref=acme.org_id).retention == ZERO
    assert _authenticated(database, acme.secret).effective_retention == ZERO


def test_a_key_may_be_stricter_than_its_organization_never_looser(database: Database) -> None:
    with database.session() as session:
        acme = customer(session)
        ref = str(acme.key.id)
        with pytest.raises(InvalidRequest, match="organization's retention policy is zero"):
            accounts.update_key(session=session, ref=ref, retention="store", retention_days=1)
        accounts.update_org(session=session, org_id=acme.org_id, retention="store",
                            retention_days=30)
    assert _authenticated(database, acme.secret).effective_retention == Retention("store", 30)
    with database.session() as session:
        with pytest.raises(InvalidRequest, match="at most 30"):
            accounts.update_key(session=session, ref=ref, retention="store", retention_days=31)
        accounts.update_key(session=session, ref=ref, retention="store", retention_days=7)
    assert _authenticated(database, acme.secret).effective_retention == Retention("store", 7)
    with database.session() as session:
        accounts.update_key(session=session, ref=ref, retention="zero")
    assert _authenticated(database, acme.secret).effective_retention == ZERO
    with database.session() as session:
        accounts.update_key(session=session, ref=ref, retention=None)
        # The organization tightening later wins over a key that was stricter before.
        accounts.update_org(session=session, org_id=acme.org_id, retention_days=3)
    assert _authenticated(database, acme.secret).effective_retention == Retention("store", 3)
    with database.session() as session:
        accounts.update_key(session=session, ref=ref, retention="store")  # the org's days
        accounts.update_org(session=session, org_id=acme.org_id, retention="zero")
    assert _authenticated(database, acme.secret).effective_retention == ZERO


def test_store_needs_days_and_zero_takes_none(database: Database) -> None:
    with database.session() as session:
        acme = customer(session)
        with pytest.raises(InvalidRequest, match="needs retention_days"):
            accounts.update_org(session=session, org_id=acme.org_id, retention="store")
        with pytest.raises(InvalidRequest, match="takes no retention_days"):
            accounts.update_org(session=session, org_id=acme.org_id, retention_days=3)


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Database, str]]:
    app = create_app(Settings(data_dir=tmp_path), engines=[FakeEngine()])
    async with app.router.lifespan_context(app):
        database: Database = app.state.services.database
        with database.session() as session:
            _, operator = accounts.create_key(session=session, name="ops", is_admin=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://serai",
                                     headers={"authorization": f"Bearer {operator}"}) as client:
            yield client, database, operator


async def test_the_admin_api_sets_policies_and_refuses_a_looser_key(
        http: tuple[httpx.AsyncClient, Database, str]) -> None:
    client, database, _ = http
    with database.session() as session:
        acme = customer(session)
    org = f"/admin/v1/organizations/{acme.org_id}"
    key = f"/admin/v1/keys/{acme.key.id}"
    assert (await client.get(org)).json()["retention"] == "zero"
    refused = await client.patch(key, json={"retention": "store", "retention_days": 5})
    assert refused.status_code == 400
    assert "retention policy is zero" in refused.json()["error"]["message"]
    changed = await client.patch(org, json={"retention": "store", "retention_days": 10})
    assert changed.status_code == 200
    assert changed.json()["retention"] == "store" and changed.json()["retention_days"] == 10
    stricter = await client.patch(key, json={"retention": "store", "retention_days": 5})
    assert stricter.status_code == 200 and stricter.json()["retention_days"] == 5
    inherit = await client.patch(key, json={"retention": None})
    assert inherit.json()["retention"] is None


def test_the_cli_sets_policies_and_refuses_a_looser_key(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("SERAI_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    data = ["--data-dir", str(tmp_path / "data")]

    def serai(*args: str) -> Any:
        return CliRunner().invoke(cli_app, [*args, *data], env={"COLUMNS": "120"})

    assert serai("orgs", "create", "acme").exit_code == 0
    secret = serai("keys", "create", "--org", "acme").stdout.strip()
    prefix = secret[:len(accounts.KEY_SCHEME) + 6]
    refused = serai("keys", "update", prefix, "--retention", "store")
    assert refused.exit_code == 1 and "retention policy is zero" in refused.output
    done = serai("orgs", "update", "acme", "--retention", "store", "--retention-days", "14")
    assert done.exit_code == 0 and "store for 14 days" in done.output
    assert serai("keys", "update", prefix, "--retention", "store", "--retention-days",
                 "15").exit_code == 1
    stricter = serai("keys", "update", prefix, "--retention", "zero")
    assert stricter.exit_code == 0 and "zero retention" in stricter.output
    database = Database(f"sqlite:///{tmp_path / 'data' / 'serai.db'}")
    try:
        assert _authenticated(database, secret).effective_retention == ZERO
    finally:
        database.dispose()


# --- zero retention: "not stored" means not stored (RELIABILITY.md row 13) -------------------


@dataclass
class Backend:
    """Where a server keeps what it keeps: its data dir, its database and its Redis (if any)."""

    settings: Settings
    redis_url: str | None = None

    def scan_database(self, database: Database, needle: str) -> list[str]:
        """Every row of every table, as text, that contains `needle`."""
        found = []
        with database.engine.connect() as connection:
            for table in Base.metadata.sorted_tables:
                for row in connection.execute(select(table)):
                    if needle in repr(tuple(row)) or any(
                            isinstance(v, bytes) and needle.encode() in v for v in row):
                        found.append(f"{table.name}: {tuple(row)!r}"[:300])
        return found

    def scan_files(self, needle: str) -> list[str]:
        return [str(p) for p in self.settings.data_dir.rglob("*")
                if p.is_file() and needle.encode() in p.read_bytes()]

    def scan_redis(self, needle: str) -> list[str]:
        if self.redis_url is None:
            return []
        import redis

        client = redis.Redis.from_url(self.redis_url)
        found = []
        try:
            for key in client.scan_iter(count=1000):
                kind = client.type(key).decode()
                value: Any = (client.get(key) if kind == "string" else
                              client.hgetall(key) if kind == "hash" else
                              client.zrange(key, 0, -1, withscores=True) if kind == "zset" else
                              client.lrange(key, 0, -1) if kind == "list" else
                              client.smembers(key) if kind == "set" else
                              client.xrange(key) if kind == "stream" else b"")
                if needle.encode() in key or needle.encode() in repr(value).encode():
                    found.append(key.decode(errors="replace"))
        finally:
            client.close()
        return found


@pytest.fixture(params=["sqlite", "postgresql+redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    data_dir = tmp_path / "serai-data"
    if request.param == "sqlite":
        return Backend(Settings(data_dir=data_dir))
    redis_url = request.getfixturevalue("redis_url")
    return Backend(Settings(data_dir=data_dir,
                            database_url=request.getfixturevalue("postgres_url"),
                            redis_url=redis_url,
                            redis_prefix=request.getfixturevalue("redis_prefix")), redis_url)


@contextmanager
def debug_log_in(path: Path) -> Iterator[None]:
    """Everything every logger says, at debug level, into `path` (a file Serai writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def _events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_a_zero_retention_organization_leaves_no_trace_of_its_content(backend: Backend) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    echo = FakeEngine(reply=f"You said {canary} and I heard it", context_length=4096)
    broken = FakeEngine(name="broken-model", reply=f"Half of {canary} then broken",
                        fail_after=2, context_length=4096)
    slow = FakeEngine(name="slow-model", reply=" ".join([canary] * 200), delay=0.05,
                      context_length=4096)
    settings = backend.settings
    with debug_log_in(settings.data_dir / "serai.log"):
        app = create_app(settings, engines=[echo, broken, slow])
        with serving(app) as base_url:
            database: Database = app.state.services.database
            with database.session() as session:
                acme = customer(session)
            ask = {"model": "fake-model", "max_tokens": 50,
                   "messages": [{"role": "user", "content": f"Remember {canary} please"}]}
            auth = {"authorization": f"Bearer {acme.secret}"}
            with httpx.Client(base_url=base_url, headers=auth, timeout=30) as client:
                whole = client.post("/chat/completions", json=ask)
                assert whole.status_code == 200 and canary in whole.text
                with client.stream("POST", "/chat/completions",
                                   json={**ask, "stream": True}) as stream:
                    assert canary in "".join(_events(stream))
                invalid = client.post("/chat/completions", json={
                    **ask, "tools": [{"type": "function", "function": {"name": f"{canary}!"}}]})
                assert invalid.status_code == 400 and canary in invalid.text
                failed = client.post("/chat/completions", json={**ask, "model": "broken-model"})
                assert failed.status_code == 503
                with client.stream("POST", "/chat/completions",
                                   json={**ask, "model": "broken-model", "stream": True}) as cut:
                    assert "engine_unavailable" in "".join(_events(cut))
                with client.stream("POST", "/chat/completions",
                                   json={**ask, "model": "slow-model", "stream": True}) as left:
                    next(left.iter_lines())  # the client goes away after the first event
                deadline = time.monotonic() + 10
                while not slow.closed_early and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert slow.closed_early, "the disconnected stream was not stopped"
                once = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
                first = client.post("/chat/completions", json=ask, headers=once)
                again = client.post("/chat/completions", json=ask, headers=once)
                assert again.headers["idempotent-replayed"] == "true"
                assert again.content == first.content and canary in again.text
                streamed_once = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
                streamed = client.post("/chat/completions", json={**ask, "stream": True},
                                       headers=streamed_once)
                replayed = client.post("/chat/completions", json={**ask, "stream": True},
                                       headers=streamed_once)
                assert replayed.content == streamed.content
                assert replayed.headers["idempotent-replayed"] == "true"
            # Usage metadata is still recorded: every run has its row, whatever its end.
            expected = {"ok": 4, "error": 2, "cancelled": 1}
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with database.session() as session:
                    rows = session.execute(select(UsageRow.status, UsageRow.model,
                                                  UsageRow.prompt_tokens)
                                           .where(UsageRow.org_id == acme.org_id)).all()
                if Counter(r.status for r in rows) == expected:
                    break
                time.sleep(0.05)
            assert Counter(r.status for r in rows) == expected
            assert all(r.prompt_tokens > 0 and r.model for r in rows)
            assert backend.scan_database(database, canary) == []
            assert backend.scan_files(canary) == []  # the WAL and shm included, while open
            assert backend.scan_redis(canary) == []
        # After shutdown (the WAL checkpointed into the database file), and in the log.
        assert backend.scan_files(canary) == []
    log_text = (settings.data_dir / "serai.log").read_text()
    assert "request_id=" in log_text, "the log captured nothing"
    assert canary not in log_text


async def test_another_process_cannot_replay_a_zero_retention_response(tmp_path: Path) -> None:
    """The response lives in the memory of the process that answered: a twin reaching another
    process is told so (409) rather than run and billed a second time."""
    settings = Settings(data_dir=tmp_path)
    one, two = (create_app(settings, engines=[FakeEngine()]) for _ in range(2))
    async with one.router.lifespan_context(one), two.router.lifespan_context(two):
        with one.state.services.database.session() as session:
            acme = customer(session)
        headers = {"authorization": f"Bearer {acme.secret}", "Idempotency-Key": "once"}
        ask = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        answers = []
        for app in (one, one, two):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://serai") as client:
                answers.append(await client.post("/v1/chat/completions", json=ask,
                                                 headers=headers))
    first, replay, elsewhere = answers
    assert replay.content == first.content and replay.headers["idempotent-replayed"] == "true"
    assert elsewhere.status_code == 409
    assert elsewhere.json()["error"]["code"] == "idempotency_response_not_retained"
