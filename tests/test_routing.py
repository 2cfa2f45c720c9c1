"""Deployments, failover before the first byte, passive health and data residency.

The router alone is tested with fake engines and a fake clock; the whole path with two or three
mock upstreams on real ports (threads of this process) and Serai in process. No model is loaded.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select

from serai.api.deps import Services
from serai.app import create_app
from serai.billing import settlement
from serai.config import Settings, UpstreamSettings
from serai.engines.base import Measure
from serai.engines.router import Router
from serai.errors import EngineOverloaded, EngineUnavailable, RegionUnavailable, UnknownModel
from serai.gateway import Gateway
from serai.governance import accounts
from serai.governance.accounts import KeyInfo
from serai.storage.tables import Reservation, UsageRow
from serai.testing.mock_upstream import MockConfig, Stats
from serai.types import GenerationRequest
from tests.support.admin_api import sdk
from tests.support.fake_engine import FakeEngine
from tests.support.ledger_rows import usage_rows
from tests.support.tenants import customer
from tests.test_upstream import MockServer

MODEL = "up"
CHAT = [{"role": "user", "content": "What is the capital of Japan?"}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _router(clock: Clock | None = None, **kwargs: object) -> Router:
    return Router(eject_after=2, cooldown_s=30, clock=clock or Clock(),
                  rng=random.Random(7), **kwargs)  # type: ignore[arg-type]


# --- the router alone -------------------------------------------------------------------------

def test_idle_deployments_share_traffic_by_weight() -> None:
    router = _router()
    heavy = router.add(FakeEngine(name="m"), deployment="heavy", weight=3)
    light = router.add(FakeEngine(name="m"), deployment="light", weight=1)
    counts = {heavy.id: 0, light.id: 0}
    for _ in range(400):
        ticket = router.pick("m")
        counts[ticket.deployment.id] += 1
        ticket.done()
    assert 260 <= counts["heavy"] <= 340, counts


def test_least_outstanding_for_its_weight_is_picked() -> None:
    router = _router()
    router.add(FakeEngine(name="m"), deployment="a", weight=2)
    router.add(FakeEngine(name="m"), deployment="b", weight=1)
    held = [router.pick("m") for _ in range(30)]
    by = {d: sum(t.deployment.id == d for t in held) for d in ("a", "b")}
    assert by == {"a": 20, "b": 10}  # outstanding / weight stays level under load
    for ticket in held:
        ticket.done()
    assert all(d.outstanding == 0 for d in router.deployments("m"))


def test_failures_eject_then_a_half_open_trial_decides() -> None:
    clock = Clock()
    router = _router(clock)
    sick = router.add(FakeEngine(name="m"), deployment="sick", weight=1000)
    router.add(FakeEngine(name="m"), deployment="well", weight=1)
    for _ in range(2):
        ticket = router.pick("m", exclude=[])
        assert ticket.deployment is sick
        ticket.failed()
        ticket.done()
    assert sick.circuit == "open"
    for _ in range(20):
        ticket = router.pick("m")
        assert ticket.deployment.id == "well"
        ticket.done()
    clock.now += 31
    trial = router.pick("m")
    assert trial.deployment is sick and sick.circuit == "half_open"
    other = router.pick("m")  # one trial at a time
    assert other.deployment.id == "well"
    other.done()
    trial.failed()  # a failed trial re-opens at once
    trial.done()
    assert sick.circuit == "open"
    assert router.pick("m").deployment.id == "well"
    clock.now += 31
    trial = router.pick("m")
    trial.succeeded()
    trial.done()
    assert (sick.circuit, sick.failures) == ("closed", 0)


def test_success_resets_the_failure_count() -> None:
    router = _router()
    only = router.add(FakeEngine(name="m"), deployment="only")
    for ok in (False, True, False):
        ticket = router.pick("m")
        ticket.succeeded() if ok else ticket.failed()
        ticket.done()
    assert (only.circuit, only.failures) == ("closed", 1)


def test_all_ejected_is_engine_unavailable_with_retry_after() -> None:
    clock = Clock()
    router = _router(clock)
    router.add(FakeEngine(name="m"), deployment="only")
    for _ in range(2):
        ticket = router.pick("m")
        ticket.failed()
        ticket.done()
    clock.now += 10
    with pytest.raises(EngineUnavailable) as err:
        router.pick("m")
    assert err.value.headers["retry-after"] == "20"


def test_regions_restrict_and_fail_closed() -> None:
    router = _router()
    router.add(FakeEngine(name="m"), deployment="us-1", region="us", weight=100)
    eu = router.add(FakeEngine(name="m"), deployment="eu-1", region="eu")
    for _ in range(50):
        ticket = router.pick("m", regions=["eu"])
        assert ticket.deployment is eu
        ticket.done()
    with pytest.raises(RegionUnavailable) as err:
        router.pick("m", regions=["ap"])
    assert err.value.code == "region_unavailable" and err.value.status_code == 503
    with pytest.raises(UnknownModel):
        router.pick("nope", regions=["eu"])


def test_max_concurrency_skips_a_full_deployment() -> None:
    router = _router()
    router.add(FakeEngine(name="m"), deployment="small", weight=100, max_concurrency=1)
    router.add(FakeEngine(name="m"), deployment="big", max_concurrency=2)
    held = [router.pick("m") for _ in range(3)]
    assert sorted(t.deployment.id for t in held) == ["big", "big", "small"]
    with pytest.raises(EngineOverloaded):
        router.pick("m")


def test_aliases_name_the_same_deployments() -> None:
    router = _router()
    deployment = router.add(FakeEngine(name="m"), deployment="d", aliases=["m-latest"])
    assert router.pick("m-latest").deployment is deployment
    assert [m.name for m in router.models()] == ["m", "m-latest"]


def test_a_deployment_id_is_unique() -> None:
    router = _router()
    router.add(FakeEngine(name="m"), deployment="d")
    with pytest.raises(ValueError, match="two deployments"):
        router.add(FakeEngine(name="n"), deployment="d")


class SlowCount(FakeEngine):
    """Counts tokens only once `counted` is set."""

    counted: asyncio.Event | None = None

    async def measure(self, request: GenerationRequest) -> Measure:
        assert self.counted is not None
        await self.counted.wait()
        return await super().measure(request)


async def test_a_removed_deployment_drains_only_after_a_token_count_on_it() -> None:
    router = _router()
    engine = SlowCount(name="m")
    engine.counted = asyncio.Event()
    deployment = router.add(engine, deployment="d")
    gateway = Gateway(router=router, ledger=None, database=None)  # type: ignore[arg-type]
    anyone = KeyInfo(1, "k", "sk-serai-k", False, datetime.now(UTC), None)
    counting = asyncio.create_task(gateway.measure(GenerationRequest("r", "m", prompt="a b c"),
                                                   key=anyone))
    await asyncio.sleep(0.01)
    router.remove("d")
    drained = asyncio.create_task(router.drained(deployment))
    await asyncio.sleep(0.05)
    assert not drained.done(), "a reload would close the engine while it counts"
    engine.counted.set()
    assert (await counting).prompt_tokens > 0
    await asyncio.wait_for(drained, 5)


def test_settings_refuse_two_upstreams_with_one_deployment_id() -> None:
    same = {"name": MODEL, "base_url": "http://gpu:8000/v1"}
    with pytest.raises(ValueError, match="distinct `deployment` ids"):
        Settings(upstreams=[UpstreamSettings(**same), UpstreamSettings(**same)])
    assert UpstreamSettings(**same).deployment_id == "up@gpu:8000"


# --- through the API, against mock upstreams --------------------------------------------------

@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, MockServer]]:
    with MockServer() as a, MockServer() as b, MockServer() as eu:
        yield {"a": a, "b": b, "eu": eu}


@pytest.fixture(autouse=True)
def fresh_mocks(request: pytest.FixtureRequest) -> None:
    if "servers" not in request.fixturenames:
        return
    for server in request.getfixturevalue("servers").values():
        server.mock.config = MockConfig()
        server.mock.stats = Stats()


def _requests(server: MockServer) -> int:
    """The mock's own request counter, read over HTTP as an operator would."""
    return int(httpx.get(f"http://127.0.0.1:{server.port}/stats").json()["requests"])


def _upstream(server: MockServer, name: str, **changes: object) -> UpstreamSettings:
    return UpstreamSettings(**{"name": MODEL, "base_url": server.url, "deployment": name,
                               "read_timeout_s": 2.0, "connect_timeout_s": 1.0, **changes})


@dataclass
class Api:
    services: Services
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient
    secret: str

    async def usage_rows(self) -> list[UsageRow]:
        return await usage_rows(self.services, limit=1000)

    def reservations(self) -> int:
        with self.services.database.session() as session:
            return session.scalar(select(func.count()).select_from(Reservation)) or 0


@asynccontextmanager
async def serai(tmp_path: Path, upstreams: list[UpstreamSettings], *,
                regions: list[str] | None = None, tenant: dict[str, Any] | None = None,
                **settings: object) -> AsyncIterator[Api]:
    """Serai in process over `upstreams`, with one customer (`tenant`: more of its terms, see
    tests.support.tenants.customer) whose key the client uses."""
    # Health here is passive and its clock is a fake one the test moves. The active prober runs
    # on the wall clock (first probe 10 s after start-up): on a slow run it would close an
    # ejected deployment's circuit behind the test's back, so it is off unless a test asks.
    settings.setdefault("probe_interval_s", 0)
    app = create_app(Settings(data_dir=tmp_path, embedded=False, upstreams=upstreams,
                              **settings), engines=[])  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        with services.database.session() as session:
            secret = customer(session, regions=regions, **(tenant or {})).secret
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://serai") as http:
            client = sdk(http, secret)
            yield Api(services, client, http, secret)


async def _ask(api: Api) -> str:
    completion = await api.client.chat.completions.create(model=MODEL, messages=CHAT)
    return completion.choices[0].message.content or ""


async def test_weights_spread_load_three_to_one(tmp_path: Path,
                                                servers: dict[str, MockServer]) -> None:
    ups = [_upstream(servers["a"], "a", weight=3), _upstream(servers["b"], "b", weight=1)]
    async with serai(tmp_path, ups) as api:
        gate = asyncio.Semaphore(4)

        async def one() -> None:
            async with gate:
                await _ask(api)

        await asyncio.gather(*(one() for _ in range(200)))
        a, b = _requests(servers["a"]), _requests(servers["b"])
        assert a + b == 200
        assert 125 <= a <= 175, (a, b)  # 3:1 is 150, binomial sd about 6
        rows = await api.usage_rows()
        assert len(rows) == 200
        assert sum(r.deployment == "a" for r in rows) == a


async def test_503_before_bytes_fails_over_and_bills_once(
        tmp_path: Path, servers: dict[str, MockServer]) -> None:
    servers["a"].mock.config.failure = "503"
    ups = [_upstream(servers["a"], "a", weight=1000, region="us"),
           _upstream(servers["b"], "b", region="us2")]
    async with serai(tmp_path, ups, eject_after_failures=100) as api:
        for _ in range(3):
            assert await _ask(api) == "The capital of Japan is Tokyo."
        assert _requests(servers["a"]) >= 2  # tried first (weight 1000), failed, moved on
        assert _requests(servers["b"]) == 3
        rows = await api.usage_rows()
        assert [(r.status, r.deployment, r.region) for r in rows] == [("ok", "b", "us2")] * 3
        assert len({r.request_id for r in rows}) == 3
        assert api.reservations() == 0


async def test_overloaded_deployment_fails_over(tmp_path: Path) -> None:
    full = FakeEngine(name="m", overloaded=True)
    app = create_app(Settings(data_dir=tmp_path, embedded=False), engines=[full])
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        router = services.gateway.router
        [local] = router.deployments("m")
        spare = router.add(FakeEngine(name="m"), deployment="spare", weight=1)
        local.weight = 1000
        with services.database.session() as session:
            _, secret = accounts.create_key(session=session, name="app")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://serai") as http:
            response = await http.post("/v1/chat/completions", json={
                "model": "m", "messages": CHAT}, headers={"authorization": f"Bearer {secret}"})
        assert response.status_code == 200
        await services.gateway.ledger.flush()
        with services.database.session() as session:
            rows = settlement.recent_usage(session=session)
        assert [(r.status, r.deployment) for r in rows] == [("ok", spare.id)]
        assert local.failures == 0  # a full engine is busy, not sick


async def test_ejected_deployment_rests_then_recovers_half_open(
        tmp_path: Path, servers: dict[str, MockServer]) -> None:
    servers["a"].mock.config.failure = "503"
    ups = [_upstream(servers["a"], "a", weight=1000), _upstream(servers["b"], "b")]
    async with serai(tmp_path, ups, eject_after_failures=2, eject_cooldown_s=30) as api:
        clock = Clock()
        api.services.gateway.router._clock = clock
        for _ in range(2):
            await _ask(api)
        assert _requests(servers["a"]) == 2
        [a, _] = api.services.gateway.router.deployments(MODEL)
        assert a.circuit == "open"
        servers["a"].mock.config.failure = "none"  # healthy again, but still resting
        for _ in range(10):
            await _ask(api)
        assert _requests(servers["a"]) == 2 and _requests(servers["b"]) == 12
        clock.now += 31
        await _ask(api)  # the half-open trial
        assert _requests(servers["a"]) == 3 and a.circuit == "closed"
        rows = await api.usage_rows()
        assert len(rows) == 13 and rows[-1].deployment == "a"


async def test_cut_mid_stream_is_not_retried(tmp_path: Path,
                                             servers: dict[str, MockServer]) -> None:
    servers["a"].mock.config.failure = "cut"
    ups = [_upstream(servers["a"], "a", weight=1000), _upstream(servers["b"], "b")]
    async with serai(tmp_path, ups) as api:
        stream = await api.client.chat.completions.create(model=MODEL, messages=CHAT,
                                                          stream=True)
        received = []
        with pytest.raises(openai.APIError, match="broke off"):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
        assert "".join(received) == "The capital "
        assert _requests(servers["b"]) == 0
        [row] = await api.usage_rows()
        assert (row.status, row.completion_tokens, row.deployment) == ("error", 2, "a")


async def test_region_pinned_org_never_leaves_its_region(
        tmp_path: Path, servers: dict[str, MockServer]) -> None:
    ups = [_upstream(servers["a"], "a", region="us", weight=100),
           _upstream(servers["b"], "b", region="us", weight=100),
           _upstream(servers["eu"], "eu", region="eu")]
    async with serai(tmp_path, ups, regions=["eu"], eject_after_failures=2) as api:
        for _ in range(10):
            await _ask(api)
        assert _requests(servers["eu"]) == 10
        rows = await api.usage_rows()
        assert {(r.region, r.deployment) for r in rows} == {("eu", "eu")}

        # The region's only deployment goes down: the org gets 503s, nothing goes to "us".
        servers["eu"].mock.config.failure = "503"
        for _ in range(2):  # these reach it, fail and eject it: one error row each
            with pytest.raises(openai.InternalServerError) as err:
                await _ask(api)
            assert err.value.code == "engine_unavailable"
        with pytest.raises(openai.InternalServerError) as err:
            await _ask(api)
        assert (err.value.status_code, err.value.code) == (503, "region_unavailable")
        assert _requests(servers["eu"]) == 12
        assert _requests(servers["a"]) == _requests(servers["b"]) == 0
        rows = await api.usage_rows()
        assert len(rows) == 12  # no row for the request that found no deployment
        assert api.reservations() == 0

        anthropic_answer = await api.http.post("/v1/messages", json={
            "model": MODEL, "max_tokens": 10, "messages": CHAT},
            headers={"x-api-key": api.secret, "anthropic-version": "2023-06-01"})
        assert anthropic_answer.status_code == 503
        assert anthropic_answer.json()["error"]["type"] == "api_error"
        assert anthropic_answer.headers["retry-after"]


async def test_region_without_any_deployment_is_region_unavailable(
        tmp_path: Path, servers: dict[str, MockServer]) -> None:
    ups = [_upstream(servers["a"], "a", region="us")]
    async with serai(tmp_path, ups, regions=["eu", "ch"]) as api:
        with pytest.raises(openai.InternalServerError) as err:
            await _ask(api)
        assert err.value.code == "region_unavailable"
        # Counting tokens is refused alike: no deployment in the org's regions serves it.
        counted = await api.http.post("/v1/messages/count_tokens", json={
            "model": MODEL, "messages": CHAT},
            headers={"x-api-key": api.secret, "anthropic-version": "2023-06-01"})
        assert counted.status_code == 503, counted.text
        assert _requests(servers["a"]) == 0
        assert await api.usage_rows() == []


async def test_admin_api_sets_and_lifts_allowed_regions(
        tmp_path: Path, servers: dict[str, MockServer]) -> None:
    async with serai(tmp_path, [_upstream(servers["a"], "a")]) as api:
        with api.services.database.session() as session:
            _, admin = accounts.create_key(session=session, name="root", is_admin=True)
            org = accounts.find_org(session=session, ref="acme")
        headers = {"authorization": f"Bearer {admin}"}
        url = f"/admin/v1/organizations/{org.id}"
        response = await api.http.patch(url, json={"allowed_regions": ["eu"]}, headers=headers)
        assert response.status_code == 200 and response.json()["allowed_regions"] == ["eu"]
        with pytest.raises(openai.InternalServerError):
            await _ask(api)  # the key reads its org's regions when it authenticates
        response = await api.http.patch(url, json={"allowed_regions": None}, headers=headers)
        assert response.json()["allowed_regions"] is None
        assert await _ask(api)
