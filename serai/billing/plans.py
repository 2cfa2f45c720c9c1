"""Plans, rolling quota windows and price books: what a request may use and what it costs.

Everything here is integer arithmetic on micro-units of money and thousandths of quota units,
so a price, a multiplier or a discount never rounds differently on two machines. Costs round
up to the next micro-unit: a reservation computed with these functions always covers the
settlement of the same request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from serai.billing.windows import Metric as Counted
from serai.errors import InvalidRequest, NotFound
from serai.governance import audit
from serai.storage.db import rowcount
from serai.storage.named import claim_name, find_named
from serai.storage.tables import Plan, Price, PriceBook

Metric = Literal["requests", "tokens", "credits"]
METRICS: tuple[Metric, ...] = ("requests", "tokens", "credits")
MILLI = 1000
PER_MILLION = 1_000_000

# What a window of each metric counts: the usage rows' running total it reads (windows.py)
# and the scale of its units: requests and tokens in thousandths (a model's multiplier may count
# a request as 1.5), credits in micro-units.
WINDOW_COLUMN: dict[str, Counted] = {"requests": "requests_milli", "tokens": "tokens_milli",
                                     "credits": "cost_micros"}
WINDOW_SCALE: dict[str, int] = {"requests": MILLI, "tokens": MILLI, "credits": 1}


@dataclass(frozen=True, slots=True)
class Window:
    """At most `limit` units of `metric` in any `seconds`-long stretch of time."""

    metric: Metric
    limit: int
    seconds: int

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Window:
        metric, limit, seconds = data.get("metric"), data.get("limit"), data.get("seconds")
        if metric not in METRICS:
            raise InvalidRequest(f"A window's metric must be one of {', '.join(METRICS)}, not "
                                 f"{metric!r}.", param="windows")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise InvalidRequest("A window's limit must be a whole number >= 0.", param="windows")
        if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 1:
            raise InvalidRequest("A window's seconds must be a whole number >= 1.", param="windows")
        return cls(metric, limit, seconds)

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "limit": self.limit, "seconds": self.seconds}


def multiplier_milli(multipliers: dict[str, float], model: str) -> int:
    """How many thousandths of a quota unit one unit of `model` counts for (1000 = 1x)."""
    return round(float(multipliers.get(model, 1.0)) * MILLI)


@dataclass(frozen=True, slots=True)
class Pricing:
    """A model's prices per million tokens (micro-units) and the multiplier in force, in
    thousandths (peak hours times the plan's ratio)."""

    input_micros: int = 0
    cached_input_micros: int = 0
    output_micros: int = 0
    multiplier_milli: int = MILLI

    @property
    def free(self) -> bool:
        return self.input_micros == self.cached_input_micros == self.output_micros == 0

    def cost(self, *, prompt_tokens: int, cached_tokens: int = 0, completion_tokens: int = 0) -> int:
        """Micro-units for this usage, rounded up."""
        cached = min(cached_tokens, prompt_tokens)
        base = ((prompt_tokens - cached) * self.input_micros + cached * self.cached_input_micros
                + completion_tokens * self.output_micros)
        return math.ceil(base * self.multiplier_milli / (PER_MILLION * MILLI)) if base else 0


def peak_multiplier_milli(peak_hours: list[dict[str, int]], hour_utc: int) -> int:
    """The multiplier of the peak period covering `hour_utc`, or 1x. A period may wrap past
    midnight (start 22, end 2)."""
    for period in peak_hours:
        start, end = period["start_hour"], period["end_hour"]
        inside = start <= hour_utc < end if start <= end else (hour_utc >= start or hour_utc < end)
        if inside:
            return int(period["multiplier_milli"])
    return MILLI


def validate_peak_hours(periods: list[dict[str, Any]]) -> list[dict[str, int]]:
    checked = []
    for period in periods:
        try:
            start, end = int(period["start_hour"]), int(period["end_hour"])
            multiplier = int(period["multiplier_milli"])
        except (KeyError, TypeError, ValueError):
            raise InvalidRequest("A peak period needs start_hour, end_hour (0-24, UTC) and "
                                 "multiplier_milli (3000 = 3x).", param="peak_hours") from None
        if not (0 <= start <= 23 and 0 <= end <= 24 and start != end and multiplier >= 0):
            raise InvalidRequest("Peak hours are 0-24 UTC, start != end, and the multiplier "
                                 "is >= 0.", param="peak_hours")
        checked.append({"start_hour": start, "end_hour": end, "multiplier_milli": multiplier})
    return checked


# -- stored plans and price books ------------------------------------------------------------


def create_plan(*, session: Session, name: str, windows: list[dict[str, Any]] | None = None,
                model_multipliers: dict[str, float] | None = None, rpm: int | None = None,
                tpm: int | None = None, max_concurrency: int | None = None,
                draws_balance: bool = True, price_ratio_milli: int = MILLI) -> Plan:
    claim_name(session, Plan, name, what="A plan")
    checked = [Window.parse(w).as_dict() for w in windows or []]
    row = Plan(name=name, windows=checked,
               model_multipliers=_check_multipliers(model_multipliers or {}), rpm=rpm, tpm=tpm,
               max_concurrency=max_concurrency, draws_balance=draws_balance,
               price_ratio_milli=_check_ratio(price_ratio_milli), disabled=False)
    session.add(row)
    session.flush()
    audit.record(session, action="plan.create", target=f"plan:{row.id}",
                 details={"name": name, "windows": row.windows,
                          "model_multipliers": row.model_multipliers, "rpm": rpm, "tpm": tpm,
                          "max_concurrency": max_concurrency, "draws_balance": draws_balance,
                          "price_ratio_milli": price_ratio_milli})
    return row


def create_price_book(*, session: Session, name: str, currency: str = "USD",
                      peak_hours: list[dict[str, Any]] | None = None) -> PriceBook:
    claim_name(session, PriceBook, name, what="A price book")
    row = PriceBook(name=name, currency=_check_currency(currency),
                    peak_hours=validate_peak_hours(peak_hours or []))
    session.add(row)
    session.flush()
    audit.record(session, action="price_book.create", target=f"price_book:{row.id}",
                 details={"name": name, "currency": row.currency, "peak_hours": row.peak_hours})
    return row


def set_price(*, session: Session, price_book_id: int, model: str, input_micros: int,
              output_micros: int, cached_input_micros: int | None = None) -> Price:
    """Prices per million tokens in micro-units; cached input defaults to the input price and
    may not exceed it (a reservation priced at the input rate must cover the settlement)."""
    cached = input_micros if cached_input_micros is None else cached_input_micros
    if min(input_micros, output_micros, cached) < 0:
        raise InvalidRequest("Prices are whole micro-units >= 0.", param="price")
    if cached > input_micros:
        raise InvalidRequest("Cached input may not cost more than input.",
                             param="cached_input_micros")
    row = session.scalar(select(Price).where(Price.price_book_id == price_book_id,
                                             Price.model == model))
    if row is None:
        row = Price(price_book_id=price_book_id, model=model)
        session.add(row)
    row.input_micros, row.output_micros, row.cached_input_micros = input_micros, output_micros, cached
    session.flush()
    audit.record(session, action="price.set", target=f"price_book:{price_book_id}",
                 details={"model": model, "input_micros": input_micros,
                          "output_micros": output_micros, "cached_input_micros": cached})
    return row


_UNSET: Any = object()


def find_plan(*, session: Session, ref: str | int) -> Plan:
    """A plan by id or name."""
    return find_named(session, Plan, ref, missing="No plan {ref}. `serai plans list` shows them.",
                      param="plan")


def list_plans(*, session: Session) -> list[Plan]:
    return list(session.scalars(select(Plan).order_by(Plan.id)))


def update_plan(*, session: Session, plan_id: int, name: str | None = None,
                windows: list[dict[str, Any]] | None = None,
                model_multipliers: dict[str, float] | None = None, rpm: int | None = _UNSET,
                tpm: int | None = _UNSET, max_concurrency: int | None = _UNSET,
                draws_balance: bool | None = None, price_ratio_milli: int | None = None,
                disabled: bool | None = None) -> Plan:
    """Change what is given. New windows apply to the next admission and count the usage
    already in the ledger: shrinking a window can leave an organization over it for a while."""
    row = find_plan(session=session, ref=plan_id)
    if name is not None:
        claim_name(session, Plan, name, what="A plan", row=row)
        row.name = name
    if windows is not None:
        row.windows = [Window.parse(w).as_dict() for w in windows]
    if model_multipliers is not None:
        row.model_multipliers = _check_multipliers(model_multipliers)
    if price_ratio_milli is not None:
        row.price_ratio_milli = _check_ratio(price_ratio_milli)
    for field, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrency", max_concurrency)):
        if value is not _UNSET:
            setattr(row, field, value)
    if draws_balance is not None:
        row.draws_balance = draws_balance
    if disabled is not None:
        row.disabled = disabled
    session.flush()
    given = {"name": name, "windows": windows, "model_multipliers": model_multipliers,
             "price_ratio_milli": price_ratio_milli, "draws_balance": draws_balance,
             "disabled": disabled}
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    changes.update({k: v for k, v in (("rpm", rpm), ("tpm", tpm),
                                      ("max_concurrency", max_concurrency)) if v is not _UNSET})
    audit.record(session, action="plan.update", target=f"plan:{plan_id}", details=changes)
    return row


def _check_multipliers(multipliers: dict[str, float]) -> dict[str, float]:
    for model, factor in multipliers.items():
        if not isinstance(factor, int | float) or isinstance(factor, bool) or factor < 0:
            raise InvalidRequest(f"The multiplier of {model!r} must be a number >= 0.",
                                 param="model_multipliers")
    return dict(multipliers)


def _check_ratio(ratio: int) -> int:
    if ratio < 0:
        raise InvalidRequest("price_ratio_milli is >= 0 (1000 = the price book's prices).",
                             param="price_ratio_milli")
    return ratio


def find_price_book(*, session: Session, ref: str | int) -> PriceBook:
    """A price book by id or name."""
    return find_named(session, PriceBook, ref, param="price_book",
                      missing="No price book {ref}. `serai prices books` shows them.")


def list_price_books(*, session: Session) -> list[PriceBook]:
    return list(session.scalars(select(PriceBook).order_by(PriceBook.id)))


def update_price_book(*, session: Session, price_book_id: int, name: str | None = None,
                      currency: str | None = None,
                      peak_hours: list[dict[str, Any]] | None = None) -> PriceBook:
    row = find_price_book(session=session, ref=price_book_id)
    if name is not None:
        claim_name(session, PriceBook, name, what="A price book", row=row)
        row.name = name
    if currency is not None:
        row.currency = _check_currency(currency)
    if peak_hours is not None:
        row.peak_hours = validate_peak_hours(peak_hours)
    session.flush()
    changes = {k: v for k, v in (("name", name), ("currency", currency),
                                 ("peak_hours", peak_hours)) if v is not None}
    audit.record(session, action="price_book.update", target=f"price_book:{price_book_id}",
                 details=changes)
    return row


def _check_currency(currency: str) -> str:
    code = currency.strip().upper()
    if not (3 <= len(code) <= 8 and code.isascii() and code.isalpha()):
        raise InvalidRequest("A currency is a code like USD, EUR or CNY.", param="currency")
    return code


def prices(*, session: Session, price_book_id: int) -> list[Price]:
    return list(session.scalars(select(Price).where(Price.price_book_id == price_book_id)
                                .order_by(Price.model)))


def remove_price(*, session: Session, price_book_id: int, model: str) -> None:
    gone = session.execute(delete(Price).where(Price.price_book_id == price_book_id,
                                               Price.model == model))
    if rowcount(gone) == 0:
        raise NotFound(f"The price book has no price for {model!r}.", param="model")
    audit.record(session, action="price.remove", target=f"price_book:{price_book_id}",
                 details={"model": model})


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    """Seconds in "90", "30m", "5h", "7d" or "1w"; ValueError otherwise."""
    text = text.strip().lower()
    if text[-1:] in _UNITS:
        return int(text[:-1]) * _UNITS[text[-1]]
    return int(text)


def format_duration(seconds: int) -> str:
    """The largest whole unit: 18000 -> "5h", 604800 -> "1w", 90 -> "90s"."""
    for unit in ("w", "d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"
