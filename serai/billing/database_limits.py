"""Admission in the database alone (SQLite or PostgreSQL), the default backend.

`admit` runs in one locked transaction per organization: it evaluates the request's terms
(terms.py) against settled usage plus what running requests hold, and holds this request's
worst case as a reservation. The databases serialize it: SQLite has one writer at a time, and on
PostgreSQL the first statement locks the organization's row.
"""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from serai.billing.base import UNMETERED, Admission, UsageRecord
from serai.billing.settlement import (
    Owned,
    hold,
    lock_org,
    release,
    renew_reservations,
    sweep_reservations,
    write_usage,
)
from serai.billing.terms import Check, derive_terms
from serai.billing.windows import WindowReader, WindowUse
from serai.governance.accounts import KeyInfo
from serai.storage.db import Database


def admit(*, session: Session, key: KeyInfo, request_id: str, model: str, endpoint: str,
          prompt_tokens: int, max_tokens: int) -> Admission:
    """Check every limit and hold this request's worst case; raises RateLimited or
    QuotaExceeded (or PermissionDenied) without holding anything."""
    if key.org_id is None:
        return UNMETERED  # platform operators are not billed
    terms = derive_terms(session, org=lock_org(session, key.org_id), key=key, model=model,
                         prompt_tokens=prompt_tokens, max_tokens=max_tokens)
    reader = WindowReader(session, org_id=terms.org_id, key_id=key.id)
    uses = []
    for check in terms.checks:
        use = _use(reader, check, terms.now_ms)
        if not check.fits(use.used):
            raise check.refuse(use, terms.now_ms)
        uses.append(use)
    reservation_id = str(uuid.uuid4())
    hold(session, terms=terms, reservation_id=reservation_id, request_id=request_id,
         endpoint=endpoint, created_ms=terms.now_ms)
    return terms.admission(reservation_id, terms.headers(uses, terms.now_ms))


def _use(reader: WindowReader, check: Check, now_ms: int) -> WindowUse:
    """What `check` counts: settled usage in its span, by the usage rows' running totals, plus
    what running requests hold."""
    if not check.span_s:
        return WindowUse(reader.held()[f"key_{check.metric}" if check.key else check.metric], None)
    return reader.use(check.metric, key=check.key, since_ms=now_ms - check.span_s * 1000)


class DatabaseLimiter:
    """The Limiter whose counters are the database's own rows: see admit."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self.owned = Owned()

    def reserve(self, *, key: KeyInfo, request_id: str, model: str, endpoint: str,
                prompt_tokens: int, max_tokens: int) -> Admission:
        with self._database.session(write=True) as session:
            admission = admit(session=session, key=key, request_id=request_id, model=model,
                              endpoint=endpoint, prompt_tokens=prompt_tokens,
                              max_tokens=max_tokens)
        self.owned.add(admission)
        return admission

    def settle(self, records: list[UsageRecord]) -> None:
        with self._database.session(write=True) as session:
            write_usage(session=session, records=records)
        self.owned.discard([r.admission.reservation_id for r in records])

    def release(self, admission: Admission) -> None:
        with self._database.session(write=True) as session:
            release(session=session, admission=admission)
        self.owned.discard([admission.reservation_id])

    def abandon(self, record: UsageRecord) -> None:
        self.owned.discard([record.admission.reservation_id])

    def renew(self) -> int:
        held = list(self.owned.now())
        if held:
            with self._database.session(write=True) as session:
                renew_reservations(session=session, reservation_ids=held)
        return len(held)

    def sweep(self, older_than_s: float) -> int:
        with self._database.session(write=True) as session:
            return sweep_reservations(session=session, older_than_s=older_than_s)

    def close(self) -> None:
        pass
