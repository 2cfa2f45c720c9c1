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

from sqlalchemy import select
from sqlalchemy.orm import Session

from serai.errors import Conflict, InvalidRequest
from serai.storage.tables import Plan, Price, PriceBook

Metric = Literal["requests", "tokens", "credits"]
METRICS: tuple[Metric, ...] = ("requests", "tokens", "credits")
MILLI = 1000
PER_MILLION = 1_000_000


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
    if session.scalar(select(Plan).where(Plan.name == name)) is not None:
        raise Conflict(f"A plan named {name!r} exists already.", param="name")
    checked = [Window.parse(w).as_dict() for w in windows or []]
    for model, factor in (model_multipliers or {}).items():
        if not isinstance(factor, int | float) or factor < 0:
            raise InvalidRequest(f"The multiplier of {model!r} must be a number >= 0.",
                                 param="model_multipliers")
    row = Plan(name=name, windows=checked, model_multipliers=dict(model_multipliers or {}),
               rpm=rpm, tpm=tpm, max_concurrency=max_concurrency, draws_balance=draws_balance,
               price_ratio_milli=price_ratio_milli, disabled=False)
    session.add(row)
    session.flush()
    return row


def create_price_book(*, session: Session, name: str, currency: str = "USD",
                      peak_hours: list[dict[str, Any]] | None = None) -> PriceBook:
    if session.scalar(select(PriceBook).where(PriceBook.name == name)) is not None:
        raise Conflict(f"A price book named {name!r} exists already.", param="name")
    row = PriceBook(name=name, currency=currency.upper(),
                    peak_hours=validate_peak_hours(peak_hours or []))
    session.add(row)
    session.flush()
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
    return row
