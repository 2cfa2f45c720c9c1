"""The terms of an admission: which limits a request must fit, in which order, what it would
hold and cost, and what its client is told when a limit is reached.

They are derived once, here, from the organization, its plan, the key, the model and the
request's size. Each backend evaluates the same checks, in order, where its counters live:
database_limits.py against the usage rows' running totals and the reservations table,
redis_limits.py in one Lua script. The first check that does not fit refuses the request with
its own message; when all fit, the tightest of each kind becomes the x-ratelimit-* headers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from serai.billing.base import Admission
from serai.billing.plans import (
    MILLI,
    WINDOW_COLUMN,
    WINDOW_SCALE,
    Pricing,
    Window,
    multiplier_milli,
    peak_multiplier_milli,
)
from serai.billing.windows import Metric, WindowUse
from serai.errors import PermissionDenied, QuotaExceeded, RateLimited, SeraiError
from serai.governance.accounts import KeyInfo
from serai.storage.db import db_now_ms
from serai.storage.tables import Organization, Plan, Price, PriceBook

MINUTE_S = 60


@dataclass(frozen=True, slots=True)
class Check:
    """One limit: what the key (or its organization) used of `metric` in the last `span_s`
    seconds, plus what its running requests hold, may not pass `limit` once this request's
    `need` is added. A span of 0 counts only what running requests hold (concurrency, money)."""

    metric: Metric
    key: bool  # the key's use; else the organization's
    span_s: int
    need: int
    limit: int
    refusal: Callable[[int, float], SeraiError]  # (used, seconds until room frees up) -> error
    shown: tuple[str, int, int] | None = None  # x-ratelimit-* kind, limit shown, units per shown one

    def fits(self, used: int) -> bool:
        return used + self.need <= self.limit

    def refuse(self, use: WindowUse, now_ms: int) -> SeraiError:
        return self.refusal(use.used, reset_after(now_ms, use, self.span_s))


@dataclass(frozen=True, slots=True)
class Terms:
    """What one request must fit and would hold, as the database stood at `now_ms`."""

    org_id: int
    key_id: int
    model: str
    prompt_tokens: int
    max_tokens: int
    pricing: Pricing
    amount_micros: int  # the worst case (prompt plus max_tokens) at these prices
    charged: bool  # taken from the balance; else only counted (a subscription, a free model)
    multiplier_milli: int  # how much one request or token of this model counts in the windows
    now_ms: int
    checks: tuple[Check, ...]

    @property
    def worst_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens

    @property
    def tokens_milli(self) -> int:
        return self.worst_tokens * self.multiplier_milli

    def admission(self, reservation_id: str, headers: dict[str, str]) -> Admission:
        return Admission(reservation_id, self.org_id, self.amount_micros, self.pricing,
                         self.charged, self.multiplier_milli, headers)

    def headers(self, uses: Sequence[WindowUse], now_ms: int) -> dict[str, str]:
        """x-ratelimit-* of the tightest limit of each kind, from each check's use (before
        this request) in the order of `checks`."""
        tightest: dict[str, tuple[int, int, float]] = {}  # kind -> (limit, remaining, reset)
        for check, use in zip(self.checks, uses, strict=True):
            if check.shown is None:
                continue
            kind, shown, scale = check.shown
            remaining = (check.limit - use.used - check.need) // scale
            if kind not in tightest or remaining < tightest[kind][1]:
                tightest[kind] = (shown, remaining, reset_after(now_ms, use, check.span_s))
        headers: dict[str, str] = {}
        for kind, (limit, remaining, reset) in tightest.items():
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(remaining, 0))
            headers[f"x-ratelimit-reset-{kind}"] = format_wait(reset)
        return headers


def derive_terms(session: Session, *, org: Organization | None, key: KeyInfo, model: str,
                 prompt_tokens: int, max_tokens: int) -> Terms:
    """The terms of a request of `key` (its organization `org`, as the backend read it) to
    `model`; raises PermissionDenied when the organization or its plan may run nothing."""
    if org is None:
        raise PermissionDenied("This key's organization no longer exists.")
    if org.disabled:
        raise PermissionDenied(f"The organization {org.name} is disabled.")
    plan = session.get(Plan, org.plan_id) if org.plan_id is not None else None
    if plan is not None and plan.disabled:
        raise PermissionDenied(f"The plan {plan.name} is disabled.")
    now_ms = db_now_ms(session)
    mult = multiplier_milli(plan.model_multipliers, model) if plan is not None else MILLI
    worst = prompt_tokens + max_tokens
    pricing = price_for(session, org, plan, model, now_ms)
    amount = pricing.cost(prompt_tokens=prompt_tokens, completion_tokens=max_tokens)
    charged = (plan is None or plan.draws_balance) and amount > 0
    checks: list[Check] = []

    # In flight: requests running now.
    cap = min((c for c in (org.max_concurrency, plan.max_concurrency if plan else None)
               if c is not None), default=None)
    if cap is not None:
        checks.append(_running(org.name, cap))

    # Requests and tokens per minute: of the key, the organization and its plan.
    for owner_key, rpm, tpm, who in ((True, key.rpm, key.tpm, "key"),
                                     (False, org.rpm, org.tpm, "organization"),
                                     (False, plan.rpm if plan else None,
                                      plan.tpm if plan else None, "plan")):
        if rpm is not None:
            checks.append(_per_minute("requests", "count", owner_key, 1, rpm, who,
                                      f"{rpm} requests per minute"))
        if tpm is not None:
            checks.append(_per_minute("tokens", "raw_tokens", owner_key, worst, tpm, who,
                                      f"{tpm} tokens per minute (this request may use "
                                      f"{worst}: prompt plus max_tokens)"))

    # The plan's rolling quota windows.
    if plan is not None:
        needs = {"requests": mult, "tokens": worst * mult, "credits": amount}
        for raw in plan.windows:
            window = Window.parse(raw)
            checks.append(_window(window, plan.name, org.name, needs[window.metric]))

    # Prepaid money: settled balance minus what running requests hold.
    if charged:
        checks.append(_funded(org.name, org.balance_micros, amount))

    return Terms(org.id, key.id, model, prompt_tokens, max_tokens, pricing, amount, charged, mult,
                 now_ms, tuple(checks))


def _running(org_name: str, cap: int) -> Check:
    def busy(used: int, _reset: float) -> SeraiError:
        return RateLimited(f"{used} requests of {org_name} are running, the most its plan "
                           f"allows at once ({cap}). Retry when one finishes.",
                           headers={"retry-after": "1"})
    return Check("count", False, 0, 1, cap, busy)


def _per_minute(kind: str, metric: Metric, owner_key: bool, need: int, limit: int, who: str,
                what: str) -> Check:
    def reached(_used: int, reset: float) -> SeraiError:
        return rate_limited(kind, what, who, reset, limit)
    return Check(metric, owner_key, MINUTE_S, need, limit, reached, (kind, limit, 1))


def _window(window: Window, plan_name: str, org_name: str, need: int) -> Check:
    def used_up(_used: int, _reset: float) -> SeraiError:
        return QuotaExceeded(
            f"The plan {plan_name} allows {window.limit} {window.metric} per "
            f"{format_wait(window.seconds)}, and {org_name} has used them. It frees up as "
            f"older requests leave the window.")
    scale = WINDOW_SCALE[window.metric]
    shown = (window.metric, window.limit, scale) if window.metric in ("requests", "tokens") else None
    return Check(WINDOW_COLUMN[window.metric], False, window.seconds, need, window.limit * scale,
                 used_up, shown)


def _funded(org_name: str, balance_micros: int, amount: int) -> Check:
    def unfunded(held: int, _reset: float) -> SeraiError:
        available = balance_micros - held
        return QuotaExceeded(
            f"The balance of {org_name} does not cover this request: it may cost up to "
            f"{amount} micro-units (prompt plus max_tokens) and {max(available, 0)} are "
            f"available. Top up, or ask for fewer max_tokens.")
    return Check("cost_micros", False, 0, amount, balance_micros, unfunded)


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
