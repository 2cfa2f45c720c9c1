"""A reservation's life in the database, from the hold admission writes to its settlement: a
finished request's usage row is written, its reservation deleted and its cost taken from the
balance, in one transaction, so the ledger and the balance always agree.

Settlement is written once, here, for both limiters: the Redis limiter settles in the database
too and then tells Redis what the rows say. A reservation already gone (settled, released or
swept) is never settled twice; one the sweeper took while its request still ran is settled late,
in full. Reservations are leases: the process running a request renews its hold (`Owned`), and
the sweeper releases only holds nobody renewed, those of a crashed process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Update, delete, func, insert, select, update
from sqlalchemy.orm import Session

from serai.billing.base import Admission, UsageRecord
from serai.billing.terms import Terms
from serai.billing.windows import Totals
from serai.storage.db import db_now_ms, rowcount
from serai.storage.tables import Organization, Reservation, UsageRow

log = logging.getLogger("serai.ledger")


def _org_lock(org_id: int) -> Update:
    # A no-op write as the transaction's first statement: PostgreSQL locks the row, SQLite takes
    # its single write lock, so admissions and settlements of one organization take turns.
    return (update(Organization).where(Organization.id == org_id)
            .values(balance_micros=Organization.balance_micros)
            .execution_options(synchronize_session=False))


def lock_org(session: Session, org_id: int) -> Organization | None:
    """Lock the organization's row and read it, in one statement: RETURNING reads the row as
    locked, where a second SELECT would cost another round trip."""
    statement = _org_lock(org_id).returning(Organization).execution_options(
        populate_existing=True)
    return session.scalars(statement).first()


def hold(session: Session, *, terms: Terms, reservation_id: str, request_id: str, endpoint: str,
         created_ms: int) -> None:
    """Hold a request's worst case under `terms` until it settles or is released."""
    # A Core INSERT: the ORM's unit of work costs several times the statement here.
    session.execute(insert(Reservation).values(
        id=reservation_id, org_id=terms.org_id, key_id=terms.key_id, request_id=request_id,
        model=terms.model, endpoint=endpoint, amount_micros=terms.amount_micros,
        requests_milli=terms.multiplier_milli, tokens_milli=terms.tokens_milli,
        prompt_tokens=terms.prompt_tokens, max_tokens=terms.max_tokens, created_ms=created_ms))


def release(*, session: Session, admission: Admission) -> None:
    """Give back a reservation whose request never ran (rejected before the engine)."""
    if admission.reservation_id is not None:
        session.execute(delete(Reservation).where(Reservation.id == admission.reservation_id))


def charge(record: UsageRecord) -> int:
    """Micro-units `record` costs once settled: its usage at its admission's prices, in full.

    A request's usage can exceed what it held only where its size was estimated (an
    upstream's prompt, before the upstream counted it). The excess is charged, never
    forgiven: a balance may then end below zero by that excess, which the engines bound (an
    upstream's reported usage is checked against what was sent and relayed)."""
    admission = record.admission
    if admission.reservation_id is None:
        return 0
    return admission.pricing.cost(prompt_tokens=record.prompt_tokens,
                                  cached_tokens=record.cached_tokens,
                                  completion_tokens=record.completion_tokens)


def write_usage(*, session: Session, records: list[UsageRecord]) -> None:
    """Settle each record: its reservation goes, its row is written, its cost leaves the
    balance. A record whose reservation is already gone was settled or swept: skipped.

    The batch costs a handful of statements however many records it holds: one DELETE of every
    reservation (RETURNING those it found), one balance UPDATE per organization, one INSERT."""
    if not records:
        return
    rows = _Rows(session)
    # Organizations in one order, so two writers never wait on each other's locks.
    records = sorted(records, key=lambda r: r.admission.org_id or 0)
    for record in records:
        rows.lock(record.admission.org_id)
    held = [r.admission.reservation_id for r in records if r.admission.reservation_id is not None]
    gone = set(session.scalars(
        delete(Reservation).where(Reservation.id.in_(held)).returning(Reservation.id)
        .execution_options(synchronize_session=False))) if held else set()
    gone |= _late(session, [r for r in records
                            if r.admission.reservation_id is not None
                            and r.admission.reservation_id not in gone])
    charges: dict[int, int] = {}
    for record in records:
        admission = record.admission
        cost = 0
        if admission.reservation_id is not None:
            if admission.reservation_id not in gone:
                log.warning("usage of %s was already settled; not billed twice", record.request_id)
                continue
            gone.discard(admission.reservation_id)  # a record twice in one batch: billed once
            cost = charge(record)
            if admission.charged and admission.org_id is not None:
                charges[admission.org_id] = charges.get(admission.org_id, 0) + cost
        counted = record.status in ("ok", "cancelled")
        rows.add(
            request_id=record.request_id, key_id=record.key_id, org_id=admission.org_id,
            model=record.model, endpoint=record.endpoint, prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens, cached_tokens=record.cached_tokens,
            status=record.status, ttft_ms=record.ttft_ms, latency_ms=record.latency_ms,
            region=record.region, deployment=record.deployment, cost_micros=cost,
            charged=admission.charged,
            requests_milli=admission.multiplier_milli if counted else 0,
            tokens_milli=(record.prompt_tokens + record.completion_tokens)
            * admission.multiplier_milli)
    for org_id, total in charges.items():
        if total:
            session.execute(update(Organization).where(Organization.id == org_id)
                            .values(balance_micros=Organization.balance_micros - total)
                            .execution_options(synchronize_session=False))
    rows.write()


def _late(session: Session, records: list[UsageRecord]) -> set[str]:
    """The reservations of `records` that the sweeper took for abandoned while their requests
    still ran: their `interrupted` rows make way for the real ones, so a late settlement is
    billed in full and the request keeps exactly one row. A record whose request already has
    a real row was settled before (a retried batch), and one with no row at all was released
    (it never ran): neither is billed.

    The interrupted row's place in its owners' running totals stays counted (one request, no
    tokens): the windows then count the request twice, which errs on the strict side."""
    if not records:
        return set()
    found = {row.request_id: row for row in session.scalars(select(UsageRow).where(
        UsageRow.request_id.in_([r.request_id for r in records])))}
    late = set()
    for record in records:
        row = found.get(record.request_id)
        if row is None or row.status != "interrupted":
            continue
        session.delete(row)
        log.warning("usage of %s arrived after its reservation was released; billed in full",
                    record.request_id)
        assert record.admission.reservation_id is not None
        late.add(record.admission.reservation_id)
    session.flush()
    return late


class _Rows:
    """The usage rows one transaction appends, stamped with the database clock and their
    owners' running totals once each organization's lock is held."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._totals = Totals(session)
        self._clock: dict[int | None, int] = {}  # organization -> database clock under its lock
        self._rows: list[dict[str, Any]] = []

    def lock(self, org_id: int | None) -> None:
        """Take the organization's lock first, as admission does: an admission then sees a
        settlement either whole or not at all, never the reservation gone and the row not yet
        there (PostgreSQL reads each statement at its own snapshot). The clock is read after
        it, so an organization's rows are stamped in the order they are written."""
        if org_id in self._clock:
            return
        if org_id is not None:
            self._session.execute(_org_lock(org_id))  # settling needs the lock, not the row
        self._clock[org_id] = db_now_ms(self._session)

    def add(self, **row: Any) -> None:
        row["created_ms"] = self._clock[row["org_id"]]
        self._rows.append(self._totals.stamp(row))

    def write(self) -> None:
        if self._rows:
            self._session.execute(insert(UsageRow), self._rows)


def renew_reservations(*, session: Session, reservation_ids: list[str]) -> None:
    """Mark reservations as still owned (their requests run in this process), so the sweeper
    leaves them alone however long their requests take."""
    now_ms = db_now_ms(session)
    for start in range(0, len(reservation_ids), 500):
        session.execute(update(Reservation)
                        .where(Reservation.id.in_(reservation_ids[start:start + 500]))
                        .values(renewed_ms=now_ms).execution_options(synchronize_session=False))


def sweep_reservations(*, session: Session, older_than_s: float) -> int:
    """Release reservations left by a crashed process (nobody renewed them for `older_than_s`):
    each gets a usage row with status `interrupted` and no charge, so every admitted request
    still has exactly one row."""
    now_ms = db_now_ms(session)
    stale = list(session.scalars(select(Reservation).where(
        func.coalesce(Reservation.renewed_ms, Reservation.created_ms)
        < now_ms - int(older_than_s * 1000))))
    rows = _Rows(session)
    for reservation in sorted(stale, key=lambda r: r.org_id):
        rows.lock(reservation.org_id)
        gone = session.execute(delete(Reservation).where(Reservation.id == reservation.id))
        if rowcount(gone):
            rows.add(
                request_id=reservation.request_id, key_id=reservation.key_id,
                org_id=reservation.org_id, model=reservation.model,
                endpoint=reservation.endpoint, prompt_tokens=0, completion_tokens=0,
                cached_tokens=0, status="interrupted", ttft_ms=None, latency_ms=0.0,
                cost_micros=0, charged=False, requests_milli=0, tokens_milli=0)
    rows.write()
    return len(stale)


def recent_usage(*, session: Session, limit: int = 100, request_id: str | None = None) -> list[UsageRow]:
    query = select(UsageRow).order_by(UsageRow.id.desc()).limit(limit)
    if request_id is not None:
        query = query.where(UsageRow.request_id == request_id)
    return list(session.scalars(query))


class Owned:
    """The reservations of the requests this process runs: from admission until settlement or
    release. Their owner renews them (a lease), so the sweeper, which takes only holds nobody
    renewed within its timeout, never takes the hold of a request that is still running,
    however slowly its client reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}  # reservation id -> organization

    def add(self, admission: Admission) -> None:
        if admission.reservation_id is not None and admission.org_id is not None:
            with self._lock:
                self._held[admission.reservation_id] = admission.org_id

    def discard(self, reservation_ids: Sequence[str | None]) -> None:
        with self._lock:
            for reservation_id in reservation_ids:
                if reservation_id is not None:
                    self._held.pop(reservation_id, None)

    def now(self) -> dict[str, int]:
        with self._lock:
            return dict(self._held)
