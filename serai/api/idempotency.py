"""Idempotency-Key on model calls: the same key and payload within 24 hours gets the first call's
response again, without running the engine or billing a second time.

The key lives in the API layer; the gateway never sees it, it runs what serving starts. A call
with the header goes through four steps, each in one place below:
- `IdempotentResponses` (ASGI middleware) reads the body and makes the call's `IdempotentCall`;
- `IdempotencyDep` checks the header and hands the call to the route;
- serving (serai.api.serving) claims the key once the request is authenticated and parsed and
  before it is admitted: `IdempotentCall.claim` returns None (run it) or a finished twin's
  response, sent again as a `ReplayedResponse`; a twin still running gets 409, another payload
  under the key 422;
- the middleware hands the call the response as it is sent (`finish`), and frees a claim that
  kept nothing (`close`).

The unique (key_id, idempotency_key) row is the lock, so twins in other processes cannot both
run; the sweeper forgets records past their 24 hours (`forget_expired`). Following Stripe, only
a call that started executing keeps a result: one refused before its engine produced anything
(admission, a full queue, a prompt too long) deletes its claim, and so does one whose client
left before the response was complete, so the client may retry with the same key. The response
is stored as the exact bytes sent (an SSE stream included), so a replay is byte-identical
whatever the wire protocol.

The response holds the completion's text, so it is never written in clear: under a `store`
retention policy (serai/governance/retention.py) it is sealed with the server's content keys
(serai/governance/crypto.py) in the database; under zero retention, or on a server without content keys,
it is kept only in the memory of the process that served it (`ResponsesInMemory`, bounded in
entries and bytes), and its database record says only that the call is done. A twin reaching
another process, or this one after a restart, cannot be replayed and gets 409
`idempotency_response_not_retained` rather than a second run billed twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Annotated

import orjson
from fastapi import Depends, Header, Request
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serai.errors import (
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    IdempotencyResponseNotRetained,
    InvalidRequest,
)
from serai.gateway import Run
from serai.governance.crypto import ContentKeyError, ContentKeys, Sealed
from serai.storage.db import Database, db_now_ms, rowcount
from serai.storage.tables import IdempotencyRecord
from serai.threads import finish_or_undo

log = logging.getLogger("serai.idempotency")

RETENTION_S = 24 * 3600
MAX_KEY_LENGTH = 255
HEADER = "Idempotency-Key"
# Rate-limit headers describe the moment of the first call; a replay counts against nothing.
_NOT_REPLAYED = ("x-ratelimit-", "x-request-id")


@dataclass(frozen=True, slots=True)
class Stored:
    """A finished call's response, as it was sent."""

    request_id: str
    status_code: int
    headers: dict[str, str]
    body: bytes | None  # None: kept only in the memory of the process that served it
    sealed_with: str | None = None  # the content key `body` is sealed with, if it is


class ResponsesInMemory:
    """Responses of zero-retention calls, for 24 hours at most, in this process only: they never
    reach the database, a file or Redis. Bounded in entries and in bytes: past `max_entries` or
    `max_bytes` the oldest are dropped (their twins get 409 instead of a replay), and a response
    larger than a tenth of `max_bytes` is not kept at all, so a few huge answers cannot push
    everyone else's out or fill the process's memory."""

    def __init__(self, *, max_entries: int = 10_000, max_bytes: int = 64 * 2**20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._kept: dict[tuple[int, str], tuple[float, Stored]] = {}

    @staticmethod
    def _size(stored: Stored) -> int:
        return len(stored.body or b"") + sum(len(k) + len(v) for k, v in stored.headers.items())

    def keep(self, key_id: int, idempotency_key: str, stored: Stored) -> None:
        now = time.monotonic()
        size = self._size(stored)
        self._drop((key_id, idempotency_key))  # re-inserted last: the newest
        if size > self.max_bytes // 10:
            return
        while self._kept:
            oldest = next(iter(self._kept))
            if (len(self._kept) < self.max_entries and self.bytes + size <= self.max_bytes
                    and self._kept[oldest][0] > now):
                break
            self._drop(oldest)
        self._kept[(key_id, idempotency_key)] = (now + RETENTION_S, stored)
        self.bytes += size

    def _drop(self, entry: tuple[int, str]) -> None:
        found = self._kept.pop(entry, None)
        if found is not None:
            self.bytes -= self._size(found[1])

    def find(self, key_id: int, idempotency_key: str, request_id: str) -> Stored | None:
        """The response `request_id` sent, if this process served it and still has it."""
        expires, stored = self._kept.get((key_id, idempotency_key), (0.0, None))
        if stored is None or stored.request_id != request_id or expires <= time.monotonic():
            return None
        return stored


class ReplayedResponse(Response):
    """A finished twin's response sent again as it was, marked `idempotent-replayed: true` with
    the `original-request-id` of the call that ran."""

    def __init__(self, stored: Stored) -> None:
        super().__init__(stored.body or b"", status_code=stored.status_code)
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1"))
                            for k, v in stored.headers.items()]
        self.raw_headers += [(b"idempotent-replayed", b"true"),
                             (b"original-request-id", stored.request_id.encode())]


def check_key(value: str) -> str:
    if not 1 <= len(value) <= MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in value):
        raise InvalidRequest(
            f"The {HEADER} header must be 1 to {MAX_KEY_LENGTH} printable ASCII characters "
            f"(got {len(value)} characters); a UUID is a good choice.", param=HEADER)
    return value


def request_hash(method: str, path: str, body: bytes) -> str:
    """SHA-256 of what the call asks for: key order and whitespace of a JSON body don't count."""
    try:
        canonical = orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        canonical = body
    return hashlib.sha256(f"{method} {path}\n".encode() + canonical).hexdigest()


def _insert_if_absent(session: Session, values: dict[str, object]) -> bool:
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = dialect.insert(IdempotencyRecord).values(**values).on_conflict_do_nothing(
        index_elements=["key_id", "idempotency_key"]).returning(IdempotencyRecord.id)
    # RETURNING rather than rowcount: psycopg reports -1 for an insert that returns rows.
    return session.execute(statement).scalar_one_or_none() is not None


def claim(*, session: Session, key_id: int, idempotency_key: str, request_hash: str,
          request_id: str, abandoned_after_s: float) -> Stored | None:
    """Claim the key for `request_id`: None when the call may run, or the stored response of
    the finished twin to replay. Raises IdempotencyKeyReused for another payload and
    IdempotencyKeyInUse while the twin is still running.

    A record past its 24 hours, or in flight for longer than `abandoned_after_s` (its process
    died), is taken over as if absent.
    """
    now = db_now_ms(session)
    claimed = {"request_hash": request_hash, "request_id": request_id, "state": "in_flight",
               "status_code": None, "headers": None, "body": None, "created_ms": now}
    mine = (IdempotencyRecord.key_id == key_id,
            IdempotencyRecord.idempotency_key == idempotency_key)
    while True:
        if _insert_if_absent(session, {"key_id": key_id, "idempotency_key": idempotency_key,
                                       **claimed}):
            return None
        record = session.scalars(select(IdempotencyRecord).where(*mine).execution_options(
            populate_existing=True)).one_or_none()
        if record is None:  # released or swept since the insert looked
            continue
        kept_s = RETENTION_S if record.state == "done" else abandoned_after_s
        if record.created_ms <= now - int(kept_s * 1000):
            # Compare-and-set on what was read, so two requests cannot both take it over.
            taken = session.execute(update(IdempotencyRecord).where(
                IdempotencyRecord.id == record.id, IdempotencyRecord.state == record.state,
                IdempotencyRecord.request_id == record.request_id).values(**claimed))
            if rowcount(taken) == 1:
                if record.state == "in_flight":
                    log.warning("%s takes over the %s of %s, which never finished",
                                request_id, HEADER, record.request_id)
                return None
            continue
        if record.request_hash != request_hash:
            raise IdempotencyKeyReused(
                f"This {HEADER} was used by an earlier request ({record.request_id}) with a "
                "different body or endpoint. Use a new key for a new request.", param=HEADER)
        if record.state != "done":
            raise IdempotencyKeyInUse(
                f"A request with this {HEADER} ({record.request_id}) is still running. Retry "
                "when it finishes to receive its response.", param=HEADER,
                headers={"retry-after": "1"})
        assert record.status_code is not None
        return Stored(record.request_id, record.status_code, dict(record.headers or {}),
                      record.body, record.cipher_key)


def finish(*, session: Session, key_id: int, idempotency_key: str, request_id: str,
           status_code: int, headers: dict[str, str] | None, body: bytes | None,
           cipher_key: str | None = None) -> bool:
    """Store the response of the call holding the claim (None: the call is done, its response
    kept elsewhere); False if it lost the claim."""
    done = session.execute(update(IdempotencyRecord).where(
        IdempotencyRecord.key_id == key_id, IdempotencyRecord.idempotency_key == idempotency_key,
        IdempotencyRecord.request_id == request_id, IdempotencyRecord.state == "in_flight",
    ).values(state="done", status_code=status_code, headers=headers, body=body,
             cipher_key=cipher_key))
    return rowcount(done) == 1


def release(*, session: Session, key_id: int, idempotency_key: str, request_id: str) -> None:
    """Free the key of a call that kept no result, so the client may retry with it."""
    session.execute(delete(IdempotencyRecord).where(
        IdempotencyRecord.key_id == key_id, IdempotencyRecord.idempotency_key == idempotency_key,
        IdempotencyRecord.request_id == request_id, IdempotencyRecord.state == "in_flight"))


def forget_expired(*, session: Session, abandoned_after_s: float) -> int:
    """Delete records past their 24 hours, and claims a crashed process left in flight."""
    now = db_now_ms(session)
    gone = session.execute(delete(IdempotencyRecord).where(or_(
        IdempotencyRecord.created_ms <= now - RETENTION_S * 1000,
        and_(IdempotencyRecord.state == "in_flight",
             IdempotencyRecord.created_ms <= now - int(abandoned_after_s * 1000)))))
    return rowcount(gone)


@dataclass(frozen=True, slots=True)
class _Claim:
    database: Database
    key_id: int
    request_id: str


class IdempotentCall:
    """One request's use of an Idempotency-Key, from its claim to its stored response.

    `IdempotentResponses` makes it from the raw request; serving claims it (`claim`, then `ran`
    or `release`) and sends a finished twin's response instead of running when the claim
    returns one; `IdempotentResponses` hands it the response as it goes out (`finish`), and
    `close`s it when the request is over.
    """

    def __init__(self, *, idempotency_key: str, request_hash: str,
                 abandoned_after_s: float, memory: ResponsesInMemory,
                 keys: ContentKeys | None = None) -> None:
        self.idempotency_key = idempotency_key
        self._keys = keys
        self.request_hash = request_hash
        self._abandoned_after_s = abandoned_after_s
        self._memory = memory  # the process's: a twin request must find the same one
        self._claim: _Claim | None = None
        self._run: Run | None = None
        self._in_memory = False

    async def claim(self, *, database: Database, key_id: int, request_id: str,
                    in_memory: bool = False) -> Stored | None:
        """Hold the key for this call and return None (run it), or return the response of the
        finished twin with this payload (send it again instead of running). Raises
        IdempotencyKeyInUse while the twin runs, IdempotencyKeyReused for another payload and
        IdempotencyResponseNotRetained for a twin whose response is gone. With `in_memory`
        (zero retention) the response will be kept in this process only; without, sealed in
        the database (in memory too when the server has no content keys)."""
        key = check_key(self.idempotency_key)

        def claim_key() -> Stored | None:
            with database.session() as session:
                return claim(session=session, key_id=key_id, idempotency_key=key,
                             request_hash=self.request_hash, request_id=request_id,
                             abandoned_after_s=self._abandoned_after_s)

        async def unclaim(stored: Stored | None) -> None:  # the client left meanwhile
            if stored is None:
                self._claim = _Claim(database, key_id, request_id)
                await self.release()

        stored = await finish_or_undo(claim_key, unclaim)
        if stored is not None and stored.sealed_with is not None:
            stored = self._unseal(stored, key_id)
        if stored is not None and stored.body is None:
            stored = self._memory.find(key_id, key, stored.request_id)
            if stored is None:
                raise IdempotencyResponseNotRetained(
                    f"The request with this {HEADER} finished, but under zero retention its "
                    "response was kept only in the memory of the server process that answered "
                    "it, which no longer has it. Use a new key to run the request again.",
                    param=HEADER)
        if stored is not None:
            log.info("replaying the response of %s", stored.request_id)
            return stored
        self._claim = _Claim(database, key_id, request_id)
        self._in_memory = in_memory
        return None

    def _context(self, key_id: int, request_id: str) -> bytes:
        return f"idempotent response {key_id} {self.idempotency_key} {request_id}".encode()

    def _unseal(self, stored: Stored, key_id: int) -> Stored:
        assert stored.body is not None and stored.sealed_with is not None
        try:
            if self._keys is None:
                raise ContentKeyError("no content keys")
            body = self._keys.open(Sealed(stored.sealed_with, stored.body),
                                   context=self._context(key_id, stored.request_id))
        except ContentKeyError:
            raise IdempotencyResponseNotRetained(
                f"The request with this {HEADER} finished, but its response was encrypted with "
                "a key this server no longer has. Use a new key to run the request again.",
                param=HEADER) from None
        return Stored(stored.request_id, stored.status_code, stored.headers, body)

    def ran(self, run: Run) -> None:
        """The call started executing: what it answers is kept."""
        self._run = run

    @property
    def answered(self) -> bool:
        """The call's run has ended with its answer (or an engine failure) to keep."""
        return self._claim is not None and self._run is not None and self._run.status != "cancelled"

    async def release(self) -> None:
        claimed, self._claim = self._claim, None
        if claimed is None:
            return

        def free() -> None:
            with claimed.database.session() as session:
                release(session=session, key_id=claimed.key_id,
                        idempotency_key=self.idempotency_key, request_id=claimed.request_id)

        try:
            await asyncio.shield(asyncio.to_thread(free))
        except Exception:
            # The record stays in flight until it counts as abandoned; the key is not lost.
            log.exception("could not release the %s of %s", HEADER, claimed.request_id)

    async def finish(self, *, status_code: int, headers: dict[str, str], body: bytes) -> None:
        """Keep the whole response of a call that ran, before its last byte goes out: a client
        that retries as soon as it has the answer must find it kept, not in flight. A call whose
        client already left (cancelled) keeps nothing."""
        claimed = self._claim
        if claimed is None or self._run is None or self._run.status == "cancelled":
            return
        self._claim = None
        kept = {k: v for k, v in headers.items() if not k.startswith(_NOT_REPLAYED)}
        keys = None if self._in_memory else self._keys  # None: kept in memory only
        in_memory = keys is None
        sealed = None
        if keys is None:  # before the record says done, so a twin that sees it finds the response
            self._memory.keep(claimed.key_id, self.idempotency_key,
                              Stored(claimed.request_id, status_code, kept, body))
        else:
            sealed = keys.seal(body, context=self._context(claimed.key_id, claimed.request_id))

        def store() -> bool:
            with claimed.database.session() as session:
                return finish(session=session, key_id=claimed.key_id,
                              idempotency_key=self.idempotency_key,
                              request_id=claimed.request_id, status_code=status_code,
                              headers=None if in_memory else kept,
                              body=None if sealed is None else sealed.data,
                              cipher_key=None if sealed is None else sealed.key_id)

        try:
            if not await asyncio.shield(asyncio.to_thread(store)):
                log.warning("the %s of %s was taken over before it finished; its response is "
                            "not kept", HEADER, claimed.request_id)
        except Exception:
            log.exception("could not store the response of %s for its %s", claimed.request_id,
                          HEADER)

    async def close(self) -> None:
        """The request is over: a claim still held kept no response (refused before it ran,
        or its client left before the end), so the key is freed for a retry."""
        await self.release()


class IdempotentResponses:
    """Gives a model call with an `Idempotency-Key` its IdempotentCall, and hands the call what
    the response sends, to keep for its twins.

    Which calls run, replay or conflict is decided in serving; this layer only sees bytes, so it
    serves every wire protocol and streaming and plain answers alike.
    """

    def __init__(self, app: ASGIApp, *, abandoned_after_s: float,
                 content_keys: ContentKeys | None = None) -> None:
        self.app = app
        self.abandoned_after_s = abandoned_after_s
        self.content_keys = content_keys  # seal kept responses; None: memory only
        # Zero-retention responses, for twins this process serves.
        self.memory = ResponsesInMemory()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_key = (dict(scope["headers"]).get(b"idempotency-key")
                   if scope["type"] == "http" and scope["method"] == "POST" else None)
        if raw_key is None:
            await self.app(scope, receive, send)
            return
        body, receive = await _buffer_body(receive)
        if body is None:
            return  # the client left before its request arrived
        call = IdempotentCall(idempotency_key=raw_key.decode("latin-1"),
                              request_hash=request_hash(scope["method"], scope["path"], body),
                              abandoned_after_s=self.abandoned_after_s, memory=self.memory,
                              keys=self.content_keys)
        scope.setdefault("state", {})["idempotency"] = call
        status = 0
        headers: dict[str, str] = {}
        chunks: list[bytes] = []
        # Once the call has its answer, the rest of the response (the last events of a stream)
        # comes at once; it is held back until the response is stored, so a client that has
        # the whole answer and retries straight away always finds it kept, never in flight.
        held: list[Message] = []

        async def keep(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers.update((k.decode("latin-1").lower(), v.decode("latin-1"))
                               for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await call.finish(status_code=status, headers=headers,
                                      body=b"".join(chunks))
                elif call.answered:
                    held.append(message)
                    return
            while held:
                await send(held.pop(0))
            await send(message)

        try:
            await self.app(scope, receive, keep)
        finally:
            await call.close()


async def _buffer_body(receive: Receive) -> tuple[bytes | None, Receive]:
    """Read the whole body, and a `receive` that hands it on once, then listens to the server
    (so the disconnect watch still works)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, receive
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    handed_on = False

    async def replay() -> Message:
        nonlocal handed_on
        if not handed_on:
            handed_on = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def idempotent_call(
    request: Request,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key",
        description="Any unique string (a UUID): the same key and body within 24 hours returns "
        "the first call's response again, without running or billing it twice.")] = None,
) -> IdempotentCall | None:
    if idempotency_key is None:
        return None
    check_key(idempotency_key)
    call: IdempotentCall = request.state.idempotency  # made by IdempotentResponses
    return call


IdempotencyDep = Annotated[IdempotentCall | None, Depends(idempotent_call)]
