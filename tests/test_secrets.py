"""No key leaks (RELIABILITY.md row 12): canary API keys and a canary upstream credential go
through every path with debug logging and forced errors, then every file Serai wrote (the
database with its -wal and -shm, the log), every database row and every Redis key is searched
for them in full; so is every answer a client received. On SQLite, and on PostgreSQL + Redis.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import select
from typer.testing import CliRunner

from serai.api.deps import Services
from serai.app import create_app
from serai.cli import app as cli_app
from serai.config import Settings, UpstreamSettings
from serai.governance import accounts
from serai.storage.db import Database
from serai.storage.tables import AuditRecord
from serai.testing.mock_upstream import MockConfig
from tests.support.fake_engine import FakeEngine
from tests.support.ledger_rows import usage_rows
from tests.support.serving import serving
from tests.support.tenants import customer
from tests.support.traces import Backend, debug_log_in
from tests.test_upstream import MockServer

UPSTREAM_KEY_ENV = "CANARY_UPSTREAM_KEY"


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer() as server:
        yield server


def _key_shaped() -> str:
    return accounts.KEY_SCHEME + secrets.token_urlsafe(32)


def test_no_full_key_is_written_anywhere_or_answered(
        backend: Backend, upstream: MockServer, monkeypatch: pytest.MonkeyPatch) -> None:
    upstream_key = f"upstream-canary-{secrets.token_hex(16)}"
    monkeypatch.setenv(UPSTREAM_KEY_ENV, upstream_key)
    settings = backend.settings.model_copy(update={"upstreams": [UpstreamSettings(
        name="mock-model", base_url=upstream.url, api_key_env=UPSTREAM_KEY_ENV,
        read_timeout_s=2.0, connect_timeout_s=2.0)]})
    engine = FakeEngine(reply="a b c d e f g h", context_length=4096, delay=0.02)
    broken = FakeEngine(name="broken-model", reply="a b c d", fail_after=2, context_length=4096)
    answers: list[httpx.Response] = []
    with debug_log_in(settings.data_dir / "serai.log"):
        app = create_app(settings, engines=[engine, broken])
        with serving(app) as base_url:
            database: Database = app.state.services.database
            with database.session() as session:
                acme = customer(session)
                _, admin = accounts.create_key(session=session, name="ops", is_admin=True)
                old, revoked = accounts.create_key(session=session, name="old",
                                                   org_id=acme.org_id)
                accounts.revoke_key(session=session, ref=str(old.id))
            unknown = _key_shaped()
            canaries = [acme.secret, admin, revoked, unknown, upstream_key]
            ask = {"model": "fake-model", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hello"}]}
            with httpx.Client(base_url=base_url, timeout=30) as client:
                def post(key: str, body: dict[str, object], path: str = "/chat/completions",
                         **headers: str) -> httpx.Response:
                    answer = client.post(path, json=body, headers={
                        "authorization": f"Bearer {key}", **headers})
                    answers.append(answer)
                    return answer

                assert post(acme.secret, ask).status_code == 200
                assert post(acme.secret, {**ask, "stream": True}).status_code == 200
                assert post(acme.secret, {**ask, "temperature": 9}).status_code == 400
                assert post(acme.secret, {**ask, "model": "broken-model"}).status_code == 503
                assert post(acme.secret, {**ask, "model": "broken-model",
                                          "stream": True}).status_code == 200
                assert post(acme.secret, {**ask, "model": "mock-model"}).status_code == 200
                upstream.mock.config = MockConfig(failure="401")  # refuses Serai's credential
                assert post(acme.secret, {**ask, "model": "mock-model"}).status_code == 503
                upstream.mock.config = MockConfig(failure="503")
                assert post(acme.secret, {**ask, "model": "mock-model"}).status_code == 503
                upstream.mock.config = MockConfig()
                once = {"Idempotency-Key": f"retry-{secrets.token_hex(8)}"}
                post(acme.secret, ask, **once)
                assert post(acme.secret, ask, **once).headers["idempotent-replayed"] == "true"
                with client.stream("POST", "/chat/completions", json={**ask, "stream": True},
                                   headers={"authorization": f"Bearer {acme.secret}"}) as left:
                    next(left.iter_lines())  # the client goes away mid-stream
                # Anthropic's header, the wrong keys, and the admin API.
                anthropic = client.post("/messages", json={**ask, "model": "fake-model"},
                                        headers={"x-api-key": acme.secret,
                                                 "anthropic-version": "2023-06-01"})
                answers.append(anthropic)
                assert anthropic.status_code == 200
                assert post(unknown, ask).status_code == 401
                assert post(revoked, ask).status_code == 401
                listed = client.get(f"{base_url.removesuffix('/v1')}/admin/v1/keys",
                                    headers={"authorization": f"Bearer {admin}"})
                answers.append(listed)
                assert listed.status_code == 200
                # The console: signing in with each key (a session for the admin key only),
                # then a page, and the Prometheus scrape.
                root = base_url.removesuffix("/v1")
                for key, status in ((admin, 200), (unknown, 401), (revoked, 401),
                                    (acme.secret, 403)):
                    with httpx.Client(base_url=root, timeout=30) as browser:
                        form = browser.get("/console/login")
                        token = form.text.split('name="login_token" value="')[1].split('"')[0]
                        signed = browser.post("/console/login", follow_redirects=True, data={
                            "key": key, "login_token": token, "next": "/console/audit"})
                        answers += [form, signed]
                        assert signed.status_code == status, signed.text
                answers.append(client.get(f"{root}/metrics"))
                assert answers[-1].status_code == 200
            deadline = time.monotonic() + 10  # the rows of the last requests are written
            while app.state.services.gateway.ledger.backlog and time.monotonic() < deadline:
                time.sleep(0.05)
            for canary in canaries:
                assert backend.scan_database(database, canary) == [], "a key in the database"
                assert backend.scan_files(canary) == [], "a key in a file (-wal, -shm included)"
                assert backend.scan_redis(canary) == [], "a key in Redis"
        for canary in canaries:  # after shutdown: the WAL checkpointed, the log complete
            assert backend.scan_files(canary) == []
    log = (settings.data_dir / "serai.log").read_text()
    assert "request_id=" in log and "status=401" in log, "the log captured nothing"
    for canary in canaries:
        assert canary not in log
        for answer in answers:
            assert canary not in answer.text, f"{answer.request.url} answered a key"
    # What is kept of a refused key is the prefix its error message shows, in the audit log
    # (written at shutdown): a revoked key's as the entry's target, an unknown one's as a
    # sample of the prefixes no key has.
    database = Database(settings.resolved_database_url)
    try:
        with database.session() as session:
            refused = {row.target: row.details for row in session.scalars(
                select(AuditRecord).where(AuditRecord.action == "auth.failed"))}
            actions = set(session.scalars(select(AuditRecord.action)))
    finally:
        database.dispose()
    assert set(refused) == {"key:unknown", f"key:{accounts.shown_prefix(revoked)}"}
    assert refused["key:unknown"]["prefixes"] == [accounts.shown_prefix(unknown)]
    assert "console.sign_in" in actions  # the admin key's session, named by its prefix


# --- credentials in an upstream's base_url ------------------------------------------------------

def _credentialed_urls(secret: str, root: str = "https://gpu-1:8000/v1") -> list[str]:
    """Every way a secret may ride in a URL: user and password, a token alone as the user, a
    query parameter (first or not), a fragment."""
    scheme, rest = root.split("://")
    return [f"{scheme}://serai:{secret}@{rest}", f"{scheme}://{secret}@{rest}",
            f"{root}?api_key={secret}", f"{root}?api-version=1&key={secret}",
            f"{root}#{secret}"]


def test_credentials_in_an_upstream_url_are_refused_naming_the_setting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"url-canary-{secrets.token_hex(8)}"
    for url in _credentialed_urls(secret):
        with pytest.raises(ValidationError) as refused:
            Settings(data_dir=tmp_path, upstreams=[{"name": "m", "base_url": url}])
        [error] = refused.value.errors()
        assert error["loc"] == ("upstreams", 0, "base_url")
        assert "api_key_env" in error["msg"] and "api_key_file" in error["msg"], url
        assert secret not in str(refused.value)  # never quoted back
        # `serai serve` stops before anything starts, saying which setting and what to use.
        config = tmp_path / "serai.toml"
        config.write_text(f'[[upstreams]]\nname = "m"\nbase_url = "{url}"\n')
        monkeypatch.setenv("SERAI_CONFIG", str(config))
        result = CliRunner().invoke(cli_app, ["serve", "--data-dir", str(tmp_path)],
                                    env={"COLUMNS": "200"})
        assert result.exit_code == 2, result.output
        assert "upstreams.0.base_url" in result.output and "api_key_env" in result.output
        assert secret not in result.output


async def test_an_upstream_url_with_credentials_reaches_no_listing_metric_or_log(
        tmp_path: Path, upstream: MockServer) -> None:
    """A reload to a credentialed base_url is refused over the admin API; and settings made
    without validation (as a bug might) still show no form of the secret: not in deployment ids,
    the deployments listing, /metrics, usage rows, answers or the debug log."""
    secret = f"url-canary-{secrets.token_hex(8)}"
    host = upstream.url.removeprefix("http://")
    # Built past the validator, which would refuse it: the places that show a URL must hold.
    smuggled = UpstreamSettings.model_construct(name="mock-model",
                                                base_url=f"http://serai:{secret}@{host}")
    settings = Settings(data_dir=tmp_path).model_copy(update={"upstreams": [smuggled],
                                                              "embedded": False})
    later = [{"name": "mock-model", "base_url": url, "deployment": f"again-{n}"}
             for n, url in enumerate(_credentialed_urls(secret, upstream.url))]
    answers: list[httpx.Response] = []
    with debug_log_in(tmp_path / "serai.log"):
        app = create_app(settings, engines=[FakeEngine()],
                         reread=lambda: Settings(data_dir=tmp_path, upstreams=later))
        async with app.router.lifespan_context(app):
            services: Services = app.state.services
            with services.database.session() as session:
                acme = customer(session)
                _, admin = accounts.create_key(session=session, name="ops", is_admin=True)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://serai") as http:
                ops = {"authorization": f"Bearer {admin}"}
                answers.append(await http.post("/v1/chat/completions", json={
                    "model": "mock-model", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"authorization": f"Bearer {acme.secret}"}))
                assert answers[-1].status_code == 200, answers[-1].text
                answers.append(await http.get("/admin/v1/deployments", headers=ops))
                assert answers[-1].status_code == 200
                assert f"mock-model@{host.split('/')[0]}" in answers[-1].text
                answers.append(await http.get("/metrics"))
                assert "serai_deployment_up" in answers[-1].text
                rows = await usage_rows(services)
                for answer in answers:
                    assert secret not in answer.text, answer.request.url
                assert [row.deployment for row in rows] == [f"mock-model@{host.split('/')[0]}"]
                reload = await http.post("/admin/v1/deployments/reload", headers=ops)
                assert reload.status_code == 400
                assert "base_url" in reload.text and "api_key_env" in reload.text
                assert secret not in reload.text
    log = (tmp_path / "serai.log").read_text()
    assert "serving mock-model from the upstream" in log, "the log captured nothing"
    assert secret not in log
