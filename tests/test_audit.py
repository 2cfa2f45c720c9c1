"""The audit log (docs/security.md): admin and CLI actions are recorded with who did them, the
hash chain exposes a changed or removed entry, refusals are recorded without secrets, an
organization's admin reads only its own entries, and keys never reach the logs in full.

SQLite and PostgreSQL; the admin API in process over httpx's ASGI transport, the CLI through
Typer's runner on the same database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from click.testing import Result
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from serai.app import create_app
from serai.cli import app as cli_app
from serai.config import Settings
from serai.governance import accounts, audit, failed_authentications
from serai.storage.db import Database
from tests.support.admin_api import Admin, admin_api
from tests.support.fake_engine import FakeEngine
from tests.support.tenants import customer

MODEL = "fake-model"


pytestmark = pytest.mark.usefixtures("cli_env")


@dataclass
class Audited(Admin):
    """The admin API, and the CLI on the same database."""

    database_url: str = ""
    data_dir: Path = Path()

    def serai(self, *args: str) -> Result:
        """The CLI on the same database the app uses."""
        return CliRunner().invoke(cli_app, [*args, "--data-dir", str(self.data_dir)],
                                  env={"COLUMNS": "80", "SERAI_DATABASE_URL": self.database_url})

    def rows(self) -> list[dict[str, Any]]:
        with self.services.database.engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(
                text("SELECT * FROM audit_log ORDER BY id"))]


@pytest.fixture
async def admin(database_url: str, tmp_path: Path) -> AsyncIterator[Audited]:
    settings = Settings(data_dir=tmp_path, database_url=database_url)
    async with admin_api(settings, FakeEngine(reply="hello there")) as api:
        yield Audited(api.app, api.http, api.operator, api.services, database_url, tmp_path)


def _prefix(secret: str) -> str:
    return secret[:accounts.PREFIX_LENGTH] + "…"


async def test_admin_and_cli_actions_are_recorded_and_the_chain_verifies(admin: Audited) -> None:
    org = await admin.ok("POST", "/admin/v1/organizations", json={"name": "acme"})
    plan = await admin.ok("POST", "/admin/v1/plans", json={"name": "basic", "rpm": 60})
    book = await admin.ok("POST", "/admin/v1/price_books", json={"name": "eu"})
    await admin.ok("PUT", f"/admin/v1/price_books/{book['id']}/prices", json={
        "model": MODEL, "input_micros": 100, "output_micros": 200})
    await admin.ok("PATCH", f"/admin/v1/organizations/{org['id']}",
                   json={"plan_id": plan["id"], "price_book_id": book["id"]})
    await admin.ok("POST", f"/admin/v1/organizations/{org['id']}/balance",
                   json={"amount_micros": 5_000_000, "reason": "first payment"})
    key = await admin.ok("POST", "/admin/v1/keys", json={"name": "app", "org_id": org["id"]})
    await admin.ok("DELETE", f"/admin/v1/keys/{key['prefix']}")

    created = admin.serai("keys", "create", "--name", "from-cli", "--org", "acme")
    assert created.exit_code == 0, created.output
    revoked = admin.serai("keys", "revoke", _prefix(created.stdout.strip())[:-1])
    assert revoked.exit_code == 0, revoked.output

    rows = admin.rows()
    me = _prefix(admin.operator)
    api_rows = [(r["actor"], r["action"], r["target"], r["org_id"]) for r in rows
                if r["actor"] == me]
    assert api_rows == [
        (me, "org.create", f"org:{org['id']}", org["id"]),
        (me, "plan.create", f"plan:{plan['id']}", None),
        (me, "price_book.create", f"price_book:{book['id']}", None),
        (me, "price.set", f"price_book:{book['id']}", None),
        (me, "org.plan_change", f"org:{org['id']}", org["id"]),
        (me, "balance.topup", f"org:{org['id']}", org["id"]),
        (me, "key.create", f"key:{key['prefix']}", org["id"]),
        (me, "key.revoke", f"key:{key['prefix']}", org["id"]),
    ]
    cli_key = _prefix(created.stdout.strip())[:-1]
    assert [(r["action"], r["target"]) for r in rows if r["actor"] == "cli"] == [
        ("key.create", f"key:{cli_key}"), ("key.revoke", f"key:{cli_key}")]
    price = next(r for r in rows if r["action"] == "price.set")
    details = price["details"] if isinstance(price["details"], dict) else json.loads(
        price["details"])
    assert details == {"model": MODEL, "input_micros": 100, "output_micros": 200,
                       "cached_input_micros": 100}

    verified = admin.serai("audit", "verify")
    assert verified.exit_code == 0, verified.output
    assert f"Audit log intact: {len(rows)} entries." in verified.stdout


async def test_a_changed_entry_makes_verify_fail_naming_it(admin: Audited) -> None:
    for name in ("a", "b", "c", "d"):
        await admin.ok("POST", "/admin/v1/organizations", json={"name": name})
    victim = admin.rows()[2]["id"]
    with admin.services.database.engine.begin() as connection:
        connection.execute(text("UPDATE audit_log SET details = :d WHERE id = :id"),
                           {"d": json.dumps({"name": "someone-else"}), "id": victim})

    result = admin.serai("audit", "verify")
    assert result.exit_code == 1
    assert f"audit entry {victim}: hash mismatch" in result.output
    assert "The 2 entries before it are intact" in result.output


async def test_a_removed_middle_entry_makes_verify_fail(admin: Audited) -> None:
    for name in ("a", "b", "c", "d"):
        await admin.ok("POST", "/admin/v1/organizations", json={"name": name})
    ids = [r["id"] for r in admin.rows()]
    with admin.services.database.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_log WHERE id = :id"), {"id": ids[2]})

    result = admin.serai("audit", "verify")
    assert result.exit_code == 1
    assert f"audit entry {ids[3]}: broken link" in result.output


async def test_failed_authentication_is_recorded_by_prefix_and_no_secret_is_stored(
        admin: Audited) -> None:
    wrong = accounts.KEY_SCHEME + "Zz9" * 14
    answer = await admin.http.get("/v1/models", headers={"authorization": f"Bearer {wrong}"})
    assert answer.status_code == 401
    key = await admin.ok("POST", "/admin/v1/keys", json={"name": "soon-gone"})
    mistyped = key["secret"][:-3] + "xyz"  # a real key's prefix, the rest wrong
    answer = await admin.http.get("/v1/models", headers={"x-api-key": mistyped})
    assert answer.status_code == 401
    await admin.ok("DELETE", f"/admin/v1/keys/{key['id']}")
    answer = await admin.http.get("/v1/models", headers={"x-api-key": key["secret"]})
    assert answer.status_code == 401
    assert not [r for r in admin.rows() if r["action"] == "auth.failed"]  # counted, not written

    assert await admin.services.failed_authentications.write() == 2
    failed = [r for r in admin.rows() if r["action"] == "auth.failed"]
    # A prefix no key has is the sender's own text: it counts as `unknown`, shown as a sample.
    minute = _details(failed[0])["minute"]
    assert {r["target"]: (r["actor"], _details(r)) for r in failed} == {
        "key:unknown": ("unknown", {"count": 1, "network": "127.0.0.0/24", "minute": minute,
                                    "reasons": {"unknown": 1}, "prefixes": [_prefix(wrong)]}),
        f"key:{_prefix(key['secret'])}": (_prefix(key["secret"]), {
            "count": 2, "network": "127.0.0.0/24", "minute": minute,
            "reasons": {"revoked": 1, "wrong_secret": 1}})}
    stored = repr(admin.rows())
    for secret in (wrong, key["secret"], admin.operator):
        assert secret[:accounts.PREFIX_LENGTH] in stored
        assert secret[:accounts.PREFIX_LENGTH + 1] not in stored
    assert admin.serai("audit", "verify").exit_code == 0


def _details(row: dict[str, Any]) -> dict[str, Any]:
    details = row["details"]
    return json.loads(details) if isinstance(details, str) else dict(details)


async def test_random_invalid_keys_write_a_handful_of_counted_entries_and_nothing_per_request(
        admin: Audited) -> None:
    """RELIABILITY.md row 23: 2,000 refused keys (the model API, the admin API and the
    console's sign-in) write nothing while they are refused, then a few entries whose counts
    add up to 2,000, and the chain still verifies."""
    writes: list[str] = []

    def spy(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().split(" ", 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            writes.append(statement)

    before = len(admin.rows())
    event.listen(admin.services.database.engine, "before_cursor_execute", spy)
    try:
        async def refused(n: int) -> None:
            secret = accounts.KEY_SCHEME + secrets.token_urlsafe(32) if n % 4 else \
                secrets.token_urlsafe(24)  # some are not even shaped like a key
            path = "/admin/v1/organizations" if n % 2 else "/v1/models"
            answer = await admin.http.get(path, headers={"authorization": f"Bearer {secret}"})
            assert answer.status_code == 401

        for start in range(0, 1980, 60):
            await asyncio.gather(*(refused(n) for n in range(start, min(start + 60, 1980))))
        page = await admin.http.get("/console/login")
        for _ in range(20):  # each refused sign-in renders the form again, with a new token
            token = re.search(r'name="login_token" value="([^"]+)"', page.text)
            assert token is not None
            page = await admin.http.post("/console/login", data={
                "key": accounts.KEY_SCHEME + secrets.token_urlsafe(32), "login_token": token[1]})
            assert page.status_code == 401
        # Nothing per request: no audit entry, and no write but the periodic sweeper's.
        assert len(admin.rows()) == before and not [w for w in writes if "audit_log" in w]
        assert len(writes) < 20, writes
        assert admin.services.failed_authentications.pending == 2000
    finally:
        event.remove(admin.services.database.engine, "before_cursor_execute", spy)

    await admin.services.failed_authentications.write()
    failed = [r for r in admin.rows() if r["action"] == "auth.failed"]
    assert 1 <= len(failed) <= 2  # one per minute: the run may straddle two
    assert sum(_details(r)["count"] for r in failed) == 2000
    assert {r["target"] for r in failed} == {"key:unknown"}
    assert all(len(_details(r)["prefixes"]) <= failed_authentications.SAMPLE for r in failed)
    assert admin.services.failed_authentications.pending == 0
    assert admin.serai("audit", "verify").exit_code == 0


def test_groups_held_are_bounded_and_a_failed_write_keeps_the_counts(tmp_path: Path) -> None:
    """One client with a network per failure (IPv6 /64s are cheap) cannot grow what is held in
    memory past `max_groups`: the rest counts in one `other` group. A write that fails (here:
    a database without its tables) keeps every count for the next one."""
    database = Database(f"sqlite:///{tmp_path / 'serai.db'}")
    try:
        failed = failed_authentications.FailedAuthentications(database, max_groups=10,
                                                              clock=lambda: 1_800_000_000.0)
        for n in range(5000):
            failed.count(prefix=f"{accounts.KEY_SCHEME}abc{n % 7}…", reason="unknown",
                         client=f"2001:db8:{n:x}::1")
        assert len(failed._groups) == 11 and failed.pending == 5000
        with pytest.raises(OperationalError):
            asyncio.run(failed.write())
        assert failed.pending == 5000
        database.upgrade()
        assert asyncio.run(failed.write()) == 11
        with database.session() as session:
            entries = list(audit.export(session=session))
            assert audit.verify(session=session).ok
        assert sum(e["details"]["count"] for e in entries) == 5000
        [other] = [e for e in entries if e["target"] == "key:other"]
        assert other["details"]["count"] == 4990 and other["details"]["network"] == "other"
    finally:
        database.dispose()


def test_clients_count_by_network() -> None:
    network_of = failed_authentications.network_of
    assert network_of("203.0.113.77") == "203.0.113.0/24"
    assert network_of("::ffff:203.0.113.77") == "203.0.113.0/24"
    assert network_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert network_of(None) == network_of("testclient") == "unknown"


async def test_redemption_codes_are_recorded_without_the_codes(admin: Audited) -> None:
    org = await admin.ok("POST", "/admin/v1/organizations", json={"name": "acme"})
    minted = await admin.ok("POST", "/admin/v1/redemption_codes", json={
        "count": 3, "amount_micros": 1_000_000, "batch": "spring"})
    codes = [c["code"] for c in minted["data"]]
    await admin.ok("POST", f"/admin/v1/organizations/{org['id']}/redeem",
                   json={"code": codes[0]})

    rows = admin.rows()
    assert [(r["action"], r["target"]) for r in rows[-2:]] == [
        ("codes.generate", "batch:spring"), ("balance.redemption", f"org:{org['id']}")]
    assert minted["data"][0]["prefix"] in repr(rows[-1]["details"])
    assert not any(code in repr(rows) for code in codes)


async def test_an_organizations_admin_reads_only_its_own_entries(admin: Audited) -> None:
    ours = await admin.ok("POST", "/admin/v1/organizations", json={"name": "ours"})
    theirs = await admin.ok("POST", "/admin/v1/organizations", json={"name": "theirs"})
    for org in (ours, theirs):
        await admin.ok("POST", f"/admin/v1/organizations/{org['id']}/balance",
                       json={"amount_micros": 1_000_000, "reason": "credit"})
    owner = (await admin.ok("POST", "/admin/v1/keys", json={
        "name": "boss", "org_id": ours["id"], "role": "owner"}))["secret"]
    await admin.ok("POST", "/admin/v1/keys", owner, json={"name": "worker"})

    seen = await admin.ok("GET", "/admin/v1/audit", owner)
    assert {e["org_id"] for e in seen["data"]} == {ours["id"]}
    assert [e["action"] for e in seen["data"]] == ["key.create", "key.create", "balance.topup",
                                                   "org.create"]
    assert seen["data"][0]["actor"] == _prefix(owner)
    refused = await admin.call("GET", f"/admin/v1/audit?org_id={theirs['id']}", owner)
    assert refused.status_code == 404

    everything = await admin.ok("GET", "/admin/v1/audit")
    assert {e["org_id"] for e in everything["data"]} >= {ours["id"], theirs["id"]}
    # Pages: newest first, `after` the previous page's last id, nothing repeated or skipped.
    first = await admin.ok("GET", "/admin/v1/audit?limit=3")
    second = await admin.ok("GET", f"/admin/v1/audit?limit=3&after={first['last_id']}")
    assert first["has_more"]
    assert [e["id"] for e in first["data"] + second["data"]] == [
        e["id"] for e in everything["data"]][:6]


async def test_a_residency_refusal_is_recorded_with_org_and_model(admin: Audited) -> None:
    with admin.services.database.session() as session:
        pinned = customer(session, name="pinned", regions=["eu"])
    with pytest.raises(openai.InternalServerError) as refused:
        await admin.sdk(pinned.secret).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "secret plan"}])
    assert refused.value.code == "region_unavailable"

    entry = admin.rows()[-1]
    assert (entry["action"], entry["org_id"], entry["target"], entry["actor"]) == (
        "residency.refused", pinned.org_id, f"model:{MODEL}", _prefix(pinned.secret))
    assert "secret plan" not in repr(admin.rows())  # never the prompt


async def test_export_writes_every_entry_as_json_lines(admin: Audited, tmp_path: Path) -> None:
    for name in ("a", "b"):
        await admin.ok("POST", "/admin/v1/organizations", json={"name": name})
    out = tmp_path / "audit.jsonl"
    result = admin.serai("audit", "export", "--output", str(out))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["hash"] for e in lines] == [r["hash"] for r in admin.rows()]
    assert lines[1]["prev_hash"] == lines[0]["hash"]

    since_then = admin.serai("audit", "export", "--since", "2000-01-01")
    assert since_then.exit_code == 0 and len(since_then.stdout.splitlines()) == len(lines)
    later = admin.serai("audit", "export", "--since", "2999-01-01")
    assert later.exit_code == 0 and later.stdout == ""


def test_concurrent_appends_chain_one_after_another(database: Database) -> None:
    def append(worker: int) -> None:
        # A Database of its own per thread: no shared in-process lock, as separate gateway
        # processes would append.
        own = Database(database.url)
        try:
            for n in range(10):
                audit.record_alone(own, action="test.append", target=f"worker:{worker}",
                                   details={"n": n})
        finally:
            own.dispose()

    threads = [threading.Thread(target=append, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    with database.session() as session:
        verdict = audit.verify(session=session)
        links = [e["prev_hash"] for e in audit.export(session=session)]
    assert verdict.ok and verdict.intact == 60
    assert len(set(links)) == 60  # no two entries chained to the same predecessor


def test_a_key_logged_at_any_level_comes_out_masked(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    create_app(Settings(data_dir=tmp_path))  # installs the mask, as `serai serve` does
    secret = accounts.KEY_SCHEME + "Ab3_-" * 9
    log = logging.getLogger("serai.test_audit")
    caplog.set_level(logging.DEBUG, logger="serai.test_audit")
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                  logging.CRITICAL):
        log.log(level, "key %s used", secret)
        log.log(level, f"key in the message itself: {secret}")
    try:
        raise ValueError(f"bad key {secret}")
    except ValueError:
        log.exception("failed with %(key)s", {"key": secret})

    assert len(caplog.records) == 11
    assert secret not in caplog.text
    assert caplog.text.count(_prefix(secret)) == 12  # 11 messages and the traceback
    assert all(secret not in r.getMessage() for r in caplog.records)


async def test_a_retention_change_is_recorded(admin: Audited) -> None:
    org = await admin.ok("POST", "/admin/v1/organizations", json={"name": "acme"})
    await admin.ok("PATCH", f"/admin/v1/organizations/{org['id']}",
                   json={"retention": "store", "retention_days": 30})
    key = await admin.ok("POST", "/admin/v1/keys", json={"name": "app", "org_id": org["id"]})
    await admin.ok("PATCH", f"/admin/v1/keys/{key['id']}", json={"retention": "zero"})
    changes = [r for r in admin.rows() if r["action"].endswith(".retention_change")]
    assert [(r["action"], r["org_id"]) for r in changes] == [
        ("org.retention_change", org["id"]), ("key.retention_change", org["id"])]
    details = [json.loads(r["details"]) if isinstance(r["details"], str) else r["details"]
               for r in changes]
    assert (details[0]["retention"], details[0]["retention_days"]) == ("store", 30)
    assert details[1]["retention"] == "zero"
    assert admin.serai("audit", "verify").exit_code == 0
