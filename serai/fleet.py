"""The deployments this process serves as its settings declare them: opened at start-up,
changed in place by a reload, and probed for health.

A reload re-reads the settings (serai.toml and SERAI_* variables) and applies the difference to
the running router. New deployments are opened (in a thread: loading a GGUF takes seconds) and
added; removed ones stop getting requests at once and their engines are closed once the requests
they hold have finished; a changed one is both, the new one added and the old one drained.
Either every new engine opens and the whole difference is applied, or nothing changes.
Deployments the settings do not declare (engines a test passed in) are left alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError

from serai.config import EmbeddedModelSettings, Settings, UpstreamSettings
from serai.engines.base import Engine, Probed
from serai.engines.router import Deployment, Router
from serai.errors import InvalidRequest

log = logging.getLogger("serai.fleet")


@dataclass(frozen=True)
class Declared:
    """One deployment as the settings declare it. Two equal ones are the same deployment: a
    reload leaves it running."""

    id: str
    kind: str  # "embedded" (in this process), "ray" (Ray Serve replicas) or "upstream"
    config: EmbeddedModelSettings | UpstreamSettings
    # What else the engine depends on: for an embedded model the top-level engine settings,
    # for an upstream a digest of its API key (so a rotated key file replaces it).
    engine_options: tuple[object, ...] = ()


def declared(settings: Settings, *, embedded: bool = True) -> dict[str, Declared]:
    """Every deployment `settings` declare, by id; the embedded ones only if `embedded`."""
    options: tuple[object, ...] = (settings.default_max_tokens, settings.engine_prefill_chunk,
                                   settings.engine_batch_invariant)
    kind = "embedded"
    if settings.ray_address:  # the embedded models run as Ray Serve replicas on that cluster
        kind = "ray"
        options += (settings.ray_address, settings.ray_min_replicas, settings.ray_max_replicas,
                    settings.ray_target_ongoing_requests, settings.ray_replica_cpus)
    items = [Declared(m.deployment or f"{m.name}@{'ray' if kind == 'ray' else 'local'}", kind,
                      m, options)
             for m in (settings.embedded_models if embedded else ())]
    items += [Declared(u.deployment_id, "upstream", u, (_key_digest(u),))
              for u in settings.upstreams]
    return {item.id: item for item in items}


def _key_digest(config: UpstreamSettings) -> str | None:
    from serai.engines.upstream import read_api_key

    key = read_api_key(config)  # a missing variable or file refuses the settings here
    return None if key is None else hashlib.sha256(key.encode()).hexdigest()


def open_engine(item: Declared, settings: Settings) -> Engine:
    """Open the engine of one declared deployment (blocking: a GGUF loads for seconds)."""
    if isinstance(item.config, UpstreamSettings):
        from serai.engines.upstream import UpstreamEngine

        return UpstreamEngine(item.config)
    from serai.engines.llamacpp import LlamaCppEngine
    from serai.engines.models import admit_model

    model = item.config
    # The directory, header and SHA-256 checks: llama.cpp (here or on a Ray replica) only
    # ever opens a file that passed them.
    path = admit_model(model.path, settings, sha256=model.sha256)
    assert model.context_length is not None and model.parallel is not None
    assert model.queue_size is not None and model.prompt_format is not None
    options: dict[str, Any] = {"context_length": model.context_length, "threads": model.threads,
               "prompt_format": model.prompt_format,
               "default_max_tokens": settings.default_max_tokens,
               "parallel": model.parallel, "queue_size": model.queue_size,
               "prefill_chunk": settings.engine_prefill_chunk,
               "batch_invariant": settings.engine_batch_invariant}
    if item.kind == "ray":
        from serai.engines.rayserve import RayServeEngine

        assert settings.ray_address is not None
        return RayServeEngine(path, name=model.name, address=settings.ray_address,
                              engine_options=options, min_replicas=settings.ray_min_replicas,
                              max_replicas=settings.ray_max_replicas,
                              target_ongoing_requests=settings.ray_target_ongoing_requests,
                              replica_cpus=settings.ray_replica_cpus,
                              # each replica batches `parallel`; Serve queues the rest
                              max_ongoing_requests=model.parallel,
                              max_queued_requests=model.queue_size)
    return LlamaCppEngine(path, name=model.name, **options)


def _add(router: Router, item: Declared, engine: Engine) -> Deployment:
    config = item.config
    return router.add(engine, deployment=item.id, region=config.region or "default",
                      weight=config.weight, aliases=config.aliases, kind=item.kind,
                      max_concurrency=config.max_concurrency
                      if isinstance(config, UpstreamSettings) else None)


@dataclass
class Changes:
    """What a reload did, by deployment id."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @classmethod
    def between(cls, old: dict[str, Declared], new: dict[str, Declared]) -> Changes:
        changes = cls(removed=[i for i in old if i not in new])
        for ident, item in new.items():
            if ident not in old:
                changes.added.append(ident)
            elif old[ident] != item:
                changes.replaced.append(ident)
            else:
                changes.unchanged.append(ident)
        return changes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_invalid(exc: Exception) -> str:
    """A one-line account of why settings could not be read, naming the fields."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
                         for e in exc.errors())
    return str(exc)


class Fleet:
    """Keeps the router's declared deployments in step with the settings.

    `reread` builds the settings again (from serai.toml and the environment, plus whatever the
    command line gave at start-up); `embedded` off leaves the embedded models to the caller.
    """

    def __init__(self, router: Router, *, reread: Callable[[], Settings],
                 embedded: bool = True) -> None:
        self.router = router
        self._reread = reread
        self._embedded = embedded
        self._declared: dict[str, Declared] = {}
        self._lock = asyncio.Lock()  # one reload at a time
        self._draining: dict[asyncio.Task[None], Deployment] = {}

    async def apply(self, settings: Settings) -> Changes:
        """Bring the router to what `settings` declare. Raises (changing nothing) if an engine
        cannot be opened or an id is taken by a deployment the settings do not manage."""
        async with self._lock:
            wanted = declared(settings, embedded=self._embedded)
            changes = Changes.between(self._declared, wanted)
            taken = {d.id for d in self.router.all()} - set(self._declared)
            if clash := sorted(taken & set(changes.added)):
                raise ValueError(f"the deployment id {clash[0]!r} is already taken")
            opened = await self._open([wanted[i] for i in changes.added + changes.replaced],
                                      settings)
            # No await from here on: requests see the old set or the new one, never a mix.
            for ident in changes.removed + changes.replaced:
                self._drain(self.router.remove(ident))
            for item, engine in opened:
                _add(self.router, item, engine)
            self._declared = wanted
            return changes

    async def _open(self, items: list[Declared],
                    settings: Settings) -> list[tuple[Declared, Engine]]:
        """Open every engine, one at a time (models loading side by side only share the cores);
        if one fails, close those already open and raise its error."""
        opened: list[tuple[Declared, Engine]] = []
        try:
            for item in items:
                opened.append((item, await asyncio.to_thread(open_engine, item, settings)))
        except BaseException as exc:
            for _, engine in opened:
                await engine.aclose()
            if isinstance(exc, Exception):
                exc.add_note(f"opening the deployment {item.id}")
            raise
        return opened

    async def reload(self) -> Changes:
        """Re-read the settings and apply them. InvalidRequest, with nothing changed, if they
        are invalid or a new deployment cannot be opened."""
        try:
            settings = await asyncio.to_thread(self._reread)
        except Exception as exc:  # a validation error, bad TOML, an unreadable model file
            raise InvalidRequest("The configuration is invalid; nothing was changed: "
                                 f"{describe_invalid(exc)}") from None
        try:
            changes = await self.apply(settings)
        except Exception as exc:
            notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
            raise InvalidRequest(f"The configuration cannot be applied; nothing was changed: "
                                 f"{exc}{notes}") from None
        log.info("reloaded the deployments: %s", changes.as_dict())
        return changes

    async def reload_logged(self) -> None:
        """A reload whose failure is logged (SIGHUP has no one to answer to)."""
        try:
            await self.reload()
        except InvalidRequest as exc:
            log.error("reload refused: %s", exc.message)
        except Exception:
            log.exception("reload failed")

    def _drain(self, deployment: Deployment) -> None:
        task = asyncio.create_task(self._close_when_idle(deployment),
                                   name=f"drain-{deployment.id}")
        self._draining[task] = deployment
        task.add_done_callback(lambda done: self._draining.pop(done, None))

    async def _close_when_idle(self, deployment: Deployment) -> None:
        await self.router.drained(deployment)
        try:
            await deployment.engine.aclose()
        except Exception:
            log.exception("closing the removed deployment %s failed", deployment.id)
        else:
            log.info("removed deployment %s drained and closed", deployment.id)

    @property
    def draining(self) -> list[Deployment]:
        """Removed deployments still finishing their requests."""
        return list(self._draining.values())

    async def aclose(self) -> None:
        """Close removed deployments still draining (the server is stopping: their requests
        end with it); the router closes the current ones."""
        draining = dict(self._draining)
        for task in draining:
            task.cancel()
        await asyncio.gather(*draining, return_exceptions=True)
        for deployment in draining.values():
            await deployment.engine.aclose()


async def probe(router: Router) -> None:
    """Probe every deployment whose engine can be probed, side by side, and record the
    outcomes on the router."""
    targets = [d for d in router.all() if isinstance(d.engine, Probed)]

    async def one(deployment: Deployment) -> None:
        engine = deployment.engine
        assert isinstance(engine, Probed)
        try:
            await engine.probe()
        except Exception as exc:
            detail = getattr(exc, "message", None) or type(exc).__name__
            if deployment.probe is None or deployment.probe.ok:
                log.warning("health probe of %s failed: %s", deployment.id, detail)
            router.probed(deployment, ok=False, detail=detail)
        else:
            router.probed(deployment, ok=True)

    await asyncio.gather(*(one(d) for d in targets))


async def probe_forever(router: Router, interval_s: float) -> None:
    """Probe every `interval_s`, the first time one interval after start-up."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await probe(router)
        except Exception:
            log.exception("health probes failed; trying again later")
