"""The OpenAI surface in process: the official SDK over httpx's ASGI transport, a fake engine.

These tests pin the wire format, the error envelope and the ledger rows; the live-server tests
check the same surface against the real bundled model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from serai.api.deps import Services
from serai.app import create_app
from serai.config import Settings
from serai.governance import accounts
from serai.storage.tables import Reservation, UsageRow
from tests.support.admin_api import sdk
from tests.support.fake_engine import FakeEngine
from tests.support.ledger_rows import usage_rows

MODEL = "fake-model"
CHAT = [{"role": "user", "content": "What is the capital of Japan?"}]
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}, "required": ["city"]}}
TOOL = {"type": "function", "function": WEATHER}


@dataclass
class Api:
    app: FastAPI
    engine: FakeEngine
    http: httpx.AsyncClient
    admin_key: str
    user_key: str
    services: Services

    def client(self, key: str | None = None) -> openai.AsyncOpenAI:
        return sdk(self.http, key or self.user_key)

    async def usage_rows(self) -> list[UsageRow]:
        return await usage_rows(self.services)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    engine = FakeEngine()
    settings = Settings(data_dir=tmp_path, max_body_bytes=4096)
    app = create_app(settings, engines=[engine])
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        with services.database.session() as session:
            _, admin_key = accounts.create_key(session=session, name="admin", is_admin=True)
            _, user_key = accounts.create_key(session=session, name="user")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serai") as http:
            yield Api(app, engine, http, admin_key, user_key, services)


async def test_chat_completion_answer_usage_and_ledger_row(api: Api) -> None:
    raw = await api.client().chat.completions.with_raw_response.create(model=MODEL, messages=CHAT)
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]

    assert completion.choices[0].message.content == "The capital of Japan is Tokyo."
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.object == "chat.completion"
    assert completion.id == f"chatcmpl-{request_id}"
    assert completion.model == MODEL
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (6, 6)
    assert completion.usage.total_tokens == 12

    [row] = await api.usage_rows()
    assert row.request_id == request_id
    assert (row.model, row.endpoint, row.status) == (MODEL, "chat.completions", "ok")
    assert (row.prompt_tokens, row.completion_tokens) == (6, 6)
    assert row.ttft_ms is not None and row.latency_ms >= row.ttft_ms


async def test_sampling_parameters_reach_the_engine(api: Api) -> None:
    await api.client().chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                            {"type": "text", "text": "there"}]}],
        temperature=0.2, top_p=0.5, seed=7, stop=["\n\n", "END"], max_completion_tokens=20)
    [request] = api.engine.requests
    assert request.sampling.temperature == 0.2
    assert request.sampling.top_p == 0.5
    assert request.sampling.seed == 7
    assert request.sampling.stop == ("\n\n", "END")
    assert request.sampling.max_tokens == 20
    assert request.messages is not None
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."),
                                                               ("user", "Hi\nthere")]


async def test_max_tokens_cuts_the_answer_with_finish_reason_length(api: Api) -> None:
    completion = await api.client().chat.completions.create(model=MODEL, messages=CHAT,
                                                            max_tokens=3)
    assert completion.choices[0].message.content == "The capital of "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


async def test_stream_sends_role_deltas_finish_and_usage(api: Api) -> None:
    stream = await api.client().chat.completions.create(
        model=MODEL, messages=CHAT, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of Japan is Tokyo."
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    [row] = await api.usage_rows()
    assert row.status == "ok" and row.completion_tokens == 6


async def test_stream_wire_format_is_sse_ending_with_done(api: Api) -> None:
    response = await api.http.post(
        "/v1/chat/completions", headers={"authorization": f"Bearer {api.user_key}"},
        json={"model": MODEL, "messages": CHAT, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert '"usage"' not in response.text  # only sent when stream_options.include_usage asks


async def test_completions_endpoint(api: Api) -> None:
    client = api.client()
    completion = await client.completions.create(model=MODEL, prompt=["Once upon a time"])
    assert completion.choices[0].text == "The capital of Japan is Tokyo."
    assert completion.object == "text_completion"
    assert api.engine.requests[0].prompt == "Once upon a time"
    assert api.engine.requests[0].sampling.max_tokens == 16  # OpenAI's default for completions

    stream = await client.completions.create(model=MODEL, prompt="Once", stream=True, max_tokens=2)
    pieces = [c async for c in stream]
    assert "".join(c.choices[0].text for c in pieces) == "The capital "
    assert pieces[-1].choices[0].finish_reason == "length"

    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model=MODEL, prompt=["one", "two"])
    assert err.value.body["param"] == "prompt"  # type: ignore[index]


async def test_models_list_and_retrieve(api: Api) -> None:
    client = api.client()
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert (await client.models.retrieve(MODEL)).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        await client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


async def test_a_key_limited_to_other_models_neither_lists_nor_uses_this_one(api: Api) -> None:
    with api.services.database.session() as session:
        _, limited = accounts.create_key(session=session, name="limited",
                                         allowed_models=["another-model"])
    client = api.client(limited)
    assert (await client.models.list()).data == []
    with pytest.raises(openai.NotFoundError, match="may use: another-model"):
        await client.models.retrieve(MODEL)
    with pytest.raises(openai.PermissionDeniedError, match="may not use the model"):
        await client.chat.completions.create(model=MODEL, messages=CHAT)
    assert await api.usage_rows() == []  # refused before it ran: nothing to bill


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "messages"),
        ({"messages": CHAT}, "model"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": CHAT, "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": CHAT, "top_p": -1}, "top_p"),
        ({"model": MODEL, "messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": CHAT, "n": 2}, "n"),
        ({"model": MODEL, "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "messages": CHAT, "stop": "x" * 257}, "stop"),
        ({"model": MODEL, "messages": CHAT, "stop": ["ok", "x" * 257]}, "stop"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages.[0].content"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]},
         "messages.[0].content.[0].type"),
        ({"model": MODEL, "messages": CHAT, "tools": [{"type": "function"}]}, "tools.0.function"),
        ({"model": MODEL, "messages": CHAT, "tools": [{"type": "retrieval", "function": WEATHER}]},
         "tools.[0].type"),
        ({"model": MODEL, "messages": CHAT, "tools": [TOOL, TOOL]}, "tools.[1].function.name"),
        ({"model": MODEL, "messages": CHAT, "tools": [
            {"type": "function", "function": {"name": "get weather"}}]},
         "tools.[0].function.name"),
        ({"model": MODEL, "messages": CHAT, "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "tools.[0].function.parameters"),
        ({"model": MODEL, "messages": CHAT, "tools": [TOOL],
          "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"model": MODEL, "messages": CHAT, "tool_choice": "required"}, "tool_choice"),
        ({"model": MODEL, "messages": CHAT, "tools": [TOOL], "tool_choice": "sometimes"},
         "tool_choice"),
        ({"model": MODEL, "messages": CHAT, "functions": [WEATHER]}, "functions"),
        ({"model": MODEL, "messages": CHAT, "response_format": {"type": "xml"}},
         "response_format.type"),
        ({"model": MODEL, "messages": CHAT, "response_format": {"type": "json_schema"}},
         "response_format.json_schema"),
        ({"model": MODEL, "messages": [*CHAT, {"role": "tool", "content": "18 C"}]},
         "messages.[1].tool_call_id"),
    ],
)
async def test_invalid_input_is_a_400_naming_the_parameter(
    api: Api, body: dict[str, object], param: str
) -> None:
    response = await api.http.post("/v1/chat/completions", json=body,
                                   headers={"authorization": f"Bearer {api.user_key}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert api.engine.requests == []
    assert await api.usage_rows() == []


async def test_unparseable_json_is_a_400(api: Api) -> None:
    response = await api.http.post("/v1/chat/completions", content=b'{"model": ',
                                    headers={"authorization": f"Bearer {api.user_key}"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


async def test_json_body_is_read_whatever_its_declared_content_type(api: Api) -> None:
    # `curl -d` declares application/x-www-form-urlencoded; OpenAI reads the JSON anyway.
    response = await api.http.post(
        "/v1/chat/completions", content=b'{"model": "fake-model", "messages": [{"role": "user", '
        b'"content": "hi"}]}', headers={"authorization": f"Bearer {api.user_key}",
                                        "content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text


async def test_oversized_body_is_a_413(api: Api) -> None:
    big = [{"role": "user", "content": "x" * 5000}]
    with pytest.raises(openai.APIStatusError) as err:
        await api.client().chat.completions.create(model=MODEL, messages=big)
    assert err.value.status_code == 413
    assert err.value.code == "request_too_large"


async def test_oversized_headers_are_a_431(api: Api) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        await api.client().chat.completions.create(
            model=MODEL, messages=CHAT, extra_headers={"x-padding": "x" * 40_000})
    assert err.value.status_code == 431
    assert err.value.code == "headers_too_large"
    after = await api.client().chat.completions.create(model=MODEL, messages=CHAT)
    assert after.choices[0].message.content == "The capital of Japan is Tokyo."


async def test_context_length_exceeded_is_a_400(api: Api) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await api.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1000)
    assert err.value.code == "context_length_exceeded"
    assert "maximum context length is 64 tokens" in err.value.message
    assert await api.usage_rows() == []  # nothing was generated, nothing is billed


async def test_authentication_errors(api: Api) -> None:
    response = await api.http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
    assert response.status_code == 401
    assert "didn't provide an API key" in response.json()["error"]["message"]

    with pytest.raises(openai.AuthenticationError) as err:
        await api.client("sk-serai-" + "A" * 43).chat.completions.create(model=MODEL, messages=CHAT)
    assert err.value.code == "invalid_api_key"
    assert "A" * 10 not in err.value.message  # the key is never echoed in full

    with pytest.raises(openai.AuthenticationError):
        await api.client("not-a-key").models.list()
    assert api.engine.requests == []


async def test_unknown_model_is_a_404(api: Api) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await api.client().chat.completions.create(model="gpt-9", messages=CHAT)
    assert err.value.code == "model_not_found"
    assert err.value.body["param"] == "model"  # type: ignore[index]


async def test_engine_failure_mid_stream_is_an_error_event_and_an_error_row(api: Api) -> None:
    api.engine.fail_after = 2
    stream = await api.client().chat.completions.create(model=MODEL, messages=CHAT, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="failed on purpose"):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "The capital "
    [row] = await api.usage_rows()
    assert (row.status, row.completion_tokens) == ("error", 2)


async def test_engine_failure_before_any_output_is_a_503(api: Api) -> None:
    api.engine.fail_after = 0
    with pytest.raises(openai.InternalServerError) as err:
        await api.client().chat.completions.create(model=MODEL, messages=CHAT)
    assert err.value.status_code == 503
    [row] = await api.usage_rows()
    assert (row.status, row.completion_tokens) == ("error", 0)


async def test_admin_key_manages_keys_and_ordinary_key_cannot(api: Api) -> None:
    user = {"authorization": f"Bearer {api.user_key}"}
    admin = {"authorization": f"Bearer {api.admin_key}"}
    forbidden = await api.http.post("/admin/v1/keys", json={"name": "x"}, headers=user)
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["type"] == "permission_error"

    created = await api.http.post("/admin/v1/keys", json={"name": "ci"}, headers=admin)
    assert created.status_code == 201
    secret = created.json()["secret"]
    assert secret.startswith("sk-serai-")
    await api.client(secret).models.list()

    listed = (await api.http.get("/admin/v1/keys", headers=admin)).json()["data"]
    assert "ci" in [k["name"] for k in listed]
    assert secret not in str(listed)

    revoked = await api.http.delete(f"/admin/v1/keys/{created.json()['id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        await api.client(secret).models.list()

    typo = await api.http.post("/admin/v1/keys", json={"name": "x", "admn": True}, headers=admin)
    assert typo.status_code == 400 and typo.json()["error"]["param"] == "admn"


async def test_every_response_has_a_request_id(api: Api) -> None:
    ids = set()
    for path in ("/health", "/ready", "/v1/models", "/nowhere"):
        response = await api.http.get(path)
        ids.add(response.headers["x-request-id"])
    assert len(ids) == 4


async def test_health_ready_and_unknown_paths(api: Api) -> None:
    assert (await api.http.get("/health")).json() == {"status": "ok"}
    ready = (await api.http.get("/ready")).json()
    assert ready["status"] == "ready" and ready["models"] == [MODEL]
    missing = await api.http.get("/v2/chat")
    assert missing.status_code == 404 and "error" in missing.json()
    spec = (await api.http.get("/openapi.json")).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(spec["paths"])


async def test_overloaded_engine_is_a_503_with_retry_after_and_bills_nothing(api: Api) -> None:
    api.engine.overloaded = True
    response = await api.http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT},
                                   headers={"authorization": f"Bearer {api.user_key}"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "engine_overloaded"
    # Refused before generating, like a prompt too long: no usage row, nothing held.
    assert await api.usage_rows() == []
    with api.services.database.session() as session:
        assert session.scalar(select(func.count()).select_from(Reservation)) == 0


async def test_usage_reports_cached_prompt_tokens(api: Api) -> None:
    completion = await api.client().chat.completions.create(model=MODEL, messages=CHAT)
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
