"""How much of a rolling window an organization or a key has used, read from running totals.

Every usage row carries its organization's and its key's running totals (the `*_total` columns of
`usage`). What an owner used in the window (since, now] is its newest row's total minus the total
of its newest row at or before `since`: two indexed lookups however many requests the window
holds, where summing the rows cost a scan that grew with the request rate.

For that to hold, an owner's totals must grow in the order of (created_ms, id). Settlement
appends rows through `Totals` while it holds the organization's lock (all of a key's rows are its
organization's), with created_ms read from the database clock after taking it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.orm import Session

Metric = Literal["count", "raw_tokens", "requests_milli", "tokens_milli", "cost_micros"]

# Running-total column per metric, of the organization's rows and of the key's rows.
ORG_TOTALS: dict[str, str] = {
    "count": "org_count_total", "raw_tokens": "org_raw_tokens_total",
    "requests_milli": "org_requests_milli_total", "tokens_milli": "org_tokens_milli_total",
    "cost_micros": "org_cost_total"}
KEY_TOTALS: dict[str, str] = {"count": "key_count_total", "raw_tokens": "key_raw_tokens_total"}


def _newest(owner: str, columns: dict[str, str], *, before: bool) -> Any:
    window = " AND created_ms <= :since" if before else ""
    return text(f"SELECT {', '.join(columns.values())} FROM usage WHERE {owner} = :owner{window} "
                "ORDER BY created_ms DESC, id DESC LIMIT 1")


def _oldest(owner: str) -> Any:
    return text(f"SELECT created_ms FROM usage WHERE {owner} = :owner AND created_ms > :since "
                "ORDER BY created_ms LIMIT 1")


# Built once: text() statements skip the ORM's per-call compile and cache-key work.
_QUERIES = {
    owner: (_newest(owner, columns, before=False), _newest(owner, columns, before=True),
            _oldest(owner))
    for owner, columns in (("org_id", ORG_TOTALS), ("key_id", KEY_TOTALS))}

# What running requests hold, per metric, for the organization and (key_*) for one key.
_HELD = text(
    "SELECT COUNT(*), COALESCE(SUM(prompt_tokens + max_tokens), 0), "
    "COALESCE(SUM(requests_milli), 0), COALESCE(SUM(tokens_milli), 0), "
    "COALESCE(SUM(amount_micros), 0), "
    "COALESCE(SUM(CASE WHEN key_id = :key THEN 1 ELSE 0 END), 0), "
    "COALESCE(SUM(CASE WHEN key_id = :key THEN prompt_tokens + max_tokens ELSE 0 END), 0) "
    "FROM reservations WHERE org_id = :org")


@dataclass(frozen=True, slots=True)
class WindowUse:
    """Units used in a window: settled (with the oldest row's time) plus held."""

    used: int
    oldest_ms: int | None


class WindowReader:
    """One admission's view of an organization's and a key's usage, each query run once."""

    def __init__(self, session: Session, *, org_id: int, key_id: int) -> None:
        self._session = session
        self._owners = {"org_id": org_id, "key_id": key_id}
        self._latest: dict[str, dict[str, int]] = {}
        # Per (owner, since): the totals at `since` and the oldest row after it. A minute's
        # requests and tokens share them, so one pair of lookups serves both limits.
        self._earlier: dict[tuple[str, int], tuple[dict[str, int], int | None]] = {}
        self._held: dict[str, int] | None = None

    def held(self) -> dict[str, int]:
        """What running requests of the organization hold: `running` requests, `amount_micros`
        and each metric (`key_count`, `key_raw_tokens`: of the key alone)."""
        if self._held is None:
            row = self._session.execute(_HELD, {"org": self._owners["org_id"],
                                                "key": self._owners["key_id"]}).one()
            names = ("count", "raw_tokens", "requests_milli", "tokens_milli", "cost_micros",
                     "key_count", "key_raw_tokens")
            self._held = dict(zip(names, map(int, row), strict=True))
        return self._held

    def use(self, metric: Metric, *, key: bool, since_ms: int) -> WindowUse:
        """Settled use of the key's (or organization's) window since `since_ms`, plus holds."""
        owner = "key_id" if key else "org_id"
        columns = KEY_TOTALS if key else ORG_TOTALS
        newest, before, oldest = _QUERIES[owner]
        params = {"owner": self._owners[owner], "since": since_ms}
        if owner not in self._latest:
            self._latest[owner] = self._totals(newest, params, columns)
        latest = self._latest[owner]
        if (owner, since_ms) not in self._earlier:
            earlier = self._totals(before, params, columns)
            found = (self._session.execute(oldest, params).scalar()
                     if latest["count"] > earlier["count"] else None)  # else: no row in it
            self._earlier[owner, since_ms] = earlier, None if found is None else int(found)
        earlier, oldest_ms = self._earlier[owner, since_ms]
        held = self.held()[f"key_{metric}" if key else metric]
        return WindowUse(latest[metric] - earlier[metric] + held, oldest_ms)

    def _totals(self, query: Any, params: dict[str, int], columns: dict[str, str]
                ) -> dict[str, int]:
        row = self._session.execute(query, params).first()
        return {metric: 0 if row is None else int(value)
                for metric, value in zip(columns, row or [0] * len(columns), strict=True)}


class Totals:
    """Stamps the usage rows one settlement appends with their owners' running totals. The
    caller holds each organization's lock; a row's totals include itself."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._org: dict[int, dict[str, int]] = {}
        self._key: dict[int, dict[str, int]] = {}

    def stamp(self, row: dict[str, Any]) -> dict[str, Any]:
        amounts = {"count": 1, "raw_tokens": row["prompt_tokens"] + row["completion_tokens"],
                   "requests_milli": row["requests_milli"], "tokens_milli": row["tokens_milli"],
                   "cost_micros": row["cost_micros"]}
        for column in (*ORG_TOTALS.values(), *KEY_TOTALS.values()):
            row[column] = 0  # every row has every column: rows are inserted together
        if row["org_id"] is None:  # operator keys: never limited, so no totals to keep
            return row
        for owner, cache, columns in (("org_id", self._org, ORG_TOTALS),
                                      ("key_id", self._key, KEY_TOTALS)):
            ident = row[owner]
            if ident is None:
                continue
            if ident not in cache:
                newest = _QUERIES[owner][0]
                found = self._session.execute(newest, {"owner": ident}).first()
                cache[ident] = {metric: 0 if found is None else int(found[i])
                                for i, metric in enumerate(columns)}
            totals = cache[ident]
            for metric, column in columns.items():
                totals[metric] += amounts[metric]
                row[column] = totals[metric]
        return row
