"""/metrics, read the way Prometheus reads it (prometheus_client's own parser), after real traffic.

In process with the fake engine: exact counts for successes, streams, a bad key, an unknown model
and a rate-limit refusal; no key, prefix, organization or prompt in any label; the token and the
port that guard /metrics. A real `serai serve` binds the metrics port; against the live server
with the bundled model, the token counters equal the usage the API reported and the engine
gauges are there. docs/metrics.md must list exactly the metrics the server has.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from serai.api.deps import Services
from serai.app import create_app
from serai.config import Settings
from serai.governance import accounts
from serai.testing.processes import free_port
from tests.conftest import LiveServer, start_server, stop_server
from tests.support.admin_api import sdk
from tests.support.fake_engine import FakeEngine
from tests.support.tenants import customer

MODEL = "fake-model"
PROMPT = "What is the capital of Japan?"  # six words: six prompt tokens for the fake engine
CHAT: list[Any] = [{"role": "user", "content": PROMPT}]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def parse(text: str) -> list[Sample]:
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    return sum(s.value for s in samples
               if s.name == name and labels.items() <= s.labels.items())


@dataclass
class Api:
    app: FastAPI
    http: httpx.AsyncClient
    sdk_http: httpx2.AsyncClient  # the anthropic SDK brings its own httpx fork
    key: str
    key_prefix: str
    limited_key: str  # one request per minute
    services: Services

    def openai(self, key: str | None = None) -> openai.AsyncOpenAI:
        return sdk(self.http, key or self.key)

    def anthropic(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url="http://serai", api_key=self.key,
                                        http_client=self.sdk_http, max_retries=0)

    async def scrape(self, **headers: str) -> list[Sample]:
        response = await self.http.get("/metrics", headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain; version=")
        return parse(response.text)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    app = create_app(Settings(data_dir=tmp_path), engines=[FakeEngine()])
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        with services.database.session() as session:
            acme = customer(session, name="acme-secret-org")
            _, limited = accounts.create_key(session=session, name="limited", rpm=1)
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                              base_url="http://serai") as http,
            httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app),
                               base_url="http://serai") as sdk_http,
        ):
            yield Api(app, http, sdk_http, acme.secret, acme.key.prefix, limited, services)


async def test_metrics_count_the_traffic_the_clients_saw(api: Api) -> None:
    oai, claude = api.openai(), api.anthropic()
    usages: list[tuple[int, int]] = []  # (input, output) as each response reported it
    for _ in range(2):
        chat = await oai.chat.completions.create(model=MODEL, messages=CHAT)
        assert chat.usage is not None
        usages.append((chat.usage.prompt_tokens, chat.usage.completion_tokens))
    stream = await oai.chat.completions.create(model=MODEL, messages=CHAT, stream=True,
                                               stream_options={"include_usage": True})
    streamed = [chunk async for chunk in stream]
    assert streamed[-1].usage is not None
    usages.append((streamed[-1].usage.prompt_tokens, streamed[-1].usage.completion_tokens))
    completion = await oai.completions.create(model=MODEL, prompt="Say hi", max_tokens=4)
    assert completion.usage is not None
    usages.append((completion.usage.prompt_tokens, completion.usage.completion_tokens))
    message = await claude.messages.create(model=MODEL, max_tokens=20, messages=CHAT)
    usages.append((message.usage.input_tokens, message.usage.output_tokens))
    async with claude.messages.stream(model=MODEL, max_tokens=20, messages=CHAT) as events:
        final = await events.get_final_message()
    usages.append((final.usage.input_tokens, final.usage.output_tokens))

    with pytest.raises(openai.AuthenticationError):
        await api.openai("sk-serai-not-a-real-key-at-all-000000000000000").chat.completions.create(
            model=MODEL, messages=CHAT)
    with pytest.raises(openai.NotFoundError):
        await oai.chat.completions.create(model="PAPAYA made-up model", messages=CHAT)
    limited = api.openai(api.limited_key)
    first = await limited.chat.completions.create(model=MODEL, messages=CHAT)
    assert first.usage is not None
    usages.append((first.usage.prompt_tokens, first.usage.completion_tokens))
    with pytest.raises(openai.RateLimitError):
        await limited.chat.completions.create(model=MODEL, messages=CHAT)

    samples = await api.scrape()
    requests = {(s.labels["model"], s.labels["protocol"], s.labels["status"]): s.value
                for s in samples if s.name == "serai_requests_total"}
    assert requests == {(MODEL, "openai", "200"): 5, (MODEL, "anthropic", "200"): 2,
                        ("unknown", "openai", "401"): 1, ("unknown", "openai", "404"): 1,
                        (MODEL, "openai", "429"): 1}
    rejections = {s.labels["reason"]: s.value for s in samples
                  if s.name == "serai_admission_rejections_total"}
    assert rejections == {"rate_limit_exceeded": 1}
    ran = len(usages)
    assert value(samples, "serai_input_tokens_total", model=MODEL) == sum(i for i, _ in usages)
    assert value(samples, "serai_output_tokens_total", model=MODEL) == sum(o for _, o in usages)
    assert sum(o for _, o in usages) == 6 * 6 + 4  # six words each; the completion cut at 4
    for histogram in ("serai_time_to_first_token_seconds", "serai_request_duration_seconds",
                      "serai_time_per_output_token_seconds"):
        assert value(samples, f"{histogram}_count", model=MODEL) == ran, histogram
        assert value(samples, f"{histogram}_bucket", model=MODEL, le="+Inf") == ran
        assert value(samples, f"{histogram}_sum", model=MODEL) > 0
    # The first token cannot come after the end of the response.
    assert (value(samples, "serai_time_to_first_token_seconds_sum")
            <= value(samples, "serai_request_duration_seconds_sum"))
    assert value(samples, "serai_deployment_up", deployment=f"{MODEL}@local",
                 model=MODEL, kind="embedded") == 1
    assert value(samples, "serai_deployment_outstanding_requests",
                 deployment=f"{MODEL}@local") == 0
    assert [s.value for s in samples if s.name == "serai_ledger_backlog"] == [0]

    # No label value carries a key, its prefix, the organization, or text the client sent.
    labels = {v for s in samples for v in s.labels.values()}
    for secret in (api.key, api.key_prefix, api.limited_key[:15], "acme-secret-org", "PAPAYA",
                   PROMPT, "Japan", "Tokyo", "sk-serai"):
        assert not any(secret in label for label in labels), secret


async def test_a_metrics_token_guards_metrics(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, metrics_token="scrape-me-please")
    app = create_app(settings, engines=[FakeEngine()])
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                  base_url="http://serai") as http):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "scrape-me-please"}):
            refused = await http.get("/metrics", headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_metrics_token"
            assert "serai_requests_total" not in refused.text
        allowed = await http.get("/metrics", headers={"authorization": "Bearer scrape-me-please"})
        assert allowed.status_code == 200
        assert any(s.name == "serai_ledger_backlog" for s in parse(allowed.text))
    assert "scrape-me-please" not in repr(settings)


async def test_a_metrics_port_serves_metrics_and_nothing_else(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, metrics_port=9464), engines=[FakeEngine()])
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                  base_url="http://serai:8000") as public,
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                  base_url="http://serai:9464") as private):
        hidden = await public.get("/metrics")
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
        assert (await private.get("/metrics")).status_code == 200
        model_api = await private.get("/v1/models")
        assert model_api.status_code == 404 and "metrics port" in model_api.text
        assert (await private.get("/health")).status_code == 200
        assert (await public.get("/health")).status_code == 200


def test_the_metrics_port_must_differ_from_the_others() -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        Settings(port=8000, metrics_port=8000)
    with pytest.raises(ValueError, match="metrics_port"):
        Settings(admin_port=9000, metrics_port=9000)


def test_serve_listens_on_the_metrics_port(tmp_path: Path) -> None:
    """`serai serve` opens the metrics port beside the API port (no model: quick to start)."""
    metrics_port = free_port()
    env = {"SERAI_METRICS_PORT": str(metrics_port), "SERAI_METRICS_TOKEN": "tok-123456",
           "SERAI_EMBEDDED": "false", "SERAI_CONFIG": str(tmp_path / "absent.toml")}
    server = start_server(tmp_path / "serai-data", extra_env=env)
    try:
        scrape = f"http://127.0.0.1:{metrics_port}/metrics"
        assert httpx.get(f"{server.base_url}/metrics").status_code == 404
        assert httpx.get(scrape).status_code == 401
        answered = httpx.get(scrape, headers={"authorization": "Bearer tok-123456"})
        assert answered.status_code == 200
        assert any(s.name == "serai_ledger_backlog" for s in parse(answered.text))
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/v1/models").status_code == 404
    finally:
        stop_server(server)
    assert "tok-123456" not in server.log()


def documented() -> set[str]:
    return {line.split("`")[1] for line in DOCS.read_text().splitlines()
            if line.startswith("| `serai_")}


async def test_every_metric_is_documented_and_every_documented_metric_exists(
        tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path), engines=[FakeEngine()])
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        assert services.metrics is not None
        families = list(services.metrics.registry.collect())
    # Counters are exposed (and documented) with their _total suffix.
    names = {f"{f.name}_total" if f.type == "counter" else f.name for f in families}
    assert names - documented() == set(), "metrics missing from docs/metrics.md"
    assert documented() - names == set(), "docs/metrics.md lists metrics the server lacks"
    assert all(re.fullmatch(r"serai_[a-z_]+", name) for name in names)


@pytest.mark.live
def test_live_metrics_match_the_usage_the_api_reported(live_server: LiveServer,
                                                       api_key: str) -> None:
    model = "gemma-3-270m"
    base = {"model": model, "protocol": "openai", "status": "200"}
    before = parse(httpx.get(f"{live_server.base_url}/metrics").text)
    oai = openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key=api_key, max_retries=0)
    usages = []
    for _ in range(2):
        chat = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=8,
                                           temperature=0)
        assert chat.usage is not None
        usages.append(chat.usage)
    stream = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=8, stream=True,
                                         stream_options={"include_usage": True})
    last = list(stream)[-1]
    assert last.usage is not None
    usages.append(last.usage)
    after = parse(httpx.get(f"{live_server.base_url}/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("serai_requests_total", **base) == 3
    assert delta("serai_input_tokens_total", model=model) == sum(u.prompt_tokens for u in usages)
    assert delta("serai_output_tokens_total", model=model) == sum(
        u.completion_tokens for u in usages)
    assert delta("serai_time_to_first_token_seconds_count", model=model) == 3
    assert delta("serai_request_duration_seconds_count", model=model) == 3
    assert delta("serai_time_per_output_token_seconds_count", model=model) == sum(
        1 for u in usages if u.completion_tokens > 1)
    deployment = {"deployment": f"{model}@local", "model": model}
    assert value(after, "serai_deployment_up", **deployment) == 1
    assert value(after, "serai_engine_running_sequences", **deployment) == 0
    assert value(after, "serai_engine_waiting_requests", **deployment) == 0
    # The answered prompts stay in the KV cache for reuse.
    assert 0 < value(after, "serai_engine_kv_cache_usage_ratio", **deployment) <= 1
