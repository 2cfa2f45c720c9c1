"""Keys, the usage ledger and migrations on a real database: SQLite always, PostgreSQL when set."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, text

from serai.billing import ledger, settlement
from serai.billing.base import UsageRecord
from serai.billing.database_limits import DatabaseLimiter
from serai.billing.ledger import LedgerWriter
from serai.errors import AuthenticationFailed, NotFound
from serai.governance import accounts
from serai.storage.db import Database
from serai.storage.tables import ApiKey


def usage(request_id: str, status: str = "ok") -> UsageRecord:
    return UsageRecord(request_id=request_id, key_id=None, model="m", endpoint="chat.completions",
                       prompt_tokens=3, completion_tokens=5, status=status,  # type: ignore[arg-type]
                       ttft_ms=1.5, latency_ms=9.0)


def test_migrations_are_idempotent_and_current(database: Database) -> None:
    database.upgrade()
    assert database.is_current()
    database.ping()


def test_key_lifecycle_stores_only_hash_and_prefix(database: Database) -> None:
    with database.session() as session:
        info, secret = accounts.create_key(session=session, name="ci")
    assert secret.startswith("sk-serai-") and len(secret) == len("sk-serai-") + 43
    with database.session() as session:
        row = session.scalars(select(ApiKey)).one()
        stored = " ".join(str(getattr(row, c.name)) for c in ApiKey.__table__.columns)
    assert secret not in stored and secret[9:30] not in stored
    with database.session() as session:
        assert accounts.authenticate(session=session, secret=secret).id == info.id
        with pytest.raises(AuthenticationFailed):
            accounts.authenticate(session=session, secret=secret[:-1] + "x")
        with pytest.raises(AuthenticationFailed):
            accounts.authenticate(session=session, secret="sk-serai-")
    with database.session() as session:
        first = accounts.revoke_key(session=session, ref=info.prefix)
    with database.session() as session:
        again = accounts.revoke_key(session=session, ref=str(info.id))
        with pytest.raises(AuthenticationFailed, match="revoked"):
            accounts.authenticate(session=session, secret=secret)
        with pytest.raises(NotFound):
            accounts.revoke_key(session=session, ref="999")
    assert first.revoked_at is not None and again.revoked_at == first.revoked_at


async def test_ledger_writer_keeps_every_row_under_concurrency(database: Database) -> None:
    writer = LedgerWriter(DatabaseLimiter(database))
    writer.start()

    async def request(i: int) -> None:
        await asyncio.sleep(0)
        writer.record(usage(f"req_{i}", ("ok", "cancelled", "error")[i % 3]))

    await asyncio.gather(*(request(i) for i in range(1000)))
    await writer.aclose()
    with database.session() as session:
        rows = settlement.recent_usage(session=session, limit=2000)
        statuses = session.execute(text("SELECT status, COUNT(*) FROM usage GROUP BY status")).all()
    assert sorted(r.request_id for r in rows) == sorted(f"req_{i}" for i in range(1000))
    assert dict(statuses) == {"ok": 334, "cancelled": 333, "error": 333}
    assert all(r.created_at is not None for r in rows)


async def test_ledger_write_failure_is_retried_not_dropped(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger, "RETRY_DELAY_S", 0.01)
    limiter = DatabaseLimiter(database)
    writer = LedgerWriter(limiter)
    real_settle = limiter.settle
    failures = iter([True, True])

    def flaky(batch: list[UsageRecord]) -> None:
        if next(failures, False):
            raise ConnectionError("database went away")
        real_settle(batch)

    monkeypatch.setattr(limiter, "settle", flaky)
    writer.start()
    writer.record(usage("kept"))
    await writer.aclose()
    with database.session() as session:
        assert [r.request_id for r in settlement.recent_usage(session=session)] == ["kept"]


def test_sqlite_runs_in_wal_mode(tmp_path: object) -> None:
    db = Database(f"sqlite:///{tmp_path}/wal.db")  # type: ignore[str-bytes-safe]
    db.upgrade()
    with db.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    db.dispose()
