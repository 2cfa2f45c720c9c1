"""Idempotency-Key on model calls (RELIABILITY.md row 5), on SQLite and PostgreSQL.

The claim itself is tested on the database, from several connection pools at once as separate
processes would; the HTTP behaviour with a real uvicorn serving a fake engine that counts its
calls and can hold a call in flight.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from serai.api import idempotency
from serai.app import create_app
from serai.config import Settings
from serai.errors import IdempotencyKeyInUse, IdempotencyKeyReused
from serai.governance import accounts
from serai.storage.db import Database
from serai.storage.tables import IdempotencyRecord
from tests.support.fake_engine import FakeEngine
from tests.support.serving import serving
from tests.support.tenants import customer
from tests.test_admission import Served as AdmissionServed

REPLY = " ".join(f"w{i}" for i in range(12))
CHAT = {"model": "fake-model", "max_tokens": 20,
        "messages": [{"role": "user", "content": "hello there"}]}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}


# --- the claim, on the database -------------------------------------------------------------

def _key_id(database: Database) -> int:
    with database.session() as session:
        key, _ = accounts.create_key(session=session, name="app")
    return key.id


def _claim(database: Database, key_id: int, request_id: str, *, body: bytes = b"{}",
           abandoned_after_s: float = 1800) -> idempotency.Stored | None:
    with database.session() as session:
        return idempotency.claim(
            session=session, key_id=key_id, idempotency_key="k-1",
            request_hash=idempotency.request_hash("POST", "/v1/chat/completions", body),
            request_id=request_id, abandoned_after_s=abandoned_after_s)


def _age(database: Database, seconds: float) -> None:
    with database.session() as session:
        session.execute(update(IdempotencyRecord).values(
            created_ms=IdempotencyRecord.created_ms - int(seconds * 1000)))


def test_twins_claiming_at_once_from_separate_processes_let_exactly_one_run(
        database: Database) -> None:
    key_id = _key_id(database)
    # One connection pool per twin, as separate gateway processes would have.
    pools = [Database(database.url) for _ in range(8)]
    start = threading.Barrier(len(pools))

    def twin(n: int) -> str:
        start.wait()
        try:
            return "ran" if _claim(pools[n], key_id, f"req-{n}") is None else "replayed"
        except IdempotencyKeyInUse:
            return "409"

    try:
        with ThreadPoolExecutor(len(pools)) as threads:
            outcomes = list(threads.map(twin, range(len(pools))))
    finally:
        for pool in pools:
            pool.dispose()
    assert sorted(outcomes) == ["409"] * 7 + ["ran"]


def test_a_finished_call_replays_and_another_payload_is_refused(database: Database) -> None:
    key_id = _key_id(database)
    assert _claim(database, key_id, "req-1") is None
    with database.session() as session:
        assert idempotency.finish(session=session, key_id=key_id, idempotency_key="k-1",
                                  request_id="req-1", status_code=200,
                                  headers={"content-type": "application/json"}, body=b"answer")
    stored = _claim(database, key_id, "req-2")
    assert stored == idempotency.Stored("req-1", 200, {"content-type": "application/json"},
                                        b"answer")
    # JSON key order and spacing are the same payload; another value is not.
    assert _claim(database, key_id, "req-3", body=b'{ }') == stored
    with pytest.raises(IdempotencyKeyReused):
        _claim(database, key_id, "req-4", body=b'{"model": "other"}')


def test_a_claim_left_in_flight_by_a_crash_stops_blocking_the_key(database: Database) -> None:
    key_id = _key_id(database)
    assert _claim(database, key_id, "req-crashed") is None
    with pytest.raises(IdempotencyKeyInUse):
        _claim(database, key_id, "req-2", abandoned_after_s=60)
    _age(database, 61)
    assert _claim(database, key_id, "req-2", abandoned_after_s=60) is None
    with database.session() as session:
        # The crashed call, were it to come back, no longer owns the key.
        assert not idempotency.finish(session=session, key_id=key_id, idempotency_key="k-1",
                                      request_id="req-crashed", status_code=200, headers={},
                                      body=b"late")
        assert idempotency.finish(session=session, key_id=key_id, idempotency_key="k-1",
                                  request_id="req-2", status_code=200, headers={}, body=b"ok")
    assert _claim(database, key_id, "req-3") == idempotency.Stored("req-2", 200, {}, b"ok")


def test_records_are_forgotten_after_24_hours(database: Database) -> None:
    key_id = _key_id(database)
    assert _claim(database, key_id, "req-1") is None
    with database.session() as session:
        idempotency.finish(session=session, key_id=key_id, idempotency_key="k-1",
                           request_id="req-1", status_code=200, headers={}, body=b"old")
    _age(database, 24 * 3600 - 60)
    with database.session() as session:
        assert idempotency.forget_expired(session=session, abandoned_after_s=1800) == 0
    assert _claim(database, key_id, "req-2") is not None  # still replayed within 24 hours
    _age(database, 120)
    # Past 24 hours the key is free, for any payload, even before the sweeper has run...
    assert _claim(database, key_id, "req-3", body=b'{"new": 1}') is None
    # ...and the sweeper deletes what is past its time: done after 24 hours, and in flight
    # after the abandon timeout.
    _age(database, 1801)
    with database.session() as session:
        assert idempotency.forget_expired(session=session, abandoned_after_s=1800) == 1
        assert session.scalar(select(func.count()).select_from(IdempotencyRecord)) == 0


def test_the_server_sweeper_deletes_expired_records(database: Database, tmp_path: Path) -> None:
    key_id = _key_id(database)
    assert _claim(database, key_id, "req-old") is None
    _age(database, 24 * 3600 + 1)
    app = create_app(Settings(data_dir=tmp_path, database_url=database.url),
                     engines=[FakeEngine()])
    with serving(app):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with database.session() as session:
                left = session.scalar(select(func.count()).select_from(IdempotencyRecord))
            if left == 0:
                break
            time.sleep(0.05)
    assert left == 0


# --- model calls through a real server ------------------------------------------------------

class Served(AdmissionServed):
    def key(self, name: str = "acme", plan: dict[str, Any] | None = None) -> str:
        with self.database.session() as session:
            return customer(session, name=name, plan=plan).secret

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60,
                            headers={"authorization": f"Bearer {key}"})


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[Served]:
    engine = FakeEngine(reply=REPLY, context_length=4096, delay=0.002)
    app = create_app(Settings(data_dir=tmp_path, database_url=database_url), engines=[engine])
    with serving(app) as base_url:
        yield Served(base_url, app.state.services.database, engine)


def _with_key(value: str | bytes) -> dict[str, Any]:
    return {"Idempotency-Key": value}


async def _at_once(served: Served, key: str, count: int, body: dict[str, Any],
                   idempotency_key: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=served.base_url, limits=limits, timeout=60, headers={
            "authorization": f"Bearer {key}", "idempotency-key": idempotency_key}) as client:
        return await asyncio.gather(*[client.post("/chat/completions", json=body)
                                      for _ in range(count)])


def test_row5_ten_in_sequence_then_ten_at_once_run_and_bill_once(served: Served) -> None:
    key = served.key()
    with served.client(key) as client:
        in_sequence = [client.post("/chat/completions", json=CHAT, headers=_with_key("order-1"))
                       for _ in range(10)]
    at_once = asyncio.run(_at_once(served, key, 10, CHAT, "order-1"))

    first, replays = in_sequence[0], in_sequence[1:] + at_once
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["content"] == REPLY
    assert "idempotent-replayed" not in first.headers
    for replay in replays:
        assert replay.status_code == 200
        assert replay.content == first.content
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.headers["original-request-id"] == first.headers["x-request-id"]
        assert replay.headers["x-request-id"] != first.headers["x-request-id"]
    assert len(served.engine.requests) == 1
    [row] = served.settled(1)
    assert (row.request_id, row.status) == (first.headers["x-request-id"], "ok")

    with served.client(key) as client:
        other = client.post("/chat/completions", headers=_with_key("order-1"), json={
            **CHAT, "messages": [{"role": "user", "content": "something else"}]})
        other_endpoint = client.post("/completions", headers=_with_key("order-1"), json={
            "model": "fake-model", "prompt": "hello there"})
    for refused in (other, other_endpoint):
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "idempotency_key_reused"
        assert first.headers["x-request-id"] in refused.json()["error"]["message"]
    assert len(served.engine.requests) == 1
    assert len(served.settled(1)) == 1


def test_ten_twins_at_once_on_a_new_key_run_once(served: Served) -> None:
    key = served.key()
    responses = asyncio.run(_at_once(served, key, 10, CHAT, "fresh"))

    ran = [r for r in responses if r.status_code == 200 and "idempotent-replayed" not in r.headers]
    assert len(ran) == 1
    for response in responses:
        if response is ran[0]:
            continue
        if response.status_code == 409:  # still running when it arrived
            assert response.json()["error"]["code"] == "idempotency_key_in_use"
            assert response.headers["retry-after"] == "1"
        else:  # arrived after it finished
            assert response.headers["idempotent-replayed"] == "true"
            assert response.content == ran[0].content
    assert len(served.engine.requests) == 1
    assert len(served.settled(1)) == 1


def _read_first_word(lines: Iterator[str]) -> None:
    """Read up to the first word. The caller keeps `lines`: dropping an httpx iterator
    part-way closes the connection."""
    seen = []
    while '"content":"w0 "' not in (line := next(lines)):
        seen.append(line)


def test_a_twin_sent_while_the_first_is_generating_gets_409(served: Served) -> None:
    key = served.key()
    served.engine.gate = threading.Event()
    with served.client(key) as client, served.client(key) as other_client:
        with client.stream("POST", "/chat/completions", json=STREAM,
                           headers=_with_key("slow")) as first:
            raw = first.iter_raw()  # kept to the end: dropping it would close the connection
            received = next(raw)
            while b'"content":"w0 "' not in received:
                received += next(raw)
            twin = other_client.post("/chat/completions", json=STREAM, headers=_with_key("slow"))
            assert twin.status_code == 409
            assert twin.json()["error"]["code"] == "idempotency_key_in_use"
            assert first.headers["x-request-id"] in twin.json()["error"]["message"]
            served.engine.gate.set()
            received += b"".join(raw)
        replay = client.post("/chat/completions", json=STREAM, headers=_with_key("slow"))

    assert received.endswith(b"data: [DONE]\n\n")
    assert replay.status_code == 200
    assert replay.headers["content-type"].startswith("text/event-stream")
    assert replay.content == received  # the same SSE bytes, chunk ids and timestamps included
    assert len(served.engine.requests) == 1


def test_a_replayed_stream_is_byte_identical_for_the_sdk(served: Served) -> None:
    import openai

    key = served.key()
    sdk = openai.OpenAI(base_url=served.base_url, api_key=key, max_retries=0)

    def stream() -> tuple[str, list[Any]]:
        raw = sdk.chat.completions.with_raw_response.create(
            model="fake-model", messages=CHAT["messages"], max_tokens=20, stream=True,
            stream_options={"include_usage": True},
            extra_headers={"Idempotency-Key": "sdk-stream"})
        return raw.headers.get("idempotent-replayed", ""), [c.to_dict() for c in raw.parse()]

    first_flag, first = stream()
    replay_flag, replay = stream()
    assert (first_flag, replay_flag) == ("", "true")
    assert replay == first
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in first
                   if c["choices"]) == REPLY
    assert len(served.engine.requests) == 1


def test_a_call_that_failed_after_its_first_token_is_replayed_not_rerun(served: Served) -> None:
    served.engine.fail_after = 3
    with served.client(served.key()) as client:
        failed = client.post("/chat/completions", json=STREAM, headers=_with_key("fails"))
        replay = client.post("/chat/completions", json=STREAM, headers=_with_key("fails"))
    assert failed.status_code == 200
    assert '"code":"engine_unavailable"' in failed.text  # the error event after the 200
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == failed.content
    assert len(served.engine.requests) == 1
    [row] = served.settled(1)
    assert (row.status, row.completion_tokens) == ("error", 3)


def test_a_request_refused_by_admission_can_be_retried_with_its_key(served: Served) -> None:
    key = served.key(plan={"max_concurrency": 1})
    served.engine.gate = threading.Event()
    with served.client(key) as client, served.client(key) as other_client:
        with client.stream("POST", "/chat/completions", json={**STREAM, "max_tokens": 5}) as busy:
            lines = busy.iter_lines()
            _read_first_word(lines)
            refused = other_client.post("/chat/completions", json=CHAT, headers=_with_key("k"))
            served.engine.gate.set()
            assert list(lines)[-2:] == ["data: [DONE]", ""]
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        served.settled(1)  # the busy call's slot is free again

        retried = other_client.post("/chat/completions", json=CHAT, headers=_with_key("k"))
        replayed = other_client.post("/chat/completions", json=CHAT, headers=_with_key("k"))
    assert retried.status_code == 200, retried.text
    assert "idempotent-replayed" not in retried.headers  # it ran: the 429 kept nothing
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.content == retried.content
    assert len(served.engine.requests) == 2
    assert len(served.settled(2)) == 2


def test_requests_refused_before_they_ran_keep_nothing(served: Served) -> None:
    key = served.key()
    with served.client(key) as client:
        unknown = client.post("/chat/completions", json={**CHAT, "model": "no-such-model"},
                              headers=_with_key("fix-and-retry"))
        too_long = client.post("/chat/completions", json={**CHAT, "max_tokens": 5000},
                               headers=_with_key("fix-and-retry"))
        fixed = client.post("/chat/completions", json=CHAT, headers=_with_key("fix-and-retry"))
    assert (unknown.status_code, too_long.status_code) == (404, 400)
    assert fixed.status_code == 200 and "idempotent-replayed" not in fixed.headers
    assert len(served.engine.requests) == 1


def test_a_client_that_leaves_mid_stream_may_retry_with_its_key(served: Served) -> None:
    key = served.key()
    served.engine.gate = threading.Event()
    with served.client(key) as client:
        with client.stream("POST", "/chat/completions", json=STREAM,
                           headers=_with_key("flaky")) as left:
            lines = left.iter_lines()
            _read_first_word(lines)
            left_id = left.headers["x-request-id"]
            left.close()  # the client goes away after the first word
    served.engine.gate.set()
    with served.client(key) as client:
        deadline = time.monotonic() + 20
        retried = client.post("/chat/completions", json=STREAM, headers=_with_key("flaky"))
        while retried.status_code == 409 and time.monotonic() < deadline:
            time.sleep(0.05)  # the server is still noticing the first client left
            retried = client.post("/chat/completions", json=STREAM, headers=_with_key("flaky"))

    assert retried.status_code == 200, retried.text
    assert "idempotent-replayed" not in retried.headers  # a cut stream is not kept to replay
    assert retried.text.endswith("data: [DONE]\n\n")
    rows = {r.request_id: r.status for r in served.settled(2)}
    # The abandoned call is billed for what it generated, the retry for its answer.
    assert rows == {left_id: "cancelled", retried.headers["x-request-id"]: "ok"}
    assert len(served.engine.requests) == 2


def test_the_same_idempotency_key_on_two_api_keys_does_not_collide(served: Served) -> None:
    keys = [served.key("acme"), served.key("globex")]
    answers = []
    for key in keys:
        with served.client(key) as client:
            answers.append(client.post("/chat/completions", json=CHAT,
                                       headers=_with_key("shared")))
    assert [a.status_code for a in answers] == [200, 200]
    assert all("idempotent-replayed" not in a.headers for a in answers)
    assert answers[0].headers["x-request-id"] != answers[1].headers["x-request-id"]
    assert len(served.engine.requests) == 2
    for key, answer in zip(keys, answers, strict=True):
        with served.client(key) as client:
            replay = client.post("/chat/completions", json=CHAT, headers=_with_key("shared"))
        assert replay.headers["original-request-id"] == answer.headers["x-request-id"]
    assert len(served.engine.requests) == 2


@pytest.mark.parametrize("value", ["", "k" * 256, "caf\u00e9".encode(), "tab\there"],
                         ids=["empty", "256 chars", "non-ascii", "control char"])
def test_a_malformed_idempotency_key_is_refused(served: Served, value: str | bytes) -> None:
    with served.client(served.key()) as client:
        refused = client.post("/chat/completions", json=CHAT, headers=_with_key(value))
        longest = client.post("/chat/completions", json=CHAT, headers=_with_key("k" * 255))
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "Idempotency-Key"
    assert "1 to 255 printable ASCII characters" in error["message"]
    assert longest.status_code == 200
    assert len(served.engine.requests) == 1
