"""The usage ledger on a real database: every request leaves exactly one row, whatever happens."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from serai.billing import ledger
from serai.billing.base import UsageRecord, UsageStatus
from serai.billing.database_limits import DatabaseLimiter
from serai.billing.ledger import LedgerWriter
from serai.billing.settlement import recent_usage, write_usage
from serai.governance import accounts
from serai.storage.db import Database
from serai.storage.tables import UsageRow


def usage(request_id: str, *, status: UsageStatus = "ok", key_id: int | None = None,
          ttft_ms: float | None = 12.5) -> UsageRecord:
    return UsageRecord(request_id=request_id, key_id=key_id, model="gemma-3-270m",
                       endpoint="chat.completions", prompt_tokens=11, completion_tokens=7,
                       status=status, ttft_ms=ttft_ms, latency_ms=250.0)


def rows_per_request(database: Database) -> dict[str, int]:
    with database.session() as session:
        query = select(UsageRow.request_id, func.count()).group_by(UsageRow.request_id)
        return {request_id: count for request_id, count in session.execute(query)}


def test_written_usage_reads_back_newest_first(database: Database) -> None:
    with database.session() as session:
        key, _ = accounts.create_key(session=session, name="app")
    with database.session() as session:
        write_usage(session=session, records=[usage("req-1", key_id=key.id),
                                              usage("req-2", status="error", ttft_ms=None)])
        write_usage(session=session, records=[])
    with database.session() as session:
        rows = recent_usage(session=session)
        assert [r.request_id for r in rows] == ["req-2", "req-1"]
        first = rows[1]
        assert (first.key_id, first.model, first.endpoint, first.prompt_tokens,
                first.completion_tokens, first.status, first.ttft_ms, first.latency_ms) == (
            key.id, "gemma-3-270m", "chat.completions", 11, 7, "ok", 12.5, 250.0)
        assert first.created_at is not None
        assert (rows[0].status, rows[0].ttft_ms, rows[0].key_id) == ("error", None, None)
        assert [r.request_id for r in recent_usage(session=session, request_id="req-1")] == ["req-1"]
        assert [r.request_id for r in recent_usage(session=session, limit=1)] == ["req-2"]


async def test_a_thousand_concurrent_requests_leave_a_thousand_rows(database: Database) -> None:
    writer = LedgerWriter(DatabaseLimiter(database))
    writer.start()

    async def request(n: int) -> None:
        await asyncio.sleep(0)  # interleave with the writer's batches
        writer.record(usage(f"req-{n}"))

    await asyncio.gather(*(request(n) for n in range(1000)))
    await writer.aclose()
    assert writer.backlog == 0
    assert rows_per_request(database) == {f"req-{n}": 1 for n in range(1000)}


async def test_every_outcome_is_recorded(database: Database) -> None:
    writer = LedgerWriter(DatabaseLimiter(database))
    writer.start()
    statuses: tuple[UsageStatus, ...] = ("ok", "cancelled", "error")
    for status in statuses:
        writer.record(usage(f"req-{status}", status=status))
    await writer.flush()
    with database.session() as session:
        assert {r.request_id: r.status for r in recent_usage(session=session)} == {
            "req-ok": "ok", "req-cancelled": "cancelled", "req-error": "error"}
    await writer.aclose()


async def test_a_failed_write_is_retried_without_losing_or_doubling_rows(
    database: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ledger, "RETRY_DELAY_S", 0.01)
    real_session = database.session
    attempts: list[int] = []

    @contextmanager
    def commit_fails_once(**kwargs: bool) -> Iterator[Session]:
        # The insert runs, then the commit fails, as when the database drops the connection.
        with real_session(**kwargs) as session:
            yield session
            attempts.append(1)
            if len(attempts) == 1:
                raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(database, "session", commit_fails_once)
    writer = LedgerWriter(DatabaseLimiter(database))
    writer.start()
    for n in range(50):
        writer.record(usage(f"req-{n}"))
    await writer.aclose()
    monkeypatch.setattr(database, "session", real_session)
    assert len(attempts) >= 2
    assert "retrying" in caplog.text
    assert rows_per_request(database) == {f"req-{n}": 1 for n in range(50)}


async def test_records_queued_during_an_outage_are_written_when_it_ends(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger, "RETRY_DELAY_S", 0.01)
    real_settle = DatabaseLimiter.settle
    failures = 5

    def settle(self: DatabaseLimiter, batch: list[UsageRecord]) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        real_settle(self, batch)

    monkeypatch.setattr(DatabaseLimiter, "settle", settle)
    writer = LedgerWriter(DatabaseLimiter(database))
    writer.start()
    writer.record(usage("before"))
    await asyncio.sleep(0.02)  # the writer is now retrying
    writer.record(usage("during"))
    await writer.aclose()
    assert failures == 0
    assert rows_per_request(database) == {"before": 1, "during": 1}


async def test_a_row_the_database_refuses_is_set_aside_and_the_rest_are_settled(
    database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A count no integer column can hold: SQLite's driver refuses it, PostgreSQL raises a
    # DataError. Retried as it was, it stalled every settlement behind it, for good.
    poisoned = dataclasses.replace(usage("poisoned"), prompt_tokens=2**70)
    aside = tmp_path / ledger.SET_ASIDE_FILE
    writer = LedgerWriter(DatabaseLimiter(database), set_aside_file=aside)
    writer.start()
    committed = [writer.record(usage("before")), writer.record(poisoned),
                 writer.record(usage("after"))]
    await asyncio.wait_for(asyncio.gather(*committed), 10)
    writer.record(usage("later"))
    await asyncio.wait_for(writer.aclose(), 10)
    assert rows_per_request(database) == {"before": 1, "after": 1, "later": 1}
    assert writer.set_aside == 1
    [kept] = [json.loads(line) for line in aside.read_text().splitlines()]
    assert (kept["request_id"], kept["prompt_tokens"]) == ("poisoned", 2**70)
    assert "can never be written" in caplog.text
