"""The upstream engine against the mock OpenAI-compatible upstream, through Serai's API.

The mock runs on a real port in a thread of this process (a hang, a cut stream and a closed
connection need real sockets); Serai runs in process behind httpx's ASGI transport, driven by
the official SDKs. No model is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import httpx2
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from serai.api.deps import Services
from serai.app import create_app
from serai.config import Settings, UpstreamSettings, load_settings
from serai.engines.upstream import UpstreamEngine, estimate_prompt_tokens
from serai.governance import accounts
from serai.storage.tables import UsageRow
from serai.testing.mock_upstream import SECRET_IN_ERRORS, MockConfig, MockUpstream
from serai.types import GenerationRequest, Message, SamplingParams
from tests.support.admin_api import sdk
from tests.support.ledger_rows import usage_rows

MODEL = "up"
API_KEY = "sk-upstream-do-not-leak-4242"
QUESTION = "What is the capital of Japan?"
CHAT = [{"role": "user", "content": QUESTION}]
ANSWER = "The capital of Japan is Tokyo."
PROMPT = 8  # the mock counts characters / 4 too: ceil(29 / 4)
ESTIMATE = estimate_prompt_tokens(GenerationRequest("r", MODEL, messages=(
    Message("user", QUESTION),)))
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}, "required": ["city"]}}



class MockServer:
    """The mock upstream served by uvicorn on a free port, in a thread."""

    def __init__(self) -> None:
        self.mock = MockUpstream(MockConfig())
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self.mock.app, log_level="warning",
                                                     lifespan="off"))
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> MockServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "the mock upstream did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(10)
        self._sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    with MockServer() as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_mock(upstream: MockServer, monkeypatch: pytest.MonkeyPatch) -> None:
    upstream.mock.config = MockConfig()
    upstream.mock.stats.bodies.clear()
    upstream.mock.stats.authorizations.clear()
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", API_KEY)


def _config(url: str, **changes: object) -> UpstreamSettings:
    return UpstreamSettings(**{"name": MODEL, "base_url": url, "model": "mock-model",
                               "api_key_env": "MOCK_UPSTREAM_KEY", "read_timeout_s": 1.0,
                               "connect_timeout_s": 1.0, **changes})


@dataclass
class Api:
    app: FastAPI
    mock: MockUpstream
    http: httpx.AsyncClient
    sdk_http: httpx2.AsyncClient
    key: str
    services: Services

    def openai(self) -> openai.AsyncOpenAI:
        return sdk(self.http, self.key)

    def anthropic(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url="http://serai", api_key=self.key,
                                        http_client=self.sdk_http, max_retries=0)

    async def usage_rows(self) -> list[UsageRow]:
        return await usage_rows(self.services)


async def _serve(tmp_path: Path, mock: MockUpstream, config: UpstreamSettings
                 ) -> AsyncIterator[Api]:
    app = create_app(Settings(data_dir=tmp_path, embedded=False, upstreams=[config]), engines=[])
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        with services.database.session() as session:
            _, key = accounts.create_key(session=session, name="user")
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                              base_url="http://serai") as http,
            httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app),
                               base_url="http://serai") as sdk_http,
        ):
            yield Api(app, mock, http, sdk_http, key, services)


@pytest.fixture
async def api(tmp_path: Path, upstream: MockServer) -> AsyncIterator[Api]:
    async for served in _serve(tmp_path, upstream.mock, _config(upstream.url)):
        yield served


# --- answers ----------------------------------------------------------------------------------

async def test_chat_through_the_upstream_is_answered_and_billed(api: Api) -> None:
    completion = await api.openai().chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0.2, seed=3, stop=["END"], max_tokens=50)
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (PROMPT, 6)
    [row] = await api.usage_rows()
    assert (row.model, row.status, row.prompt_tokens, row.completion_tokens) == (
        MODEL, "ok", PROMPT, 6)

    [body] = api.mock.stats.bodies
    assert body["model"] == "mock-model" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["seed"], body["stop"], body["max_tokens"]) == (
        0.2, 3, ["END"], 50)
    assert body["messages"] == CHAT
    assert api.mock.stats.authorizations == [f"Bearer {API_KEY}"]


async def test_streamed_chat_through_the_upstream(api: Api) -> None:
    stream = await api.openai().chat.completions.create(
        model=MODEL, messages=CHAT, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    [row] = await api.usage_rows()
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("ok", PROMPT, 6)


async def test_max_tokens_reaches_the_upstream_and_finish_length_comes_back(api: Api) -> None:
    completion = await api.openai().chat.completions.create(model=MODEL, messages=CHAT,
                                                            max_tokens=3)
    assert completion.choices[0].message.content == "The capital of "
    assert completion.choices[0].finish_reason == "length"
    assert api.mock.stats.bodies[0]["max_tokens"] == 3


async def test_default_max_tokens_is_sent(api: Api) -> None:
    await api.openai().chat.completions.create(model=MODEL, messages=CHAT)
    assert api.mock.stats.bodies[0]["max_tokens"] == 4096


async def test_plain_completion_goes_to_the_completions_endpoint(api: Api) -> None:
    completion = await api.openai().completions.create(model=MODEL, prompt="Once upon a time")
    assert completion.choices[0].text == ANSWER
    [body] = api.mock.stats.bodies
    assert body["prompt"] == "Once upon a time" and "messages" not in body
    [row] = await api.usage_rows()
    assert (row.endpoint, row.status, row.completion_tokens) == ("completions", "ok", 6)


async def test_tool_calls_are_assembled_from_the_upstreams_deltas(api: Api) -> None:
    completion = await api.openai().chat.completions.create(
        model=MODEL, messages=CHAT, tools=[{"type": "function", "function": WEATHER}],
        tool_choice="required")
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')
    [body] = api.mock.stats.bodies
    assert body["tools"][0]["function"]["name"] == "get_weather"
    assert body["tool_choice"] == "required"
    [row] = await api.usage_rows()
    assert (row.status, row.completion_tokens) == ("ok", 3)  # three deltas of the call


async def test_named_tool_choice_and_response_format_pass_through(api: Api) -> None:
    await api.openai().chat.completions.create(
        model=MODEL, messages=CHAT, tools=[{"type": "function", "function": WEATHER}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    await api.openai().chat.completions.create(
        model=MODEL, messages=CHAT, response_format={
            "type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    named, structured = api.mock.stats.bodies
    assert named["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert structured["response_format"]["type"] == "json_schema"
    assert structured["response_format"]["json_schema"]["schema"] == schema


async def test_anthropic_messages_through_the_upstream(api: Api) -> None:
    message = await api.anthropic().messages.create(model=MODEL, max_tokens=20000,
                                                    messages=CHAT)  # type: ignore[arg-type]
    assert message.content[0].type == "text" and message.content[0].text == ANSWER
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (PROMPT, 6)
    assert api.mock.stats.bodies[0]["max_tokens"] == 20000
    [row] = await api.usage_rows()
    assert (row.endpoint, row.status, row.completion_tokens) == ("messages", "ok", 6)


async def test_anthropic_tool_use_through_the_upstream(api: Api) -> None:
    message = await api.anthropic().messages.create(
        model=MODEL, max_tokens=200, messages=CHAT,  # type: ignore[arg-type]
        tools=[{"name": "get_weather", "input_schema": WEATHER["parameters"]}],  # type: ignore[list-item]
        tool_choice={"type": "any"})
    assert message.stop_reason == "tool_use"
    [block] = [b for b in message.content if b.type == "tool_use"]
    assert (block.name, block.input) == ("get_weather", {"city": "Paris"})


# --- failures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", ["503", "429"])
async def test_upstream_unavailable_is_a_503_with_one_error_row(api: Api, failure: str) -> None:
    api.mock.config.failure = failure  # type: ignore[assignment]
    with pytest.raises(openai.InternalServerError) as err:
        await api.openai().chat.completions.create(model=MODEL, messages=CHAT)
    assert err.value.status_code == 503
    assert SECRET_IN_ERRORS not in err.value.response.text  # the upstream's body stays inside
    assert f"({failure})" in err.value.message
    [row] = await api.usage_rows()
    assert (row.status, row.completion_tokens) == ("error", 0)


async def test_upstream_4xx_is_the_clients_error_and_no_run(api: Api) -> None:
    api.mock.config.failure = "400"
    with pytest.raises(openai.BadRequestError) as err:
        await api.openai().chat.completions.create(model=MODEL, messages=CHAT)
    assert "Invalid value for temperature." in err.value.message
    assert await api.usage_rows() == []


async def test_upstream_refusing_serais_key_is_a_503_not_the_clients_fault(api: Api) -> None:
    api.mock.config.failure = "401"
    with pytest.raises(openai.InternalServerError) as err:
        await api.openai().chat.completions.create(model=MODEL, messages=CHAT)
    assert "credentials" in err.value.message


async def test_hanging_upstream_times_out_into_a_503(api: Api) -> None:
    api.mock.config.failure = "hang"
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as err:
        await api.openai().chat.completions.create(model=MODEL, messages=CHAT)
    assert err.value.status_code == 503 and time.monotonic() - started < 5
    [row] = await api.usage_rows()
    assert (row.status, row.completion_tokens) == ("error", 0)


async def test_unreachable_upstream_is_a_503(tmp_path: Path, upstream: MockServer) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    async for api in _serve(tmp_path, upstream.mock, _config(f"http://127.0.0.1:{port}/v1")):
        with pytest.raises(openai.InternalServerError) as err:
            await api.openai().chat.completions.create(model=MODEL, messages=CHAT)
        assert err.value.status_code == 503 and "cannot be reached" in err.value.message
        assert str(port) not in err.value.response.text  # where the upstream lives stays inside
        [row] = await api.usage_rows()
        assert (row.status, row.completion_tokens) == ("error", 0)


async def test_stream_cut_midway_is_an_error_event_billing_what_was_relayed(api: Api) -> None:
    api.mock.config.failure = "cut"
    stream = await api.openai().chat.completions.create(model=MODEL, messages=CHAT, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="broke off"):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "The capital "
    [row] = await api.usage_rows()
    assert (row.status, row.completion_tokens) == ("error", 2)


async def test_no_usage_frame_is_billed_on_the_relayed_deltas(
        api: Api, caplog: pytest.LogCaptureFixture) -> None:
    api.mock.config.failure = "no_usage"
    completion = await api.openai().chat.completions.create(model=MODEL, messages=CHAT)
    assert completion.choices[0].message.content == ANSWER
    [row] = await api.usage_rows()
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("ok", ESTIMATE, 6)
    assert "sent no usage" in caplog.text


async def test_absurd_usage_is_clamped_to_what_was_relayed(
        api: Api, caplog: pytest.LogCaptureFixture) -> None:
    api.mock.config.failure = "absurd_usage"
    completion = await api.openai().chat.completions.create(model=MODEL, messages=CHAT)
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (ESTIMATE, 6)
    [row] = await api.usage_rows()
    assert (row.prompt_tokens, row.completion_tokens) == (ESTIMATE, 6)
    assert "1000000000 completion tokens" in caplog.text and "-3 prompt tokens" in caplog.text


async def test_the_upstream_key_never_shows(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts = []
    for failure in ("none", "503", "400", "401", "cut", "absurd_usage"):
        api.mock.config.failure = failure  # type: ignore[assignment]
        response = await api.http.post(
            "/v1/chat/completions", headers={"authorization": f"Bearer {api.key}"},
            json={"model": MODEL, "messages": CHAT, "stream": failure == "cut"})
        texts.append(response.text)
        models = await api.http.get("/v1/models", headers={"authorization": f"Bearer {api.key}"})
        texts.append(models.text)
    assert all(API_KEY not in text for text in texts)
    assert API_KEY not in caplog.text
    assert api.mock.stats.authorizations[-1] == f"Bearer {API_KEY}"  # yet it was sent


async def test_an_upstream_echoing_the_key_in_its_message_is_redacted(
        upstream: MockServer) -> None:
    async def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": f"bad request with {API_KEY}"}})

    engine = UpstreamEngine(_config(upstream.url), transport=httpx.MockTransport(echo))
    request = GenerationRequest("r1", MODEL, messages=(Message("user", QUESTION),))
    with pytest.raises(Exception) as err:
        await anext(engine.generate(request))
    assert API_KEY not in str(err.value) and "[redacted]" in str(err.value)
    await engine.aclose()


# --- the engine alone -------------------------------------------------------------------------

async def test_closing_the_generation_closes_the_upstreams_stream(upstream: MockServer) -> None:
    upstream.mock.config = MockConfig(chunks=200, delay_s=0.02)
    cancelled = upstream.mock.stats.cancelled
    engine = UpstreamEngine(_config(upstream.url))
    chunks = engine.generate(GenerationRequest("r2", MODEL, messages=(
        Message("user", QUESTION),)))
    first = await anext(chunks)
    assert first.text == "The "
    await chunks.aclose()
    deadline = time.monotonic() + 5
    while upstream.mock.stats.cancelled == cancelled:
        assert time.monotonic() < deadline, "the upstream kept generating"
        await asyncio.sleep(0.02)
    assert upstream.mock.stats.active == 0
    await engine.aclose()


async def test_engine_over_the_in_process_mock() -> None:
    mock = MockUpstream(MockConfig(chunks=4))
    engine = UpstreamEngine(UpstreamSettings(name=MODEL, base_url="http://mock/v1"),
                            transport=httpx.ASGITransport(app=mock.app))
    request = GenerationRequest("r3", MODEL, messages=(Message("user", QUESTION),),
                                sampling=SamplingParams(max_tokens=10, top_k=40))
    chunks = [chunk async for chunk in engine.generate(request)]
    assert "".join(c.text for c in chunks) == "The capital of Japan "
    assert chunks[-1].finish_reason == "stop"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (PROMPT, 4)
    assert mock.stats.authorizations == [None]  # no key configured, none sent
    assert mock.stats.bodies[0]["top_k"] == 40 and "min_p" not in mock.stats.bodies[0]
    await engine.aclose()


async def test_measure_is_an_estimate_and_the_asked_or_default_max_tokens() -> None:
    engine = UpstreamEngine(UpstreamSettings(name=MODEL, base_url="http://mock/v1",
                                             default_max_tokens=100))
    chat = GenerationRequest("r4", MODEL, messages=(Message("user", "x" * 41),))
    assert (await engine.measure(chat)).prompt_tokens == 11  # 41 characters / 4, rounded up
    assert (await engine.measure(chat)).max_tokens == 100
    asked = GenerationRequest("r5", MODEL, prompt="hi", sampling=SamplingParams(max_tokens=7))
    assert (await engine.measure(asked)).max_tokens == 7
    # Anthropic clients always send a large max_tokens: clamped to what the context leaves.
    anthropic_like = GenerationRequest("r6", MODEL, prompt="x" * 40, sampling=SamplingParams(
        max_tokens=10**6, clamp_max_tokens=True))
    assert (await engine.measure(anthropic_like)).max_tokens == 32768 - 10
    await engine.aclose()


# --- configuration ----------------------------------------------------------------------------

def test_upstreams_are_declared_in_serai_toml(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.delenv("SERAI_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "key").write_text(API_KEY + "\n")
    (tmp_path / "serai.toml").write_text(
        'embedded = false\n[[upstreams]]\nname = "qwen"\nbase_url = "http://gpu:8000/v1"\n'
        'model = "Qwen/Qwen3-32B"\napi_key_file = "key"\nread_timeout_s = 30\n')
    settings = load_settings()
    [config] = settings.upstreams
    assert (config.name, config.model, config.read_timeout_s) == ("qwen", "Qwen/Qwen3-32B", 30)
    assert settings.embedded is False
    assert API_KEY not in repr(settings)
    engine = UpstreamEngine(config)
    assert engine.model.name == "qwen"


def test_missing_key_or_two_key_sources_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE"):
        UpstreamEngine(UpstreamSettings(name="a", base_url="http://x/v1",
                                        api_key_env="NOT_SET_ANYWHERE"))
    with pytest.raises(ValueError, match="not both"):
        UpstreamSettings(name="a", base_url="http://x/v1", api_key_env="A",
                         api_key_file=Path("k"))


def test_the_mock_runs_as_a_server_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    process = subprocess.Popen(
        [sys.executable, "-m", "serai.testing.mock_upstream", "--port", str(port),
         "--chunks", "3", "--delay-s", "0"],
        env={**os.environ, "MOCK_UPSTREAM_REPLY": "one two three"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                assert httpx.get(f"{base}/stats").json()["requests"] == 0
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
                time.sleep(0.1)
        stream = httpx.post(f"{base}/v1/chat/completions", json={"model": "m", "messages": CHAT,
                                                                 "stream": True})
        assert stream.text.count('"content"') == 4 and "one two three" not in stream.text
        assert httpx.post(f"{base}/config", json={"failure": "503"}).status_code == 200
        assert httpx.post(f"{base}/v1/chat/completions", json={}).status_code == 503
        assert httpx.get(f"{base}/stats").json()["requests"] == 2
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize(("reported", "billed"), [
    ({"prompt_tokens": 9, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}},
     (9, 5, 4)),
    ({"prompt_tokens": 9, "completion_tokens": 11}, (9, 4, 0)),  # above max_tokens (10)
    ({"prompt_tokens": 9, "completion_tokens": 2}, (9, 4, 0)),  # fewer than the 4 deltas
    ({"prompt_tokens": 9, "completion_tokens": -1}, (9, 4, 0)),
    ({"prompt_tokens": 9, "completion_tokens": "7"}, (9, 4, 0)),
    ({"prompt_tokens": 10**6, "completion_tokens": 4}, (3, 4, 0)),  # prompt: the estimate
    ({"prompt_tokens": 9, "completion_tokens": 4,
      "prompt_tokens_details": {"cached_tokens": 99}}, (9, 4, 9)),
    (None, (3, 4, 0)),
])
def test_reported_usage_is_checked_against_what_was_relayed(
        reported: dict[str, object] | None, billed: tuple[int, int, int]) -> None:
    from serai.engines.upstream import _Relay

    relay = _Relay(prompt_estimate=3, max_tokens=10, deltas=4, chars=6)
    usage = relay.checked(reported, model=MODEL, prompt_chars=40)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == billed
