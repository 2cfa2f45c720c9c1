"""What an organization used and owes, read from the usage ledger: daily usage by model, and
monthly invoices whose lines add up to the ledger to the micro-unit.

Days and months are UTC and measured on `usage.created_ms`, the database clock at settlement,
the same clock the plan windows use.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import case, func, literal, select
from sqlalchemy.orm import Session

from serai.errors import InvalidRequest
from serai.storage.tables import Organization, PriceBook, UsageRow

DAY_MS = 86_400_000
EPOCH = date(1970, 1, 1)
DEFAULT_CURRENCY = "USD"


@dataclass(frozen=True, slots=True)
class UsageLine:
    """One model's usage in one period (a day or a month)."""

    period: str  # "2026-11-23" or "2026-11"
    model: str
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    # What the tokens cost at the prices in force, and what of it was taken from the balance
    # (a subscription counts cost without charging it).
    cost_micros: int
    charged_micros: int


def _ms(moment: date) -> int:
    return int(datetime(moment.year, moment.month, moment.day, tzinfo=UTC).timestamp() * 1000)


def _totals(session: Session, org_id: int, start_ms: int, end_ms: int, *, by_day: bool,
            period: Callable[[int], str]) -> list[UsageLine]:
    """A line per model (and per day, named by `period` from the day's number, when `by_day`;
    else `period(0)` names the whole range)."""
    day = UsageRow.created_ms // DAY_MS if by_day else literal(0)
    charged = func.sum(case((UsageRow.charged.is_(True), UsageRow.cost_micros), else_=0))
    query = (select(day, UsageRow.model, func.count(), func.sum(UsageRow.prompt_tokens),
                    func.sum(UsageRow.cached_tokens), func.sum(UsageRow.completion_tokens),
                    func.sum(UsageRow.cost_micros), charged)
             # A request lost to a crash (`interrupted`) was never priced: not a line item.
             .where(UsageRow.org_id == org_id, UsageRow.created_ms >= start_ms,
                    UsageRow.created_ms < end_ms, UsageRow.status != "interrupted")
             .group_by(*([day] if by_day else []), UsageRow.model)
             .order_by(*([day] if by_day else []), UsageRow.model))
    return [UsageLine(period(int(d)), str(m), _sum(n), _sum(prompt), _sum(cached),
                      _sum(completion), _sum(cost), _sum(taken))
            for d, m, n, prompt, cached, completion, cost, taken in session.execute(query)]


def _sum(value: Any) -> int:
    # SUM of an empty set is NULL, and PostgreSQL hands sums back as Decimal.
    return int(value or 0)


DEFAULT_DAYS = 30
# The days usage can be asked for: the ledger's clock starts at the epoch, and a range ends
# the day after its last (which the calendar must still hold).
FIRST_DAY, LAST_DAY = EPOCH, date.max - timedelta(days=1)


def date_range(start: date | None, end: date | None) -> tuple[date, date]:
    """The days asked for: up to today (UTC), the last 30 days when no start is given."""
    for param, day in (("start_date", start), ("end_date", end)):
        if day is not None and not FIRST_DAY <= day <= LAST_DAY:
            raise InvalidRequest(f"Invalid '{param}': usage is kept by UTC days from "
                                 f"{FIRST_DAY} to {LAST_DAY}, not {day}.", param=param)
    end = end or datetime.now(UTC).date()
    return (start or end - timedelta(days=DEFAULT_DAYS - 1)), end


def daily_usage(*, session: Session, org_id: int, start: date, end: date) -> list[UsageLine]:
    """Usage by day and model from `start` to `end`, both included."""
    if end < start:
        raise InvalidRequest("The end date comes before the start date.", param="end_date")
    if (end - start).days > 366:
        raise InvalidRequest("Ask for at most 366 days at a time.", param="start_date")
    return _totals(session, org_id, _ms(start), _ms(end + timedelta(days=1)), by_day=True,
                   period=lambda number: (EPOCH + timedelta(days=number)).isoformat())


@dataclass(frozen=True, slots=True)
class Invoice:
    org_id: int
    org_name: str
    month: str
    currency: str
    lines: list[UsageLine]

    @property
    def total_micros(self) -> int:
        return sum(line.charged_micros for line in self.lines)

    def as_dict(self) -> dict[str, object]:
        return {"object": "invoice", "organization": {"id": self.org_id, "name": self.org_name},
                "month": self.month, "currency": self.currency,
                "lines": [{"model": line.model, "requests": line.requests,
                           "input_tokens": line.input_tokens,
                           "cached_input_tokens": line.cached_input_tokens,
                           "output_tokens": line.output_tokens,
                           "cost_micros": line.cost_micros,
                           "amount_micros": line.charged_micros} for line in self.lines],
                "total_micros": self.total_micros, "total": money(self.total_micros)}

    def as_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["month", "organization", "model", "requests", "input_tokens",
                         "cached_input_tokens", "output_tokens", "amount_micros", "amount",
                         "currency"])
        for line in self.lines:
            writer.writerow([self.month, self.org_name, line.model, line.requests,
                             line.input_tokens, line.cached_input_tokens, line.output_tokens,
                             line.charged_micros, money(line.charged_micros), self.currency])
        writer.writerow([self.month, self.org_name, "TOTAL", sum(x.requests for x in self.lines),
                         sum(x.input_tokens for x in self.lines),
                         sum(x.cached_input_tokens for x in self.lines),
                         sum(x.output_tokens for x in self.lines), self.total_micros,
                         money(self.total_micros), self.currency])
        return out.getvalue()


def money(micros: int) -> str:
    """Micro-units as a decimal amount with six places, exactly ("12.500000")."""
    return str((Decimal(micros) / Decimal(1_000_000)).quantize(Decimal("0.000001")))


# A billion currency units: above any real price, top-up or adjustment, and far below what the
# database's 64-bit money columns hold, so sums of many amounts cannot overflow them either.
MAX_MONEY_MICROS = 10**15


def parse_money(text: str) -> int:
    """A decimal amount ("10", "10.5", "0.000001") as integer micro-units, exactly."""
    try:
        amount = Decimal(text.strip())
    except ArithmeticError:
        amount = Decimal("NaN")
    if not amount.is_finite():
        raise InvalidRequest(f"{text!r} is not an amount of money; write one like 12.50.",
                             param="amount")
    micros = amount * 1_000_000
    if micros != micros.to_integral_value():
        raise InvalidRequest(f"{text!r} has more than six decimal places.", param="amount")
    if abs(micros) > MAX_MONEY_MICROS:
        raise InvalidRequest(f"{text!r} is more than {MAX_MONEY_MICROS // 1_000_000:,} "
                             "currency units.", param="amount")
    return int(micros)


MONTH = re.compile(r"^(\d{4})-(\d{2})$")


def month_bounds(month: str) -> tuple[date, date]:
    """The first day of `month` ("2026-11") and of the month after."""
    match = MONTH.match(month)
    if match is None or not 1 <= int(match.group(2)) <= 12:
        raise InvalidRequest(f"A month is written YYYY-MM, like 2026-11; not {month!r}.",
                             param="month")
    year, number = int(match.group(1)), int(match.group(2))
    if not (FIRST_DAY.year, 1) <= (year, number) < (date.max.year, 12):
        raise InvalidRequest(f"Invalid 'month': invoices cover the months from "
                             f"{FIRST_DAY:%Y-%m} to {date.max.year}-11, not {month!r}.",
                             param="month")
    first = date(year, number, 1)
    following = date(year + number // 12, number % 12 + 1, 1)
    return first, following


def invoice(*, session: Session, org_id: int, month: str) -> Invoice:
    first, following = month_bounds(month)
    org = session.get(Organization, org_id)
    if org is None:
        raise InvalidRequest(f"No organization {org_id}.", param="org")
    book = session.get(PriceBook, org.price_book_id) if org.price_book_id is not None else None
    lines = _totals(session, org_id, _ms(first), _ms(following), by_day=False,
                    period=lambda _: month)
    return Invoice(org.id, org.name, month, book.currency if book else DEFAULT_CURRENCY, lines)


def request_usage(*, session: Session, request_id: str,
                  org_id: int | None) -> dict[str, object] | None:
    """One request's usage row (tokens, cost, currency), if it was settled and belongs to
    `org_id` (None: any organization, for a platform operator)."""
    query = (select(UsageRow, PriceBook.currency)
             .outerjoin(Organization, Organization.id == UsageRow.org_id)
             .outerjoin(PriceBook, PriceBook.id == Organization.price_book_id)
             .where(UsageRow.request_id == request_id).order_by(UsageRow.id.desc()).limit(1))
    if org_id is not None:
        query = query.where(UsageRow.org_id == org_id)
    found = session.execute(query).first()
    if found is None:
        return None
    row, currency = found
    return {"request_id": row.request_id, "model": row.model, "status": row.status,
            "input_tokens": row.prompt_tokens, "cached_input_tokens": row.cached_tokens,
            "output_tokens": row.completion_tokens, "cost_micros": row.cost_micros,
            "charged": row.charged, "currency": currency or DEFAULT_CURRENCY}
