"""create_app(settings) -> FastAPI. The lifespan opens the database, starts the ledger writer and
loads the engines; shutting down drains the ledger so no usage row is lost."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.responses import Response

from serai import __version__, idempotency
from serai.api import admin, anthropic, openai, usage
from serai.api.deps import Services, ServicesDep
from serai.api.errors import install_error_handlers, json_response
from serai.api.middleware import BodySizeLimit, IdempotentReplays, JsonBodies, RequestContext
from serai.config import Settings, UpstreamSettings
from serai.engines.base import Engine
from serai.engines.router import Router
from serai.gateway import Gateway
from serai.ledger import LedgerWriter
from serai.limits import Limiter, create_limiter
from serai.storage.db import Database

log = logging.getLogger("serai")


def load_engines(settings: Settings) -> list[Engine]:
    """The embedded GGUF model, unless `settings.embedded` is off: in this process, or as Ray
    Serve replicas when `settings.ray_address` is set."""
    if not settings.embedded:
        return []
    from serai.engines.llamacpp import LlamaCppEngine
    from serai.models import resolve_model

    path, name = resolve_model(settings)
    if settings.ray_address:
        from serai.engines.rayserve import RayServeEngine, engine_options

        return [RayServeEngine(path, name=name, address=settings.ray_address,
                               engine_options=engine_options(settings),
                               min_replicas=settings.ray_min_replicas,
                               max_replicas=settings.ray_max_replicas,
                               target_ongoing_requests=settings.ray_target_ongoing_requests,
                               replica_cpus=settings.ray_replica_cpus,
                               max_ongoing_requests=settings.engine_parallel,
                               max_queued_requests=settings.engine_queue_size)]
    return [LlamaCppEngine(path, name=name, context_length=settings.context_length,
                           threads=settings.threads, prompt_format=settings.prompt_format,
                           default_max_tokens=settings.default_max_tokens,
                           parallel=settings.engine_parallel, queue_size=settings.engine_queue_size,
                           prefill_chunk=settings.engine_prefill_chunk,
                           batch_invariant=settings.engine_batch_invariant)]


def upstream_engines(settings: Settings) -> list[tuple[UpstreamSettings, Engine]]:
    """An engine for each of the `[[upstreams]]` `settings` declare."""
    from serai.engines.upstream import UpstreamEngine

    return [(upstream, UpstreamEngine(upstream)) for upstream in settings.upstreams]


def build_router(settings: Settings, local: Sequence[Engine],
                 upstreams: Sequence[tuple[UpstreamSettings, Engine]]) -> Router:
    """The deployments: engines of this process in `settings.region`, then each upstream."""
    router = Router(eject_after=settings.eject_after_failures, cooldown_s=settings.eject_cooldown_s)
    for engine in local:
        # `<model>@local` in this process, `<model>@ray` on a Ray cluster (its `placement`).
        placement = getattr(engine, "placement", "local")
        router.add(engine, deployment=f"{engine.model.name}@{placement}", region=settings.region)
    for config, engine in upstreams:
        router.add(engine, deployment=config.deployment_id, region=config.region,
                   weight=config.weight, max_concurrency=config.max_concurrency,
                   aliases=config.aliases)
    return router


async def _sweep_forever(limiter: Limiter, database: Database, timeout_s: float) -> None:
    """Release reservations a crashed process left behind, so they stop holding quota, and
    forget Idempotency-Key records past their 24 hours or left in flight by a crash."""

    def forget() -> None:
        with database.session() as session:
            idempotency.forget_expired(session=session, abandoned_after_s=timeout_s)

    while True:
        try:
            if released := await asyncio.to_thread(limiter.sweep, timeout_s):
                log.warning("released %d reservations older than %ss", released, timeout_s)
            await asyncio.to_thread(forget)
        except Exception:
            log.exception("reservation sweep failed; trying again later")
        await asyncio.sleep(min(60.0, timeout_s / 2))


def create_app(settings: Settings, *, engines: Sequence[Engine] | None = None) -> FastAPI:
    """Build the app. `engines` replaces the embedded one (tests pass a fake engine); the
    upstreams the settings declare are served beside them."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upstreams = upstream_engines(settings)  # first: a missing API key stops start-up here
        database = Database(settings.resolved_database_url)
        await asyncio.to_thread(database.upgrade)
        limiter = create_limiter(database, redis_url=settings.redis_url,
                                 redis_prefix=settings.redis_prefix)
        ledger = LedgerWriter(limiter)
        ledger.start()
        loaded = list(engines) if engines is not None else await asyncio.to_thread(
            load_engines, settings)
        router = build_router(settings, loaded, upstreams)
        gateway = Gateway(router=router, ledger=ledger, database=database, limiter=limiter,
                          failover_attempts=settings.failover_attempts)
        app.state.services = Services(settings=settings, database=database, gateway=gateway)
        sweeper = asyncio.create_task(_sweep_forever(limiter, database,
                                                     settings.reservation_timeout_s),
                                      name="reservation-sweeper")
        try:
            yield
        finally:
            sweeper.cancel()
            await router.aclose()
            await ledger.aclose()
            await asyncio.to_thread(limiter.close)
            database.dispose()

    app = FastAPI(title="Serai", version=__version__, lifespan=lifespan,
                  description="Open-weight models behind OpenAI- and Anthropic-compatible APIs.")
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(usage.router)
    app.include_router(admin.router)

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
    app.add_middleware(IdempotentReplays, abandoned_after_s=settings.reservation_timeout_s)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext)
    return app
