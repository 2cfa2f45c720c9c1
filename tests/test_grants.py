"""No key does more than its grant (issue 16): an organization's admin manages only the keys it
may create, the console holds a key's allowed networks at sign-in and on every request, and a
key limited to some models reads only those models' stored completions.

In process over httpx's ASGI transport (SQLite and PostgreSQL); another client address is an
ASGI transport with another `client`, as a request from another network reaches the app.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serai.app import create_app
from serai.config import Settings
from serai.governance import accounts, audit
from tests.support.admin_api import Admin, sdk
from tests.support.console import csrf_of, org_key, sign_in
from tests.support.fake_engine import FakeEngine

OUTSIDE = "10.1.2.3"  # an address outside 127.0.0.1/32, where the test clients come from


def _refusals(admin: Admin, action: str) -> list[dict[str, Any]]:
    with admin.services.database.session() as session:
        found, _ = audit.entries(session=session, limit=1000)
    return [entry for entry in found if entry["action"] == action]


def _key(admin: Admin, ref: int | str) -> accounts.KeyInfo:
    with admin.services.database.session() as session:
        return accounts.key_info(accounts.find_key(session=session, ref=str(ref)))


# -- an organization's admin manages only the roles it may create ------------------------------


async def test_an_admin_manages_only_model_and_viewer_keys(admin: Admin) -> None:
    org = await admin.ok("POST", "/admin/v1/organizations", json={"name": "initech"})

    async def made(name: str, **body: Any) -> dict[str, Any]:
        return await admin.ok("POST", "/admin/v1/keys", json={"name": name, "org_id": org["id"],
                                                              **body})

    owner = await made("boss", role="owner")
    other_admin = await made("ops-lead", role="admin")
    # The admin's own limits: what it must not lift for itself.
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    me = await made("deputy", role="admin", rpm=5, tpm=500, allowed_models=["fake-model"],
                    allowed_cidrs=["127.0.0.1/32"], expires_at=later)
    model_key = await made("app")
    viewer = await made("auditor", role="viewer")

    attempts = [
        ("PATCH", owner, {"rpm": 1}),
        ("PATCH", owner, {"name": "mine now"}),
        ("DELETE", owner, None),
        ("PATCH", other_admin, {"allowed_cidrs": ["0.0.0.0/0"]}),
        ("DELETE", other_admin, None),
        ("PATCH", me, {"rpm": None}),
        ("PATCH", me, {"tpm": None}),
        ("PATCH", me, {"allowed_models": None}),
        ("PATCH", me, {"allowed_cidrs": None}),
        ("PATCH", me, {"expires_at": None}),
        ("PATCH", me, {"retention": None}),
    ]
    for method, target, body in attempts:
        for ref in (target["id"], target["prefix"]):
            refused = await admin.call(method, f"/admin/v1/keys/{ref}", me["secret"], json=body)
            assert refused.status_code == 403, (method, target["name"], body, refused.text)
            error = refused.json()["error"]
            assert error["type"] == "permission_error", refused.text
            assert "manages model and viewer keys only" in error["message"]
            assert "Ask an owner of your organization" in error["message"]
    for body in ({"role": "admin"}, {"role": "owner"}, {"admin": True}):
        refused = await admin.call("POST", "/admin/v1/keys", me["secret"],
                                   json={"name": "promoted", **body})
        assert refused.status_code == 403, (body, refused.text)
        assert "may create model and viewer keys only" in refused.json()["error"]["message"]

    # Each refusal is in the audit log as the admin's, naming what it tried on which key.
    entries = _refusals(admin, "key.refused")
    assert len(entries) == 2 * len(attempts) + 3
    assert {e["actor"] for e in entries} == {me["prefix"] + "…"}
    assert {e["org_id"] for e in entries} == {org["id"]}
    assert {(e["target"], e["details"]["attempted"]) for e in entries} >= {
        (f"key:{owner['prefix']}…", "revoke"), (f"key:{other_admin['prefix']}…", "change"),
        (f"key:{me['prefix']}…", "change"), (f"org:{org['id']}", "create")}

    # Nothing changed: every limit of the admin's own key holds, and no key was revoked.
    mine = _key(admin, me["id"])
    assert (mine.rpm, mine.tpm, mine.allowed_models, mine.allowed_cidrs) == (
        5, 500, ["fake-model"], ["127.0.0.1/32"])
    assert mine.expires_at is not None
    assert _key(admin, owner["id"]).name == "boss"
    assert not any(_key(admin, k["id"]).revoked for k in (owner, other_admin))

    # What it may create, it manages; and it may give up its own key.
    await admin.ok("PATCH", f"/admin/v1/keys/{model_key['id']}", me["secret"],
                   json={"rpm": 10, "allowed_models": None})
    made_viewer = await admin.ok("POST", "/admin/v1/keys", me["secret"],
                                 json={"name": "reader", "role": "viewer"})
    await admin.ok("PATCH", f"/admin/v1/keys/{made_viewer['id']}", me["secret"],
                   json={"name": "reader-2"})
    await admin.ok("DELETE", f"/admin/v1/keys/{viewer['id']}", me["secret"])
    await admin.ok("DELETE", f"/admin/v1/keys/{me['id']}", me["secret"])
    # Owners and operators keep their powers over admins and owners.
    await admin.ok("PATCH", f"/admin/v1/keys/{other_admin['id']}", owner["secret"],
                   json={"rpm": None, "name": "lead"})
    await admin.ok("POST", "/admin/v1/keys", owner["secret"],
                   json={"name": "co-owner", "role": "owner"})
    await admin.ok("PATCH", f"/admin/v1/keys/{owner['id']}", json={"rpm": 100})
    await admin.ok("DELETE", f"/admin/v1/keys/{other_admin['id']}", owner["secret"])


async def test_the_consoles_forms_refuse_an_admin_what_the_api_refuses(admin: Admin) -> None:
    org_id, _, admin_key = org_key(admin, role="admin")
    with admin.services.database.session() as session:
        owner, _ = accounts.create_key(session=session, name="boss", org_id=org_id, role="owner")
    await sign_in(admin, admin_key)
    page = await admin.http.get(f"/console/orgs/{org_id}/keys")
    assert page.status_code == 200
    row = page.text.split(f'data-key-id="{owner.id}"')[1].split("</tr>")[0]
    assert "Revoke" not in row  # the page offers only what the key may do
    refused = await admin.http.post(f"/console/orgs/{org_id}/keys/{owner.id}/revoke",
                                    data={"csrf_token": csrf_of(page.text)})
    assert refused.status_code == 403
    assert "manages model and viewer keys only" in refused.text
    promoted = await admin.http.post(f"/console/orgs/{org_id}/keys", data={
        "name": "promoted", "kind": "owner", "csrf_token": csrf_of(page.text)})
    assert promoted.status_code == 403
    assert "may create model and viewer keys only" in promoted.text
    assert [e["details"]["attempted"] for e in _refusals(admin, "key.refused")] == [
        "create", "revoke"]
    assert not _key(admin, owner.id).revoked
    with admin.services.database.session() as session:
        assert "promoted" not in [k.name for k in accounts.list_keys(session=session,
                                                                      org_id=org_id)]


# -- the console honours a key's allowed networks, expiry and revocation -----------------------


@pytest.fixture
async def outside(admin: Admin) -> AsyncIterator[httpx.AsyncClient]:
    """A browser at OUTSIDE, on the same app."""
    transport = httpx.ASGITransport(app=admin.app, client=(OUTSIDE, 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://serai") as http:
        yield http


async def test_a_console_sign_in_from_outside_the_keys_networks_is_refused(
        admin: Admin, outside: httpx.AsyncClient) -> None:
    org_id, _, owner = org_key(admin, role="owner")
    with admin.services.database.session() as session:
        accounts.update_key(session=session, ref=owner[:accounts.PREFIX_LENGTH],
                            allowed_cidrs=["127.0.0.0/8"])
    far = Admin(admin.app, outside, admin.operator, admin.services)
    refused = await sign_in(far, owner)
    assert refused.status_code == 403
    assert f"may not be used from {OUTSIDE}" in refused.text
    assert "serai_console=" not in refused.headers.get("set-cookie", "")
    assert (await outside.get(f"/console/orgs/{org_id}/keys")).status_code == 303
    [entry] = _refusals(admin, "console.sign_in_refused")
    assert entry["target"] == f"key:{owner[:accounts.PREFIX_LENGTH]}…"
    assert entry["org_id"] == org_id and entry["details"]["client"] == OUTSIDE
    # From inside its networks the same key signs in.
    assert (await sign_in(admin, owner)).status_code == 303


async def test_a_console_session_stops_when_the_keys_networks_no_longer_hold_its_address(
        admin: Admin, outside: httpx.AsyncClient) -> None:
    org_id, _, owner = org_key(admin, role="owner")
    prefix = owner[:accounts.PREFIX_LENGTH]
    with admin.services.database.session() as session:
        accounts.update_key(session=session, ref=prefix, allowed_cidrs=["127.0.0.1/32"])
    await sign_in(admin, owner)
    keys_page = f"/console/orgs/{org_id}/keys"
    assert (await admin.http.get(keys_page)).status_code == 200
    # The session's cookie, presented from another network, opens nothing there.
    outside.cookies.update(admin.http.cookies)
    stolen = await outside.get(keys_page)
    assert stolen.status_code == 403 and f"may not be used from {OUTSIDE}" in stolen.text
    assert 'id="keys"' not in stolen.text
    # The key's networks narrowed: the session stops on its next request, forms included.
    page = await admin.http.get(keys_page)
    with admin.services.database.session() as session:
        accounts.update_key(session=session, ref=prefix, allowed_cidrs=["10.0.0.0/8"])
    assert (await admin.http.get(keys_page)).status_code == 403
    made = await admin.http.post(keys_page, data={"name": "late", "kind": "model",
                                                  "csrf_token": csrf_of(page.text)})
    assert made.status_code == 403
    with admin.services.database.session() as session:
        assert "late" not in [k.name for k in accounts.list_keys(session=session,
                                                                  org_id=org_id)]
    # The API judges the same address by the same check.
    api = await admin.call("GET", "/admin/v1/keys", owner)
    assert api.status_code == 403 and "may not be used from 127.0.0.1" in api.text


async def test_a_console_session_stops_when_its_key_expires(admin: Admin) -> None:
    org_id, _, owner = org_key(admin, role="owner")
    await sign_in(admin, owner)
    assert (await admin.http.get(f"/console/orgs/{org_id}/usage")).status_code == 200
    with admin.services.database.session() as session:
        accounts.update_key(session=session, ref=owner[:accounts.PREFIX_LENGTH],
                            expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert (await admin.http.get(f"/console/orgs/{org_id}/usage")).status_code == 303
    expired = await sign_in(admin, owner)
    assert expired.status_code == 401 and "expired" in expired.text


# -- stored completions follow the reading key's allowed models --------------------------------

KEY = base64.b64encode(b"k" * 32).decode()


async def test_a_key_limited_to_a_model_reads_only_that_models_stored_completions(
        database_url: str, tmp_path: Path) -> None:
    engines = [FakeEngine(name="model-x", reply="from x", context_length=4096),
               FakeEngine(name="model-y", reply="from y", context_length=4096)]
    app = create_app(Settings(data_dir=tmp_path, database_url=database_url, secret_key=KEY),
                     engines=engines)
    async with app.router.lifespan_context(app):
        # model-x is also served under an alias; a completion is stored under the name asked.
        app.state.services.gateway.router.add(engines[0], deployment="x-2", aliases=["x-latest"])
        database = app.state.services.database
        with database.session() as session:
            org = accounts.create_org(session=session, name="acme")
            accounts.update_org(session=session, org_id=org.id, retention="store",
                                retention_days=30)
            _, both = accounts.create_key(session=session, name="both", org_id=org.id)
            _, only_x = accounts.create_key(session=session, name="x", org_id=org.id,
                                            allowed_models=["model-x"])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://serai") as http:
            everything = sdk(http, both)
            ask = [{"role": "user", "content": "hello"}]
            x = await everything.chat.completions.create(model="model-x", messages=ask,
                                                         store=True)
            y = await everything.chat.completions.create(model="model-y", messages=ask,
                                                         store=True)
            limited = sdk(http, only_x)
            assert (await limited.chat.completions.retrieve(x.id)).id == x.id
            calls: list[Callable[[], Awaitable[Any]]] = [
                lambda: limited.chat.completions.retrieve(y.id),
                lambda: limited.chat.completions.messages.list(y.id),
                lambda: limited.chat.completions.delete(y.id),
                lambda: limited.chat.completions.list(after=y.id)]
            for call in calls:
                with pytest.raises(openai.NotFoundError, match="No stored chat completion"):
                    await call()
            assert [c.id for c in (await limited.chat.completions.list()).data] == [x.id]
            assert (await limited.chat.completions.list(model="model-y")).data == []
            # The unrestricted key still reaches both: nothing was deleted.
            assert [c.id for c in (await everything.chat.completions.list()).data] == [
                x.id, y.id]
            # Asked for by an alias of model-x, a completion is still model-x's.
            aliased = await limited.chat.completions.create(model="x-latest", messages=ask,
                                                            store=True)
            assert (await limited.chat.completions.retrieve(aliased.id)).id == aliased.id
            assert [c.id for c in (await limited.chat.completions.list()).data] == [
                x.id, aliased.id]
            assert (await limited.chat.completions.delete(x.id)).deleted is True
