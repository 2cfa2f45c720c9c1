"""The embedded model scaled out on Ray Serve: each replica holds a LlamaCppEngine for one GGUF
file, and the gateway reaches them through a DeploymentHandle.

Serve queues a request until a replica has room for it (`max_ongoing_requests`, the replica's
decoding batch) and scales the replicas between `min_replicas` and `max_replicas` on the load
(`target_ongoing_requests` per replica). A request whose replica dies or cannot be reached
before its first chunk is sent again (Serve routes it to a live replica); a failure after the
first chunk ends the stream. Errors the client caused (a prompt longer than the context) cross
Ray wrapped in a RayTaskError and are unwrapped, so they reach the client as the same 4xx.

The Ray nodes need Serai and llama-cpp-python installed (the same Serai version as the
gateways: requests and chunks cross as pickled serai.types), and the model file at the same
path. Closing the engine releases the gateway's handle and leaves the application running for
the other gateways; `serve delete serai-<model>` removes it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

from serai.engines.base import Measure, ModelInfo
from serai.errors import EngineOverloaded, EngineUnavailable, SeraiError
from serai.types import Chunk, GenerationRequest

log = logging.getLogger("serai.engines.rayserve")

DEPLOYMENT = "model"
ATTEMPTS = 3  # replicas a request is sent to while they die before its first chunk
RETRY_DELAY_S = 0.5  # lets Serve learn that a replica is gone before the next attempt
READY_TIMEOUT_S = 600.0


def application_name(model: str) -> str:
    """The Serve application serving `model`: stable, so every gateway finds the same one."""
    return "serai-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model)


class ModelReplica:
    """One Serve replica: the model loaded from a file on its node, with a batch of its own."""

    def __init__(self, path: str, name: str, engine_options: dict[str, Any]) -> None:
        from ray import serve

        from serai.engines.llamacpp import LlamaCppEngine

        self._engine = LlamaCppEngine(Path(path), name=name, **engine_options)
        self._replica = serve.get_replica_context().replica_id.unique_id

    async def info(self) -> ModelInfo:
        return self._engine.model

    async def measure(self, request: GenerationRequest) -> Measure:
        return await self._engine.measure(request)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str | Chunk]:
        """The replica's id, then the chunks. Serve cancels this task when the caller cancels
        the call; closing the engine's stream then takes the sequence out of the batch."""
        yield self._replica
        chunks = self._engine.generate(request)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()


class _ReplicaLost(Exception):
    """The replica died or could not be reached: the request may go to another one."""


def _translate(error: BaseException) -> BaseException:
    """What a failure of a Serve call means to the gateway."""
    from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError, WorkerCrashedError
    from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

    cause = error.cause if isinstance(error, RayTaskError) else error
    if isinstance(cause, SeraiError):  # the engine's own verdict, the client's 4xx included
        return cause
    if isinstance(cause, BackPressureError):
        return EngineOverloaded("Every replica of the model is busy and the waiting line is full. "
                                "Retry shortly.", headers={"retry-after": "1"})
    lost = (RayActorError, ReplicaUnavailableError, WorkerCrashedError, TaskCancelledError)
    if isinstance(cause, lost):
        first_line = (str(cause).splitlines() or [""])[0]  # Ray's own are a page long
        return _ReplicaLost(f"{type(cause).__name__}: {first_line}")
    log.warning("Ray Serve call failed: %s: %s", type(cause).__name__, cause)
    return EngineUnavailable("The model's replicas failed; retry later.")


class _Connection:
    """This process's connection to the Ray cluster, shared by its Ray engines: a reload opens
    the new engine before closing the old one, which must not disconnect it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owned = False  # connected by an engine (not by whoever embeds Serai)
        self.users = 0


_connection = _Connection()


class RayServeEngine:
    """Serves one GGUF model from replicas of a Ray Serve application on the cluster at
    `address`, deploying (or joining) the application `serai-<name>`."""

    def __init__(self, path: Path, *, name: str, address: str, engine_options: dict[str, Any],
                 min_replicas: int = 1, max_replicas: int = 1, target_ongoing_requests: float = 2,
                 replica_cpus: float = 1.0, max_ongoing_requests: int = 8,
                 max_queued_requests: int = 64) -> None:
        import ray
        from ray import serve

        with _connection.lock:
            if not ray.is_initialized():
                ray.init(address=address, namespace="serai", log_to_driver=False,
                         logging_level=logging.WARNING)
                _connection.owned = True
            _connection.users += 1
        # No Serve HTTP proxy: the gateways are the only way in.
        serve.start(proxy_location="Disabled")
        self._app = application_name(name)
        running = serve.status().applications.get(self._app)
        if running is not None and running.status == "RUNNING":
            # Another gateway deployed it: join its replicas rather than replace them (a new
            # deployment of the same app would restart every replica).
            log.info("joining the Ray Serve application %s on %s", self._app, address)
            handle = serve.get_app_handle(self._app)
        else:
            deployment: Any = serve.deployment(  # a Deployment once applied to the class
                ModelReplica, name=DEPLOYMENT, ray_actor_options={"num_cpus": replica_cpus},
                max_ongoing_requests=max_ongoing_requests,
                max_queued_requests=max_queued_requests,
                autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                                    "initial_replicas": min_replicas,
                                    "target_ongoing_requests": target_ongoing_requests},
                # Stopping a replica waits for its streams, up to a minute.
                graceful_shutdown_timeout_s=60)
            log.info("deploying %s on the Ray cluster at %s (%d to %d replicas)", self._app,
                     address, min_replicas, max_replicas)
            handle = serve.run(deployment.bind(str(path), name, engine_options), name=self._app,
                               route_prefix=None)
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._info: ModelInfo = handle.info.remote().result(timeout_s=READY_TIMEOUT_S)
        self._closed = False
        log.info("serving %s from Ray Serve application %s", name, self._app)

    @property
    def model(self) -> ModelInfo:
        return self._info

    async def measure(self, request: GenerationRequest) -> Measure:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await self._handle.measure.remote(request)
            except Exception as exc:
                error = _translate(exc)
                if isinstance(error, _ReplicaLost) and attempt < ATTEMPTS:
                    await asyncio.sleep(RETRY_DELAY_S)
                    continue
                raise self._unavailable(error) from None
        raise AssertionError("unreachable")

    def _unavailable(self, error: BaseException) -> BaseException:
        if isinstance(error, _ReplicaLost):
            log.warning("replicas of %s unreachable: %s", self._app, error)
            return EngineUnavailable("No replica of the model could be reached; retry later.",
                                     headers={"retry-after": "1"})
        return error

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        if self._closed:
            raise EngineUnavailable("The gateway is shutting down; retry on another server.")
        for attempt in range(1, ATTEMPTS + 1):
            # With stream=True the response is a DeploymentResponseGenerator; Ray's stubs type
            # the call as either kind of response.
            response: Any = self._stream.generate.remote(request)
            try:
                try:
                    replica = await anext(response)
                    first = await anext(response)
                except Exception as exc:
                    error = _translate(exc)
                    if isinstance(error, _ReplicaLost) and attempt < ATTEMPTS:
                        log.warning("%s: a replica of %s was lost before the first chunk (%s); "
                                    "sending it to another replica", request.request_id,
                                    self._app, error)
                        await asyncio.sleep(RETRY_DELAY_S)
                        continue
                    raise self._unavailable(error) from None
                log.info("%s runs on replica %s of %s", request.request_id, replica, self._app)
                yield first
                if first.finish_reason is not None:
                    return
                try:
                    async for chunk in response:
                        yield chunk
                        if chunk.finish_reason is not None:
                            return
                except Exception as exc:
                    error = _translate(exc)
                    log.warning("%s: replica %s of %s failed mid-stream: %s",
                                request.request_id, replica, self._app, error)
                    raise EngineUnavailable("The model's replica failed while generating.") \
                        from None
                raise EngineUnavailable("The model's replica ended its answer before finishing it.")
            finally:
                # Also when the consumer stops reading: Serve cancels the replica's task, which
                # takes the sequence out of the batch.
                response.cancel()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Release the handles (and disconnect from the cluster when the last engine that
        shares this process's connection closes); the application keeps running for the other
        gateways."""
        if self._closed:
            return
        self._closed = True
        for handle in (self._stream, self._handle):
            try:
                await handle.shutdown_async()
            except Exception as exc:  # the cluster may be gone already
                log.warning("closing the handle of %s failed: %s", self._app, exc)
        with _connection.lock:
            _connection.users -= 1
            last = _connection.owned and _connection.users == 0
            if last:
                _connection.owned = False
        if last:
            import ray

            await asyncio.to_thread(ray.shutdown)
