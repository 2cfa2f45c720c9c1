"""The admin API as operators and organizations' admins use it: organizations, plans, prices,
balances, redemption codes, usage and invoices, and who may reach what (RELIABILITY.md row 11).

In process over httpx's ASGI transport with a fake engine; the model calls go through the
official OpenAI SDK.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

import openai
import pytest
from sqlalchemy import func, select

from serai.governance import accounts
from serai.storage.tables import Organization, UsageRow
from tests.support.admin_api import Admin

MODEL = "fake-model"


async def priced_org(admin: Admin, name: str, *, windows: list[dict[str, int]] | None = None,
                     balance: int = 0) -> dict[str, Any]:
    plan = await admin.ok("POST", "/admin/v1/plans", json={
        "name": f"{name}-plan", "windows": windows or [], "rpm": 1000})
    book = await admin.ok("POST", "/admin/v1/price_books", json={"name": f"{name}-book",
                                                                 "currency": "EUR"})
    await admin.ok("PUT", f"/admin/v1/price_books/{book['id']}/prices", json={
        "model": MODEL, "input_micros": 2_000_000, "output_micros": 8_000_000})
    org = await admin.ok("POST", "/admin/v1/organizations", json={
        "name": name, "plan_id": plan["id"], "price_book_id": book["id"]})
    if balance:
        org = await admin.ok("POST", f"/admin/v1/organizations/{org['id']}/balance",
                             json={"amount_micros": balance, "reason": "welcome credit"})
    return org


async def test_an_organization_spends_its_balance_sees_usage_and_invoice_and_redeems_a_code(
        admin: Admin) -> None:
    org = await priced_org(admin, "acme", balance=2_000)
    key = (await admin.ok("POST", "/admin/v1/keys", json={"name": "app",
                                                          "org_id": org["id"]}))["secret"]
    client = admin.sdk(key)

    served = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(100):
            await client.chat.completions.create(
                model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
            served += 1
    assert refused.value.code == "insufficient_quota"
    assert served > 0

    usage = (await admin.http.get("/v1/usage", headers=admin.as_(key))).json()
    [day] = usage["data"]
    assert (day["model"], day["requests"]) == (MODEL, served)
    with admin.services.database.session() as session:
        rows = list(session.scalars(select(UsageRow).where(UsageRow.org_id == org["id"])))
        balance = session.get(Organization, org["id"]).balance_micros  # type: ignore[union-attr]
    spent = sum(r.cost_micros for r in rows)
    assert day["charged_micros"] == spent == 2_000 - balance
    assert day["output_tokens"] == sum(r.completion_tokens for r in rows)

    month = datetime.now(UTC).strftime("%Y-%m")
    invoice = (await admin.http.get(f"/v1/invoices/{month}", headers=admin.as_(key))).json()
    assert invoice["currency"] == "EUR"
    assert invoice["total_micros"] == sum(line["amount_micros"] for line in invoice["lines"]) == spent
    as_csv = await admin.http.get(f"/v1/invoices/{month}?format=csv", headers=admin.as_(key))
    assert as_csv.headers["content-type"].startswith("text/csv")
    *lines, total = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert total["model"] == "TOTAL"
    assert int(total["amount_micros"]) == sum(int(x["amount_micros"]) for x in lines) == spent
    same = await admin.ok("GET", f"/admin/v1/organizations/{org['id']}/invoices/{month}")
    assert same == invoice

    codes = (await admin.ok("POST", "/admin/v1/redemption_codes", json={
        "count": 2, "amount_micros": 5_000, "batch": "launch"}))["data"]
    owner = (await admin.ok("POST", "/admin/v1/keys", json={
        "name": "boss", "org_id": org["id"], "role": "owner"}))["secret"]
    redeemed = await admin.ok("POST", f"/admin/v1/organizations/{org['id']}/redeem", owner,
                              json={"code": codes[0]["code"]})
    assert redeemed["balance_micros"] == balance + 5_000
    again = await admin.call("POST", f"/admin/v1/organizations/{org['id']}/redeem", owner,
                             json={"code": codes[0]["code"]})
    assert again.status_code == 409
    listed = (await admin.ok("GET", "/admin/v1/redemption_codes?batch=launch"))["data"]
    assert [(c["redeemed_by_org_id"] is not None) for c in listed] == [True, False]
    assert all("code" not in c for c in listed)  # the codes themselves are never shown again

    # Topped up, the key works again.
    await client.chat.completions.create(model=MODEL, max_tokens=10,
                                         messages=[{"role": "user", "content": "hi"}])
    balance_view = await admin.ok("GET", f"/admin/v1/organizations/{org['id']}/balance", owner)
    assert [e["kind"] for e in balance_view["entries"]] == ["redemption", "topup"]


async def test_plan_windows_refuse_past_the_quota_and_a_plan_change_applies_at_once(
        admin: Admin) -> None:
    org = await priced_org(admin, "windowed", windows=[
        {"metric": "requests", "limit": 2, "seconds": 3600}], balance=10**9)
    key = (await admin.ok("POST", "/admin/v1/keys", json={"name": "app",
                                                          "org_id": org["id"]}))["secret"]
    client = admin.sdk(key)
    for _ in range(2):
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
    with pytest.raises(openai.RateLimitError) as refused:
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
    assert refused.value.code == "insufficient_quota"
    await admin.ok("PATCH", f"/admin/v1/plans/{org['plan_id']}", json={
        "windows": [{"metric": "requests", "limit": 3, "seconds": 3600}]})
    await client.completions.create(model=MODEL, prompt="hi", max_tokens=3)


async def test_a_key_limited_to_other_networks_is_refused(admin: Admin) -> None:
    org = await admin.ok("POST", "/admin/v1/organizations", json={"name": "netco"})
    far = await admin.ok("POST", "/admin/v1/keys", json={
        "name": "office", "org_id": org["id"], "allowed_cidrs": ["10.0.0.0/8"]})
    near = await admin.ok("POST", "/admin/v1/keys", json={
        "name": "local", "org_id": org["id"], "allowed_cidrs": ["127.0.0.1"]})
    assert near["allowed_cidrs"] == ["127.0.0.1/32"]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await admin.sdk(far["secret"]).models.list()
    assert "may not be used from 127.0.0.1" in refused.value.message
    await admin.sdk(near["secret"]).models.list()
    bad = await admin.call("POST", "/admin/v1/keys", json={
        "name": "x", "org_id": org["id"], "allowed_cidrs": ["ten.zero"]})
    assert bad.status_code == 400 and "not an IP network" in bad.json()["error"]["message"]


async def test_a_viewer_reads_but_changes_nothing(admin: Admin) -> None:
    org = await priced_org(admin, "viewed", balance=1_000)
    viewer = (await admin.ok("POST", "/admin/v1/keys", json={
        "name": "auditor", "org_id": org["id"], "role": "viewer"}))["secret"]
    model_key = await admin.ok("POST", "/admin/v1/keys", json={"name": "app",
                                                               "org_id": org["id"]})
    assert (await admin.ok("GET", f"/admin/v1/organizations/{org['id']}", viewer))["name"] == "viewed"
    listed = (await admin.ok("GET", "/admin/v1/keys", viewer))["data"]
    assert len(listed) == 2
    # Times carry their offset (SQLite hands back naive ones): a client must not read them as
    # its local time.
    assert all(datetime.fromisoformat(k["created_at"]).utcoffset() is not None for k in listed)
    await admin.ok("GET", f"/admin/v1/organizations/{org['id']}/balance", viewer)
    await admin.ok("GET", f"/admin/v1/plans/{org['plan_id']}", viewer)

    writes = [
        ("POST", "/admin/v1/keys", {"name": "mine", "org_id": org["id"]}),
        ("PATCH", f"/admin/v1/keys/{model_key['id']}", {"name": "renamed"}),
        ("DELETE", f"/admin/v1/keys/{model_key['id']}", None),
        ("POST", f"/admin/v1/organizations/{org['id']}/redeem", {"code": "serai-rc-0000"}),
        ("PATCH", f"/admin/v1/organizations/{org['id']}", {"rpm": 5}),
        ("POST", f"/admin/v1/organizations/{org['id']}/balance",
         {"amount_micros": 10, "reason": "gift"}),
        ("POST", "/admin/v1/organizations", {"name": "new"}),
        ("POST", "/admin/v1/plans", {"name": "new"}),
        ("PATCH", f"/admin/v1/plans/{org['plan_id']}", {"rpm": 1}),
        ("POST", "/admin/v1/price_books", {"name": "new"}),
        ("PUT", f"/admin/v1/price_books/{org['price_book_id']}/prices",
         {"model": MODEL, "input_micros": 0, "output_micros": 0}),
        ("POST", "/admin/v1/redemption_codes", {"count": 1, "amount_micros": 1, "batch": "b"}),
    ]
    for method, path, body in writes:
        response = await admin.call(method, path, viewer, json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["type"] == "permission_error"
    with admin.services.database.session() as session:
        keys = accounts.list_keys(session=session, org_id=org["id"])
        assert [(k.name, k.revoked) for k in keys] == [("auditor", False), ("app", False)]
        assert accounts.find_org(session=session, ref=org["id"]).balance_micros == 1_000


async def test_one_organizations_admins_never_reach_anothers_objects(admin: Admin) -> None:
    mine = await priced_org(admin, "initech", balance=1_000)
    theirs = await priced_org(admin, "globex-private", balance=7_777)
    their_key = await admin.ok("POST", "/admin/v1/keys", json={"name": "globex-app",
                                                               "org_id": theirs["id"]})
    secrets_of_b = ["globex", their_key["prefix"], "7777"]
    owner = (await admin.ok("POST", "/admin/v1/keys", json={
        "name": "boss", "org_id": mine["id"], "role": "owner"}))["secret"]
    month = datetime.now(UTC).strftime("%Y-%m")
    b = theirs["id"]
    attempts = [
        ("GET", f"/admin/v1/organizations/{b}", None),
        ("PATCH", f"/admin/v1/organizations/{b}", {"rpm": 1}),
        ("GET", f"/admin/v1/organizations/{b}/balance", None),
        ("POST", f"/admin/v1/organizations/{b}/balance", {"amount_micros": -1, "reason": "x",
                                                         "kind": "adjustment"}),
        ("POST", f"/admin/v1/organizations/{b}/redeem", {"code": "serai-rc-0"}),
        ("GET", f"/admin/v1/organizations/{b}/usage", None),
        ("GET", f"/admin/v1/organizations/{b}/invoices/{month}", None),
        ("GET", f"/admin/v1/keys?org_id={b}", None),
        ("POST", "/admin/v1/keys", {"name": "intruder", "org_id": b}),
        ("PATCH", f"/admin/v1/keys/{their_key['id']}", {"rpm": 1}),
        ("PATCH", f"/admin/v1/keys/{their_key['prefix']}", {"rpm": 1}),
        ("DELETE", f"/admin/v1/keys/{their_key['id']}", None),
        ("DELETE", f"/admin/v1/keys/{their_key['prefix']}", None),
        ("GET", f"/admin/v1/plans/{theirs['plan_id']}", None),
        ("GET", f"/admin/v1/price_books/{theirs['price_book_id']}", None),
        ("GET", "/admin/v1/plans", None),
        ("GET", "/admin/v1/price_books", None),
        ("GET", "/admin/v1/redemption_codes", None),
    ]
    for method, path, body in attempts:
        response = await admin.call(method, path, owner, json=body)
        assert response.status_code in (403, 404), (method, path, response.text)
        assert not any(s in response.text for s in secrets_of_b), (method, path, response.text)
    # What an organization's owner can list holds only its own organization.
    for path in ("/admin/v1/organizations", "/admin/v1/keys"):
        listed = await admin.call("GET", path, owner)
        assert listed.status_code == 200
        assert not any(s in listed.text for s in secrets_of_b), listed.text
    # And a model key of the other organization reads only its own usage.
    usage = await admin.http.get("/v1/usage", headers=admin.as_(their_key["secret"]))
    assert usage.json()["org_id"] == b
    with admin.services.database.session() as session:
        assert accounts.find_org(session=session, ref=b).balance_micros == 7_777
        assert session.scalar(select(func.count()).select_from(UsageRow)) == 0
        assert not accounts.find_key(session=session, ref=str(their_key["id"])).revoked_at


async def test_the_platforms_traffic_counts_every_organizations_requests(admin: Admin) -> None:
    keys = []
    for name in ("acme", "globex"):
        org = await priced_org(admin, name, balance=1_000_000)
        keys.append((await admin.ok("POST", "/admin/v1/keys", json={
            "name": "app", "org_id": org["id"]}))["secret"])
    for key in keys:
        await admin.sdk(key).chat.completions.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    found = await admin.ok("GET", "/admin/v1/traffic")
    assert [w["seconds"] for w in found["windows"]] == [60, 300]
    minute = found["windows"][0]
    assert (minute["requests"], minute["output_tokens"], minute["failed"]) == (2, 8, 0)
    assert minute["requests_per_second"] == 2 / 60 and minute["error_rate"] == 0
    assert len(found["minutes"]) == 60 and sum(m["requests"] for m in found["minutes"]) == 2
    owner = (await admin.ok("POST", "/admin/v1/keys", json={
        "name": "boss", "org_id": org["id"], "role": "owner"}))["secret"]
    refused = await admin.call("GET", "/admin/v1/traffic", owner)
    assert refused.status_code == 403
    assert refused.json()["error"]["message"] == ("Only a platform operator can read the "
                                                  "platform's traffic.")


async def test_model_keys_cannot_use_the_admin_api(admin: Admin) -> None:
    org = await admin.ok("POST", "/admin/v1/organizations", json={"name": "plain"})
    key = (await admin.ok("POST", "/admin/v1/keys", json={"name": "app",
                                                          "org_id": org["id"]}))["secret"]
    response = await admin.call("GET", f"/admin/v1/organizations/{org['id']}", key)
    assert response.status_code == 403


async def test_admin_errors_are_clear(admin: Admin) -> None:
    org = await admin.ok("POST", "/admin/v1/organizations", json={"name": "dup"})
    twice = await admin.call("POST", "/admin/v1/organizations", json={"name": "dup"})
    assert twice.status_code == 409 and "exists already" in twice.json()["error"]["message"]
    no_plan = await admin.call("PATCH", f"/admin/v1/organizations/{org['id']}",
                               json={"plan_id": 999})
    assert no_plan.status_code == 404 and "No plan 999" in no_plan.json()["error"]["message"]
    overdraw = await admin.call("POST", f"/admin/v1/organizations/{org['id']}/balance",
                                json={"amount_micros": -5, "reason": "oops",
                                      "kind": "adjustment"})
    assert overdraw.status_code == 400
    assert "cannot go below zero" in overdraw.json()["error"]["message"]
    negative_topup = await admin.call("POST", f"/admin/v1/organizations/{org['id']}/balance",
                                      json={"amount_micros": -5, "reason": "oops"})
    assert negative_topup.status_code == 400
    # An amount past what the money columns can sum is a typo, refused before it is stored.
    for path, body in ((f"/admin/v1/organizations/{org['id']}/balance",
                        {"amount_micros": 10**30, "reason": "typo"}),
                       ("/admin/v1/redemption_codes",
                        {"count": 1, "amount_micros": 10**19, "batch": "typo"})):
        huge = await admin.call("POST", path, json=body)
        assert huge.status_code == 400 and huge.json()["error"]["param"] == "amount_micros"
    assert (await admin.ok("GET", f"/admin/v1/organizations/{org['id']}/balance")
            )["balance_micros"] == 0
    bad_window = await admin.call("POST", "/admin/v1/plans", json={
        "name": "p", "windows": [{"metric": "hours", "limit": 1, "seconds": 60}]})
    assert bad_window.status_code == 400
    bad_month = await admin.call("GET", f"/admin/v1/organizations/{org['id']}/invoices/2026-13")
    assert bad_month.status_code == 400 and "YYYY-MM" in bad_month.json()["error"]["message"]
    unknown_code = await admin.call("POST", f"/admin/v1/organizations/{org['id']}/redeem",
                                    json={"code": "serai-rc-nothing"})
    assert unknown_code.status_code == 404


async def test_admin_operations_are_listed_in_openapi(admin: Admin) -> None:
    paths = (await admin.http.get("/openapi.json")).json()["paths"]
    for path in ("/admin/v1/organizations", "/admin/v1/plans", "/admin/v1/price_books",
                 "/admin/v1/redemption_codes", "/admin/v1/keys", "/v1/usage",
                 "/v1/invoices/{month}", "/admin/v1/organizations/{org_id}/invoices/{month}"):
        assert path in paths
