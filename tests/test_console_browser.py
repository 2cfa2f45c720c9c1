"""The console in headless Chromium, as a new user meets it: `serai serve` on a fresh data dir,
the admin key it printed, the real bundled model. Screenshots of every page land in
test-artifacts/console/ (or $SERAI_TEST_ARTIFACTS/console)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.conftest import ARTIFACTS, LiveServer, start_server, stop_server

pytestmark = pytest.mark.live

MODEL = "gemma-3-270m"
ZONE = "Asia/Tokyo"  # not the server's UTC: times must be converted by the browser
SHOTS = ARTIFACTS / "console"


@dataclass
class Tenant:
    server: LiveServer
    model_key: str
    owner: str
    viewer: str


def _cli(server: LiveServer, *args: str) -> str:
    result = server.cli(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def tenant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenant]:
    root = tmp_path_factory.mktemp("console")
    server = start_server(root / "serai-data")
    assert server.admin_key, server.log()
    _cli(server, "prices", "create-book", "acme-book", "--currency", "EUR")
    _cli(server, "prices", "set", "acme-book", MODEL, "--input", "100", "--output", "400")
    _cli(server, "plans", "create", "acme-plan", "--window", "requests:100:1d")
    _cli(server, "orgs", "create", "acme", "--plan", "acme-plan", "--price-book", "acme-book")
    _cli(server, "balance", "topup", "acme", "10", "--reason", "welcome")
    model_key = _cli(server, "keys", "create", "--org", "acme", "--name", "app")
    owner = _cli(server, "keys", "create", "--org", "acme", "--role", "owner", "--name", "ana")
    viewer = _cli(server, "keys", "create", "--org", "acme", "--role", "viewer", "--name", "vic")
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield Tenant(server, model_key, owner, viewer)
    stop_server(server)
    shutil.rmtree(root, ignore_errors=True)


class Browser:
    """One signed-in tab, with every error the page logs (a CSP violation included)."""

    def __init__(self, chromium: Any, base_url: str) -> None:
        self.context = chromium.new_context(timezone_id=ZONE, locale="en-GB",
                                            viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.base_url = base_url
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def go(self, path: str) -> None:
        self.page.goto(self.base_url + path)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def sign_in(self, key: str) -> None:
        self.go("/console/")
        assert self.page.url.startswith(self.base_url + "/console/login")
        self.page.fill("input[name=key]", key)
        self.page.click("#signin button[type=submit]")
        self.page.wait_for_load_state()

    def text(self, selector: str) -> str:
        return str(self.page.inner_text(selector))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def browser(chromium: Any, tenant: Tenant) -> Iterator[Browser]:
    tab = Browser(chromium, tenant.server.base_url)
    yield tab
    tab.close()
    assert not tab.errors, f"the page logged errors: {tab.errors}"


def test_a_wrong_key_cannot_sign_in(browser: Browser, tenant: Tenant) -> None:
    browser.sign_in("sk-serai-" + "w" * 43)
    assert "/console/login" in browser.page.url
    assert "Incorrect API key provided" in browser.text(".error")
    browser.shot("sign-in-refused")
    browser.sign_in(tenant.model_key)  # a model key is a key, but not for the console
    assert "can only call the model API" in browser.text(".error")
    browser.errors.clear()  # the 401 and 403 answers themselves are logged by Chromium


def test_the_key_serai_printed_signs_in(browser: Browser, tenant: Tenant) -> None:
    browser.sign_in(tenant.server.admin_key)
    assert browser.page.url.endswith("/console/overview")
    assert "operator" in browser.text(".whoami")
    browser.shot("operator-home")


def test_the_operator_sets_up_an_organization_whose_owner_then_signs_in(
        chromium: Any, browser: Browser, tenant: Tenant) -> None:
    """What a new operator does first, all in the browser: an organization, its owner's key."""
    browser.sign_in(tenant.server.admin_key)
    page = browser.page
    page.click("nav >> text=Organizations")
    page.fill("#create-organization input[name=name]", "globex")
    page.click("#create-organization button[type=submit]")
    page.locator("#organizations a", has_text="globex").click()
    assert page.url.endswith("/usage") and "globex" in browser.text("h1")
    page.click("main >> text=Keys")
    page.fill("#create-key input[name=name]", "greta")
    page.select_option("#create-key select[name=kind]", "owner")
    page.click("#create-key button[type=submit]")
    owner_key = browser.text("#new-secret").strip()
    browser.shot("operator-made-owner-key")
    owner = Browser(chromium, tenant.server.base_url)
    try:
        owner.sign_in(owner_key)
        assert "globex" in owner.text("h1") and "owner" in owner.text(".whoami")
        assert not owner.errors, owner.errors
    finally:
        owner.close()


def test_an_owner_creates_a_key_sees_it_once_and_revokes_it(browser: Browser,
                                                           tenant: Tenant) -> None:
    browser.sign_in(tenant.owner)
    assert "/console/orgs/" in browser.page.url and browser.page.url.endswith("/usage")
    browser.page.click("nav >> text=Keys")
    browser.page.fill("#create-key input[name=name]", "reporting")
    browser.page.click("#create-key button[type=submit]")
    secret = browser.text("#new-secret").strip()
    assert secret.startswith("sk-serai-")
    browser.shot("key-created")
    models = httpx.get(f"{tenant.server.base_url}/v1/models",
                       headers={"authorization": f"Bearer {secret}"})
    assert models.status_code == 200
    browser.page.click("nav >> text=Keys")  # shown once: a new visit does not show it
    assert browser.page.locator("#new-secret").count() == 0
    assert secret not in browser.page.content()
    row = browser.page.locator("#keys tr", has_text="reporting")
    browser.page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button", has_text="Revoke").click()
    browser.page.wait_for_selector("text=Revoked key reporting")
    assert "revoked" in browser.page.locator("#keys tr", has_text="reporting").inner_text()
    browser.shot("key-revoked")
    refused = httpx.get(f"{tenant.server.base_url}/v1/models",
                        headers={"authorization": f"Bearer {secret}"})
    assert refused.status_code == 401


def test_the_playground_streams_an_answer_and_the_usage_chart_follows(
        browser: Browser, tenant: Tenant) -> None:
    browser.sign_in(tenant.owner)
    page = browser.page
    before = _requests_shown(browser)
    page.click("nav >> text=Playground")
    page.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
    page.fill("#settings textarea[name=system]", "You write long, friendly stories.")
    page.fill("#settings input[name=max_tokens]", "48")
    page.fill("#compose textarea[name=message]", "Tell me a story about a caravan inn.")
    page.click("#send")
    # Streamed: part of the answer is on the page while the request is still running.
    page.wait_for_function("""() => {
        const text = document.querySelector('.turn.assistant .text');
        return text && text.textContent.length > 0
            && document.getElementById('status').textContent === 'streaming…';
    }""")
    page.wait_for_function(
        "() => (document.querySelector('.turn.assistant .meta') || {}).textContent"
        "?.includes('cost')", timeout=60_000)
    meta = browser.text(".turn.assistant .meta")
    assert "tokens in" in meta and "EUR" in meta
    assert browser.text(".turn.assistant .text").strip()
    browser.shot("playground")
    # The chart and table count the playground's turn, then follow new requests without a
    # reload (the panel refreshes itself).
    page.click("nav >> text=Usage")
    page.wait_for_selector("#usage-chart canvas")
    assert _requests_shown(browser) == before + 1
    browser.shot("usage")
    for _ in range(2):
        reply = httpx.post(f"{tenant.server.base_url}/v1/chat/completions", timeout=60,
                           headers={"authorization": f"Bearer {tenant.model_key}"},
                           json={"model": MODEL, "max_tokens": 4,
                                 "messages": [{"role": "user", "content": "Hi"}]})
        assert reply.status_code == 200, reply.text
    page.wait_for_function(
        f"() => document.querySelector('#usage-by-model td.num')?.textContent === "
        f"'{before + 3}'", timeout=40_000)
    page.wait_for_selector("#usage-chart canvas")


def _requests_shown(browser: Browser) -> int:
    cell = browser.page.locator("#usage-by-model td.num").first
    return int(cell.inner_text()) if cell.count() else 0


def test_a_viewer_can_look_but_not_change_anything(browser: Browser, tenant: Tenant) -> None:
    browser.sign_in(tenant.viewer)
    page = browser.page
    for name in ("Usage", "Keys", "Plan", "Invoices", "Settings"):
        page.click(f"nav >> text={name}")
        assert page.locator("main form[method=post]").count() == 0, name
        browser.shot(f"viewer-{name.lower()}")
    page.click("nav >> text=Keys")
    assert "viewer role" in browser.text("main")
    assert page.locator("button", has_text="Revoke").count() == 0


def test_times_show_in_the_browsers_zone(browser: Browser, tenant: Tenant) -> None:
    browser.sign_in(tenant.owner)
    browser.page.click("nav >> text=Keys")
    stamp = browser.page.locator("#keys time").first
    iso = stamp.get_attribute("datetime")
    shown = stamp.inner_text()
    assert iso is not None
    # The same instant on Tokyo's clock: the page states its offset, and the browser converts.
    tokyo = datetime.fromisoformat(iso).astimezone(ZoneInfo(ZONE))
    assert datetime.fromisoformat(iso).utcoffset() is not None, iso
    assert f"{tokyo:%d/%m/%Y, %H:%M:%S}" == shown, (iso, shown)


def test_the_plan_invoices_and_settings_pages_show_the_organization(browser: Browser,
                                                                     tenant: Tenant) -> None:
    browser.sign_in(tenant.owner)
    page = browser.page
    page.click("nav >> text=Plan")
    assert "requests per 1d" in browser.text("#windows")
    balance = browser.text("#balance")
    assert balance.endswith(" EUR") and 9 < float(balance.split()[0]) <= 10  # less what it used
    browser.shot("owner-plan")
    page.click("nav >> text=Invoices")
    with page.expect_download() as download:
        page.locator("#invoices a", has_text="CSV").first.click()
    assert download.value.suggested_filename.endswith(".csv")
    browser.shot("owner-invoices")
    page.click("nav >> text=Settings")
    assert "Zero retention" in browser.text("#retention")
    browser.shot("owner-settings")
