"""Retention (issue 7): organizations' and keys' retention policies, the zero-retention proof
(RELIABILITY.md row 13) and stored completions."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from serai import accounts
from serai.app import create_app
from serai.cli import app as cli_app
from serai.config import Settings
from serai.errors import InvalidRequest
from serai.retention import ZERO, Retention
from serai.storage.db import Database
from tests.support.fake_engine import FakeEngine
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
