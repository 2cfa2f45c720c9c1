"""The Anthropic Messages API, judged by the official anthropic SDK.

In process with a scripted fake engine: the wire format, tool_use/tool_result mapping both ways,
the error envelope and the ledger rows. Against a live server with the real bundled model
(marked live): text answers, streams, token counts, stop reasons, and that a conversation costs
the same through /v1/messages as through /v1/chat/completions.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import jsonschema
import openai
import pytest
from fastapi import FastAPI

from serai.api.deps import Services
from serai.app import create_app
from serai.config import Settings
from serai.governance import accounts
from serai.storage.tables import UsageRow
from serai.types import Message, ResponseFormat, Tool, ToolCall, ToolChoice
from tests.conftest import LiveServer
from tests.support.fake_engine import FakeEngine
from tests.support.ledger_rows import usage_rows
from tests.support.tenants import customer
from tests.test_live_server import wait_for_row

FAKE = "fake-model"
JAPAN: list[Any] = [{"role": "user", "content": "What is the capital of Japan?"}]
WEATHER_TOOL: dict[str, Any] = {
    "name": "get_weather", "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                     "required": ["city"]}}


@dataclass
class Api:
    app: FastAPI
    engine: FakeEngine
    http: httpx.AsyncClient
    sdk_http: httpx2.AsyncClient  # the anthropic SDK brings its own httpx fork
    key: str
    services: Services

    def client(self, key: str | None = None, *, bearer: bool = False) -> anthropic.AsyncAnthropic:
        secret = key or self.key
        return anthropic.AsyncAnthropic(
            base_url="http://serai", api_key=None if bearer else secret,
            auth_token=secret if bearer else None, http_client=self.sdk_http, max_retries=0)

    async def post(self, body: dict[str, Any], path: str = "/v1/messages",
                   **headers: str) -> httpx.Response:
        return await self.http.post(path, json=body, headers={"x-api-key": self.key, **headers})

    async def usage_rows(self) -> list[UsageRow]:
        return await usage_rows(self.services)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    engine = FakeEngine()
    app = create_app(Settings(data_dir=tmp_path, max_body_bytes=4096), engines=[engine])
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
            yield Api(app, engine, http, sdk_http, key, services)


def _events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each server-sent event; the name and the data's type agree."""
    events = []
    for block in body.strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        name = name_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        events.append((name, data))
    return events


# --- in process, fake engine ------------------------------------------------------------------

async def test_message_answer_usage_and_ledger_row(api: Api) -> None:
    raw = await api.client().messages.with_raw_response.create(
        model=FAKE, max_tokens=100, messages=JAPAN)
    message = await raw.parse()
    request_id = raw.headers["request-id"]

    assert request_id == raw.headers["x-request-id"]
    assert message.id == "msg_" + request_id.removeprefix("req_")
    assert (message.type, message.role, message.model) == ("message", "assistant", FAKE)
    [block] = message.content
    assert block.type == "text" and block.text == "The capital of Japan is Tokyo."
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (6, 6)
    assert message.usage.cache_read_input_tokens == 0
    assert message.usage.cache_creation_input_tokens == 0

    [row] = await api.usage_rows()
    assert (row.request_id, row.endpoint, row.model, row.status) == (
        request_id, "messages", FAKE, "ok")
    assert (row.prompt_tokens, row.completion_tokens) == (6, 6)


async def test_request_fields_map_onto_the_neutral_request(api: Api) -> None:
    await api.client().messages.create(
        model=FAKE, max_tokens=20, stop_sequences=["END"], metadata={"user_id": "u-1"},
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        tools=[WEATHER_TOOL], tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[
            {"role": "user", "content": "Weather in Tokyo?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Tokyo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": [{"type": "text", "text": "Sunny"}]},
                {"type": "text", "text": "And now?"}]},
        ],
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
        extra_query={"beta": "true"},
        # Sampling parameters left this SDK's signature (Anthropic's newest models fix them);
        # older clients and other tools still send them.
        extra_body={"temperature": 0.3, "top_p": 0.9, "top_k": 5})
    [request] = api.engine.requests
    assert request.messages == (
        Message("system", "Be brief."),
        Message("user", "Weather in Tokyo?"),
        Message("assistant", "Let me look.",
                tool_calls=(ToolCall("toolu_1", "get_weather", '{"city": "Tokyo"}'),)),
        Message("tool", "Sunny", tool_call_id="toolu_1"),
        Message("user", "And now?"),
    )
    assert request.tools == (Tool("get_weather", "The weather in a city.",
                                  WEATHER_TOOL["input_schema"]),)
    assert request.tool_choice == ToolChoice("required")
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (
        20, 0.3, 0.9, 5)
    assert sampling.stop == ("END",)


async def test_a_system_message_among_the_turns_is_accepted(api: Api) -> None:
    # Claude Code sends its environment this way, after the first user turn.
    await api.client().messages.create(
        model=FAKE, max_tokens=20, system="Be brief.",
        messages=[{"role": "user", "content": "Hi"},
                  {"role": "system", "content": [{"type": "text", "text": "cwd: /tmp"}]}])
    [request] = api.engine.requests
    assert request.messages == (Message("system", "Be brief."), Message("user", "Hi"),
                                Message("system", "cwd: /tmp"))


@pytest.mark.parametrize(("choice", "neutral"), [
    ({"type": "auto"}, ToolChoice("auto")),
    ({"type": "none"}, ToolChoice("none")),
    ({"type": "tool", "name": "get_weather"}, ToolChoice("tool", "get_weather")),
])
async def test_tool_choice_maps(api: Api, choice: dict[str, Any], neutral: ToolChoice) -> None:
    response = await api.post({"model": FAKE, "max_tokens": 10, "messages": JAPAN,
                               "tools": [WEATHER_TOOL], "tool_choice": choice})
    assert response.status_code == 200, response.text
    assert api.engine.requests[0].tool_choice == neutral


async def test_output_config_format_is_structured_output(api: Api) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    await api.client().messages.create(
        model=FAKE, max_tokens=10, messages=JAPAN,
        output_config={"effort": "low", "format": {"type": "json_schema", "schema": schema}})
    assert api.engine.requests[0].response_format == ResponseFormat("json_schema", schema)


async def test_failed_tool_result_tells_the_model(api: Api) -> None:
    await api.client().messages.create(model=FAKE, max_tokens=10, messages=[
        *JAPAN,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": "no network", "is_error": True}]}])
    messages = api.engine.requests[0].messages
    assert messages is not None and messages[-1] == Message("tool", "Error: no network",
                                                            tool_call_id="t1")
    assert messages[-2].tool_calls == (ToolCall("t1", "f", "{}"),)


async def test_tool_calls_answer_as_tool_use_blocks(api: Api) -> None:
    api.engine.reply = "Checking."
    api.engine.tool_calls = (ToolCall("toolu_9", "get_weather", '{"city": "Tokyo"}'),)
    message = await api.client().messages.create(model=FAKE, max_tokens=50, messages=JAPAN,
                                                 tools=[WEATHER_TOOL])
    assert message.stop_reason == "tool_use"
    text, tool = message.content
    assert text.type == "text" and text.text == "Checking."
    assert tool.type == "tool_use"
    assert (tool.id, tool.name, tool.input) == ("toolu_9", "get_weather", {"city": "Tokyo"})
    [row] = await api.usage_rows()
    assert row.status == "ok"


async def test_tool_calls_stream_as_input_json_deltas(api: Api) -> None:
    api.engine.reply = "Checking."
    api.engine.tool_calls = (ToolCall("toolu_1", "get_weather", '{"city": "Tokyo"}'),
                             ToolCall("toolu_2", "get_weather", '{"city": "Osaka"}'))
    async with api.client().messages.stream(model=FAKE, max_tokens=50, messages=JAPAN,
                                            tools=[WEATHER_TOOL]) as stream:
        kinds = [event.type async for event in stream]
        message = await stream.get_final_message()
    assert "input_json" in kinds
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert [b.input for b in message.content if b.type == "tool_use"] == [
        {"city": "Tokyo"}, {"city": "Osaka"}]

    response = await api.post({"model": FAKE, "max_tokens": 50, "messages": JAPAN,
                               "tools": [WEATHER_TOOL], "stream": True})
    events = _events(response.text)
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert starts[1] == {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    deltas = [d["delta"] for n, d in events if n == "content_block_delta" and d["index"] == 2]
    assert deltas == [{"type": "input_json_delta", "partial_json": '{"city": "Osaka"}'}]
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}


async def test_stream_events_come_in_anthropics_order(api: Api) -> None:
    response = await api.post({"model": FAKE, "max_tokens": 100, "messages": JAPAN,
                               "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["request-id"]
    events = _events(response.text)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 6
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "The capital of Japan is Tokyo."
    assert events[-2][1]["usage"]["output_tokens"] == 6


async def test_sdk_stream_final_message(api: Api) -> None:
    async with api.client().messages.stream(model=FAKE, max_tokens=3, messages=JAPAN) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        message = await stream.get_final_message()
    assert text == "The capital of "
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (6, 3)


async def test_stop_sequences_end_with_stop_sequence(api: Api) -> None:
    message = await api.client().messages.create(model=FAKE, max_tokens=100, messages=JAPAN,
                                                 stop_sequences=["Japan"])
    assert message.content[0].type == "text" and message.content[0].text == "The capital of "
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "Japan")


async def test_large_max_tokens_is_clamped_to_the_context(api: Api) -> None:
    async with api.client().messages.stream(model=FAKE, max_tokens=32000,
                                            messages=JAPAN) as stream:
        message = await stream.get_final_message()
    assert message.stop_reason == "end_turn"
    assert api.engine.requests[0].sampling.clamp_max_tokens
    # A prompt that alone does not fit is still refused.
    with pytest.raises(anthropic.BadRequestError) as err:
        await api.client().messages.create(model=FAKE, max_tokens=1000, messages=[
            {"role": "user", "content": "word " * 70}])
    assert "maximum context length" in err.value.message


async def test_count_tokens(api: Api) -> None:
    counted = await api.client().messages.count_tokens(
        model=FAKE, messages=JAPAN, system="Be brief.", tools=[WEATHER_TOOL])
    assert counted.input_tokens == 8
    assert api.engine.requests == [] and await api.usage_rows() == []


async def test_x_api_key_and_bearer_both_authenticate(api: Api) -> None:
    for client in (api.client(), api.client(bearer=True)):
        message = await client.messages.create(model=FAKE, max_tokens=5, messages=JAPAN)
        assert message.content
    # The OpenAI surface accepts x-api-key too.
    chat = await api.post({"model": FAKE, "messages": JAPAN}, "/v1/chat/completions")
    assert chat.status_code == 200, chat.text


@pytest.mark.parametrize(("body", "words"), [
    ({"model": FAKE, "messages": JAPAN}, "max_tokens"),
    ({"model": FAKE, "max_tokens": 0, "messages": JAPAN}, "max_tokens"),
    ({"model": FAKE, "max_tokens": 5, "messages": JAPAN, "temperature": 1.5}, "temperature"),
    ({"model": FAKE, "max_tokens": 5, "messages": []}, "messages"),
    ({"model": FAKE, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "AAAA"}}]}]}, "text only"),
    ({"model": FAKE, "max_tokens": 5, "messages": JAPAN,
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
    ({"model": FAKE, "max_tokens": 5, "messages": JAPAN,
      "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
    ({"model": FAKE, "max_tokens": 5, "messages": JAPAN,
      "tools": [WEATHER_TOOL, WEATHER_TOOL]}, "unique"),
    ({"model": FAKE, "max_tokens": 5, "messages": JAPAN, "stop_sequences": ["x"] * 33},
     "stop_sequences: at most 32"),
    ({"model": FAKE, "max_tokens": 5, "messages": JAPAN, "stop_sequences": ["ok", "x" * 257]},
     "stop_sequences.1: a stop sequence may be at most 256 characters"),
])
async def test_invalid_requests_are_400s_in_anthropics_envelope(
        api: Api, body: dict[str, Any], words: str) -> None:
    response = await api.post(body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert words in error["error"]["message"]
    assert response.headers["request-id"]
    assert api.engine.requests == [] and await api.usage_rows() == []


async def test_auth_errors_in_anthropics_envelope(api: Api) -> None:
    missing = await api.http.post("/v1/messages", json={"model": FAKE, "max_tokens": 5,
                                                        "messages": JAPAN})
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert "x-api-key" in missing.json()["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError) as err:
        await api.client("sk-serai-" + "A" * 43).messages.create(
            model=FAKE, max_tokens=5, messages=JAPAN)
    assert err.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    # The OpenAI surface keeps its own envelope.
    openai_missing = await api.http.post("/v1/chat/completions",
                                         json={"model": FAKE, "messages": JAPAN})
    assert openai_missing.json()["error"]["code"] == "invalid_api_key"


async def test_unknown_model_is_a_404_not_found_error(api: Api) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        await api.client().messages.create(model="claude-not-served", max_tokens=5,
                                           messages=JAPAN)
    assert err.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


async def test_full_engine_is_a_529_overloaded_error_with_retry_after(api: Api) -> None:
    api.engine.overloaded = True
    response = await api.post({"model": FAKE, "max_tokens": 5, "messages": JAPAN})
    assert response.status_code == 529
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.APIStatusError) as err:
        await api.client().messages.create(model=FAKE, max_tokens=5, messages=JAPAN)
    assert err.value.status_code == 529
    assert await api.usage_rows() == []


async def test_rate_limit_is_a_429_rate_limit_error_with_its_headers(api: Api) -> None:
    with api.services.database.session() as session:
        limited = customer(session, name="limited", model=FAKE, plan={"rpm": 1})
    body = {"model": FAKE, "max_tokens": 5, "messages": JAPAN}
    assert (await api.post(body, **{"x-api-key": limited.secret})).status_code == 200
    refused = await api.post(body, **{"x-api-key": limited.secret})
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.headers["retry-after"]
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_oversized_body_is_a_413_request_too_large(api: Api) -> None:
    response = await api.post({"model": FAKE, "max_tokens": 5,
                               "messages": [{"role": "user", "content": "x" * 5000}]})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"


async def test_oversized_headers_are_a_431_in_anthropics_format(api: Api) -> None:
    response = await api.http.post("/v1/messages", json={
        "model": FAKE, "max_tokens": 5, "messages": JAPAN},
        headers={"x-api-key": api.key, "anthropic-version": "2023-06-01",
                 "x-padding": "x" * 40_000})
    assert response.status_code == 431
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_engine_failure_mid_stream_is_an_error_event(api: Api) -> None:
    api.engine.fail_after = 2
    response = await api.post({"model": FAKE, "max_tokens": 50, "messages": JAPAN,
                               "stream": True})
    name, data = _events(response.text)[-1]
    assert name == "error" and data["error"]["type"] == "api_error"
    assert "failed on purpose" in data["error"]["message"]
    with pytest.raises(anthropic.APIError, match="failed on purpose"):
        async with api.client().messages.stream(model=FAKE, max_tokens=50,
                                                messages=JAPAN) as stream:
            async for _ in stream:
                pass


async def test_idempotency_key_replays_a_message(api: Api) -> None:
    body = {"model": FAKE, "max_tokens": 50, "messages": JAPAN}
    first = await api.post(body, **{"idempotency-key": "k-anthropic-1"})
    second = await api.post(body, **{"idempotency-key": "k-anthropic-1"})
    assert first.status_code == second.status_code == 200
    assert second.headers["idempotent-replayed"] == "true"
    assert second.headers["original-request-id"] == first.headers["request-id"]
    assert second.content == first.content
    assert len(api.engine.requests) == 1


# --- live server, real bundled model ----------------------------------------------------------

MODEL = "gemma-3-270m"
GREEDY = {"temperature": 0}


def live_client(server: LiveServer, key: str, *, bearer: bool = False) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key=None if bearer else key,
                               auth_token=key if bearer else None, max_retries=0)


@pytest.mark.live
def test_live_message_stream_and_count_tokens(live_server: LiveServer, api_key: str) -> None:
    sdk = live_client(live_server, api_key)
    raw = sdk.messages.with_raw_response.create(model=MODEL, max_tokens=30, extra_body=GREEDY,
                                                messages=JAPAN)
    message = raw.parse()
    assert message.content[0].type == "text" and "Tokyo" in message.content[0].text
    assert "User:" not in message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    usage = message.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) > 5
    assert 0 < usage.output_tokens <= 30
    row = wait_for_row(live_server, raw.headers["request-id"])
    assert (row.endpoint, row.status, row.completion_tokens) == ("messages", "ok",
                                                                 usage.output_tokens)

    counted = sdk.messages.count_tokens(model=MODEL, messages=JAPAN)
    assert counted.input_tokens == row.prompt_tokens

    with live_client(live_server, api_key, bearer=True).messages.stream(
            model=MODEL, max_tokens=30, extra_body=GREEDY, messages=JAPAN) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == message.content[0].text
    assert final.usage.output_tokens == usage.output_tokens
    assert final.stop_reason == message.stop_reason


@pytest.mark.live
def test_live_tool_round_trip(live_server: LiveServer, api_key: str) -> None:
    """The real model calls the tool (arguments valid against its schema, streamed as
    input_json_delta), then answers the tool's result in text."""
    sdk = live_client(live_server, api_key)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    with sdk.messages.stream(model=MODEL, max_tokens=100, extra_body=GREEDY, messages=ask,
                             tools=[WEATHER_TOOL], tool_choice={"type": "any"}) as stream:
        kinds = [event.type for event in stream]
        called = stream.get_final_message()
    assert "input_json" in kinds and called.stop_reason == "tool_use"
    [use] = [b for b in called.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id
    jsonschema.validate(use.input, WEATHER_TOOL["input_schema"])

    answer = sdk.messages.create(
        model=MODEL, max_tokens=40, extra_body=GREEDY, tools=[WEATHER_TOOL],
        tool_choice={"type": "none"},
        messages=[*ask, {"role": "assistant", "content": called.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": "18 degrees and sunny"}]}])
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text.strip()


@pytest.mark.live
def test_live_stop_reasons(live_server: LiveServer, api_key: str) -> None:
    sdk = live_client(live_server, api_key)
    stopped = sdk.messages.create(model=MODEL, max_tokens=30, extra_body=GREEDY, messages=JAPAN,
                                  stop_sequences=["Tokyo"])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "Tokyo")
    assert all("Tokyo" not in b.text for b in stopped.content if b.type == "text")

    cut = sdk.messages.create(model=MODEL, max_tokens=2, extra_body=GREEDY,
                              messages=[{"role": "user", "content": "Count to twenty."}])
    assert (cut.stop_reason, cut.usage.output_tokens) == ("max_tokens", 2)

    # Claude Code's max_tokens on a 4096-token model: clamped, not refused.
    with sdk.messages.stream(model=MODEL, max_tokens=32000, extra_body=GREEDY, messages=JAPAN,
                             stop_sequences=["."]) as stream:
        roomy = stream.get_final_message()
    assert roomy.stop_reason in ("stop_sequence", "end_turn")


@pytest.mark.live
def test_live_errors(live_server: LiveServer, api_key: str) -> None:
    sdk = live_client(live_server, api_key)
    missing = httpx.post(f"{live_server.base_url}/v1/messages?beta=true",
                         headers={"x-api-key": api_key, "anthropic-version": "2023-06-01"},
                         json={"model": MODEL, "messages": JAPAN})
    assert missing.status_code == 400 and missing.headers["request-id"]
    assert missing.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "Missing required parameter: 'max_tokens'."}}
    with pytest.raises(anthropic.BadRequestError, match="text only"):
        sdk.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}])
    with pytest.raises(anthropic.AuthenticationError):
        live_client(live_server, "sk-serai-wrong").messages.create(
            model=MODEL, max_tokens=5, messages=JAPAN)
    with pytest.raises(anthropic.NotFoundError) as not_found:
        sdk.messages.create(model="claude-not-served", max_tokens=5, messages=JAPAN)
    assert not_found.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError, match="maximum context length"):
        sdk.messages.create(model=MODEL, max_tokens=5, messages=[
            {"role": "user", "content": "tree " * 5000}])


@pytest.mark.live
def test_live_same_conversation_costs_the_same_on_both_protocols(live_server: LiveServer) -> None:
    database = live_server.database
    try:
        with database.session() as session:
            buyer = customer(session, name="both-protocols", model=MODEL,
                             prices=(1_000_000, 4_000_000), balance=10_000_000)
    finally:
        database.dispose()
    system = "Answer in one short sentence."
    chat = openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key=buyer.secret,
                         max_retries=0).chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=16, temperature=0,
        messages=[{"role": "system", "content": system}, *JAPAN])
    message = live_client(live_server, buyer.secret).messages.with_raw_response.create(
        model=MODEL, max_tokens=16, extra_body=GREEDY, system=system, messages=JAPAN)

    via_openai = wait_for_row(live_server, chat.headers["x-request-id"])
    via_anthropic = wait_for_row(live_server, message.headers["request-id"])
    assert (via_openai.endpoint, via_anthropic.endpoint) == ("chat.completions", "messages")
    assert via_anthropic.prompt_tokens == via_openai.prompt_tokens
    assert via_anthropic.completion_tokens == via_openai.completion_tokens
    assert via_anthropic.cost_micros == via_openai.cost_micros > 0
    usage = message.parse().usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == via_openai.prompt_tokens
    assert chat.parse().choices[0].message.content == message.parse().content[0].text  # type: ignore[union-attr]
