"""The console in process: signing in and out, the session cookie and CSRF token, what each
role may see and change, and the pages' figures against the ledger. The browser tests
(tests/test_console_browser.py) drive the same pages in Chromium."""

from __future__ import annotations

import html
import re

import openai
import pytest

from serai.console.web import CONTENT_SECURITY_POLICY
from serai.governance import accounts, audit
from tests.support.admin_api import Admin
from tests.support.console import csrf_of, org_key, sign_in

MODEL = "fake-model"


async def test_signing_in_sets_a_strict_session_cookie_and_sends_the_operator_home(
        admin: Admin) -> None:
    response = await sign_in(admin, admin.operator)
    assert response.status_code == 303
    assert response.headers["location"] == "/console/overview"
    cookie = next(value for name, value in response.headers.multi_items()
                  if name == "set-cookie" and value.startswith("serai_console="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert admin.operator not in cookie  # a random token, never the key itself
    with admin.services.database.session() as session:
        assert audit.entries(session=session, limit=5)[0][0]["action"] == "console.sign_in"


async def test_a_wrong_key_or_a_model_key_cannot_sign_in(admin: Admin) -> None:
    org_id, model_key, _ = org_key(admin, role="viewer")
    wrong = await sign_in(admin, "sk-serai-" + "x" * 40)
    assert wrong.status_code == 401
    assert "Incorrect API key provided: sk-serai-xxxxxx…" in wrong.text
    assert "serai_console=" not in wrong.headers.get("set-cookie", "")
    await admin.services.failed_authentications.write()  # counted, then written each minute
    with admin.services.database.session() as session:
        assert audit.entries(session=session, limit=5)[0][0]["action"] == "auth.failed"
    model = await sign_in(admin, model_key)
    assert model.status_code == 403
    assert "can only call the model API" in model.text
    assert (await admin.http.get(f"/console/orgs/{org_id}/usage")).status_code == 303


async def test_pages_need_a_session_and_send_the_browser_to_sign_in(admin: Admin) -> None:
    response = await admin.http.get("/console/orgs/1/keys")
    assert response.status_code == 303
    assert response.headers["location"] == "/console/login?next=/console/orgs/1/keys"
    htmx = await admin.http.get("/console/orgs/1/usage", headers={"hx-request": "true"})
    assert htmx.headers["hx-redirect"].startswith("/console/login")
    # After signing in, the browser lands where it was going (never outside the console).
    landed = await sign_in(admin, admin.operator, next_path="/console/orgs/1/keys")
    assert landed.headers["location"] == "/console/orgs/1/keys"
    admin.http.cookies.clear()
    elsewhere = await sign_in(admin, admin.operator, next_path="https://evil.example/")
    assert elsewhere.headers["location"] == "/console/overview"


async def test_every_console_answer_carries_the_security_headers(admin: Admin) -> None:
    org_id, _, _ = org_key(admin, role="owner")
    await sign_in(admin, admin.operator)
    for path in ("/console/login", f"/console/orgs/{org_id}/usage", "/console/static/console.js"):
        response = await admin.http.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
    page = await admin.http.get(f"/console/orgs/{org_id}/usage")
    assert page.headers["cache-control"] == "no-store"
    missing = await admin.http.get("/console/orgs/999/usage")  # an error is a page too
    assert missing.status_code == 404 and "No organization 999" in missing.text
    assert missing.headers["x-frame-options"] == "DENY"
    # The model API's answers are not the console's: no page policy on them.
    assert "content-security-policy" not in (await admin.http.get("/health")).headers


async def test_a_form_without_the_session_csrf_token_changes_nothing(admin: Admin) -> None:
    org_id, _, owner = org_key(admin, role="owner")
    await sign_in(admin, owner)
    refused = await admin.http.post(f"/console/orgs/{org_id}/keys",
                                    data={"name": "sneaky", "kind": "model"})
    assert refused.status_code == 403
    forged = await admin.http.post(f"/console/orgs/{org_id}/keys",
                                   data={"name": "sneaky", "kind": "model", "csrf_token": "x" * 43})
    assert forged.status_code == 403
    with admin.services.database.session() as session:
        assert "sneaky" not in {k.name for k in accounts.list_keys(session=session, org_id=org_id)}


async def test_an_owner_creates_a_key_sees_it_once_and_revokes_it(admin: Admin) -> None:
    org_id, _, owner = org_key(admin, role="owner")
    await sign_in(admin, owner)
    page = await admin.http.get(f"/console/orgs/{org_id}/keys")
    created = await admin.http.post(f"/console/orgs/{org_id}/keys", data={
        "name": "billing-service", "kind": "model", "csrf_token": csrf_of(page.text)})
    assert created.status_code == 201
    secret = re.search(r'id="new-secret">(sk-serai-[^<]+)<', created.text)
    assert secret is not None
    # What to do next: a request that works as shown, with this server's address and a model.
    try_it = html.unescape(created.text.split('id="try-it">')[1].split("</pre>")[0])
    assert try_it.startswith("curl http://serai/v1/chat/completions")
    assert f"Bearer {secret[1]}" in try_it and '"model": "fake-model"' in try_it
    # The secret works on the model API, and the next page never shows it again.
    reply = await admin.sdk(secret[1]).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.usage is not None
    again = await admin.http.get(f"/console/orgs/{org_id}/keys")
    assert secret[1] not in again.text and "billing-service" in again.text
    with admin.services.database.session() as session:
        made = next(k for k in accounts.list_keys(session=session, org_id=org_id)
                    if k.name == "billing-service")
    revoked = await admin.http.post(f"/console/orgs/{org_id}/keys/{made.id}/revoke",
                                    data={"csrf_token": csrf_of(again.text)})
    assert revoked.status_code == 200 and "Revoked key billing-service" in revoked.text
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        await admin.sdk(secret[1]).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)


async def test_a_viewer_reads_but_cannot_change_anything(admin: Admin) -> None:
    org_id, _, viewer = org_key(admin, role="viewer")
    await sign_in(admin, viewer)
    page = await admin.http.get(f"/console/orgs/{org_id}/keys")
    assert page.status_code == 200
    assert 'id="create-key"' not in page.text and "Revoke" not in page.text
    assert "viewer role" in page.text
    # Even a hand-made form with the right token is refused, as the admin API refuses it.
    refused = await admin.http.post(f"/console/orgs/{org_id}/keys", data={
        "name": "nope", "kind": "model", "csrf_token": csrf_of(page.text)})
    assert refused.status_code == 403
    assert "viewer role" in refused.text
    with admin.services.database.session() as session:
        model_key = accounts.list_keys(session=session, org_id=org_id)[0]
    refused = await admin.http.post(f"/console/orgs/{org_id}/keys/{model_key.id}/revoke",
                                    data={"csrf_token": csrf_of(page.text)})
    assert refused.status_code == 403
    settings = await admin.http.get(f"/console/orgs/{org_id}/settings")
    assert 'id="settings-form"' not in settings.text
    refused = await admin.http.post(f"/console/orgs/{org_id}/settings", data={
        "retention": "store", "retention_days": "30", "csrf_token": csrf_of(page.text)})
    assert refused.status_code == 403
    with admin.services.database.session() as session:
        assert accounts.find_org(session=session, ref=org_id).retention.policy == "zero"
        assert accounts.list_keys(session=session, org_id=org_id)[0].revoked_at is None


async def test_an_organization_never_sees_another_ones_pages(admin: Admin) -> None:
    org_id, _, owner = org_key(admin, role="owner")
    other_id, _, _ = org_key(admin, role="owner", name="globex")
    await sign_in(admin, owner)
    for page in ("usage", "keys", "plan", "invoices", "settings"):
        response = await admin.http.get(f"/console/orgs/{other_id}/{page}")
        assert response.status_code == 404, page
        assert "globex" not in response.text
    assert (await admin.http.get(f"/console/orgs/{org_id}/usage")).status_code == 200


async def test_usage_plan_windows_and_invoices_show_what_the_ledger_holds(admin: Admin) -> None:
    org_id, model_key, owner = org_key(
        admin, role="owner", prices=(1_000_000, 2_000_000), balance=50_000_000,
        plan={"windows": [{"metric": "requests", "limit": 10, "seconds": 3600}]})
    await sign_in(admin, owner)
    empty = await admin.http.get(f"/console/orgs/{org_id}/usage")
    assert "No requests in the last 30 days" in empty.text
    sdk = admin.sdk(model_key)
    for _ in range(3):
        await sdk.chat.completions.create(model=MODEL, max_tokens=10,
                                          messages=[{"role": "user", "content": "one two"}])
    usage = await admin.http.get(f"/console/orgs/{org_id}/usage")
    by_model = usage.text.split('id="usage-by-model"')[1].split("</table>")[0]
    row = re.search(r'<td>fake-model</td>' + r'\s*<td class="num">([\d.]+)(?: USD)?</td>' * 4,
                    by_model)
    assert row is not None, usage.text
    # 3 requests of 2 prompt and 10 completion tokens at 1 and 2 per million tokens.
    assert row.groups() == ("3", "6", "30", f"{(6 * 1 + 30 * 2) / 1e6:.6f}")
    assert 'data-chart="usage-chart-data"' in usage.text
    plan = await admin.http.get(f"/console/orgs/{org_id}/plan")
    window = re.search(r'<td>requests per 1h</td>\s*<td class="num">10</td>\s*'
                       r'<td class="num">3</td>\s*<td class="num">7</td>', plan.text)
    assert window is not None, plan.text
    assert "<time datetime=" in plan.text  # when room frees up, shown in the browser's zone
    month = (await admin.http.get(f"/console/orgs/{org_id}/invoices")).text
    current = re.search(r'/invoices/(\d{4}-\d{2})\.csv', month)
    assert current is not None
    csv = await admin.http.get(f"/console/orgs/{org_id}/invoices/{current[1]}.csv")
    assert csv.status_code == 200 and "attachment" in csv.headers["content-disposition"]
    assert "fake-model" in csv.text


async def test_the_operator_changes_retention_and_regions_and_an_owner_only_reads_them(
        admin: Admin) -> None:
    org_id, _, owner = org_key(admin, role="owner")
    await sign_in(admin, admin.operator)
    page = await admin.http.get(f"/console/orgs/{org_id}/settings")
    saved = await admin.http.post(f"/console/orgs/{org_id}/settings", data={
        "retention": "store", "retention_days": "14", "allowed_regions": "eu-west, eu-north",
        "csrf_token": csrf_of(page.text)})
    assert saved.status_code == 200 and "Settings saved" in saved.text
    bad = await admin.http.post(f"/console/orgs/{org_id}/settings", data={
        "retention": "store", "retention_days": "0", "csrf_token": csrf_of(page.text)})
    assert bad.status_code == 400 and 'class="error"' in bad.text
    with admin.services.database.session() as session:
        org = accounts.find_org(session=session, ref=org_id)
        assert (org.retention.policy, org.retention.days) == ("store", 14)
        assert org.allowed_regions == ["eu-west", "eu-north"]
    admin.http.cookies.clear()
    await sign_in(admin, owner)
    shown = await admin.http.get(f"/console/orgs/{org_id}/settings")
    assert "kept encrypted for 14 days" in shown.text and "eu-west, eu-north" in shown.text
    assert 'id="settings-form"' not in shown.text


async def test_signing_out_or_revoking_the_key_ends_the_session(admin: Admin) -> None:
    org_id, _, owner = org_key(admin, role="owner")
    await sign_in(admin, owner)
    page = await admin.http.get(f"/console/orgs/{org_id}/keys")
    assert page.status_code == 200
    out = await admin.http.post("/console/logout", data={"csrf_token": csrf_of(page.text)})
    assert out.headers["location"] == "/console/login"
    assert (await admin.http.get(f"/console/orgs/{org_id}/keys")).status_code == 303
    await sign_in(admin, owner)
    assert (await admin.http.get(f"/console/orgs/{org_id}/keys")).status_code == 200
    with admin.services.database.session() as session:
        accounts.revoke_key(session=session, ref=owner[:accounts.PREFIX_LENGTH])
    assert (await admin.http.get(f"/console/orgs/{org_id}/keys")).status_code == 303


async def test_the_playground_reads_a_turns_cost_only_within_the_organization(
        admin: Admin) -> None:
    org_id, model_key, owner = org_key(admin, role="owner", prices=(1_000_000, 2_000_000),
                                       balance=50_000_000)
    other_id, other_key, _ = org_key(admin, role="owner", name="globex")
    reply = await admin.sdk(model_key).chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "one two"}])
    mine = reply.headers["x-request-id"]
    theirs = (await admin.sdk(other_key).chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "one"}])
              ).headers["x-request-id"]
    await sign_in(admin, owner)
    assert (await admin.http.get("/console/playground")).status_code == 200
    turn = (await admin.http.get(f"/console/playground/requests/{mine}")).json()
    assert (turn["input_tokens"], turn["output_tokens"]) == (2, 10)
    assert turn["cost_micros"] == 2 * 1 + 10 * 2 and turn["currency"] == "USD"
    assert (await admin.http.get(f"/console/playground/requests/{theirs}")).status_code == 404
