"""Deployments declared in serai.toml: several embedded models, reload without dropping
requests (admin API, CLI and SIGHUP), the deployments list, active health probes and the model
list filtered by region.

Upstreams are mock servers on real ports (threads of this process); Serai runs in process
behind httpx's ASGI transport, or as a `serai serve` subprocess for SIGHUP and the CLI. Only
`test_two_embedded_models_load_side_by_side` loads a model.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from serai.api.deps import Services
from serai.app import create_app
from serai.cli import app as cli
from serai.config import Settings, load_settings
from serai.engines.router import Router
from serai.fleet import Fleet
from serai.governance import accounts
from serai.testing.mock_upstream import MockConfig, Stats
from tests.conftest import LiveServer, start_server, stop_server
from tests.support.admin_api import sdk
from tests.support.fake_engine import FakeEngine
from tests.support.ledger_rows import usage_rows
from tests.support.tenants import customer
from tests.test_upstream import MockServer

MODEL = "up"
CHAT = [{"role": "user", "content": "What is the capital of Japan?"}]
ANSWER = "The capital of Japan is Tokyo."
UPSTREAM_SECRET = "sk-upstream-never-shown-5150"


def until(condition: Callable[[], bool], *, timeout: float = 10.0) -> None:
    """Poll `condition` (a cap against hanging, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


async def until_async(condition: Callable[[], bool], *, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _toml_value(value: object) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def write_config(path: Path, upstreams: list[dict[str, Any]], *,
                 models: list[dict[str, Any]] | None = None, **top: object) -> None:
    """A serai.toml with `top` settings and one [[upstreams]] or [[models]] table per dict."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for table, entries in (("upstreams", upstreams), ("models", models or [])):
        for entry in entries:
            lines += ["", f"[[{table}]]", *(f"{k} = {_toml_value(v)}" for k, v in entry.items())]
    path.write_text("\n".join(lines) + "\n")


def write_key(path: Path, key: str) -> None:
    path.write_text(key + "\n")


def upstream(server: MockServer, deployment: str, **changes: object) -> dict[str, Any]:
    return {"name": MODEL, "base_url": server.url, "deployment": deployment,
            "api_key_env": "MOCK_UPSTREAM_KEY", "read_timeout_s": 5.0,
            "connect_timeout_s": 1.0, **changes}


# --- settings and the router alone -----------------------------------------------------------

def test_models_entries_take_unset_values_from_the_top_level() -> None:
    settings = Settings(region="eu", context_length=1024, engine_parallel=2, engine_queue_size=5,
                        models=[{"name": "a"},
                                {"name": "b", "path": "/m/b.gguf", "deployment": "b-1",
                                 "region": "us", "parallel": 1, "queue_size": 0,
                                 "aliases": ["bee"], "weight": 3}])
    a, b = settings.embedded_models
    assert (a.deployment_id, a.path, a.region, a.context_length, a.parallel, a.queue_size) == (
        "a@local", None, "eu", 1024, 2, 5)
    assert (b.deployment_id, b.region, b.parallel, b.queue_size, b.weight) == (
        "b-1", "us", 1, 0, 3)
    legacy = Settings(model_name="mine").embedded_models
    assert [(m.name, m.deployment_id, m.path) for m in legacy] == [("mine", "mine@local", None)]
    assert Settings(embedded=False, models=[{"name": "a"}]).embedded_models == []
    with pytest.raises(ValueError, match="distinct `deployment` ids"):
        Settings(models=[{"name": "a"}, {"name": "a"}])


def test_models_come_from_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERAI_CONFIG", "/nonexistent.toml")
    monkeypatch.setenv("SERAI_MODELS", json.dumps([{"name": "x", "threads": 1}]))
    [x] = load_settings().embedded_models
    assert (x.name, x.threads) == ("x", 1)


async def test_a_removed_deployment_drains_before_it_is_closed() -> None:
    router = Router(rng=random.Random(1))
    old = router.add(FakeEngine(name="m"), deployment="old")
    held = router.pick("m")
    router.remove("old")
    new = router.add(FakeEngine(name="m"), deployment="new")
    assert router.pick("m").deployment is new  # no new request reaches the removed one
    drained = asyncio.create_task(router.drained(old))
    await asyncio.sleep(0)
    assert not drained.done()
    held.succeeded()
    held.done()  # a ticket on a removed deployment still works
    await asyncio.wait_for(drained, 1)
    assert old.outstanding == 0 and [d.id for d in router.all()] == ["new"]


# --- in process, against mock upstreams ------------------------------------------------------

@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, MockServer]]:
    with MockServer() as a, MockServer() as b, MockServer() as c:
        yield {"a": a, "b": b, "c": c}


@pytest.fixture(autouse=True)
def fresh_mocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("SERAI_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_SECRET)
    if "servers" in request.fixturenames:
        for server in request.getfixturevalue("servers").values():
            server.mock.config = MockConfig()
            server.mock.stats = Stats()


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "serai.toml"
    monkeypatch.setenv("SERAI_CONFIG", str(path))
    return path


@dataclass
class Api:
    services: Services
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient
    admin: dict[str, str]

    @property
    def router(self) -> Router:
        return self.services.gateway.router

    @property
    def fleet(self) -> Fleet:
        assert self.services.fleet is not None
        return self.services.fleet

    async def reload(self) -> httpx.Response:
        return await self.http.post("/admin/v1/deployments/reload", headers=self.admin)

    async def deployments(self) -> list[dict[str, Any]]:
        response = await self.http.get("/admin/v1/deployments", headers=self.admin)
        assert response.status_code == 200, response.text
        data: list[dict[str, Any]] = response.json()["data"]
        return data


@asynccontextmanager
async def serai(regions: list[str] | None = None) -> AsyncIterator[Api]:
    """Serai on the settings serai.toml (SERAI_CONFIG) declares, re-read on reload."""
    app = create_app(load_settings())
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        with services.database.session() as session:
            secret = customer(session, regions=regions).secret
            _, admin = accounts.create_key(session=session, name="root", is_admin=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://serai") as http:
            client = sdk(http, secret)
            yield Api(services, client, http, {"authorization": f"Bearer {admin}"})


async def _ask(api: Api) -> str:
    completion = await api.client.chat.completions.create(model=MODEL, messages=CHAT)
    return completion.choices[0].message.content or ""


async def _stream(api: Api) -> str:
    stream = await api.client.chat.completions.create(model=MODEL, messages=CHAT, stream=True)
    return "".join([chunk.choices[0].delta.content or "" async for chunk in stream
                    if chunk.choices])


async def test_reload_adds_and_drains_without_failing_running_streams(
        tmp_path: Path, config: Path, servers: dict[str, MockServer]) -> None:
    servers["a"].mock.config = MockConfig(delay_s=0.1, chunks=12)  # a stream takes 1.2 s
    write_config(config, [upstream(servers["a"], "a")], data_dir=str(tmp_path), embedded=False)
    async with serai() as api:
        [a] = api.router.deployments(MODEL)
        streams = [asyncio.create_task(_stream(api)) for _ in range(3)]
        await until_async(lambda: servers["a"].mock.stats.active == 3)

        write_config(config, [upstream(servers["b"], "b")], data_dir=str(tmp_path),
                     embedded=False)
        response = await api.reload()
        assert response.status_code == 200, response.text
        assert {k: response.json()[k] for k in ("added", "removed", "replaced")} == {
            "added": ["b"], "removed": ["a"], "replaced": []}
        assert a.removed and a.outstanding == 3
        listed = {d["id"]: d for d in await api.deployments()}
        assert listed["a"]["draining"] and listed["a"]["outstanding"] == 3
        assert not listed["b"]["draining"]

        for _ in range(4):  # new requests only reach the new deployment
            assert await _ask(api) == ANSWER
        assert servers["b"].mock.stats.requests == 4
        assert servers["a"].mock.stats.requests == 3

        texts = await asyncio.gather(*streams)
        assert texts == [ANSWER * 2] * 3  # 12 words: the answer twice
        await until_async(lambda: not api.fleet.draining)  # closed once its streams ended
        rows = await usage_rows(api.services)
        assert sorted((r.deployment, r.status, r.completion_tokens) for r in rows) == (
            [("a", "ok", 12)] * 3 + [("b", "ok", 6)] * 4)


async def test_an_invalid_config_changes_nothing(
        tmp_path: Path, config: Path, servers: dict[str, MockServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"data_dir": str(tmp_path), "embedded": False}
    write_config(config, [upstream(servers["a"], "a")], **base)
    async with serai() as api:
        [a] = api.router.all()
        write_config(config, [upstream(servers["a"], "a", weight=0),
                              upstream(servers["b"], "b")], **base)
        response = await api.reload()
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert "nothing was changed" in message and "upstreams.0.weight" in message

        write_config(config, [upstream(servers["a"], "a"),
                              upstream(servers["b"], "b", api_key_env="NOT_SET_ANYWHERE")],
                     **base)
        monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
        response = await api.reload()
        assert response.status_code == 400
        assert "NOT_SET_ANYWHERE" in response.json()["error"]["message"]
        assert UPSTREAM_SECRET not in response.text
        assert api.router.all() == [a] and not api.fleet.draining
        assert await _ask(api) == ANSWER

        write_config(config, [upstream(servers["a"], "a", weight=2)], **base)  # a change
        response = await api.reload()
        assert (response.json()["replaced"], response.json()["unchanged"]) == (["a"], [])
        [new] = api.router.all()
        assert new is not a and new.weight == 2 and a.removed
        response = await api.reload()  # the same again: nothing to do
        assert response.json()["unchanged"] == ["a"] and api.router.all() == [new]

        response = await api.http.post("/admin/v1/deployments/reload", headers={
            "authorization": f"Bearer {api.client.api_key}"})
        assert response.status_code == 403  # a model key may not reload


async def test_a_rotated_key_file_replaces_the_upstream(
        tmp_path: Path, config: Path, servers: dict[str, MockServer]) -> None:
    key_file = tmp_path / "upstream.key"
    keyed = {k: v for k, v in upstream(servers["a"], "a").items() if k != "api_key_env"}
    write_key(key_file, "sk-first")
    write_config(config, [{**keyed, "api_key_file": str(key_file)}], data_dir=str(tmp_path),
                 embedded=False)
    async with serai() as api:
        assert (await api.reload()).json()["unchanged"] == ["a"]
        write_key(key_file, "sk-second")
        assert (await api.reload()).json()["replaced"] == ["a"]
        assert await _ask(api) == ANSWER
        assert servers["a"].mock.stats.authorizations[-1] == "Bearer sk-second"


async def test_active_probe_ejects_and_brings_back(
        tmp_path: Path, config: Path, servers: dict[str, MockServer]) -> None:
    write_config(config, [upstream(servers["a"], "a"), upstream(servers["b"], "b")],
                 data_dir=str(tmp_path), embedded=False, probe_interval_s=0.05,
                 eject_after_failures=2, eject_cooldown_s=600)
    async with serai() as api:
        a, b = api.router.all()
        await until_async(lambda: a.probe is not None and a.probe.ok)
        servers["a"].mock.config.failure = "503"
        await until_async(lambda: a.circuit == "open")
        assert a.probe is not None and a.probe.detail == "GET /models answered 503"
        for _ in range(3):  # an ejected deployment gets no traffic
            assert await _ask(api) == ANSWER
        assert servers["a"].mock.stats.requests == 0

        servers["a"].mock.config.failure = "none"  # back long before the cool-down ends
        await until_async(lambda: a.circuit == "closed")
        assert (a.failures, b.circuit) == (0, "closed")
        listed = {d["id"]: d["health"] for d in await api.deployments()}
        assert listed["a"]["circuit"] == "closed" and listed["a"]["last_probe"]["ok"]


async def test_models_list_shows_only_the_regions_an_org_may_use(
        tmp_path: Path, config: Path, servers: dict[str, MockServer]) -> None:
    write_config(config, [upstream(servers["a"], "us", name="us-model", region="us"),
                          upstream(servers["b"], "eu", name="eu-model", region="eu",
                                   aliases=["eu-latest"]),
                          upstream(servers["c"], "both-eu", name="both", region="eu"),
                          upstream(servers["a"], "both-us", name="both", region="us")],
                 data_dir=str(tmp_path), embedded=False)
    async with serai(regions=["eu"]) as api:
        models = await api.client.models.list()
        assert sorted(m.id for m in models.data) == ["both", "eu-latest", "eu-model"]
        with pytest.raises(openai.NotFoundError):
            await api.client.models.retrieve("us-model")
        assert (await api.client.models.retrieve("eu-latest")).id == "eu-latest"
        unrestricted = sdk(api.http, api.admin["authorization"][7:])
        assert len((await unrestricted.models.list()).data) == 4


# --- a `serai serve` subprocess: the CLI and SIGHUP ------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           servers: dict[str, MockServer]) -> Iterator[tuple[LiveServer, Path]]:
    """`serai serve` with upstream `a` (healthy) and `sick` (its probes fail), probing every
    0.1 s; the config file is returned for tests to rewrite."""
    root = tmp_path_factory.mktemp("deployments")
    config = root / "serai.toml"
    write_config(config, [upstream(servers["a"], "a"), upstream(servers["c"], "sick")],
                 embedded=False, probe_interval_s=0.1, eject_after_failures=2)
    server = start_server(root / "serai-data", extra_env={
        "SERAI_CONFIG": str(config), "MOCK_UPSTREAM_KEY": UPSTREAM_SECRET})
    yield server, config
    stop_server(server)


def _model_key(server: LiveServer) -> str:
    database = server.database
    try:
        with database.session() as session:
            return accounts.create_key(session=session, name="t")[1]
    finally:
        database.dispose()


def _listed(server: LiveServer) -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{server.base_url}/admin/v1/deployments",
                         headers={"authorization": f"Bearer {server.admin_key}"})
    return {d["id"]: d for d in response.json()["data"]}


def test_cli_lists_health_and_load_and_no_secret(
        served: tuple[LiveServer, Path], servers: dict[str, MockServer]) -> None:
    server, _ = served
    servers["c"].mock.config.failure = "503"
    servers["a"].mock.config = MockConfig(delay_s=0.1, chunks=20)  # a 2 s stream
    until(lambda: _listed(server)["sick"]["health"]["circuit"] == "open")
    key = _model_key(server)

    def one_stream() -> None:
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": MODEL, "messages": CHAT, "stream": True}) as r:
            assert r.status_code == 200
            r.read()

    streaming = threading.Thread(target=one_stream)
    streaming.start()
    try:
        until(lambda: _listed(server)["a"]["outstanding"] == 1)
        runner = CliRunner()
        args = ["--url", server.base_url, "--key", server.admin_key]
        table = runner.invoke(cli, ["deployments", "list", *args])
        as_json = runner.invoke(cli, ["deployments", "list", "--json", *args])
    finally:
        streaming.join(30)
    assert table.exit_code == 0, table.output
    rows = {line.split("│")[1].strip(): line for line in table.output.splitlines()
            if line.count("│") > 5}
    assert "upstream" in rows["a"] and "closed" in rows["a"] and " 1 " in rows["a"]
    assert "open, " in rows["sick"] and "failed" in rows["sick"] and "503" in rows["sick"]
    data = {d["id"]: d for d in json.loads(as_json.output)}
    assert data["a"]["outstanding"] == 1 and data["a"]["health"]["last_probe"]["ok"]
    assert data["sick"]["health"]["consecutive_failures"] >= 2
    for text in (table.output, as_json.output, server.log()):
        assert UPSTREAM_SECRET not in text
    denied = runner.invoke(cli, ["deployments", "list", "--url", server.base_url,
                                 "--key", key])
    assert denied.exit_code == 1 and "admin key" in denied.output


def test_sighup_reloads_a_running_server(served: tuple[LiveServer, Path],
                                         servers: dict[str, MockServer]) -> None:
    server, config = served
    for name in ("a", "c"):  # whichever serves the stream takes 1 s
        servers[name].mock.config = MockConfig(delay_s=0.05, chunks=20)
    key = _model_key(server)
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": MODEL, "messages": CHAT, "stream": True}) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data:")  # streaming from `a` or `sick`
        write_config(config, [upstream(servers["b"], "b")], embedded=False,
                     probe_interval_s=0.1)
        server.process.send_signal(signal.SIGHUP)

        def swapped() -> bool:  # `b` serves; the idle one closed, the streaming one drains
            listed = _listed(server)
            return len(listed) == 2 and [d["draining"] for d in listed.values()] == [False, True]

        until(swapped)
        draining = list(_listed(server))[1]
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]"  # the stream on the removed deployment finished
    until(lambda: list(_listed(server)) == ["b"])
    assert f"removed deployment {draining} drained and closed" in server.log()

    config.write_text("probe_interval_s = -1\n")
    server.process.send_signal(signal.SIGHUP)
    until(lambda: "reload refused" in server.log())
    assert "probe_interval_s" in server.log() and list(_listed(server)) == ["b"]
    assert server.process.poll() is None


# --- the real bundled model ------------------------------------------------------------------

@pytest.mark.live
async def test_two_embedded_models_load_side_by_side(tmp_path: Path, bundled_gguf: Path,
                                                     config: Path) -> None:
    entry = {"path": str(bundled_gguf), "context_length": 512, "parallel": 1, "queue_size": 1}
    write_config(config, [], data_dir=str(tmp_path), probe_interval_s=0, models=[
        {"name": "g1", "region": "eu", **entry}, {"name": "g2", "region": "us", **entry}])
    async with serai() as api:
        deployments = api.router.all()
        assert [(d.id, d.kind, d.region) for d in deployments] == [
            ("g1@local", "embedded", "eu"), ("g2@local", "embedded", "us")]
        for name in ("g1", "g2"):
            completion = await api.client.completions.create(model=name, prompt="Paris is",
                                                              max_tokens=2)
            assert completion.usage is not None and completion.usage.completion_tokens >= 1
        rows = await usage_rows(api.services)
        assert [r.deployment for r in rows] == ["g1@local", "g2@local"]
