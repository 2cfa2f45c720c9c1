"""Maps the model names clients ask for to the deployments that serve them, and picks one.

A deployment is one engine serving a model in a region. Several may serve one public name; the
router picks among the healthy ones in the regions a request may use, the least loaded for its
weight (outstanding / weight; ties drawn at random in proportion to weight). Health is passive:
`eject_after` consecutive failures before a first byte eject a deployment for `cooldown_s`; then
one trial request (half-open) closes the circuit if it succeeds and re-opens it if it fails.
Active probes (see serai.fleet) report through `probed`: a failure counts like one before a first
byte, a success closes an open circuit at once.

Deployments come and go while requests run (a reload): `remove` stops new requests reaching one
at once, and `drained` waits until the requests it holds have left, so its engine can be closed
without failing any of them.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from serai.engines.base import Engine, ModelInfo
from serai.errors import EngineOverloaded, EngineUnavailable, RegionUnavailable, UnknownModel

Circuit = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class Probe:
    """The outcome of one active health probe."""

    ok: bool
    at: float  # wall-clock time (time.time()), for people to read
    detail: str = ""


@dataclass(eq=False)
class Deployment:
    """One engine serving a model in a region, with its load and health."""

    id: str
    engine: Engine
    region: str = "default"
    weight: int = 1
    max_concurrency: int | None = None
    aliases: Sequence[str] = ()
    outstanding: int = 0
    failures: int = 0  # consecutive, before a first byte
    circuit: Circuit = "closed"
    opened_at: float = 0.0
    trial: bool = False  # a half-open trial request is in flight
    kind: str = "embedded"  # or "upstream": what serves it, for operators
    probe: Probe | None = None  # the last active probe, if any
    removed: bool = False  # no new requests; closed once `outstanding` reaches 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def names(self) -> list[str]:
        return [self.engine.model.name, *self.aliases]


@dataclass(eq=False)
class Ticket:
    """A request's hold on the deployment picked for it: counted as outstanding until `done`."""

    deployment: Deployment
    _router: Router
    _done: bool = field(default=False)

    def succeeded(self) -> None:
        """The first chunk arrived: the deployment is healthy."""
        self._router._verdict(self.deployment, ok=True)

    def failed(self) -> None:
        """The deployment failed before its first byte (unreachable, 5xx, 429, timeout)."""
        self._router._verdict(self.deployment, ok=False)

    def done(self) -> None:
        """The request left the deployment (idempotent)."""
        if self._done:
            return
        self._done = True
        self.deployment.outstanding -= 1
        self.deployment.trial = False
        if self.deployment.removed and self.deployment.outstanding == 0:
            self.deployment._idle.set()


def _unknown(model: str) -> UnknownModel:
    return UnknownModel(f"The model `{model}` does not exist or you do not have access to it.",
                        param="model")


class Router:
    def __init__(self, engines: Iterable[Engine] = (), *, eject_after: int = 3,
                 cooldown_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self._models: dict[str, list[Deployment]] = {}
        self._by_id: dict[str, Deployment] = {}  # every deployment, in the order added
        self.eject_after = eject_after
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._rng = rng or random.Random()
        for engine in engines:
            self.add(engine)

    def add(self, engine: Engine, *, deployment: str | None = None, region: str = "default",
            weight: int = 1, max_concurrency: int | None = None,
            aliases: Sequence[str] = (), kind: str = "embedded") -> Deployment:
        ident = deployment or engine.model.name
        if ident in self._by_id:
            raise ValueError(f"two deployments have the id {ident!r}")
        added = Deployment(ident, engine, region=region, weight=weight,
                           max_concurrency=max_concurrency, aliases=tuple(aliases), kind=kind)
        self._by_id[ident] = added
        for name in added.names:
            self._models.setdefault(name, []).append(added)
        return added

    def remove(self, ident: str) -> Deployment:
        """Take a deployment out: no request picks it from now on; those holding a ticket on it
        run to their end. Its engine stays open (see `drained`)."""
        removed = self._by_id.pop(ident)
        for name in removed.names:
            left = [d for d in self._models[name] if d is not removed]
            if left:
                self._models[name] = left
            else:
                del self._models[name]
        removed.removed = True
        if removed.outstanding == 0:
            removed._idle.set()
        return removed

    async def drained(self, deployment: Deployment) -> None:
        """Wait until a removed deployment holds no request any more."""
        await deployment._idle.wait()

    def all(self) -> list[Deployment]:
        """Every deployment, in the order they were added."""
        return list(self._by_id.values())

    def serves(self, model: str) -> bool:
        return model in self._models

    def deployments(self, model: str) -> list[Deployment]:
        try:
            return self._models[model]
        except KeyError:
            raise _unknown(model) from None

    def canonical(self, name: str) -> str:
        """The model `name` stands for (an alias resolves to its deployments' model name; a
        name nothing serves is itself). Requests are admitted, priced, limited and recorded by
        this name, so an alias is never a way around a price or an allowed-models list."""
        deployments = self._models.get(name)
        return deployments[0].engine.model.name if deployments else name

    def engine_for(self, model: str) -> Engine:
        """An engine serving `model` (the first declared): to measure or describe it."""
        return self.deployments(model)[0].engine

    def model(self, name: str, *, regions: Sequence[str] | None = None) -> ModelInfo:
        """What `name` is; with `regions`, UnknownModel unless a deployment is in one of them
        (a model an organization cannot use is one it does not see)."""
        if regions and not any(d.region in regions for d in self.deployments(name)):
            raise _unknown(name)
        info = self.engine_for(name).model
        return info if info.name == name else ModelInfo(name, info.context_length, info.created,
                                                        info.owned_by)

    def models(self, *, regions: Sequence[str] | None = None) -> list[ModelInfo]:
        """The models served; with `regions`, only those with a deployment in one of them."""
        return [self.model(name) for name, deployments in self._models.items()
                if not regions or any(d.region in regions for d in deployments)]

    def _available(self, deployment: Deployment, now: float) -> bool:
        if deployment.circuit == "open":
            if now - deployment.opened_at < self.cooldown_s:
                return False
            deployment.circuit = "half_open"
        if deployment.circuit == "half_open" and deployment.trial:
            return False  # one trial at a time
        return not (deployment.max_concurrency is not None
                    and deployment.outstanding >= deployment.max_concurrency)

    def pick(self, model: str, *, regions: Sequence[str] | None = None,
             exclude: Iterable[Deployment] = ()) -> Ticket:
        """Hold the best deployment of `model` in `regions` (None or empty: any), skipping
        `exclude`. RegionUnavailable if the regions have none that can take the request;
        EngineUnavailable or EngineOverloaded if no region restriction applies."""
        skipped = set(map(id, exclude))
        allowed = [d for d in self.deployments(model)
                   if id(d) not in skipped and (not regions or d.region in regions)]
        now = self._clock()
        candidates = [d for d in allowed if self._available(d, now)]
        if not candidates:
            raise self._none_available(model, allowed, regions, now)
        best = min(d.outstanding / d.weight for d in candidates)
        tied = [d for d in candidates if d.outstanding / d.weight == best]
        chosen = self._rng.choices(tied, weights=[d.weight for d in tied])[0]
        chosen.outstanding += 1
        if chosen.circuit == "half_open":
            chosen.trial = True
        return Ticket(chosen, self)

    def has_alternative(self, model: str, *, regions: Sequence[str] | None,
                        exclude: Iterable[Deployment]) -> bool:
        skipped = set(map(id, exclude))
        now = self._clock()
        return any(self._available(d, now) for d in self.deployments(model)
                   if id(d) not in skipped and (not regions or d.region in regions))

    def _none_available(self, model: str, allowed: list[Deployment],
                        regions: Sequence[str] | None, now: float) -> Exception:
        if regions:
            return RegionUnavailable(
                f"No deployment of `{model}` in the regions this organization may use "
                f"({', '.join(regions)}) can take the request now; it is not sent elsewhere. "
                "Retry in a moment.", headers={"retry-after": str(self._retry_after(allowed, now))})
        if allowed and all(d.circuit == "closed" for d in allowed):
            return EngineOverloaded(f"Every deployment of `{model}` is busy; retry in a moment.",
                                    headers={"retry-after": "1"})
        return EngineUnavailable(f"No deployment of `{model}` is healthy now; retry in a moment.",
                                 headers={"retry-after": str(self._retry_after(allowed, now))})

    def _retry_after(self, deployments: list[Deployment], now: float) -> int:
        waits = [self.cooldown_s - (now - d.opened_at) for d in deployments
                 if d.circuit == "open"]
        return max(1, math.ceil(min(waits))) if waits else 1

    def _verdict(self, deployment: Deployment, *, ok: bool) -> None:
        if ok:
            deployment.failures = 0
            deployment.circuit = "closed"
            return
        deployment.failures += 1
        if deployment.circuit == "half_open" or deployment.failures >= self.eject_after:
            deployment.circuit = "open"
            deployment.opened_at = self._clock()

    def probed(self, deployment: Deployment, *, ok: bool, detail: str = "") -> None:
        """Record an active probe. A failure counts like one before a first byte; a success
        closes an open circuit without waiting for a trial request. A success leaves the
        failures of a closed circuit counted: requests, not probes, say a serving one is sick."""
        deployment.probe = Probe(ok, time.time(), detail)
        if not ok:
            self._verdict(deployment, ok=False)
        elif deployment.circuit != "closed":
            self._verdict(deployment, ok=True)

    async def aclose(self) -> None:
        for deployment in self.all():
            await deployment.engine.aclose()
