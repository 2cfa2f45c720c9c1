"""Admission shared through Redis by several Serai processes.

One Lua script evaluates a request's terms (terms.py: the same checks, in the same order, as the
database backend) and holds its reservation atomically, by Redis TIME; the money balance, the
durable reservations and the usage rows stay in the database, where settlement.py settles them
before Redis is told. Redis that cannot be reached refuses requests with 503
`limits_unavailable`; it never lets one in unlimited.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from serai.billing.base import UNMETERED, Admission, UsageRecord
from serai.billing.settlement import (
    Owned,
    hold,
    release,
    renew_reservations,
    sweep_reservations,
    write_usage,
)
from serai.billing.terms import MINUTE_S, Check, derive_terms
from serai.billing.windows import WindowUse
from serai.errors import LimitsUnavailable
from serai.governance.accounts import KeyInfo
from serai.storage.db import Database, db_now_ms
from serai.storage.tables import Organization, Reservation, UsageRow

log = logging.getLogger("serai.limits")


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

# Where the reserve script finds each metric a check counts: the sorted set of settled usage of
# the organization and of the key (0: none is kept per key), and the field of the held sums.
_COUNTED: dict[str, tuple[int, int, str]] = {
    "count": (_ORG_REQ, _KEY_REQ, "n"), "raw_tokens": (_ORG_TOK, _KEY_TOK, "raw"),
    "requests_milli": (_W_REQ, 0, "rm"), "tokens_milli": (_W_TOK, 0, "tm"),
    "cost_micros": (_W_CREDITS, 0, "amount")}

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
                seq = _text(self._redis.hget(keys[_META - 1], "seq") or b"0")
                with self._database.session() as session:
                    terms = derive_terms(session, org=session.get(Organization, org_id), key=key,
                                         model=model, prompt_tokens=prompt_tokens,
                                         max_tokens=max_tokens)
                horizon_ms = max([MINUTE_S, *(c.span_s for c in terms.checks)]) * 1000
                fields = _hold_fields(key_id=key.id, amount=terms.amount_micros,
                                      requests_milli=terms.multiplier_milli,
                                      tokens_milli=terms.tokens_milli,
                                      raw_tokens=terms.worst_tokens)
                args: list[Any] = [reservation_id, _hold_record(fields, request_id),
                                   f"{org_id}|{reservation_id}", horizon_ms,
                                   seq if terms.charged else "", len(terms.checks)]
                for check in terms.checks:
                    args += _script_args(check, key.id)
                for name, amount in fields:
                    args += [name, amount]
                reply = self._reserve(keys=keys, args=args)
                status = reply[0].decode()
                if status == "seed":
                    self._seed(org_id, horizon_ms)
                elif status == "refuse":
                    now_ms, index, used, oldest = (int(x) for x in reply[1:5])
                    raise terms.checks[index - 1].refuse(_use(used, oldest), now_ms)
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
                hold(session, terms=terms, reservation_id=reservation_id, request_id=request_id,
                     endpoint=endpoint, created_ms=db_now_ms(session))
        except BaseException:
            self._pend([_Settled(org_id, reservation_id)])
            raise
        headers: dict[str, str] = {}
        if status == "ok":  # "held": the script ran before (a retry) and reported nothing
            uses = [_use(int(used), int(oldest)) for used, oldest in zip(reply[2::2], reply[3::2],
                                                                        strict=True)]
            headers = terms.headers(uses, int(reply[1]))
        admitted = terms.admission(reservation_id, headers)
        self.owned.add(admitted)
        return admitted

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
        for held in holds:
            fields = _hold_fields(key_id=held.key_id, amount=held.amount_micros,
                                  requests_milli=held.requests_milli,
                                  tokens_milli=held.tokens_milli,
                                  raw_tokens=held.prompt_tokens + held.max_tokens)
            args += [held.id, _hold_record(fields, held.request_id), f"{org_id}|{held.id}",
                     held.renewed_ms or held.created_ms]
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
            org, _, reservation_id = _text(member).partition("|")
            record = self._redis.hget(self._keys(int(org))[_HOLDS - 1], reservation_id)
            request_id = _text(record).partition("\n")[2] if record else ""
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


def _script_args(check: Check, key_id: int) -> list[str | int]:
    """A check as the reserve script takes it: mode, sorted set, held field, span, need, limit."""
    org_set, key_set, field = _COUNTED[check.metric]
    if check.key:
        field = f"k{key_id}:{field}"
    if not check.span_s:
        return ["held", 0, field, 0, check.need, check.limit]
    mode = "count" if check.metric == "count" else "sum"
    return [mode, key_set if check.key else org_set, field, check.span_s * 1000, check.need,
            check.limit]


def _use(used: int, oldest_ms: int) -> WindowUse:
    """A check's use as the reserve script reports it (-1: no settled request in the span)."""
    return WindowUse(used, oldest_ms if oldest_ms >= 0 else None)


def _text(reply: object) -> str:
    """A Redis reply as text: the client hands back bytes (it is not asked to decode)."""
    return reply.decode() if isinstance(reply, bytes) else str(reply)
