"""create_app(settings) -> FastAPI. The lifespan opens the deployments the settings declare (see
serai.fleet), the database and the ledger writer, and starts the health probes; shutting down
drains the ledger so no usage row is lost."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from serai import __version__
from serai.api import admin, anthropic, idempotency, openai, scrape, stored_completions, usage
from serai.api.deps import Services, ServicesDep
from serai.api.errors import OpenAIError, documented_errors, install_error_handlers, json_response
from serai.api.middleware import (
    JsonBodies,
    PortListener,
    RequestContext,
    SizeLimits,
)
from serai.billing.base import Limiter
from serai.billing.database_limits import DatabaseLimiter
from serai.billing.ledger import SET_ASIDE_FILE, LedgerWriter
from serai.billing.redis_limits import RedisLimiter
from serai.config import Settings
from serai.console import site
from serai.engines.base import Engine
from serai.engines.router import Router
from serai.fleet import Fleet, probe_forever
from serai.gateway import Gateway
from serai.governance import stored
from serai.governance.crypto import ContentKeys
from serai.governance.failed_authentications import FailedAuthentications
from serai.observability import redaction, tracing
from serai.observability.metrics import Metrics
from serai.storage.db import Database

log = logging.getLogger("serai")


def configured_tracing(settings: Settings) -> tracing.Tracing:
    """The tracing `settings` ask for: off without `otel_endpoint`. With it but without the
    `otel` extra installed, a ValueError says what to install. The OTLP implementation is
    imported here, at the composition root, so serai.observability.tracing never imports it."""
    if not settings.otel_endpoint:
        return tracing.OFF
    try:
        from serai.observability.otlp import OtlpTracing
    except ImportError as error:
        if not (error.name or "").startswith("opentelemetry"):
            raise
        raise ValueError(tracing.OTEL_MISSING) from None
    return OtlpTracing(endpoint=settings.otel_endpoint, service_name=settings.otel_service_name)


def build_router(settings: Settings, local: Sequence[Engine] = ()) -> Router:
    """A router with `local` engines (tests pass fakes) as deployments of this process in
    `settings.region`; the declared deployments are added by the fleet."""
    router = Router(eject_after=settings.eject_after_failures, cooldown_s=settings.eject_cooldown_s)
    for engine in local:
        router.add(engine, deployment=f"{engine.model.name}@local", region=settings.region)
    return router


def _reload_on_sighup(fleet: Fleet) -> Callable[[], None]:
    """SIGHUP reloads the deployments (as `serai deployments reload` does); returns the undo.
    Only the main thread may handle signals: elsewhere (a server in a test thread) nothing."""
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        log.info("SIGHUP: reloading the deployments")
        task = loop.create_task(fleet.reload_logged())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (ValueError, RuntimeError, NotImplementedError):
        return lambda: None
    def undo() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    return undo


def create_limiter(database: Database, *, redis_url: str | None, redis_prefix: str) -> Limiter:
    """The database backend, or Redis when a URL is configured."""
    if redis_url:
        return RedisLimiter(database, redis_url, prefix=redis_prefix)
    return DatabaseLimiter(database)


def sweep(limiter: Limiter, database: Database, timeout_s: float) -> None:
    """Renew the reservations of this process's running requests; release those a crashed
    process left behind, so they stop holding quota; forget Idempotency-Key records past their
    24 hours or left in flight by a crash; delete stored completions past their organization's
    retention."""
    limiter.renew()
    if released := limiter.sweep(timeout_s):
        log.warning("released %d reservations older than %ss", released, timeout_s)
    with database.session() as session:
        idempotency.forget_expired(session=session, abandoned_after_s=timeout_s)
        if deleted := stored.forget_expired(session=session):
            log.info("deleted %d stored completions past their retention", deleted)


async def _sweep_forever(limiter: Limiter, database: Database, timeout_s: float) -> None:
    while True:
        try:
            await asyncio.to_thread(sweep, limiter, database, timeout_s)
        except Exception:
            log.exception("sweep failed; trying again later")
        # A third of the timeout: a renewal that fails once is made up before any hold of a
        # running request is old enough to be taken.
        await asyncio.sleep(min(60.0, timeout_s / 3))


# FastAPI 0.16x records its own OpenTelemetry spans, metrics and logs (validation errors with
# the input values among them) whenever a global provider exists. Serai's spans are the only
# ones it sends (serai/observability/tracing.py): they are built to carry no content.
_NO_NATIVE_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False, "auto_configure": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


def create_app(settings: Settings, *, engines: Sequence[Engine] | None = None,
               reread: Callable[[], Settings] = Settings, sighup: bool = False) -> FastAPI:
    """Build the app. `engines` replaces the embedded models (tests pass a fake engine); the
    upstreams the settings declare are served beside them. A reload (the admin API, or SIGHUP
    if `sighup`) applies the deployments of the settings `reread` builds."""
    # A malformed content key stops everything here, before anything is opened.
    content_keys = ContentKeys.configured(
        settings.secret_key.get_secret_value() if settings.secret_key else None,
        settings.secret_key_file)
    # Tracing asked for without OpenTelemetry installed stops everything here too.
    traces = configured_tracing(settings)
    metrics = Metrics()  # this app's own registry: apps in one process never mix counts

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        router = build_router(settings, engines or ())
        fleet = Fleet(router, reread=reread, embedded=engines is None)
        await fleet.apply(settings)  # first: a missing API key stops start-up here
        database = Database(settings.resolved_database_url)
        await asyncio.to_thread(database.upgrade)
        limiter = create_limiter(database, redis_url=settings.redis_url,
                                 redis_prefix=settings.redis_prefix)
        ledger = LedgerWriter(limiter, set_aside_file=settings.data_dir / SET_ASIDE_FILE)
        ledger.start()
        traces.open()
        gateway = Gateway(router=router, ledger=ledger, database=database, limiter=limiter,
                          failover_attempts=settings.failover_attempts, tracing=traces,
                          max_stream_s=settings.max_stream_s,
                          counts_per_minute=settings.count_tokens_rpm)
        metrics.watch(router=router, ledger=ledger)
        failed = FailedAuthentications(database)
        app.state.services = Services(settings=settings, database=database, gateway=gateway,
                                      failed_authentications=failed, fleet=fleet,
                                      content_keys=content_keys, metrics=metrics)
        tasks = [asyncio.create_task(_sweep_forever(limiter, database,
                                                    settings.reservation_timeout_s),
                                     name="reservation-sweeper"),
                 asyncio.create_task(failed.write_forever(), name="failed-authentications")]
        if settings.probe_interval_s > 0:
            tasks.append(asyncio.create_task(probe_forever(router, settings.probe_interval_s),
                                             name="health-probes"))
        undo_sighup = _reload_on_sighup(fleet) if sighup else (lambda: None)
        try:
            yield
        finally:
            undo_sighup()
            for task in tasks:
                task.cancel()
            await fleet.aclose()
            await router.aclose()
            await ledger.aclose()
            await traces.aclose()  # after the ledger: its last settlements are spans too
            try:
                await failed.write()  # what was counted since the last minute's write
            except Exception:
                log.exception("the last failed authentications could not be written")
            await asyncio.to_thread(limiter.close)
            database.dispose()

    redaction.install()
    app = FastAPI(title="Serai", version=__version__, lifespan=lifespan, **_NO_NATIVE_TELEMETRY,
                  responses=documented_errors(OpenAIError),
                  description="Open-weight models behind OpenAI- and Anthropic-compatible APIs.")
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(stored_completions.router)
    app.include_router(anthropic.router)
    app.include_router(usage.router)
    app.include_router(admin.router)
    app.include_router(scrape.router)
    site.install(app)

    @app.get("/health", tags=["Operations"])
    async def health() -> Response:
        """The process is up."""
        return json_response(200, {"status": "ok"})

    @app.get("/ready", tags=["Operations"])
    async def ready(services: ServicesDep) -> Response:
        """The models are loaded and the database answers."""
        try:
            await asyncio.to_thread(services.database.ping)
        except Exception as exc:
            log.warning("readiness: database unreachable: %s", exc)
            return json_response(503, {"status": "unavailable", "database": "unreachable"})
        models = [m.name for m in services.gateway.router.models()]
        return json_response(200, {"status": "ready", "database": "ok", "models": models})

    app.add_middleware(JsonBodies)
    app.add_middleware(idempotency.IdempotentResponses,
                       abandoned_after_s=settings.reservation_timeout_s, content_keys=content_keys)
    app.add_middleware(SizeLimits, max_bytes=settings.max_body_bytes,
                       max_header_bytes=settings.max_header_bytes)
    if settings.admin_port is not None:
        app.add_middleware(PortListener, port=settings.admin_port,
                           serves=lambda path: path.startswith("/admin/"),
                           refusal="This is the admin port: it serves only the admin API "
                           "(/admin/...).")
    if settings.metrics_port is not None:
        app.add_middleware(PortListener, port=settings.metrics_port,
                           serves=lambda path: path == scrape.PATH,
                           refusal="This is the metrics port: it serves only /metrics.")
    traces.install(app)  # inside RequestContext: the request id is known to the span
    app.add_middleware(RequestContext, metrics=metrics)
    if settings.cors_origins:
        # Outermost, so preflights are answered before authentication and every answer (a 413,
        # a 429) carries the headers a browser needs to show it. Keys travel in the
        # Authorization header, never cookies: no credentials mode.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["*"], allow_headers=["*"], max_age=600,
                           expose_headers=["x-request-id", "request-id", "retry-after", *(
                               f"x-ratelimit-{part}-{kind}" for kind in ("requests", "tokens")
                               for part in ("limit", "remaining", "reset"))])
    return app
