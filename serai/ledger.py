"""The usage ledger: one row per request, written off the request path in batches.

Requests hand a finished `UsageRecord` to the `LedgerWriter`, which never blocks them: rows are
queued in memory and inserted in batches by one background task, so the ledger costs no database
round trip per token, chunk or even per request under load. A failed write is retried, never
dropped; shutting down drains the queue.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from typing import Literal

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from serai.storage.db import Database
from serai.storage.tables import UsageRow

log = logging.getLogger("serai.ledger")

UsageStatus = Literal["ok", "cancelled", "error"]

BATCH_LIMIT = 500
RETRY_DELAY_S = 0.5


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    key_id: int | None
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    status: UsageStatus
    ttft_ms: float | None
    latency_ms: float


def write_usage(*, session: Session, records: list[UsageRecord]) -> None:
    if records:
        session.execute(insert(UsageRow), [asdict(r) for r in records])


def recent_usage(*, session: Session, limit: int = 100, request_id: str | None = None) -> list[UsageRow]:
    query = select(UsageRow).order_by(UsageRow.id.desc()).limit(limit)
    if request_id is not None:
        query = query.where(UsageRow.request_id == request_id)
    return list(session.scalars(query))


class LedgerWriter:
    """Queues usage records and inserts them in batches from one background task."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    def record(self, record: UsageRecord) -> None:
        """Queue a row; safe to call from cancellation handlers (never awaits)."""
        self._queue.put_nowait(record)

    async def flush(self) -> None:
        """Wait until every row recorded so far is in the database."""
        await self._queue.join()

    async def aclose(self) -> None:
        """Write everything still queued, then stop."""
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH_LIMIT and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write(batch)
            for _ in batch:
                self._queue.task_done()

    async def _write(self, batch: list[UsageRecord]) -> None:
        while True:
            try:
                await asyncio.to_thread(self._insert, batch)
                return
            except Exception:
                log.exception("ledger write of %d rows failed; retrying", len(batch))
                await asyncio.sleep(RETRY_DELAY_S)

    def _insert(self, batch: list[UsageRecord]) -> None:
        with self._database.session() as session:
            write_usage(session=session, records=batch)
