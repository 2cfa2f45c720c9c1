"""The ledger writer: requests hand it a finished `UsageRecord` and never wait on the database.

Records are queued in memory and settled in batches by one background task, through the limiter
that holds their reservations (settlement.py writes them). A failed write is retried, never
dropped; a record the database refuses for what it holds is set aside for the operator, and the
rest of its batch is settled. Shutting down drains the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from serai.billing.base import Limiter, UsageRecord

log = logging.getLogger("serai.ledger")

BATCH_LIMIT = 500
RETRY_DELAY_S = 0.5
SET_ASIDE_FILE = "ledger-set-aside.jsonl"  # in the data dir: usage the database refused


class LedgerWriter:
    """Queues usage records and inserts them in batches from one background task.

    Each record comes with a future that resolves once its batch is committed: a request that
    finished waits for it before its last bytes go out (every request queued meanwhile shares
    the same commit), so a client never holds a complete answer the ledger could lose in a crash.
    """

    def __init__(self, limiter: Limiter, *, set_aside_file: Path | None = None) -> None:
        self._limiter = limiter  # settles where admission holds its reservations
        self._queue: asyncio.Queue[tuple[UsageRecord, asyncio.Future[None]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._set_aside_file = set_aside_file
        self.set_aside = 0  # records that could never be written, since start-up

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    def record(self, record: UsageRecord) -> asyncio.Future[None]:
        """Queue a row; the future resolves once it is committed. Safe to call from
        cancellation handlers (never awaits)."""
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((record, committed))
        return committed

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
            await self._write([record for record, _ in batch])
            for _, committed in batch:
                if not committed.done():
                    committed.set_result(None)
                self._queue.task_done()

    async def _write(self, batch: list[UsageRecord]) -> None:
        """Write a batch, retrying while the database is unreachable. A batch that fails for
        what it holds is written one record at a time, so one record that can never be written
        (a value its column cannot hold) is set aside and the others are settled."""
        while True:
            try:
                await asyncio.to_thread(self._limiter.settle, batch)
                return
            except Exception as exc:
                if _unreachable(exc):
                    log.exception("ledger write of %d rows failed; retrying", len(batch))
                    await asyncio.sleep(RETRY_DELAY_S)
                    continue
                if len(batch) > 1:
                    log.warning("ledger write of %d rows failed (%s); writing them one by one",
                                len(batch), type(exc).__name__)
                    for record in batch:
                        await self._write([record])
                    return
                await asyncio.to_thread(self._put_aside, batch[0], exc)
                return

    def _put_aside(self, record: UsageRecord, exc: Exception) -> None:
        """Keep a record the database refuses for the operator (a JSON line in the data dir:
        usage metadata only, never content), count it, and let settlement go on. Its
        reservation stays until the sweeper releases it."""
        self.set_aside += 1
        log.error("usage of %s can never be written (%s: %s); set aside in %s",
                  record.request_id, type(exc).__name__, str(exc)[:200], self._set_aside_file)
        self._limiter.abandon(record)
        if self._set_aside_file is None:
            return
        line = json.dumps({"error": type(exc).__name__, **_plain(record)}, default=str)
        try:
            with self._set_aside_file.open("a", encoding="utf-8") as out:
                out.write(line + "\n")
        except OSError:
            log.exception("could not keep the set-aside usage of %s", record.request_id)


def _unreachable(exc: Exception) -> bool:
    """Whether a write failed because the database cannot be reached or is busy (worth
    retrying whole), rather than because of what was written."""
    return isinstance(exc, OperationalError | InterfaceError | DisconnectionError |
                      TimeoutError | ConnectionError) or getattr(exc, "connection_invalidated",
                                                                 False)


def _plain(record: UsageRecord) -> dict[str, object]:
    out = dataclasses.asdict(record)
    out["admission"] = {"reservation_id": record.admission.reservation_id,
                        "org_id": record.admission.org_id,
                        "amount_micros": record.admission.amount_micros}
    return out
