"""The audit log: who changed what (admin actions, keys, plans, prices, balances), and which
requests were refused for a bad key or for data residency.

Entries form a hash chain: each entry's hash is SHA-256 over the previous entry's hash and a
canonical encoding of its own fields, so changing or removing an entry breaks the chain at the
entry after it. Entries never hold secrets or prompt/completion content: keys and codes appear
by their display prefix only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from serai.storage.db import Database, utc
from serai.storage.tables import AuditRecord

GENESIS = "0" * 64  # what the first entry chains to
# Any fixed number: the PostgreSQL advisory lock appends queue on (see `record`).
APPEND_LOCK = 0x5E4A1A0D17
_ACTOR = "audit_actor"


def act_as(session: Session, actor: str) -> Session:
    """Name who acts in this session (an admin key's prefix, or "cli"): the domain functions
    that change something record their entries with this actor."""
    session.info[_ACTOR] = actor
    return session


def _plain(value: Any) -> Any:
    """Details as JSON: dates become ISO strings, so the stored and hashed forms agree."""
    if isinstance(value, datetime):
        return utc(value).isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def entry_hash(row: AuditRecord) -> str:
    """SHA-256 over the previous hash and the entry's fields, in one canonical JSON form."""
    fields = [row.id, utc(row.created_at).isoformat(timespec="microseconds"), row.actor,
              row.action, row.target, row.org_id, row.details, row.prev_hash]
    encoded = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((row.prev_hash + encoded).encode()).hexdigest()


def record(session: Session, *, action: str, target: str, org_id: int | None = None,
           details: dict[str, Any] | None = None, actor: str | None = None) -> None:
    """Append an entry in the session's transaction: it commits or rolls back with the change
    it describes.

    Two appends must never chain to the same predecessor. On PostgreSQL a transaction-scoped
    advisory lock queues them (and ids are then handed out in chain order). On SQLite the
    INSERT comes first: it takes the database's single write lock, so nothing else can append
    before this transaction ends, and the newest earlier entry is the final predecessor.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": APPEND_LOCK})
    # This process's clock, to the microsecond: the entry's order is its id, not its time.
    row = AuditRecord(created_at=datetime.now(UTC),
                      actor=(actor or session.info.get(_ACTOR) or "system")[:64],
                      action=action, target=target[:200], org_id=org_id,
                      details=_plain(details or {}), prev_hash="", hash="")
    session.add(row)
    session.flush()
    previous = session.scalar(select(AuditRecord.hash).where(AuditRecord.id < row.id)
                              .order_by(AuditRecord.id.desc()).limit(1))
    row.prev_hash = previous or GENESIS
    row.hash = entry_hash(row)
    session.flush()


def record_alone(database: Database, **entry: Any) -> None:
    """Append an entry in a transaction of its own (a refusal: nothing else is written)."""
    with database.session(write=True) as session:
        record(session, **entry)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of walking the chain: how many entries are intact up to the first broken one
    (if any), and what is wrong with it."""

    intact: int
    broken_id: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.broken_id is None


def verify(*, session: Session) -> Verdict:
    """Walk the chain in id order: each entry must link to the one before it and hash to its
    stored hash. Removing the newest entries leaves a shorter chain that still verifies; an
    export kept elsewhere (`serai audit export`) shows that."""
    expected_prev = GENESIS
    intact = 0
    for row in _rows(session):
        if row.prev_hash != expected_prev:
            return Verdict(intact, row.id, "broken link: its previous hash does not match the "
                           "entry before it (an entry was removed or changed)")
        if entry_hash(row) != row.hash:
            return Verdict(intact, row.id, "hash mismatch: its fields were changed after it "
                           "was written")
        expected_prev = row.hash
        intact += 1
    return Verdict(intact)


def _rows(session: Session, *, since: datetime | None = None) -> Iterator[AuditRecord]:
    query = select(AuditRecord).order_by(AuditRecord.id)
    if since is not None:
        query = query.where(AuditRecord.created_at >= since)
    # Streamed in batches: the log grows without bound.
    yield from session.scalars(query.execution_options(yield_per=1000))


def entry_object(row: AuditRecord) -> dict[str, Any]:
    return {"id": row.id, "object": "audit_entry",
            "created_at": utc(row.created_at).isoformat(), "actor": row.actor,
            "action": row.action, "target": row.target, "org_id": row.org_id,
            "details": row.details, "prev_hash": row.prev_hash, "hash": row.hash}


def export(*, session: Session, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Every entry (from `since` on), oldest first, as the API shows it."""
    for row in _rows(session, since=since):
        yield entry_object(row)


def entries(*, session: Session, org_id: int | None = None, after: int | None = None,
            limit: int = 100) -> tuple[list[dict[str, Any]], bool]:
    """A page of entries, newest first: those older than entry `after`, only `org_id`'s when
    given. Returns the page and whether older entries remain."""
    query = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit + 1)
    if org_id is not None:
        query = query.where(AuditRecord.org_id == org_id)
    if after is not None:
        query = query.where(AuditRecord.id < after)
    rows = list(session.scalars(query))
    return [entry_object(r) for r in rows[:limit]], len(rows) > limit
