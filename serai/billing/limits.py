"""Admission: who may start a request now, and what a running request holds until it settles.

`Limiter` is the seam: `reserve` checks every limit and holds a request's worst case, `settle`
writes the usage rows of finished requests and gives their holds back, `release` gives back the
hold of a request that never ran, and `sweep` releases what a crashed process left behind.

`DatabaseLimiter` (the default) admits in the database alone: `admit` runs in one locked
transaction per organization, checks every limit (concurrency, rates, plan windows, balance)
against settled usage plus what running requests hold, and holds this request's worst case as a
reservation. Both databases serialize it: SQLite has one writer at a time, and on PostgreSQL
the first statement locks the organization's row.

`RedisLimiter` lets several Serai processes enforce limits together: one Lua script checks every
limit and holds the reservation atomically, by Redis TIME, while the money balance and the usage
rows stay in the database. Redis that cannot be reached refuses requests with 503
`limits_unavailable`; it never lets one in unlimited.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
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
from serai.billing.settlement import (
    Owned,
    lock_org,
    release,
    renew_reservations,
    sweep_reservations,
    write_usage,
)
from serai.billing.windows import WindowReader, WindowUse
from serai.errors import LimitsUnavailable, PermissionDenied, QuotaExceeded, RateLimited, SeraiError
from serai.storage.db import Database, db_now_ms
from serai.storage.tables import Organization, Plan, Price, PriceBook, Reservation, UsageRow

log = logging.getLogger("serai.limits")

MINUTE_S = 60


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
    org = lock_org(session, key.org_id)
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


class DatabaseLimiter:
    """Admission in the database alone (SQLite or PostgreSQL): see admit."""

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


# -- Redis ------------------------------------------------------------------------------------
#
# Per organization (one hash tag, so a script only touches keys of one slot):
#   holds    hash   reservation id -> "field amount field amount ...\n<request id>"
#   held     hash   sums over the holds: n, amount, rm, tm, raw, k<key>:n, k<key>:raw
#   meta     hash   horizon (ms of settled usage loaded from the database), seq (settlements)
#   done     zset   reservation ids settled or released lately, so a late seed cannot revive them
#   req tok  zsets  settled requests / tokens of the organization, "<request id>|<amount>" by time
#   k<key>:req k<key>:tok   the same per key
#   wreq wtok wcredits      requests_milli, tokens_milli, cost_micros for the plan's windows
# and one index of every hold by time, for the sweeper.

_HOLDS, _HELD, _META, _INDEX, _DONE = 1, 2, 3, 4, 5
_ORG_REQ, _ORG_TOK, _KEY_REQ, _KEY_TOK, _W_REQ, _W_TOK, _W_CREDITS = 6, 7, 8, 9, 10, 11, 12

_LUA_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_LUA_SUM = """
local function sum(key, since)
  local total = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, since, '+inf')) do
    total = total + tonumber(string.match(m, '|(%d+)$'))
  end
  return total
end
"""

_LUA_UNHOLD = """
local function unhold(rid)
  local rec = redis.call('HGET', KEYS[1], rid)
  if not rec then return 0 end
  redis.call('HDEL', KEYS[1], rid)
  local field = nil
  for token in string.gmatch(string.match(rec, '^[^\\n]*'), '%S+') do
    if field == nil then field = token else
      redis.call('HINCRBY', KEYS[2], field, string.format('%d', 0 - tonumber(token)))
      field = nil
    end
  end
  if redis.call('HLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end
  return 1
end
"""

# ARGV: reservation id, hold record, index member, horizon needed (ms), expected seq ('' when
# the balance is not checked), number of checks, then 6 per check (mode, key index, held field,
# span ms, need, limit), then the hold's (field, amount) increments.
_RESERVE = _LUA_NOW + _LUA_SUM + """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return {'held', now} end
local horizon = tonumber(redis.call('HGET', KEYS[3], 'horizon') or '-1')
if horizon < tonumber(ARGV[4]) then return {'seed', now} end
if ARGV[5] ~= '' and (redis.call('HGET', KEYS[3], 'seq') or '0') ~= ARGV[5] then
  return {'stale', now}
end
for i = 6, 12 do redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', string.format('%d', now - horizon)) end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', string.format('%d', now - 600000))
local out = {'ok', now}
local at = 7
for i = 1, tonumber(ARGV[6]) do
  local mode, key, field = ARGV[at], tonumber(ARGV[at + 1]), ARGV[at + 2]
  local span, need, limit = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4]), tonumber(ARGV[at + 5])
  at = at + 6
  local used, oldest = 0, -1
  if key > 0 then
    local since = string.format('(%d', now - span)
    if mode == 'count' then used = redis.call('ZCOUNT', KEYS[key], since, '+inf')
    else used = sum(KEYS[key], since) end
    local first = redis.call('ZRANGEBYSCORE', KEYS[key], since, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    if first[2] then oldest = tonumber(first[2]) end
  end
  if field ~= '' then used = used + tonumber(redis.call('HGET', KEYS[2], field) or '0') end
  if used + need > limit then return {'refuse', now, i, used, oldest} end
  out[#out + 1] = used
  out[#out + 1] = oldest
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[4], now, ARGV[3])
for j = at, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[j], ARGV[j + 1]) end
return out
"""

# ARGV: reservation id, index member, then for a settlement: request id, raw tokens,
# requests_milli, tokens_milli, cost_micros. The hold goes once; the settled amounts join the
# windows once (ZADD NX on a member named by the request), however often this runs.
_SETTLE = _LUA_NOW + _LUA_UNHOLD + """
local removed = unhold(ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('ZADD', KEYS[5], now, ARGV[1])
if ARGV[3] then
  if removed == 1 then redis.call('HINCRBY', KEYS[3], 'seq', 1) end
  local rq = ARGV[3]
  redis.call('ZADD', KEYS[6], 'NX', now, rq .. '|1')
  redis.call('ZADD', KEYS[8], 'NX', now, rq .. '|1')
  local amounts = {{7, ARGV[4]}, {9, ARGV[4]}, {10, ARGV[5]}, {11, ARGV[6]}, {12, ARGV[7]}}
  for _, pair in ipairs(amounts) do
    if tonumber(pair[2]) > 0 then redis.call('ZADD', KEYS[pair[1]], 'NX', now, rq .. '|' .. pair[2]) end
  end
end
return removed
"""

# ARGV: horizon, then 4 per hold (reservation id, hold record, index member, created ms).
_SEED_HOLDS = """
for i = 2, #ARGV, 4 do
  local rid, rec = ARGV[i], ARGV[i + 1]
  if not redis.call('ZSCORE', KEYS[5], rid) and redis.call('HSETNX', KEYS[1], rid, rec) == 1 then
    local field = nil
    for token in string.gmatch(string.match(rec, '^[^\\n]*'), '%S+') do
      if field == nil then field = token else
        redis.call('HINCRBY', KEYS[2], field, token)
        field = nil
      end
    end
    redis.call('ZADD', KEYS[4], ARGV[i + 3], ARGV[i + 2])
  end
end
local horizon = tonumber(redis.call('HGET', KEYS[3], 'horizon') or '-1')
if tonumber(ARGV[1]) > horizon then redis.call('HSET', KEYS[3], 'horizon', ARGV[1]) end
return 1
"""

# A stale balance read is retried; this many in a row means settlements outpace admissions.
_ATTEMPTS = 50
_SEED_CHUNK = 1000
RETRY_AFTER_S = 2
_UNAVAILABLE = ("Serai cannot reach its rate-limit store (Redis) right now, so it cannot check "
                "this request against your limits. Retry in a few seconds.")


@dataclass(frozen=True, slots=True)
class _Check:
    """One limit as the reserve script sees it, and how to tell the client it is reached."""

    mode: str  # count | sum (settled members in the span, plus the held field) | held
    key: int  # index of the sorted set in KEYS; 0 for held-only checks
    field: str  # held field added to what was settled; '' for none
    span_ms: int
    need: int
    limit: int
    refusal: Callable[[int, float], SeraiError]  # (used, reset seconds) -> error
    note: tuple[str, int, int] | None = None  # header kind, limit shown, units per shown unit

    def args(self) -> list[str | int]:
        return [self.mode, self.key, self.field, self.span_ms, self.need, self.limit]


@dataclass(frozen=True, slots=True)
class _Settled:
    """What Redis must learn after the database settled or released a request."""

    org_id: int
    reservation_id: str
    request_id: str | None = None  # None: released, nothing joins the windows
    key_id: int = 0
    raw_tokens: int = 0
    requests_milli: int = 0
    tokens_milli: int = 0
    cost_micros: int = 0


@dataclass(frozen=True, slots=True)
class _Terms:
    org: Organization
    plan: Plan | None
    admission: Admission
    worst_tokens: int
    horizon_ms: int
    checks: list[_Check]


def _hold_record(fields: Sequence[tuple[str, int]], request_id: str) -> str:
    return " ".join(f"{name} {amount}" for name, amount in fields) + "\n" + request_id


def _hold_fields(*, key_id: int, amount: int, requests_milli: int, tokens_milli: int,
                 raw_tokens: int) -> list[tuple[str, int]]:
    return [("n", 1), ("amount", amount), ("rm", requests_milli), ("tm", tokens_milli),
            ("raw", raw_tokens), (f"k{key_id}:n", 1), (f"k{key_id}:raw", raw_tokens)]


class RedisLimiter:
    """Admission shared through Redis by every Serai process with the same URL and prefix.

    Limits, plan windows, prices and the balance are read from the database on every admission,
    so a top-up or a plan change counts from the next request. Settled usage for the windows
    lives in Redis; an organization Redis knows nothing of (first use, or Redis restarted
    empty) is first loaded from the database's usage rows and reservations.

    The client is redis-py's synchronous one: admission already runs in a worker thread and
    interleaves database reads with the script, so one blocking call sequence per request keeps a
    single code path (and one transaction order) for both backends.
    """

    def __init__(self, database: Database, url: str, *, prefix: str = "serai") -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._database = database
        self._prefix = prefix
        # One retry on a fresh connection: pooled connections die when Redis restarts. The
        # reserve script is safe to repeat (a hold already there is answered as held).
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1,
                                           retry=Retry(NoBackoff(), 1))
        self._error = redis.RedisError
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)
        self._seed_holds = self._redis.register_script(_SEED_HOLDS)
        self._pending: list[_Settled] = []
        self._pending_lock = threading.Lock()
        self._failing = False
        self.owned = Owned()

    # -- keys

    def _keys(self, org_id: int, key_id: int = 0) -> list[str]:
        tag = f"{self._prefix}:{{o{org_id}}}"
        return [f"{tag}:holds", f"{tag}:held", f"{tag}:meta", f"{self._prefix}:holds-by-time",
                f"{tag}:done", f"{tag}:req", f"{tag}:tok", f"{tag}:k{key_id}:req",
                f"{tag}:k{key_id}:tok", f"{tag}:wreq", f"{tag}:wtok", f"{tag}:wcredits"]

    # -- reserve

    def reserve(self, *, key: KeyInfo, request_id: str, model: str, endpoint: str,
                prompt_tokens: int, max_tokens: int) -> Admission:
        if key.org_id is None:
            return UNMETERED  # platform operators are not billed
        org_id = key.org_id
        keys = self._keys(org_id, key.id)
        reservation_id = str(uuid.uuid4())
        try:
            self._flush_pending()
            for _ in range(_ATTEMPTS):
                # The settlement count is read before the balance: a settlement between the two
                # reads changes it, and the script then asks for a fresh balance instead of
                # pairing an old balance with holds already given back.
                seq = (self._redis.hget(keys[_META - 1], "seq") or b"0").decode()
                with self._database.session() as session:
                    terms = self._terms(session, key=key, model=model, prompt_tokens=prompt_tokens,
                                        max_tokens=max_tokens, reservation_id=reservation_id)
                admission = terms.admission
                fields = _hold_fields(key_id=key.id, amount=admission.amount_micros,
                                      requests_milli=admission.multiplier_milli,
                                      tokens_milli=terms.worst_tokens * admission.multiplier_milli,
                                      raw_tokens=terms.worst_tokens)
                args: list[Any] = [reservation_id, _hold_record(fields, request_id),
                                   f"{org_id}|{reservation_id}", terms.horizon_ms,
                                   seq if admission.charged else "", len(terms.checks)]
                for check in terms.checks:
                    args += check.args()
                for name, amount in fields:
                    args += [name, amount]
                reply = self._reserve(keys=keys, args=args)
                status = reply[0].decode()
                if status == "seed":
                    self._seed(org_id, terms.horizon_ms)
                elif status == "refuse":
                    now_ms, index, used, oldest = (int(x) for x in reply[1:5])
                    check = terms.checks[index - 1]
                    reset = reset_after(now_ms, WindowUse(used, oldest if oldest >= 0 else None),
                                         check.span_ms // 1000)
                    raise check.refusal(used, reset)
                elif status in ("ok", "held"):
                    self._recovered()
                    break
            else:
                raise LimitsUnavailable("Too many settlements are racing this request's balance "
                                        "check. Retry in a few seconds.",
                                        headers={"retry-after": str(RETRY_AFTER_S)})
        except self._error as exc:
            self._report(exc, "admission")
            raise LimitsUnavailable(_UNAVAILABLE,
                                    headers={"retry-after": str(RETRY_AFTER_S)}) from exc
        try:
            # The durable reservation: settlement and the database sweeper work from it, as
            # with the database backend, so a crash loses no request.
            with self._database.session() as session:
                session.add(Reservation(
                    id=reservation_id, org_id=org_id, key_id=key.id, request_id=request_id,
                    model=model, endpoint=endpoint, amount_micros=admission.amount_micros,
                    requests_milli=admission.multiplier_milli,
                    tokens_milli=terms.worst_tokens * admission.multiplier_milli,
                    prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                    created_ms=db_now_ms(session)))
        except BaseException:
            self._pend([_Settled(org_id, reservation_id)])
            raise
        headers = _headers(terms.checks, [int(x) for x in reply[2:]], int(reply[1]))
        admitted = Admission(reservation_id, org_id, admission.amount_micros, admission.pricing,
                             admission.charged, admission.multiplier_milli,
                             headers if status == "ok" else {})
        self.owned.add(admitted)
        return admitted

    def _terms(self, session: Session, *, key: KeyInfo, model: str, prompt_tokens: int,
               max_tokens: int, reservation_id: str) -> _Terms:
        """What this request would hold and every limit it must fit, from the database."""
        assert key.org_id is not None
        org = session.get(Organization, key.org_id)
        if org is None:
            raise PermissionDenied("This key's organization no longer exists.")
        if org.disabled:
            raise PermissionDenied(f"The organization {org.name} is disabled.")
        plan = session.get(Plan, org.plan_id) if org.plan_id is not None else None
        if plan is not None and plan.disabled:
            raise PermissionDenied(f"The plan {plan.name} is disabled.")
        mult = multiplier_milli(plan.model_multipliers, model) if plan is not None else MILLI
        worst = prompt_tokens + max_tokens
        pricing = price_for(session, org, plan, model, db_now_ms(session))
        amount = pricing.cost(prompt_tokens=prompt_tokens, completion_tokens=max_tokens)
        charged = (plan is None or plan.draws_balance) and amount > 0
        checks: list[_Check] = []
        minute = MINUTE_S * 1000

        cap = min((c for c in (org.max_concurrency, plan.max_concurrency if plan else None)
                   if c is not None), default=None)
        if cap is not None:
            def busy(used: int, _reset: float, cap: int = cap) -> SeraiError:
                return RateLimited(f"{used} requests of {org.name} are running, the most its "
                                   f"plan allows at once ({cap}). Retry when one finishes.",
                                   headers={"retry-after": "1"})
            checks.append(_Check("held", 0, "n", 0, 1, cap, busy))

        for owner, rpm, tpm, who in ((True, key.rpm, key.tpm, "key"),
                                     (False, org.rpm, org.tpm, "organization"),
                                     (False, plan.rpm if plan else None,
                                      plan.tpm if plan else None, "plan")):
            prefix = f"k{key.id}:" if owner else ""
            if rpm is not None:
                checks.append(_Check(
                    "count", _KEY_REQ if owner else _ORG_REQ, prefix + "n", minute, 1, rpm,
                    lambda _u, reset, rpm=rpm, who=who: rate_limited(
                        "requests", f"{rpm} requests per minute", who, reset, rpm),
                    ("requests", rpm, 1)))
            if tpm is not None:
                checks.append(_Check(
                    "sum", _KEY_TOK if owner else _ORG_TOK, prefix + "raw", minute, worst, tpm,
                    lambda _u, reset, tpm=tpm, who=who: rate_limited(
                        "tokens", f"{tpm} tokens per minute (this request may use {worst}: "
                        "prompt plus max_tokens)", who, reset, tpm),
                    ("tokens", tpm, 1)))

        needs = {"requests": mult, "tokens": worst * mult, "credits": amount}
        where = {"requests": (_W_REQ, "rm"), "tokens": (_W_TOK, "tm"),
                 "credits": (_W_CREDITS, "amount")}
        longest = MINUTE_S
        for raw in (plan.windows if plan is not None else []):
            window = Window.parse(raw)
            longest = max(longest, window.seconds)

            def used_up(_u: int, _reset: float, window: Window = window) -> SeraiError:
                return QuotaExceeded(
                    f"The plan {plan.name} allows {window.limit} {window.metric} per "  # type: ignore[union-attr]
                    f"{format_wait(window.seconds)}, and {org.name} has used them. It frees up as "
                    f"older requests leave the window.")
            set_index, field = where[window.metric]
            note = ((window.metric, window.limit, WINDOW_SCALE[window.metric])
                    if window.metric in ("requests", "tokens") else None)
            checks.append(_Check("sum", set_index, field, window.seconds * 1000,
                                 needs[window.metric], window.limit * WINDOW_SCALE[window.metric],
                                 used_up, note))

        if charged:
            def unfunded(used: int, _reset: float) -> SeraiError:
                available = org.balance_micros - used
                return QuotaExceeded(
                    f"The balance of {org.name} does not cover this request: it may cost up to "
                    f"{amount} micro-units (prompt plus max_tokens) and {max(available, 0)} are "
                    f"available. Top up, or ask for fewer max_tokens.")
            checks.append(_Check("held", 0, "amount", 0, amount, org.balance_micros, unfunded))

        admission = Admission(reservation_id, org.id, amount, pricing, charged, mult)
        return _Terms(org, plan, admission, worst, longest * 1000, checks)

    def _seed(self, org_id: int, horizon_ms: int) -> None:
        """Load an organization's settled usage and running reservations from the database."""
        with self._database.session() as session:
            # Reservations before usage rows: a settlement committing in between is then seen
            # twice (its hold goes when Redis settles it), never not at all.
            holds = list(session.scalars(select(Reservation).where(Reservation.org_id == org_id)))
            since = db_now_ms(session) - horizon_ms
            rows = list(session.scalars(select(UsageRow).where(UsageRow.org_id == org_id,
                                                               UsageRow.created_ms > since)))
        pipe = self._redis.pipeline(transaction=False)
        for row in rows:
            keys = self._keys(org_id, row.key_id or 0)
            for index, amount in _members(row):
                # NX: a member a settlement already added keeps its own time.
                pipe.zadd(keys[index - 1], {f"{row.request_id}|{amount}": row.created_ms}, nx=True)
            if len(pipe) >= _SEED_CHUNK:
                pipe.execute()
        pipe.execute()
        args: list[Any] = [horizon_ms]
        for hold in holds:
            fields = _hold_fields(key_id=hold.key_id, amount=hold.amount_micros,
                                  requests_milli=hold.requests_milli,
                                  tokens_milli=hold.tokens_milli,
                                  raw_tokens=hold.prompt_tokens + hold.max_tokens)
            args += [hold.id, _hold_record(fields, hold.request_id), f"{org_id}|{hold.id}",
                     hold.renewed_ms or hold.created_ms]
        self._seed_holds(keys=self._keys(org_id), args=args)
        log.info("loaded %d usage rows and %d reservations of organization %d into Redis",
                 len(rows), len(holds), org_id)

    # -- settle, release, sweep

    def settle(self, records: list[UsageRecord]) -> None:
        metered = [r for r in records if r.admission.reservation_id is not None]
        with self._database.session() as session:
            write_usage(session=session, records=records)
            # What the database holds, not what this process computed: a record settled by an
            # earlier try, or swept meanwhile, joins the windows as its row says.
            settled = _settled_from_rows(session, [(r.admission.org_id, r.admission.reservation_id,
                                                    r.request_id) for r in metered])
        self.owned.discard([r.admission.reservation_id for r in metered])
        self._pend(settled)

    def release(self, admission: Admission) -> None:
        if admission.reservation_id is None:
            return
        with self._database.session() as session:
            release(session=session, admission=admission)
        self.owned.discard([admission.reservation_id])
        assert admission.org_id is not None
        self._pend([_Settled(admission.org_id, admission.reservation_id)])

    def abandon(self, record: UsageRecord) -> None:
        self.owned.discard([record.admission.reservation_id])

    def renew(self) -> int:
        """Renew in the database (for its sweeper) and in Redis's index of holds by time (for
        this one): a hold that is renewed is never taken for a crashed process's."""
        held = self.owned.now()
        if not held:
            return 0
        with self._database.session() as session:
            renew_reservations(session=session, reservation_ids=list(held))
        try:
            seconds, micros = self._redis.time()
            now_ms = seconds * 1000 + micros // 1000
            # XX: a hold settled meanwhile is not put back in the index.
            self._redis.zadd(self._keys(0)[_INDEX - 1],
                             {f"{org}|{rid}": now_ms for rid, org in held.items()}, xx=True)
        except self._error as exc:
            self._report(exc, "renewing holds")
        return len(held)

    def sweep(self, older_than_s: float) -> int:
        with self._database.session() as session:
            swept = sweep_reservations(session=session, older_than_s=older_than_s)
        self._flush_pending(raise_errors=True)
        seconds, micros = self._redis.time()
        cutoff = seconds * 1000 + micros // 1000 - int(older_than_s * 1000)
        stale = []
        for member in self._redis.zrangebyscore(self._keys(0)[_INDEX - 1], "-inf", cutoff):
            org, _, reservation_id = member.decode().partition("|")
            record = self._redis.hget(self._keys(int(org))[_HOLDS - 1], reservation_id)
            request_id = record.decode().partition("\n")[2] if record else ""
            stale.append((int(org), reservation_id, request_id))
        if stale:
            with self._database.session() as session:
                found = _settled_from_rows(session, stale)
            settled = {s.reservation_id for s in found}
            self._pend(found + [_Settled(org, rid) for org, rid, _ in stale if rid not in settled],
                       raise_errors=True)
            log.warning("released %d Redis holds older than %ss", len(stale), older_than_s)
        return swept + len(stale)

    def close(self) -> None:
        try:
            self._flush_pending()
        finally:
            self._redis.close()

    def _pend(self, items: list[_Settled], *, raise_errors: bool = False) -> None:
        """Tell Redis about settled or released requests now, or as soon as it answers again:
        the database is already right, and until then the holds only keep limits stricter."""
        with self._pending_lock:
            self._pending.extend(items)
        self._flush_pending(raise_errors=raise_errors)

    def _flush_pending(self, *, raise_errors: bool = False) -> None:
        with self._pending_lock:
            if not self._pending:
                return
            items, self._pending = self._pending, []
            try:
                pipe = self._redis.pipeline(transaction=False)
                for item in items:
                    args: list[Any] = [item.reservation_id, f"{item.org_id}|{item.reservation_id}"]
                    if item.request_id is not None:
                        args += [item.request_id, item.raw_tokens, item.requests_milli,
                                 item.tokens_milli, item.cost_micros]
                    self._settle(keys=self._keys(item.org_id, item.key_id), args=args,
                                 client=pipe)
                pipe.execute()
            except self._error as exc:
                # Every step is idempotent, so the whole list is simply tried again later.
                self._pending = items + self._pending
                self._report(exc, f"settling {len(items)} requests")
                if raise_errors:
                    raise
                return
            self._recovered()

    def _recovered(self) -> None:
        if self._failing:
            log.warning("Redis answers again")
            self._failing = False

    def _report(self, exc: Exception, what: str) -> None:
        if not self._failing:
            log.error("Redis failed during %s (%s); model requests get 503 until it answers",
                      what, exc)
        self._failing = True


def _members(row: UsageRow) -> list[tuple[int, int]]:
    """(sorted set index, amount) of a settled usage row, as the settle script adds them."""
    raw = row.prompt_tokens + row.completion_tokens
    pairs = [(_ORG_REQ, 1), (_KEY_REQ, 1), (_ORG_TOK, raw), (_KEY_TOK, raw),
             (_W_REQ, row.requests_milli), (_W_TOK, row.tokens_milli),
             (_W_CREDITS, row.cost_micros)]
    return [(index, amount) for index, amount in pairs if amount > 0]


def _settled_from_rows(session: Session,
                       wanted: Sequence[tuple[int | None, str | None, str]]) -> list[_Settled]:
    """The usage rows of (organization, reservation, request) triples, as Redis settlements."""
    by_request = {request_id: (org_id, reservation_id)
                  for org_id, reservation_id, request_id in wanted if request_id}
    settled = []
    for start in range(0, len(by_request), 500):
        chunk = list(by_request)[start:start + 500]
        for row in session.scalars(select(UsageRow).where(UsageRow.request_id.in_(chunk))):
            org_id, reservation_id = by_request[row.request_id]
            if org_id is None or reservation_id is None or row.org_id != org_id:
                continue
            settled.append(_Settled(org_id, reservation_id, row.request_id, row.key_id or 0,
                                    row.prompt_tokens + row.completion_tokens,
                                    row.requests_milli, row.tokens_milli, row.cost_micros))
    return settled


def _headers(checks: list[_Check], uses: list[int], now_ms: int) -> dict[str, str]:
    """x-ratelimit-* of the tightest limit of each kind, as the database backend sends them."""
    tightest: dict[str, tuple[int, int, float]] = {}
    for n, check in enumerate(checks):
        if check.note is None or 2 * n + 1 >= len(uses):
            continue
        used, oldest = uses[2 * n], uses[2 * n + 1]
        kind, shown, scale = check.note
        remaining = (check.limit - used - check.need) // scale
        reset = reset_after(now_ms, WindowUse(used, oldest if oldest >= 0 else None),
                             check.span_ms // 1000)
        if kind not in tightest or remaining < tightest[kind][1]:
            tightest[kind] = (shown, remaining, reset)
    headers: dict[str, str] = {}
    for kind, (limit, remaining, reset) in tightest.items():
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(remaining, 0))
        headers[f"x-ratelimit-reset-{kind}"] = format_wait(reset)
    return headers


def create_limiter(database: Database, *, redis_url: str | None, redis_prefix: str) -> Limiter:
    """The database backend, or Redis when a URL is configured."""
    if redis_url:
        return RedisLimiter(database, redis_url, prefix=redis_prefix)
    return DatabaseLimiter(database)

