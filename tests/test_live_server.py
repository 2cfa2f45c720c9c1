"""A live `serai serve` on 127.0.0.1 with the real bundled model, driven by the official SDK.

This is what a user sees: the first start prints an admin key, the CLI manages keys of the
running server through its data dir, and the openai SDK works unchanged.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from serai.billing import settlement
from serai.storage.tables import UsageRow
from tests.conftest import LiveServer, start_server, stop_server

pytestmark = pytest.mark.live

MODEL = "gemma-3-270m"
JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]


def client(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def wait_for_row(server: LiveServer, request_id: str, timeout: float = 15) -> UsageRow:
    database = server.database
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with database.session() as session:
                rows = settlement.recent_usage(session=session, request_id=request_id)
            if rows:
                return rows[0]
            time.sleep(0.1)
    finally:
        database.dispose()
    raise AssertionError(f"no usage row for {request_id}")


def test_chat_answers_from_the_real_model(live_server: LiveServer, api_key: str) -> None:
    raw = client(live_server, api_key).chat.completions.with_raw_response.create(
        model=MODEL, messages=JAPAN, temperature=0, max_tokens=30)
    completion = raw.parse()
    answer = completion.choices[0].message.content or ""
    assert "Tokyo" in answer
    assert not answer.startswith(" ")
    assert "User:" not in answer  # the transcript's next turn is a stop, never shown
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens > 5
    assert 0 < completion.usage.completion_tokens <= 30

    request_id = raw.headers["x-request-id"]
    row = wait_for_row(live_server, request_id)
    assert (row.status, row.endpoint, row.model) == ("ok", "chat.completions", MODEL)
    assert row.completion_tokens == completion.usage.completion_tokens
    assert request_id in live_server.log()


async def test_async_stream_with_usage(live_server: LiveServer, api_key: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{live_server.base_url}/v1", api_key=api_key,
                                  max_retries=0) as aclient:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": "Answer in one sentence."},
                                   *JAPAN],
            temperature=0, max_tokens=30, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Tokyo" in text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_completions_and_stop_sequences(live_server: LiveServer, api_key: str) -> None:
    sdk = client(live_server, api_key)
    completion = sdk.completions.create(model=MODEL, prompt="The capital of Japan is",
                                        temperature=0, max_tokens=8)
    assert "Tokyo" in completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens <= 8

    stopped = sdk.completions.create(model=MODEL, prompt="The capital of Japan is",
                                     temperature=0, max_tokens=8, stop=["Tokyo"])
    assert "Tokyo" not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"


def test_models(live_server: LiveServer, api_key: str) -> None:
    sdk = client(live_server, api_key)
    assert [m.id for m in sdk.models.list().data] == [MODEL]
    assert sdk.models.retrieve(MODEL).owned_by == "serai"


def test_error_cases(live_server: LiveServer, api_key: str) -> None:
    sdk = client(live_server, api_key)
    with pytest.raises(openai.AuthenticationError):
        client(live_server, "sk-serai-wrong").models.list()
    missing_key = httpx.post(f"{live_server.base_url}/v1/chat/completions",
                             json={"model": MODEL, "messages": JAPAN})
    assert missing_key.status_code == 401
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk.chat.completions.create(model="gpt-4o", messages=JAPAN)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model=MODEL, messages=JAPAN, temperature=9)
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_long:
        sdk.chat.completions.create(model=MODEL, messages=JAPAN, max_tokens=1_000_000)
    assert too_long.value.code == "context_length_exceeded"
    assert "4096" in too_long.value.message
    with pytest.raises(openai.APIStatusError) as too_big:
        sdk.chat.completions.create(model=MODEL, messages=[
            {"role": "user", "content": "x" * (5 * 1024 * 1024)}])
    assert too_big.value.status_code == 413
    # The server is still fine afterwards.
    assert sdk.models.list().data


def test_abandoned_stream_is_recorded_as_cancelled(live_server: LiveServer, api_key: str) -> None:
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "temperature": 0, "max_tokens": 2000,
            "stream": True}
    received = 0
    with httpx.stream("POST", f"{live_server.base_url}/v1/completions", json=body,
                      headers={"authorization": f"Bearer {api_key}"}, timeout=30) as response:
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: {"):
                received += 1
                if received == 2:
                    break
    row = wait_for_row(live_server, request_id)
    assert row.status == "cancelled"
    assert 2 <= row.completion_tokens < 2000
    # The engine is free again: the next request is answered.
    after = client(live_server, api_key).chat.completions.create(
        model=MODEL, messages=JAPAN, temperature=0, max_tokens=20)
    assert "Tokyo" in (after.choices[0].message.content or "")


def test_cli_keys_act_on_the_running_server(live_server: LiveServer) -> None:
    created = live_server.cli("keys", "create", "--name", "temporary")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    sdk = client(live_server, secret)
    assert sdk.models.list().data

    listed = live_server.cli("keys", "list")
    assert secret[:15] in listed.stdout and secret not in listed.stdout

    revoked = live_server.cli("keys", "revoke", secret[:15])
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        sdk.models.list()


def test_admin_key_works_and_ordinary_key_cannot_manage_keys(
    live_server: LiveServer, api_key: str
) -> None:
    admin = {"authorization": f"Bearer {live_server.admin_key}"}
    keys = httpx.get(f"{live_server.base_url}/admin/v1/keys", headers=admin)
    assert keys.status_code == 200 and keys.json()["data"][0]["admin"] is True
    denied = httpx.get(f"{live_server.base_url}/admin/v1/keys",
                       headers={"authorization": f"Bearer {api_key}"})
    assert denied.status_code == 403


def test_health_and_ready(live_server: LiveServer) -> None:
    assert httpx.get(f"{live_server.base_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{live_server.base_url}/ready").json()
    assert ready == {"status": "ready", "database": "ok", "models": [MODEL]}


def test_restart_on_the_same_data_dir_prints_no_new_key(live_server: LiveServer) -> None:
    second = start_server(live_server.data_dir)
    try:
        assert second.admin_key == ""
        assert "admin API key" not in second.log()
        # The first start's admin key still works on the second process.
        keys = httpx.get(f"{second.base_url}/admin/v1/keys",
                         headers={"authorization": f"Bearer {live_server.admin_key}"})
        assert keys.status_code == 200
    finally:
        stop_server(second)


def test_server_answers_other_requests_while_the_model_generates(
    live_server: LiveServer, api_key: str
) -> None:
    first_token, finished, checked = threading.Event(), threading.Event(), threading.Event()

    def long_stream() -> None:
        body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "temperature": 0, "max_tokens": 400,
                "stream": True}
        with httpx.stream("POST", f"{live_server.base_url}/v1/completions", json=body,
                          headers={"authorization": f"Bearer {api_key}"}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    first_token.set()
                if checked.is_set():
                    return  # leave early: what mattered happened while tokens were flowing
        finished.set()

    worker = threading.Thread(target=long_stream)
    worker.start()
    try:
        assert first_token.wait(60)
        assert httpx.get(f"{live_server.base_url}/health", timeout=10).status_code == 200
        assert client(live_server, api_key).models.list().data
        # Both answers came while tokens were still streaming: generation is off the event loop.
        assert not finished.is_set()
    finally:
        checked.set()
        worker.join(60)
    assert not worker.is_alive()
