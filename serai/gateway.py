"""What every model request goes through between the wire protocol and the engine.

The gateway routes a neutral request to a deployment of its model, runs it, and meters it:
whatever way a request ends (finished, client gone, engine failure), exactly one usage row is
recorded for it. A deployment that fails before its first chunk is replaced by another (under the
same admission, without a row of its own); once a chunk came, the request stays where it is. It
never knows which wire protocol the request came in on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from serai.billing.base import UNMETERED, Admission, Limiter, UsageRecord, UsageStatus
from serai.billing.database_limits import DatabaseLimiter
from serai.billing.ledger import LedgerWriter
from serai.billing.settlement import charge
from serai.engines.base import Engine, Measure
from serai.engines.router import Router, Ticket
from serai.errors import (
    EngineOverloaded,
    EngineUnavailable,
    RateLimited,
    RegionUnavailable,
    SeraiError,
)
from serai.governance import audit
from serai.governance.accounts import KeyInfo
from serai.observability.tracing import NO_SPAN, OFF, Span, Tracing, error_code
from serai.storage.db import Database
from serai.threads import finish_or_undo
from serai.types import Chunk, GenerationRequest, Usage

log = logging.getLogger("serai.gateway")

# How long a finished answer waits for its usage row to be committed before it is sent anyway.
COMMIT_WAIT_S = 5.0


class Run:
    """One request's generation on an engine, metered into the ledger exactly once."""

    def __init__(
        self, *, engine: Engine, request: GenerationRequest, key: KeyInfo, endpoint: str,
        ledger: LedgerWriter, admission: Admission = UNMETERED,
        limiter: Limiter | None = None, ticket: Ticket | None = None,
        span: Span = NO_SPAN, tracing: Tracing = OFF,
    ) -> None:
        self.request = request
        self.span = span  # "engine": ends with the run, however it ends
        self._tracing = tracing
        self._error: str | None = None
        self.ticket = ticket
        self.admission = admission
        self._limiter = limiter
        self.engine = engine
        self._key = key
        self._endpoint = endpoint
        self._ledger = ledger
        self._chunks = engine.generate(request)
        self._started = time.perf_counter()
        self._first_token_at: float | None = None
        self._pending: Chunk | None = None
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.failed = False
        self._closed = False
        self._committed: asyncio.Future[None] | None = None

    async def open(self, *, may_fail_over: bool = False) -> None:
        """Wait for the first chunk, so errors the engine raises up front (a prompt too long
        for the context) reach the client as a 4xx instead of a broken stream.

        With `may_fail_over`, a deployment that is unavailable or full leaves neither a row nor
        a released admission: the caller runs the request elsewhere under the same admission.
        """
        try:
            self._pending = await self._next()
        except SeraiError as error:
            if self.ticket is not None and isinstance(error, EngineUnavailable):
                self.ticket.failed()
            if may_fail_over and isinstance(error, EngineUnavailable | EngineOverloaded):
                await self._abandon()
                raise
            if not error.refusal:
                await self.close()
                raise
            # Refused before generating: never a billable run, so it leaves no usage row.
            self._closed = True
            self._end_span()
            if self.ticket is not None:
                self.ticket.done()
            if self._limiter is not None:
                await _give_back(self._limiter, self.admission)
            raise
        except BaseException:
            await self.close()
            raise
        if self.ticket is not None:
            self.ticket.succeeded()

    async def _abandon(self) -> None:
        """Drop an attempt that produced nothing, leaving the admission to the next one."""
        self._closed = True
        self.span.set(failed_over=True)
        self._end_span()
        await self._stop_engine()

    async def _stop_engine(self) -> None:
        """Close the engine's stream and free the deployment's slot, whatever the stream does."""
        try:
            # Shielded: a cancelled request must still stop its engine.
            await asyncio.shield(self._chunks.aclose())
        except Exception:
            log.exception("engine stream of %s failed to close", self.request.request_id)
        finally:
            if self.ticket is not None:
                self.ticket.done()

    async def _next(self) -> Chunk:
        try:
            chunk = await anext(self._chunks)
        except Exception as error:
            self.failed = True
            self._error = error_code(error)
            raise
        self.usage = chunk.usage
        if (chunk.text or chunk.tool_calls) and self._first_token_at is None:
            self._first_token_at = time.perf_counter()
            self.span.event("first_token")
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        return chunk

    @property
    def first_token_at(self) -> float | None:
        """When (time.perf_counter()) the first token arrived; None before it."""
        return self._first_token_at

    @property
    def status(self) -> UsageStatus:
        """How the run ended, as its usage row says; `cancelled` while it has not."""
        if self.failed:
            return "error"
        return "ok" if self.finish_reason is not None else "cancelled"

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        chunk, self._pending = self._pending, None
        while True:
            if chunk is None:
                chunk = await self._next()
            if chunk.finish_reason is not None:
                # The answer is complete: its usage row is committed before the client gets
                # the end of it, so a crash cannot leave a delivered answer unbilled.
                await self.settle()
                yield chunk
                return
            yield chunk
            chunk = None

    async def settle(self) -> None:
        """Close the run and wait (a bounded while) until its usage row is committed."""
        await self.close()
        if self._committed is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._committed), COMMIT_WAIT_S)
        except TimeoutError:
            # The database is not answering: the row stays queued (the writer retries until it
            # is written) and the client is not held hostage to the outage.
            log.warning("usage of %s not committed after %ss; answering anyway",
                        self.request.request_id, COMMIT_WAIT_S)

    async def close(self) -> None:
        """Stop the engine if it is still generating and record the usage row (idempotent)."""
        if self._closed:
            return
        self._closed = True
        status = self.status
        try:
            await self._stop_engine()  # before the row is written
        finally:
            self._end_span()
            deployment = None if self.ticket is None else self.ticket.deployment
            now = time.perf_counter()
            record = UsageRecord(
                request_id=self.request.request_id,
                key_id=self._key.id,
                model=self.request.model,
                endpoint=self._endpoint,
                prompt_tokens=self.usage.prompt_tokens,
                completion_tokens=self.usage.completion_tokens,
                cached_tokens=self.usage.cached_tokens,
                admission=self.admission,
                status=status,
                ttft_ms=self.ttft_ms,
                latency_ms=(now - self._started) * 1000,
                region=None if deployment is None else deployment.region,
                deployment=None if deployment is None else deployment.id,
            )
            settling = self._tracing.span("settlement")
            self._committed = self._ledger.record(record)
            if settling.recording:
                # Ends when the row is committed, which a finished answer waits for and a
                # stopped one does not.
                settling.set(status=status, cost_micros=charge(record),
                             charged=self.admission.charged)
                self._committed.add_done_callback(lambda _: settling.end())

    @property
    def ttft_ms(self) -> float | None:
        if self._first_token_at is None:
            return None
        return (self._first_token_at - self._started) * 1000

    def _end_span(self) -> None:
        """End the engine span with what the run produced (counts and codes, never text)."""
        span = self.span
        if not span.recording:
            return
        span.set(input_tokens=self.usage.prompt_tokens,
                 output_tokens=self.usage.completion_tokens,
                 cached_tokens=self.usage.cached_tokens, finish_reason=self.finish_reason,
                 ttft_ms=self.ttft_ms)
        if self._error is not None:
            span.fail(self._error)
        elif self.finish_reason is None:
            span.set(client_disconnected=True)  # stopped before its end: the client left
        span.end()


async def _give_back(limiter: Limiter, admission: Admission) -> None:
    """Release the reservation of a request that never ran."""
    if admission.reservation_id is None:
        return
    await asyncio.to_thread(limiter.release, admission)


@dataclass(frozen=True, slots=True)
class Admissible:
    """A request that passed the checks needing no engine, under its model's canonical name:
    what Gateway.start runs. Made only by Gateway.admissible, so a run cannot skip them and the
    API layer, which must claim an Idempotency-Key between them and admission, runs them once."""

    key: KeyInfo
    request: GenerationRequest


class CountRate:
    """Token counts (`/v1/messages/count_tokens`) a key may ask for per minute, in this process.
    A count bills nothing, so without a rate of its own it would be free tokenizing for anyone
    with a key. The key's own rpm applies when it is lower. Memory is bounded: past
    `max_keys` keys in one minute, the table is cleared (a new minute clears it too)."""

    def __init__(self, per_minute: int, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.time) -> None:
        self.per_minute = per_minute
        self._max_keys = max_keys
        self._clock = clock
        self._minute = 0
        self._counts: dict[int, int] = {}

    def check(self, key: KeyInfo) -> None:
        now = self._clock()
        minute = int(now // 60)
        if minute != self._minute or len(self._counts) >= self._max_keys:
            self._minute, self._counts = minute, {}
        limit = min(self.per_minute, key.rpm) if key.rpm is not None else self.per_minute
        used = self._counts.get(key.id, 0)
        if used >= limit:
            wait = max(1, math.ceil((minute + 1) * 60 - now))
            raise RateLimited(f"Rate limit reached: this key may count tokens {limit} times per "
                              f"minute. Retry in {wait}s.", headers={"retry-after": str(wait)})
        self._counts[key.id] = used + 1


class RefusedKeys:
    """Keys a requests-per-minute window refused, until that window frees a request: their next
    requests are refused at once, before any tokenizing or grammar work. A key flooding past its
    rpm then costs the server a dictionary lookup per request instead of a tokenized prompt and
    an admission transaction. Only request-count refusals are remembered: whether a token
    window admits a request depends on its size. Bounded: past `max_keys`, the table is
    cleared (the next refusal of each key fills it again)."""

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._until: dict[int, tuple[float, RateLimited]] = {}
        self._max_keys = max_keys
        self._clock = clock

    def note(self, key: KeyInfo, error: RateLimited) -> None:
        if error.window_reset_s is None or error.error_type != "requests":
            return
        if len(self._until) >= self._max_keys:
            self._until.clear()
        self._until[key.id] = (self._clock() + error.window_reset_s, error)

    def check(self, key: KeyInfo) -> None:
        found = self._until.get(key.id)
        if found is None:
            return
        until, error = found
        left = until - self._clock()
        if left <= 0:
            del self._until[key.id]
            return
        again = RateLimited(error.message, headers={**error.headers,
                                                     "retry-after": str(max(1, math.ceil(left)))})
        again.error_type, again.window_reset_s = error.error_type, left
        raise again


class Gateway:
    def __init__(self, *, router: Router, ledger: LedgerWriter, database: Database,
                 limiter: Limiter | None = None, failover_attempts: int = 3,
                 tracing: Tracing = OFF, max_stream_s: float | None = None,
                 counts_per_minute: int = 600) -> None:
        self.router = router
        self.count_rate = CountRate(counts_per_minute)
        self.refused = RefusedKeys()
        self.max_stream_s = max_stream_s  # how long a stream may be sent for (None: no bound)
        self.tracing = tracing
        self.failover_attempts = failover_attempts
        self.ledger = ledger
        self.database = database
        self.limiter = limiter if limiter is not None else DatabaseLimiter(database)

    async def start(self, admissible: Admissible, *, endpoint: str) -> Run:
        """Start a run of a request that passed `admissible` (see `_start`)."""
        key, request = admissible.key, admissible.request
        self.tracing.annotate(model=request.model, org_id=key.org_id)
        return await self._start(key=key, request=request, endpoint=endpoint)

    def admissible(self, key: KeyInfo, request: GenerationRequest) -> Admissible:
        """`request` under its model's canonical name, once the checks that need no engine
        passed: the model is served, and this key may use it by whatever name it was asked
        for. They come before any tokenising or grammar compiling, which cost the server
        work a refused request must not get."""
        model = self.router.canonical(request.model)
        self.router.deployments(model)  # UnknownModel (404) before anything else
        key.check_may_use(model, canonical=self.router.canonical)
        self.refused.check(key)
        if model != request.model:
            request = dataclasses.replace(request, model=model)
        return Admissible(key, request)

    async def measure(self, request: GenerationRequest, *, key: KeyInfo) -> Measure:
        """The size of `request` on a deployment of its model in the key's regions, without
        running it: nothing is admitted, generated or recorded (token counting endpoints). The
        deployment is held meanwhile, so a reload cannot close its engine mid-count."""
        request = self.admissible(key, request).request
        self.count_rate.check(key)
        ticket = self.router.pick(request.model, regions=key.allowed_regions)
        try:
            return await ticket.deployment.engine.measure(request)
        finally:
            ticket.done()

    async def _start(self, *, key: KeyInfo, request: GenerationRequest, endpoint: str) -> Run:
        """Route, admit and start a run; returns once an engine produced its first chunk.

        Admission errors (RateLimited, QuotaExceeded, PermissionDenied), a prompt that does not
        fit and a model with no deployment the key's regions allow reach the caller before
        anything is held or generated. Reserved once, the request is tried on up to
        `failover_attempts` deployments while they fail before their first chunk.
        """
        regions = key.allowed_regions
        with self.tracing.span("routing", attempt=1) as routing:
            try:
                ticket = self.router.pick(request.model, regions=regions)
            except RegionUnavailable:
                await asyncio.to_thread(
                    audit.record_alone, self.database, action="residency.refused",
                    actor=key.shown, target=f"model:{request.model}", org_id=key.org_id,
                    details={"model": request.model, "regions": list(regions or ())})
                raise
            routing.set(deployment=ticket.deployment.id, region=ticket.deployment.region)
        with self.tracing.span("admission") as admitting:  # ends failed if this raises
            try:
                size = await ticket.deployment.engine.measure(request)

                def reserve() -> Admission:
                    return self.limiter.reserve(key=key, request_id=request.request_id,
                                                model=request.model, endpoint=endpoint,
                                                prompt_tokens=size.prompt_tokens,
                                                max_tokens=size.max_tokens)

                async def give_back(admission: Admission) -> None:  # the client left meanwhile
                    await _give_back(self.limiter, admission)

                admission = await finish_or_undo(reserve, give_back)
            except BaseException as error:
                ticket.done()
                if isinstance(error, RateLimited):
                    self.refused.note(key, error)
                if isinstance(error, SeraiError):
                    admitting.set(outcome="refused", reason=error_code(error))
                else:  # the client left meanwhile (cancelled), or a bug
                    admitting.set(outcome="abandoned")
                raise
            admitting.set(outcome="admitted", reserved_micros=admission.amount_micros)
        tried = []
        while True:
            tried.append(ticket.deployment)
            may_fail_over = len(tried) < self.failover_attempts and self.router.has_alternative(
                request.model, regions=regions, exclude=tried)
            engine_span = self.tracing.span(
                "engine", deployment=ticket.deployment.id, region=ticket.deployment.region,
                attempt=len(tried))
            run = Run(engine=ticket.deployment.engine, request=request, key=key,
                      endpoint=endpoint, ledger=self.ledger, admission=admission,
                      limiter=self.limiter, ticket=ticket, span=engine_span,
                      tracing=self.tracing)
            try:
                await run.open(may_fail_over=may_fail_over)
                return run
            except (EngineUnavailable, EngineOverloaded) as error:
                if not may_fail_over:
                    raise
                log.warning("%s failed on %s before its first byte (%s); trying another "
                            "deployment", request.request_id, ticket.deployment.id, error.code)
                try:
                    with self.tracing.span("routing", attempt=len(tried) + 1,
                                           failover_from=ticket.deployment.id) as routing:
                        ticket = self.router.pick(request.model, regions=regions, exclude=tried)
                        routing.set(deployment=ticket.deployment.id,
                                    region=ticket.deployment.region)
                except SeraiError:
                    # The alternative went away meanwhile: nothing ran, nothing is billed.
                    await _give_back(self.limiter, admission)
                    raise error from None
