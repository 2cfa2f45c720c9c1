"""Retention (issue 7): organizations' and keys' retention policies, the zero-retention proof
(RELIABILITY.md row 13) and stored completions."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update
from typer.testing import CliRunner

from serai.app import create_app, sweep
from serai.cli import app as cli_app
from serai.config import Settings
from serai.errors import InvalidRequest
from serai.governance import accounts, stored
from serai.governance.crypto import ContentKeyError, ContentKeys, key_id
from serai.governance.retention import ZERO, Retention
from serai.storage.db import Database
from serai.storage.tables import IdempotencyRecord, StoredCompletion, UsageRow
from serai.types import ToolCall
from tests.support.admin_api import admin_api, sdk
from tests.support.fake_engine import FakeEngine
from tests.support.serving import serving
from tests.support.tenants import Customer, customer
from tests.support.traces import Backend, debug_log_in

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


async def test_the_admin_api_sets_policies_and_refuses_a_looser_key(tmp_path: Path) -> None:
    async with admin_api(Settings(data_dir=tmp_path), FakeEngine()) as admin:
        client = admin.http
        client.headers["authorization"] = f"Bearer {admin.operator}"
        with admin.services.database.session() as session:
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


@pytest.mark.usefixtures("cli_env")
def test_the_cli_sets_policies_and_refuses_a_looser_key(tmp_path: Path) -> None:
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


def _events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_a_zero_retention_organization_leaves_no_trace_of_its_content(backend: Backend) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    echo = FakeEngine(reply=f"You said {canary} and I heard it", context_length=4096)
    broken = FakeEngine(name="broken-model", reply=f"Half of {canary} then broken",
                        fail_after=2, context_length=4096)
    slow = FakeEngine(name="slow-model", reply=" ".join([canary] * 200), delay=0.05,
                      context_length=4096)
    # A model that calls a tool with arguments that are not a JSON object, the canary in them:
    # the Anthropic API answers `input: {}` and logs that it did, never what the model said.
    garbled = FakeEngine(name="tool-model", reply="calling", context_length=4096,
                         tool_calls=(ToolCall("call_1", "lookup", f"{{{canary}"),))
    settings = backend.settings
    with debug_log_in(settings.data_dir / "serai.log"):
        app = create_app(settings, engines=[echo, broken, slow, garbled])
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
                refused = client.post("/chat/completions", json={**ask, "store": True})
                assert refused.status_code == 400
                assert "forbids storing" in refused.json()["error"]["message"]
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
                tools = {"model": "tool-model", "max_tokens": 50,
                         "messages": [{"role": "user", "content": f"Look up {canary}"}],
                         "tools": [{"name": "lookup", "input_schema": {"type": "object"}}]}
                called = client.post("/messages", json=tools)
                assert called.status_code == 200, called.text
                assert called.json()["content"][-1]["input"] == {}
                with client.stream("POST", "/messages", json={**tools, "stream": True}) as sent:
                    assert '"tool_use"' in "".join(_events(sent))
            # Usage metadata is still recorded: every run has its row, whatever its end.
            expected = {"ok": 6, "error": 2, "cancelled": 1}
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


# --- stored completions ---------------------------------------------------------------------

KEY_A, KEY_B = base64.b64encode(b"a" * 32).decode(), base64.b64encode(b"b" * 32).decode()


@dataclass
class Store:
    app: FastAPI
    database: Database
    http: httpx.AsyncClient
    acme: Any  # a customer whose organization stores content for 30 days
    other: Any  # another organization's customer, also storing

    def sdk(self, secret: str) -> openai.AsyncOpenAI:
        return sdk(self.http, secret)


@asynccontextmanager
async def store_server(settings: Settings, engine: FakeEngine | None = None,
                       ) -> AsyncIterator[Store]:
    app = create_app(settings, engines=[engine or FakeEngine(context_length=4096)])
    async with app.router.lifespan_context(app):
        database: Database = app.state.services.database
        with database.session() as session:
            tenants = []
            for name in ("acme", "globex"):
                found = [o for o in accounts.list_orgs(session=session) if o.name == name]
                if found:
                    org = found[0]
                    key, secret = accounts.create_key(session=session, name="again",
                                                      org_id=org.id)
                    tenants.append(Customer(org.id, key, secret))
                else:
                    tenants.append(customer(session, name=name))
                    accounts.update_org(session=session, org_id=tenants[-1].org_id,
                                        retention="store", retention_days=30)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://serai") as http:
            yield Store(app, database, http, *tenants)


def _ask(canary: str) -> list[Any]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Remember {canary}"}]


async def test_a_stored_completion_round_trips_encrypted_and_stays_in_its_organization(
        database_url: str, tmp_path: Path) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url,
                        secret_key=KEY_A)
    engine = FakeEngine(reply=f"Stored {canary} safely", context_length=4096)
    async with store_server(settings, engine) as server:
        acme = server.sdk(server.acme.secret)
        made = await acme.chat.completions.create(
            model="fake-model", messages=_ask(canary), store=True,
            metadata={"project": "apollo"})
        stream = await acme.chat.completions.create(
            model="fake-model", messages=_ask(canary), store=True, stream=True,
            metadata={"project": "gemini"})
        streamed_id = None
        async for chunk in stream:
            streamed_id = chunk.id
        not_stored = await acme.chat.completions.create(model="fake-model",
                                                        messages=_ask(canary))

        got = await acme.chat.completions.retrieve(made.id)
        assert got.choices[0].message.content == f"Stored {canary} safely"
        assert got.model_dump()["metadata"] == {"project": "apollo"}
        assert got.usage is not None and got.usage.total_tokens == made.usage.total_tokens
        assert streamed_id is not None
        got_stream = await acme.chat.completions.retrieve(streamed_id)
        assert got_stream.choices[0].message.content == f"Stored {canary} safely"
        assert got_stream.choices[0].finish_reason == "stop"

        listed = await acme.chat.completions.list()
        assert [c.id for c in listed.data] == [made.id, streamed_id]
        assert not_stored.id not in [c.id for c in listed.data]
        apollo = await acme.chat.completions.list(metadata={"project": "apollo"})
        assert [c.id for c in apollo.data] == [made.id]
        first = await server.http.get("/v1/chat/completions", params={"limit": 1},
                                      headers={"authorization": f"Bearer {server.acme.secret}"})
        assert first.json()["has_more"] is True and first.json()["last_id"] == made.id
        rest = await acme.chat.completions.list(after=made.id, limit=5)
        assert [c.id for c in rest.data] == [streamed_id]
        assert (await acme.chat.completions.list(model="other")).data == []
        messages = await acme.chat.completions.messages.list(made.id)
        assert [m.content for m in messages.data] == ["Be brief.", f"Remember {canary}"]

        # Another organization sees nothing of it: 404 like a completion that never was.
        globex = server.sdk(server.other.secret)
        for call in (globex.chat.completions.retrieve(made.id),
                     globex.chat.completions.messages.list(made.id),
                     globex.chat.completions.delete(made.id)):
            with pytest.raises(openai.NotFoundError):
                await call
        assert (await globex.chat.completions.list()).data == []

        # At rest, only ciphertext: no table holds the canary, in clear, anywhere.
        assert Backend(settings).scan_database(server.database, canary) == []
        if database_url.startswith("sqlite"):
            assert Backend(settings).scan_files(canary) == []  # the -wal included

        deleted = await acme.chat.completions.delete(made.id)
        assert deleted.deleted is True
        with pytest.raises(openai.NotFoundError):
            await acme.chat.completions.retrieve(made.id)
        assert [c.id for c in (await acme.chat.completions.list()).data] == [streamed_id]


async def test_store_is_refused_under_zero_retention_and_without_a_key(tmp_path: Path) -> None:
    async with store_server(Settings(data_dir=tmp_path)) as server:
        headers = {"authorization": f"Bearer {server.acme.secret}"}
        ask = {"model": "fake-model", "messages": _ask("x"), "store": True}
        missing = await server.http.post("/v1/chat/completions", json=ask, headers=headers)
        assert missing.status_code == 503
        assert missing.json()["error"]["code"] == "content_key_missing"
        assert "SERAI_SECRET_KEY" in missing.json()["error"]["message"]
        with server.database.session() as session:
            accounts.update_key(session=session, ref=str(server.acme.key.id), retention="zero")
        zero = await server.http.post("/v1/chat/completions", json=ask, headers=headers)
        assert zero.status_code == 400 and zero.json()["error"]["param"] == "store"
        assert "retention policy" in zero.json()["error"]["message"]
        with server.database.session() as session:
            assert stored.count(session=session) == 0


async def test_a_stored_completion_is_gone_after_its_retention(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, secret_key=KEY_A)
    async with store_server(settings) as server:
        with server.database.session() as session:
            accounts.update_org(session=session, org_id=server.acme.org_id, retention_days=1)
        acme = server.sdk(server.acme.secret)
        made = await acme.chat.completions.create(model="fake-model", messages=_ask("x"),
                                                  store=True)
        with server.database.session() as session:
            row = session.scalars(select(StoredCompletion)).one()
            assert row.expires_ms - row.created_ms == 24 * 3600 * 1000  # the org's one day
            # A day later (the clock moved by moving the expiry).
            session.execute(update(StoredCompletion).values(expires_ms=row.created_ms - 1))
        with pytest.raises(openai.NotFoundError):  # past its time: never served, swept or not
            await acme.chat.completions.retrieve(made.id)
        services = server.app.state.services
        await asyncio.to_thread(sweep, services.gateway.limiter, server.database, 1800)
        with server.database.session() as session:
            assert stored.count(session=session) == 0


async def test_key_rotation_keeps_old_completions_readable(tmp_path: Path) -> None:
    async with store_server(Settings(data_dir=tmp_path, secret_key=KEY_A)) as server:
        old = await server.sdk(server.acme.secret).chat.completions.create(
            model="fake-model", messages=_ask("before rotation"), store=True)
    rotated = Settings(data_dir=tmp_path, secret_key=KEY_B, secret_key_file=tmp_path / "keys")
    (tmp_path / "keys").write_text(f"{KEY_A}\n")
    async with store_server(rotated) as server:
        acme = server.sdk(server.acme.secret)
        new = await acme.chat.completions.create(model="fake-model",
                                                 messages=_ask("after rotation"), store=True)
        assert (await acme.chat.completions.retrieve(old.id)).id == old.id
        with server.database.session() as session:
            sealed_with = dict(session.execute(select(StoredCompletion.completion_id,
                                                      StoredCompletion.cipher_key)).all())
        assert sealed_with == {old.id: key_id(b"a" * 32), new.id: key_id(b"b" * 32)}
        messages = await acme.chat.completions.messages.list(old.id)
        assert messages.data[-1].content == "Remember before rotation"


def test_sealed_content_opens_only_with_its_context_and_a_listed_key() -> None:
    keys = ContentKeys([b"b" * 32, b"a" * 32])
    sealed = keys.seal(b"secret text", context=b"org 1")
    assert b"secret text" not in sealed.data
    assert keys.open(sealed, context=b"org 1") == b"secret text"
    with pytest.raises(ContentKeyError):
        keys.open(sealed, context=b"org 2")  # moved to another organization's row
    with pytest.raises(ContentKeyError):
        ContentKeys([b"a" * 32]).open(sealed, context=b"org 1")
    with pytest.raises(ContentKeyError, match="32 bytes"):
        ContentKeys.configured(base64.b64encode(b"short").decode(), None)


async def test_idempotent_responses_under_store_are_sealed_and_replay_across_processes(
        tmp_path: Path) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    settings = Settings(data_dir=tmp_path / "data", secret_key=KEY_A)
    engine = FakeEngine(reply=f"Sealed {canary} reply", context_length=4096)
    async with store_server(settings, engine) as server:
        headers = {"authorization": f"Bearer {server.acme.secret}", "Idempotency-Key": "k1"}
        ask = {"model": "fake-model", "messages": _ask(canary)}
        first = await server.http.post("/v1/chat/completions", json=ask, headers=headers)
        assert canary in first.text
        with server.database.session() as session:
            record = session.scalars(select(IdempotencyRecord)).one()
            assert record.cipher_key == key_id(b"a" * 32)
        assert Backend(settings).scan_files(canary) == []
    # Another process with the same keys replays it from the database.
    async with store_server(settings, engine) as elsewhere:
        again = await elsewhere.http.post("/v1/chat/completions", json=ask, headers=headers)
        assert again.headers["idempotent-replayed"] == "true" and again.content == first.content
