"""The platform's live traffic, read from the usage ledger: requests, output tokens and failed
requests over the last minutes, and per minute for a chart. Read from the ledger rather than
one process's counters, so every gateway's requests count."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from serai.storage.db import db_now_ms, iso_from_ms
from serai.storage.tables import UsageRow

MINUTE_MS = 60_000
# created_at is indexed and created_ms is not (outside an organization's index): the query
# narrows by created_at with this much room, then counts by created_ms, the settling clock.
_SLACK_MS = 2 * MINUTE_MS


@dataclass(frozen=True, slots=True)
class Rates:
    """What the ledger holds of the last `seconds`. A request failed when its row's status is
    not "ok": the engine failed, the client went away or the process died under it."""

    seconds: int
    requests: int
    output_tokens: int
    failed: int

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def output_tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "requests": self.requests,
                "output_tokens": self.output_tokens, "failed": self.failed,
                "requests_per_second": self.requests_per_second,
                "output_tokens_per_second": self.output_tokens_per_second,
                "error_rate": self.error_rate}


@dataclass(frozen=True, slots=True)
class Minute:
    start_ms: int
    requests: int
    output_tokens: int
    failed: int

    def as_dict(self) -> dict[str, Any]:
        return {"start": iso_from_ms(self.start_ms),
                "requests": self.requests, "output_tokens": self.output_tokens,
                "failed": self.failed}


@dataclass(frozen=True, slots=True)
class Traffic:
    now_ms: int
    rates: list[Rates]
    minutes: list[Minute]  # oldest first, the current (unfinished) minute last


def _since(since_ms: int) -> Any:
    cutoff = datetime.fromtimestamp((since_ms - _SLACK_MS) / 1000, UTC)
    return (UsageRow.created_at >= cutoff) & (UsageRow.created_ms >= since_ms)


def _failed() -> Any:
    return func.coalesce(func.sum(case((UsageRow.status != "ok", 1), else_=0)), 0)


def traffic(*, session: Session, windows: tuple[int, ...] = (60, 300),
            minutes: int = 60) -> Traffic:
    """Rates over each of `windows` (seconds) up to the database clock's now, and the counts
    of each of the last `minutes` whole clock minutes (quiet minutes as zeros)."""
    now = db_now_ms(session)
    rates = []
    for seconds in windows:
        found = session.execute(
            select(func.count(), func.coalesce(func.sum(UsageRow.completion_tokens), 0),
                   _failed()).where(_since(now - seconds * 1000))).one()
        rates.append(Rates(seconds, int(found[0]), int(found[1]), int(found[2])))
    first = (now // MINUTE_MS - minutes + 1) * MINUTE_MS
    minute = (UsageRow.created_ms // MINUTE_MS).label("minute")
    counted = {int(row.minute) * MINUTE_MS: row for row in session.execute(
        select(minute, func.count().label("requests"),
               func.coalesce(func.sum(UsageRow.completion_tokens), 0).label("tokens"),
               _failed().label("failed"))
        .where(_since(first)).group_by(minute))}
    series = []
    for n in range(minutes):
        start = first + n * MINUTE_MS
        row = counted.get(start)
        series.append(Minute(start, 0, 0, 0) if row is None else
                      Minute(start, int(row.requests), int(row.tokens), int(row.failed)))
    return Traffic(now, rates, series)
