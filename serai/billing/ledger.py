"""The usage ledger: reserve before a request runs, settle after, one usage row per request.

`admit` runs in one locked transaction per organization: it checks every limit (concurrency,
rates, plan windows, balance) against settled usage plus what running requests hold, and holds
this request's worst case as a reservation. Both backends serialize it: SQLite has one writer at
a time, and on PostgreSQL the first statement locks the organization's row.

Requests hand a finished `UsageRecord` to the `LedgerWriter`, which never blocks them: rows are
queued in memory and settled in batches by one background task. Settling deletes the
reservation, writes the usage row and takes the cost from the balance in one transaction, so
the ledger and the balance always agree; a reservation already gone (settled or swept) is never
settled twice. A failed write is retried, never dropped; shutting down drains the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Update, delete, func, insert, select, update
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from serai.accounts import KeyInfo
from serai.billing.base import UNMETERED, Admission, Limiter, UsageRecord
from serai.billing.plans import (
    MILLI,
    WINDOW_COLUMN,
    WINDOW_SCALE,
    Pricing,
    Window,
    multiplier_milli,
    peak_multiplier_milli,
)
from serai.billing.windows import Totals, WindowReader, WindowUse
from serai.errors import PermissionDenied, QuotaExceeded, RateLimited
from serai.storage.db import db_now_ms
from serai.storage.tables import Organization, Plan, Price, PriceBook, Reservation, UsageRow

log = logging.getLogger("serai.ledger")

BATCH_LIMIT = 500
RETRY_DELAY_S = 0.5
SET_ASIDE_FILE = "ledger-set-aside.jsonl"  # in the data dir: usage the database refused


MINUTE_S = 60


def _org_lock(org_id: int) -> Update:
    # A no-op write as the transaction's first statement: PostgreSQL locks the row, SQLite takes
    # its single write lock, so admissions and settlements of one organization take turns.
    return (update(Organization).where(Organization.id == org_id)
            .values(balance_micros=Organization.balance_micros)
            .execution_options(synchronize_session=False))


def _lock_org(session: Session, org_id: int) -> Organization | None:
    """Lock the organization's row and read it, in one statement: RETURNING reads the row as
    locked, where a second SELECT would cost another round trip."""
    statement = _org_lock(org_id).returning(Organization).execution_options(
        populate_existing=True)
    return session.scalars(statement).first()


def reset_after(now_ms: int, use: WindowUse, seconds: int) -> float:
    """Seconds until the oldest counted row leaves the window (or the whole window)."""
    if use.oldest_ms is None:
        return float(seconds)
    return max(0.001, (use.oldest_ms + seconds * 1000 - now_ms) / 1000)


def format_wait(seconds: float) -> str:
    # OpenAI's format: "1s", "6m0s", "1h2m3s"
    whole = max(1, int(-(-seconds // 1)))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{secs}s"


def admit(*, session: Session, key: KeyInfo, request_id: str, model: str, endpoint: str,
          prompt_tokens: int, max_tokens: int) -> Admission:
    """Check every limit and hold this request's worst case; raises RateLimited or
    QuotaExceeded (or PermissionDenied) without holding anything."""
    if key.org_id is None:
        return UNMETERED  # platform operators are not billed
    org = _lock_org(session, key.org_id)
    if org is None:
        raise PermissionDenied("This key's organization no longer exists.")
    if org.disabled:
        raise PermissionDenied(f"The organization {org.name} is disabled.")
    plan = session.get(Plan, org.plan_id) if org.plan_id is not None else None
    if plan is not None and plan.disabled:
        raise PermissionDenied(f"The plan {plan.name} is disabled.")
    now_ms = db_now_ms(session)
    mult = multiplier_milli(plan.model_multipliers, model) if plan is not None else MILLI
    worst_tokens = prompt_tokens + max_tokens
    pricing = price_for(session, org, plan, model, now_ms)
    amount = pricing.cost(prompt_tokens=prompt_tokens, completion_tokens=max_tokens)
    charged = (plan is None or plan.draws_balance) and amount > 0
    tightest: dict[str, tuple[int, int, float]] = {}  # kind -> (limit, remaining, reset)

    def note(kind: str, limit: int, remaining: int, reset: float) -> None:
        if kind not in tightest or remaining < tightest[kind][1]:
            tightest[kind] = (limit, remaining, reset)

    # In flight: reservations held now.
    cap = min((c for c in (org.max_concurrency, plan.max_concurrency if plan else None)
               if c is not None), default=None)
    windows = WindowReader(session, org_id=org.id, key_id=key.id)
    if cap is not None:
        running = windows.held()["count"]
        if running >= cap:
            raise RateLimited(f"{running} requests of {org.name} are running, the most its plan "
                              f"allows at once ({cap}). Retry when one finishes.",
                              headers={"retry-after": "1"})

    # Requests and tokens per minute: of the key, the organization and its plan.
    since = now_ms - MINUTE_S * 1000
    for owner_key, rpm, tpm, who in ((True, key.rpm, key.tpm, "key"),
                                     (False, org.rpm, org.tpm, "organization"),
                                     (False, plan.rpm if plan else None,
                                      plan.tpm if plan else None, "plan")):
        if rpm is not None:
            use = windows.use("count", key=owner_key, since_ms=since)
            reset = reset_after(now_ms, use, MINUTE_S)
            if use.used + 1 > rpm:
                raise rate_limited("requests", f"{rpm} requests per minute", who, reset,
                                    rpm)
            note("requests", rpm, rpm - use.used - 1, reset)
        if tpm is not None:
            use = windows.use("raw_tokens", key=owner_key, since_ms=since)
            reset = reset_after(now_ms, use, MINUTE_S)
            if use.used + worst_tokens > tpm:
                raise rate_limited("tokens", f"{tpm} tokens per minute (this request may use "
                                    f"{worst_tokens}: prompt plus max_tokens)", who, reset, tpm)
            note("tokens", tpm, tpm - use.used - worst_tokens, reset)

    # The plan's rolling quota windows.
    needs = {"requests": mult, "tokens": worst_tokens * mult, "credits": amount}
    for raw in (plan.windows if plan is not None else []):
        window = Window.parse(raw)
        use = windows.use(WINDOW_COLUMN[window.metric], key=False,  # type: ignore[arg-type]
                          since_ms=now_ms - window.seconds * 1000)
        limit = window.limit * WINDOW_SCALE[window.metric]
        if use.used + needs[window.metric] > limit:
            raise QuotaExceeded(
                f"The plan {plan.name} allows {window.limit} {window.metric} per "  # type: ignore[union-attr]
                f"{format_wait(window.seconds)}, and {org.name} has used them. It frees up as "
                f"older requests leave the window.")
        if window.metric in ("requests", "tokens"):
            note(window.metric, window.limit, (limit - use.used - needs[window.metric])
                 // WINDOW_SCALE[window.metric], reset_after(now_ms, use, window.seconds))

    # Prepaid money: settled balance minus what running requests hold.
    if charged:
        available = org.balance_micros - windows.held()["cost_micros"]
        if amount > available:
            raise QuotaExceeded(
                f"The balance of {org.name} does not cover this request: it may cost up to "
                f"{amount} micro-units (prompt plus max_tokens) and {max(available, 0)} are "
                f"available. Top up, or ask for fewer max_tokens.")

    reservation_id = str(uuid.uuid4())
    # A Core INSERT: the ORM's unit of work costs several times the statement here.
    session.execute(insert(Reservation).values(
        id=reservation_id, org_id=org.id, key_id=key.id, request_id=request_id, model=model,
        endpoint=endpoint, amount_micros=amount, requests_milli=mult,
        tokens_milli=worst_tokens * mult, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
        created_ms=now_ms))
    headers: dict[str, str] = {}
    for kind, (limit, remaining, reset) in tightest.items():
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(remaining, 0))
        headers[f"x-ratelimit-reset-{kind}"] = format_wait(reset)
    return Admission(reservation_id, org.id, amount, pricing, charged, mult, headers)


def rate_limited(kind: str, what: str, who: str, reset: float, limit: int) -> RateLimited:
    error = RateLimited(f"Rate limit reached: this {who} allows {what}. Retry in "
                        f"{format_wait(reset)}.", headers={
                            "retry-after": str(max(1, int(-(-reset // 1)))),
                            f"x-ratelimit-limit-{kind}": str(limit),
                            f"x-ratelimit-remaining-{kind}": "0",
                            f"x-ratelimit-reset-{kind}": format_wait(reset)})
    error.error_type = kind
    error.window_reset_s = reset
    return error


def price_for(session: Session, org: Organization, plan: Plan | None, model: str,
             now_ms: int) -> Pricing:
    if org.price_book_id is None:
        return Pricing()
    found = session.execute(select(PriceBook.peak_hours, Price).join(
        Price, Price.price_book_id == PriceBook.id).where(
        PriceBook.id == org.price_book_id, Price.model == model)).first()
    if found is None:
        return Pricing()
    peak_hours, price = found
    hour = datetime.fromtimestamp(now_ms / 1000, UTC).hour
    multiplier = peak_multiplier_milli(peak_hours, hour)
    ratio = plan.price_ratio_milli if plan is not None else MILLI
    return Pricing(price.input_micros, price.cached_input_micros, price.output_micros,
                   multiplier * ratio // MILLI)


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
        self._rows: list[dict[str, object]] = []

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

    def add(self, **row: object) -> None:
        row["created_ms"] = self._clock[row["org_id"]]  # type: ignore[index]
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
        if gone.rowcount:
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
