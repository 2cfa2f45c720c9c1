"""The platform operator's console pages in process: the live overview against the traffic sent,
organizations, plans and price books made through the forms, top-ups, deployments and their
reload, the audit log and its pages, and what an organization's owner is refused."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import openai
import pytest

from serai.billing import plans
from serai.console.web import CONTENT_SECURITY_POLICY, PAGE_SIZE
from serai.governance import accounts, audit
from tests.conftest import REPLY_WORDS
from tests.support.admin_api import Admin
from tests.support.console import csrf_of, org_key, sign_in
from tests.support.fake_engine import FakeEngine

MODEL = "fake-model"
def _row(html: str, table_id: str, first_cell: str) -> list[str]:
    """The cells' text of the row of table `table_id` whose first cell reads `first_cell`."""
    table = html.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S):
        cells = [re.sub(r"<[^>]+>", "", cell).strip()
                 for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in #{table_id}")


def _assert_safe(html: str) -> None:
    """No inline script and no inline style: the CSP would block them."""
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag, tag
    for script in re.findall(r"<script\b[^>]*src=[^>]*>(.*?)</script>", html, re.S):
        assert script.strip() == ""
    assert not re.search(r"\sstyle\s*=", html)


async def test_the_overview_counts_the_traffic_sent(admin: Admin, engine: FakeEngine) -> None:
    _, model_key, _ = org_key(admin, role="owner")
    await sign_in(admin, admin.operator)
    quiet = await admin.http.get("/console/overview")
    assert quiet.status_code == 200
    assert "No requests in the last hour" in quiet.text
    assert _row(quiet.text, "rates", "last minute")[1:] == ["0", "0.00", "0.0", "0", "0.0%"]
    sdk = admin.sdk(model_key)
    for _ in range(3):
        await sdk.chat.completions.create(model=MODEL, max_tokens=REPLY_WORDS,
                                          messages=[{"role": "user", "content": "one two"}])
    page = await admin.http.get("/console/overview")
    # 3 requests of 10 output tokens, none failed; over 60 s and over 300 s.
    assert _row(page.text, "rates", "last minute")[1:] == ["3", "0.05", "0.5", "0", "0.0%"]
    assert _row(page.text, "rates", "last 5 minutes")[1:] == ["3", "0.01", "0.1", "0", "0.0%"]
    assert 'data-chart="requests-chart-data"' in page.text
    assert 'data-chart="tokens-chart-data"' in page.text
    engine.fail_after = 2  # the fourth request fails after 2 tokens
    with pytest.raises(openai.APIStatusError):
        await sdk.chat.completions.create(model=MODEL, max_tokens=REPLY_WORDS,
                                          messages=[{"role": "user", "content": "one two"}])
    engine.fail_after = None
    failed = await admin.http.get("/console/overview")
    assert _row(failed.text, "rates", "last minute")[1:] == ["4", "0.07", "0.5", "1", "25.0%"]
    assert "1 failed request in the last hour" in failed.text
    # The chart's data: this minute holds the 4 requests and their 32 output tokens.
    chart = re.search(r'<template id="tokens-chart-data">(.*?)</template>', failed.text, re.S)
    assert chart is not None
    tokens = json.loads(chart[1])
    assert len(tokens["x"]) == 60 and sum(tokens["series"][0]["values"]) == 3 * 10 + 2
    # The compact deployments table, and the htmx panel that refreshes it.
    assert _row(failed.text, "overview-deployments", MODEL)[1:] == [
        "default", "embedded", "healthy", "0 / ∞"]
    panel = await admin.http.get("/console/overview", headers={"hx-request": "true"})
    assert panel.text.lstrip().startswith('<div id="overview-panel"')
    assert 'hx-trigger="every 10s"' in panel.text and "<html" not in panel.text


async def test_the_operator_creates_a_plan_a_price_book_and_an_organization(
        admin: Admin) -> None:
    await sign_in(admin, admin.operator)
    page = await admin.http.get("/console/plans")
    assert "No plans yet" in page.text
    token = csrf_of(page.text)
    made = await admin.http.post("/console/plans", data={
        "csrf_token": token, "name": "starter", "draws_balance": "true",
        "metric_0": "requests", "limit_0": "1000", "seconds_0": "1h",
        "metric_1": "tokens", "limit_1": "", "seconds_1": "",  # an empty row is ignored
        "metric_2": "tokens", "limit_2": "50000", "seconds_2": "86400"})
    assert made.status_code == 201 and "Created plan starter" in made.text
    assert _row(made.text, "plans", "starter")[1] == "requests: 1000 per 1htokens: 50000 per 1d"
    with admin.services.database.session() as session:
        plan = next(p for p in plans.list_plans(session=session) if p.name == "starter")
        assert plan.windows == [{"metric": "requests", "limit": 1000, "seconds": 3600},
                                {"metric": "tokens", "limit": 50000, "seconds": 86400}]
        plan_id = plan.id

    disabled = await admin.http.post(f"/console/plans/{plan_id}/disabled", data={
        "csrf_token": token, "disabled": "true"})
    assert disabled.status_code == 200 and "Plan starter is disabled." in disabled.text
    assert _row(disabled.text, "plans", "starter")[3] == "disabled"
    enabled = await admin.http.post(f"/console/plans/{plan_id}/disabled", data={
        "csrf_token": token, "disabled": "false"})
    assert _row(enabled.text, "plans", "starter")[3] == "active"

    books = await admin.http.get("/console/price-books")
    assert "No price books yet" in books.text
    book = await admin.http.post("/console/price-books", data={
        "csrf_token": token, "name": "standard", "currency": "eur"})
    assert book.status_code == 201 and "Created price book standard" in book.text
    with admin.services.database.session() as session:
        book_id = plans.find_price_book(session=session, ref="standard").id
    priced = await admin.http.post(f"/console/price-books/{book_id}/prices", data={
        "csrf_token": token, "model": MODEL, "input": "0.10", "cached_input": "",
        "output": "0.4"})
    assert priced.status_code == 200
    section = priced.text.split(f'id="book-{book_id}"')[1].split("</section>")[0]
    assert "(EUR, per million tokens)" in section
    assert _row(section, f"prices-{book_id}", MODEL)[1:4] == ["0.100000", "0.100000", "0.400000"]
    with admin.services.database.session() as session:
        price = plans.prices(session=session, price_book_id=book_id)[0]
        assert (price.input_micros, price.output_micros) == (100_000, 400_000)

    orgs = await admin.http.get("/console/organizations")
    assert "No organizations yet" in orgs.text
    created = await admin.http.post("/console/organizations", data={
        "csrf_token": token, "name": "initech", "plan_id": str(plan_id),
        "price_book_id": str(book_id)})
    assert created.status_code == 201 and "Created organization initech" in created.text
    with admin.services.database.session() as session:
        org = accounts.find_org(session=session, ref="initech")
        assert (org.plan_id, org.price_book_id) == (plan_id, book_id)
    assert _row(created.text, "organizations", "initech")[1:6] == [
        "starter", "standard", "0.000000 EUR", "zero", "active"]
    assert f'href="/console/orgs/{org.id}/usage"' in created.text

    removed = await admin.http.post(f"/console/price-books/{book_id}/prices/remove", data={
        "csrf_token": token, "model": MODEL})
    assert "Removed the price of fake-model" in removed.text
    with admin.services.database.session() as session:
        assert plans.prices(session=session, price_book_id=book_id) == []


async def test_bad_input_shows_the_apis_message_and_changes_nothing(admin: Admin) -> None:
    org_key(admin, role="owner", name="acme", prices=(1, 1))
    await sign_in(admin, admin.operator)
    token = csrf_of((await admin.http.get("/console/plans")).text)
    with admin.services.database.session() as session:
        plans_before = len(plans.list_plans(session=session))
        orgs_before = len(accounts.list_orgs(session=session))

    duplicate = await admin.http.post("/console/organizations", data={
        "csrf_token": token, "name": "acme", "plan_id": "", "price_book_id": ""})
    assert duplicate.status_code == 409
    assert "exists already" in duplicate.text and 'class="error"' in duplicate.text
    no_plan = await admin.http.post("/console/organizations", data={
        "csrf_token": token, "name": "globex", "plan_id": "999", "price_book_id": ""})
    assert no_plan.status_code == 404 and "No plan 999." in no_plan.text

    negative = await admin.http.post("/console/plans", data={
        "csrf_token": token, "name": "bad", "metric_0": "requests", "limit_0": "-5",
        "seconds_0": "60"})
    assert negative.status_code == 400
    assert "windows.0.limit: Input should be greater than or equal to 0" in negative.text
    length = await admin.http.post("/console/plans", data={
        "csrf_token": token, "name": "bad", "metric_0": "requests", "limit_0": "5",
        "seconds_0": "soon"})
    assert length.status_code == 400 and "Window 1: write its length" in length.text

    with admin.services.database.session() as session:
        book_id = plans.find_price_book(session=session, ref="acme-book").id
    price = await admin.http.post(f"/console/price-books/{book_id}/prices", data={
        "csrf_token": token, "model": MODEL, "input": "-1", "output": "1"})
    assert price.status_code == 400 and "input_micros" in price.text
    typo = await admin.http.post(f"/console/price-books/{book_id}/prices", data={
        "csrf_token": token, "model": MODEL, "input": "one", "output": "1"})
    assert typo.status_code == 400 and "Input price: &#39;one&#39; is not an amount of money" in typo.text

    with admin.services.database.session() as session:
        assert len(plans.list_plans(session=session)) == plans_before
        assert len(accounts.list_orgs(session=session)) == orgs_before
        assert plans.prices(session=session, price_book_id=book_id)[0].input_micros == 1


async def test_the_operator_tops_up_changes_the_plan_and_disables_an_organization(
        admin: Admin) -> None:
    org_id, model_key, _ = org_key(admin, role="owner", prices=(1_000_000, 1_000_000))
    await sign_in(admin, admin.operator)
    page = await admin.http.get(f"/console/organizations/{org_id}")
    assert page.status_code == 200 and "No top-ups yet" in page.text
    token = csrf_of(page.text)
    topped = await admin.http.post(f"/console/organizations/{org_id}/balance", data={
        "csrf_token": token, "amount": "12.5", "reason": "invoice 118 paid"})
    assert topped.status_code == 200 and "Topped up acme" in topped.text
    assert '<span id="balance">12.500000 USD</span>' in topped.text
    assert "invoice 118 paid" in topped.text
    refused = await admin.http.post(f"/console/organizations/{org_id}/balance", data={
        "csrf_token": token, "amount": "0", "reason": "nothing"})
    assert refused.status_code == 400 and "A top-up adds money" in refused.text
    huge = await admin.http.post(f"/console/organizations/{org_id}/balance", data={
        "csrf_token": token, "amount": "1e30", "reason": "a typo"})
    assert huge.status_code == 400 and "is more than 1,000,000,000 currency units" in huge.text
    listed = await admin.http.get("/console/organizations")
    assert _row(listed.text, "organizations", "acme")[3] == "12.500000 USD"

    disabled = await admin.http.post(f"/console/organizations/{org_id}", data={
        "csrf_token": token, "plan_id": "", "price_book_id": "", "disabled": "true"})
    assert disabled.status_code == 200 and "Saved." in disabled.text
    with admin.services.database.session() as session:
        org = accounts.find_org(session=session, ref=org_id)
        assert org.disabled and org.price_book_id is None and org.balance_micros == 12_500_000
    with pytest.raises(openai.APIStatusError):
        await admin.sdk(model_key).chat.completions.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])


async def test_deployments_show_their_health_and_a_reload_shows_what_it_did_or_why_not(
        admin: Admin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERAI_CONFIG", str(tmp_path / "absent.toml"))  # nothing declared
    await sign_in(admin, admin.operator)
    page = await admin.http.get("/console/deployments")
    assert page.status_code == 200
    cells = _row(page.text, "deployments", "fake-model@local")
    assert cells[1:] == ["fake-model", "default", "embedded", "1", "healthy", "0", "not probed",
                         "0 / ∞"]
    token = csrf_of(page.text)
    reload = await admin.http.post("/console/deployments/reload", data={"csrf_token": token})
    assert reload.status_code == 200 and "Deployments reloaded." in reload.text
    result = reload.text.split('id="reload-result"')[1].split("</section>")[0]
    assert [line.strip() for line in re.findall(r"<li>(.*?)</li>", result)] == [
        "added: none", "removed: none", "replaced: none", "unchanged: none"]
    assert 'data-deployment="fake-model@local"' in reload.text
    # An invalid configuration changes nothing, and the page says why.
    bad = tmp_path / "serai.toml"
    bad.write_text("[[upstreams]]\nname = \n")
    monkeypatch.setenv("SERAI_CONFIG", str(bad))
    refused = await admin.http.post("/console/deployments/reload", data={"csrf_token": token})
    assert refused.status_code == 400
    assert "The configuration is invalid; nothing was changed" in refused.text
    assert 'data-deployment="fake-model@local"' in refused.text
    with admin.services.database.session() as session:
        assert audit.entries(session=session, limit=1)[0][0]["action"] == "deployments.reload"


async def test_the_audit_log_pages_back_and_an_owner_sees_only_its_own(admin: Admin) -> None:
    org_id, _, owner = org_key(admin, role="owner", name="acme")
    other_id, _, _ = org_key(admin, role="owner", name="globex")
    await sign_in(admin, admin.operator)
    token = csrf_of((await admin.http.get("/console/plans")).text)
    for n in range(PAGE_SIZE):  # more than a page of entries, a top-up each
        await admin.http.post(f"/console/organizations/{other_id}/balance", data={
            "csrf_token": token, "amount": "1", "reason": f"top-up {n}"})
    await admin.http.post(f"/console/organizations/{org_id}/balance", data={
        "csrf_token": token, "amount": "2", "reason": "acme's top-up"})

    first = await admin.http.get("/console/audit")
    assert first.status_code == 200
    ids = [int(i) for i in re.findall(r'data-entry-id="(\d+)"', first.text)]
    assert len(ids) == PAGE_SIZE and ids == sorted(ids, reverse=True)
    row = re.search(r'data-entry-id="\d+"><td>(.*?)</td><td><code>(.*?)</code></td>'
                    r'<td>(.*?)</td><td>(.*?)</td>', first.text)
    assert row is not None
    assert row[1].startswith("<time datetime=") and row[3] == "balance.topup"
    assert str(org_id) in row[4]
    assert '{"amount_micros":2000000,"reason":"acme\'s top-up"}' in html.unescape(first.text)
    older = re.search(r'href="(/console/audit\?after=\d+)" rel="next"', first.text)
    assert older is not None
    second = await admin.http.get(older[1])
    more = [int(i) for i in re.findall(r'data-entry-id="(\d+)"', second.text)]
    assert more and max(more) < min(ids)
    assert 'href="/console/audit" rel="first"' in second.text
    with admin.services.database.session() as session:
        everything, _ = audit.entries(session=session, limit=1000)
    seen = ids + more
    while (nxt := re.search(r'href="(/console/audit\?after=\d+)" rel="next"', second.text)):
        second = await admin.http.get(nxt[1])
        seen += [int(i) for i in re.findall(r'data-entry-id="(\d+)"', second.text)]
    assert seen == [entry["id"] for entry in everything]

    # One organization's entries, from its page's link.
    acme = await admin.http.get(f"/console/audit?org_id={org_id}")
    assert "acme&#39;s top-up" in acme.text and "top-up 0" not in acme.text

    admin.http.cookies.clear()
    await sign_in(admin, owner)
    assert (await admin.http.get(f"/console/audit?org_id={other_id}")).status_code == 404
    own = await admin.http.get("/console/audit")
    assert own.status_code == 200
    assert "acme&#39;s top-up" in own.text
    assert "top-up 0" not in own.text and "globex" not in own.text
    with admin.services.database.session() as session:
        mine, _ = audit.entries(session=session, org_id=org_id, limit=1000)
    assert [int(i) for i in re.findall(r'data-entry-id="(\d+)"', own.text)] == [
        entry["id"] for entry in mine][:PAGE_SIZE]


@pytest.mark.parametrize("path", ["/console/overview", "/console/organizations",
                                  "/console/plans", "/console/price-books",
                                  "/console/deployments"])
async def test_an_organizations_owner_gets_the_apis_403(admin: Admin, path: str) -> None:
    org_id, _, owner = org_key(admin, role="owner")
    await sign_in(admin, owner)
    refused = await admin.http.get(path)
    assert refused.status_code == 403
    assert "Only a platform operator can" in refused.text
    assert 'class="error"' in refused.text


async def test_an_organizations_owner_cannot_top_itself_up(admin: Admin) -> None:
    """Forms are refused as the pages are, whatever a page shows."""
    org_id, _, owner = org_key(admin, role="owner")
    await sign_in(admin, owner)
    token = csrf_of((await admin.http.get(f"/console/orgs/{org_id}/keys")).text)
    topup = await admin.http.post(f"/console/organizations/{org_id}/balance", data={
        "csrf_token": token, "amount": "100", "reason": "free money"})
    assert topup.status_code == 403
    with admin.services.database.session() as session:
        assert accounts.find_org(session=session, ref=org_id).balance_micros == 0


async def test_every_operator_page_is_safe_under_the_content_security_policy(
        admin: Admin) -> None:
    org_id, model_key, _ = org_key(admin, role="owner", prices=(1, 1), balance=1_000_000)
    await admin.sdk(model_key).chat.completions.create(
        model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    await sign_in(admin, admin.operator)
    for path in ("/console/overview", "/console/organizations", f"/console/organizations/{org_id}",
                 "/console/plans", "/console/price-books", "/console/deployments",
                 "/console/audit"):
        page = await admin.http.get(path)
        assert page.status_code == 200, path
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert page.headers["cache-control"] == "no-store", path
        _assert_safe(page.text)
        if path in ("/console/overview", f"/console/organizations/{org_id}", "/console/audit"):
            assert "<time datetime=" in page.text, path  # times for the browser to localise
