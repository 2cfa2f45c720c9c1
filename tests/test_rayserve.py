"""The bundled model served by Ray Serve replicas behind a live Serai, beside a GPU model served
by mock upstreams in two regions.

A local Ray cluster (`ray start --head` on 127.0.0.1, two CPUs) runs for the module; `serai serve
--ray ADDRESS` deploys two replicas of Gemma 3 270M on it (one llama.cpp thread each) and is
driven over HTTP with the openai SDK and httpx (those tests are marked live). Replicas are found
as operators would find them, by their process title (`ray::ServeReplica:serai-<model>:...`), to
watch their CPU and to kill one. Without Ray installed they skip, unless
SERAI_TEST_REQUIRE_SERVICES=1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from serai.testing.processes import free_port, wait_until_ready
from tests.conftest import REPO, LiveServer, _missing, stop_server

MODEL = "gemma-3-270m"
DEPLOYMENT = f"{MODEL}@ray"
GPU_MODEL = "glm-gpu"  # served by mock upstreams in two regions
CONTEXT = 1024
PARALLEL = 4  # sequences per replica: Serve sends a replica at most this many at once
RAY = Path(sys.executable).parent / "ray"
CHAT = [{"role": "user", "content": "Name a colour."}]
SENTENCE = "The caravan stopped at the inn by the old road, and the traders rested. "
# About 160 prompt tokens: with one thread a replica takes several seconds to read four of them,
# so a replica killed a second after they were sent has not started any of its answers.
LONG_TEXT = SENTENCE * 10
TOO_LONG = SENTENCE * 80  # about 1,300 tokens, past the context


def test_ray_settings_from_the_flag_and_environment(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from serai.cli import app
    from serai.config import load_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SERAI_RAY_MAX_REPLICAS", "4")
    settings = load_settings(ray_address="10.0.0.5:6379")
    assert (settings.ray_address, settings.ray_min_replicas, settings.ray_max_replicas,
            settings.ray_target_ongoing_requests) == ("10.0.0.5:6379", 1, 4, 2)
    monkeypatch.setenv("SERAI_RAY_MIN_REPLICAS", "5")
    result = CliRunner().invoke(app, ["serve", "--ray", "10.0.0.5:6379"])
    assert result.exit_code == 2
    assert "ray_min_replicas (5) is above ray_max_replicas (4)" in " ".join(result.output.split())


def _ray_processes(temp_dir: Path) -> list[int]:
    """Processes of the cluster: those named after `temp_dir` or holding a file under it (its
    logs). Ray's processes retitle themselves (`ray::DashboardAgent`), so the name is not
    enough."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            mine = str(temp_dir) in cmdline or any(
                os.readlink(fd).startswith(str(temp_dir)) for fd in (proc / "fd").iterdir())
        except OSError:  # gone meanwhile
            continue
        if mine:
            found.append(int(proc.name))
    return found


def _stop_cluster(temp_dir: Path) -> None:
    """`ray stop` kills every Ray process of the machine; only this cluster's are stopped here:
    SIGTERM, then SIGKILL for any left after five seconds."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in _ray_processes(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _ray_processes(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """The address of a one-node Ray cluster on 127.0.0.1 with two CPUs."""
    try:
        import ray  # noqa: F401
    except ImportError:
        _missing("ray is not installed (pip install -e '.[ray]'): Ray Serve tests need it")
    # Short: Ray's socket paths live under it and a Unix socket path holds 107 bytes at most.
    temp_dir = Path(tempfile.mkdtemp(prefix="sray", dir="/tmp"))
    port = free_port()
    # The workers (the replicas) import this checkout's serai, as the gateway does.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run(
        [str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard=false", "--temp-dir", str(temp_dir),
         "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"127.0.0.1:{port}"
    finally:
        _stop_cluster(temp_dir)
        left = _ray_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert left == [], f"Ray processes survived the cluster: {left}"


@dataclass
class RayServer:
    live: LiveServer
    temp: Path
    mocks: dict[str, str] = field(default_factory=dict)  # region -> mock upstream URL

    def client(self, **options: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.live.base_url}/v1", api_key=self.live.admin_key,
                             max_retries=0, **options)  # type: ignore[arg-type]

    def replicas_in_log(self, request_ids: list[str]) -> dict[str, str]:
        """The replica each request ran on, as the gateway logged it."""
        found = {}
        for request_id, replica in re.findall(r"(req_[0-9a-f]+) runs on replica (\S+) of",
                                              self.live.log()):
            if request_id in request_ids:
                found[request_id] = replica
        return found

    def usage(self, request_ids: list[str], *, expect: int = 0) -> list[tuple[str, str, str]]:
        """(request id, status, deployment) of each usage row of `request_ids`, waiting (a few
        seconds at most) until there are `expect` of them: a row is written when its run
        closes, which may be just after the client saw the stream end."""
        deadline = time.monotonic() + 10
        while len(rows := self._usage(request_ids)) < expect and time.monotonic() < deadline:
            time.sleep(0.2)
        return rows

    def _usage(self, request_ids: list[str]) -> list[tuple[str, str, str]]:
        from sqlalchemy import select

        from serai.storage.tables import UsageRow

        database = self.live.database
        try:
            with database.session() as session:
                rows = session.execute(select(UsageRow.request_id, UsageRow.status,
                                              UsageRow.deployment)
                                       .where(UsageRow.request_id.in_(request_ids))).all()
        finally:
            database.dispose()
        return [tuple(row) for row in rows]  # type: ignore[misc]


@pytest.fixture(scope="module")
def ray_server(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServer]:
    """`serai serve --ray ADDRESS` with two replicas of the bundled model."""
    root = tmp_path_factory.mktemp("ray")
    data_dir = root / "serai-data"
    port = free_port()
    log_path = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERAI_")}
    # Beside the Ray deployment (region sg), a GPU model served by two OpenAI-compatible
    # upstreams, one per region: three deployments in two regions behind one API.
    mocks = {region: _start_mock(root, region) for region in ("eu", "sg")}
    upstreams = [{"name": GPU_MODEL, "deployment": f"{GPU_MODEL}@{region}", "region": region,
                  "base_url": f"{url}/v1"} for region, (_, url) in mocks.items()]
    env.update({"SERAI_REGION": "sg", "SERAI_UPSTREAMS": json.dumps(upstreams)})
    env.update({"SERAI_RAY_MIN_REPLICAS": "2", "SERAI_RAY_MAX_REPLICAS": "2",
                "SERAI_RAY_REPLICA_CPUS": "1", "SERAI_THREADS": "1",
                "SERAI_CONTEXT_LENGTH": str(CONTEXT), "SERAI_ENGINE_PARALLEL": str(PARALLEL),
                "RAY_USAGE_STATS_ENABLED": "0"})
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "serai", "serve", "--port", str(port), "--data-dir",
             str(data_dir), "--ray", ray_cluster],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    base_url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, f"{base_url}/ready", log_path, timeout=240)
    keys = re.findall(r"sk-serai-[A-Za-z0-9_-]{43}", log_path.read_text())
    live = LiveServer(base_url, keys[0] if keys else "", data_dir, log_path, process)
    assert live.admin_key, live.log()
    try:
        yield RayServer(live, root, {region: url for region, (_, url) in mocks.items()})
    finally:
        stop_server(live)
        for mock, _ in mocks.values():
            if mock.poll() is None:
                mock.terminate()
                mock.wait(timeout=10)


def _start_mock(root: Path, region: str) -> tuple[subprocess.Popen[bytes], str]:
    """A mock OpenAI-compatible upstream (the GPU servers of `region`)."""
    port = free_port()
    with (root / f"mock-{region}.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "serai.testing.mock_upstream",
                                    "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/stats", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(f"the {region} mock upstream did not start")


def _replica_pids() -> list[int]:
    """The replica processes of the bundled model's Serve application, by process title."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if f"ServeReplica:serai-{MODEL}" in cmdline:
            pids.append(int(proc.name))
    return pids


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def _replicas_busy(window_s: float = 1.0) -> float:
    """CPU cores the replicas used over `window_s`."""
    pids = _replica_pids()
    before = _cpu_seconds(pids)
    time.sleep(window_s)
    return (_cpu_seconds(pids) - before) / window_s


def _wait_replicas_idle(count: int = 2, timeout: float = 60.0) -> None:
    """Wait until `count` replicas are up and quiet (one started after a kill loads its model)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_replica_pids()) == count and _replicas_busy(0.5) < 0.15:
            return
        time.sleep(0.5)
    raise AssertionError(f"replicas not idle: {_replica_pids()}")


@pytest.mark.live
def test_two_replicas_serve_chat_streamed_and_whole(ray_server: RayServer) -> None:
    client = ray_server.client()
    assert [m.id for m in client.models.list().data] == [MODEL, GPU_MODEL]

    async def burst() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{ray_server.live.base_url}/v1",
                                      api_key=ray_server.live.admin_key, max_retries=0) as aio:
            async def whole() -> str:
                raw = await aio.chat.completions.with_raw_response.create(
                    model=MODEL, messages=CHAT, max_tokens=8, temperature=0)  # type: ignore
                completion = raw.parse()
                assert completion.choices[0].finish_reason in ("stop", "length")
                assert completion.usage is not None and completion.usage.completion_tokens > 0
                return raw.headers["x-request-id"]

            async def streamed() -> str:
                raw = await aio.chat.completions.with_raw_response.create(
                    model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True)  # type: ignore
                text, finish = "", None
                async for event in raw.parse():
                    for choice in event.choices:
                        text += choice.delta.content or ""
                        finish = choice.finish_reason or finish
                assert text and finish in ("stop", "length")
                return raw.headers["x-request-id"]

            return list(await asyncio.gather(*(whole() for _ in range(6)),
                                             *(streamed() for _ in range(6))))

    ids = asyncio.run(burst())
    replicas = ray_server.replicas_in_log(ids)
    assert set(replicas) == set(ids)
    assert len(set(replicas.values())) == 2, replicas  # both replicas took a share
    rows = ray_server.usage(ids, expect=len(ids))
    assert sorted(rows) == sorted((i, "ok", DEPLOYMENT) for i in ids)


@pytest.mark.live
def test_prompt_longer_than_the_context_is_a_400(ray_server: RayServer) -> None:
    client = ray_server.client()
    long_chat = [{"role": "user", "content": TOO_LONG}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=long_chat, max_tokens=8,
                                           stream=stream)  # type: ignore[call-overload]
        assert refused.value.code == "context_length_exceeded"
        assert f"maximum context length is {CONTEXT} tokens" in refused.value.message
        request_id = refused.value.response.headers["x-request-id"]
        assert ray_server.usage([request_id]) == []  # refused: nothing ran, nothing billed


@pytest.mark.live
def test_client_that_leaves_stops_its_replica(ray_server: RayServer) -> None:
    _wait_replicas_idle()
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 900,
            "temperature": 1.0, "seed": 3, "stream": True}
    headers = {"authorization": f"Bearer {ray_server.live.admin_key}"}
    with httpx.stream("POST", f"{ray_server.live.base_url}/v1/completions", json=body,
                      headers=headers, timeout=60) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        # A replica decoding holds a core; the gateway does not decode.
        busy = _replicas_busy()
        assert busy > 0.5, busy
    deadline = time.monotonic() + 10
    while (idle := _replicas_busy(0.5)) > 0.15 and time.monotonic() < deadline:
        pass
    assert idle < 0.15, f"the replica kept generating after the client left ({idle:.2f} cores)"
    rows = ray_server.usage([request_id], expect=1)
    assert rows == [(request_id, "cancelled", DEPLOYMENT)]


@dataclass
class Outcome:
    request_id: str = ""
    status: int = 0
    chunks: int = 0  # content events before the end
    finished: bool = False  # a finish_reason then [DONE]
    error: dict[str, object] | None = None
    events: list[str] = field(default_factory=list)


async def _stream_chat(http: httpx.AsyncClient, key: str, content: str) -> Outcome:
    outcome = Outcome()
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 12, "temperature": 0, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body,
                           headers={"authorization": f"Bearer {key}"}) as response:
        outcome.status = response.status_code
        outcome.request_id = response.headers.get("x-request-id", "")
        if response.status_code != 200:
            await response.aread()
            outcome.error = response.json().get("error")
            return outcome
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                outcome.error = event["error"]
                continue
            for choice in event.get("choices", ()):
                if choice["delta"].get("content"):
                    outcome.chunks += 1
                if choice.get("finish_reason"):
                    outcome.finished = True
    return outcome


@pytest.mark.live
def test_killed_replica_loses_no_request_that_had_not_started(ray_server: RayServer) -> None:
    _wait_replicas_idle()
    key = ray_server.live.admin_key

    async def run() -> list[Outcome]:
        async with httpx.AsyncClient(base_url=ray_server.live.base_url, timeout=120) as http:
            requests = [asyncio.create_task(_stream_chat(http, key, f"{i}. {LONG_TEXT}"))
                        for i in range(8)]
            await asyncio.sleep(1.0)  # sent and spread over both replicas, still reading
            victim = _replica_pids()[0]
            os.kill(victim, signal.SIGKILL)
            return list(await asyncio.gather(*requests))

    outcomes = asyncio.run(run())
    for outcome in outcomes:
        assert outcome.status == 200, outcome
        # Finished, or cut after it had started streaming; never cut before its first chunk.
        assert (outcome.finished and outcome.error is None) or (
            outcome.chunks > 0 and outcome.error is not None), outcome
    ids = [o.request_id for o in outcomes]
    rows = ray_server.usage(ids, expect=len(ids))
    assert sorted(r[0] for r in rows) == sorted(ids)  # exactly one usage row each
    assert {r[2] for r in rows} == {DEPLOYMENT}
    for request_id, status, _ in rows:
        outcome = next(o for o in outcomes if o.request_id == request_id)
        assert status == ("ok" if outcome.finished and outcome.error is None else "error")
    # The kill did hit requests that had not started, and they were sent to the other replica.
    retried = re.findall(r"(req_[0-9a-f]+): a replica of \S+ was lost before the first chunk",
                         ray_server.live.log())
    assert set(retried) & set(ids), ray_server.live.log()[-4000:]


def _serai(server: RayServer, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "serai", *args, "--data-dir",
                           str(server.live.data_dir)], capture_output=True, text=True,
                          cwd=server.temp, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("SERAI_")})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _mock_requests(server: RayServer) -> dict[str, int]:
    return {region: httpx.get(f"{url}/stats").json()["requests"]
            for region, url in server.mocks.items()}


def test_three_deployments_in_two_regions_behind_one_api(ray_server: RayServer) -> None:
    """Ray replicas in sg, a GPU upstream in eu and one in sg: each organization is served only
    in its regions, the usage rows say where, and a region whose deployments are down fails
    closed."""
    keys = {}
    for region in ("eu", "sg"):
        _serai(ray_server, "orgs", "create", f"org-{region}")
        _serai(ray_server, "orgs", "update", f"org-{region}", "--regions", region)
        out = _serai(ray_server, "keys", "create", "--org", f"org-{region}", "--name", region)
        keys[region] = out.strip().splitlines()[-1]
    clients = {region: openai.OpenAI(base_url=f"{ray_server.live.base_url}/v1", api_key=key,
                                     max_retries=0) for region, key in keys.items()}
    assert {m.id for m in clients["eu"].models.list()} == {GPU_MODEL}
    assert {m.id for m in clients["sg"].models.list()} == {GPU_MODEL, MODEL}

    before = _mock_requests(ray_server)
    served: dict[str, list[str]] = {"eu": [], "sg": []}
    for region, client in clients.items():
        for _ in range(3):
            reply = client.chat.completions.with_raw_response.create(
                model=GPU_MODEL, messages=CHAT, max_tokens=4)
            served[region].append(reply.headers["x-request-id"])
    sg_ray = clients["sg"].chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, max_tokens=4)
    after = _mock_requests(ray_server)
    assert {r: after[r] - before[r] for r in after} == {"eu": 3, "sg": 3}
    rows = ray_server.usage([*served["eu"], *served["sg"], sg_ray.headers["x-request-id"]],
                            expect=7)
    by_request = {request_id: deployment for request_id, status, deployment in rows
                  if status == "ok"}
    assert {by_request[r] for r in served["eu"]} == {f"{GPU_MODEL}@eu"}
    assert {by_request[r] for r in served["sg"]} == {f"{GPU_MODEL}@sg"}
    assert by_request[sg_ray.headers["x-request-id"]] == DEPLOYMENT

    # The Ray model has no deployment in eu: refused, not sent to sg.
    with pytest.raises(openai.APIStatusError) as refused:
        clients["eu"].chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert (refused.value.status_code, refused.value.code) == (503, "region_unavailable")

    # eu's GPU servers go down: eu fails closed while sg is still served.
    httpx.post(f"{ray_server.mocks['eu']}/config", json={"failure": "503"}).raise_for_status()
    try:
        before = _mock_requests(ray_server)
        for _ in range(4):  # until the eu deployment is ejected
            with pytest.raises(openai.APIStatusError) as down:
                clients["eu"].chat.completions.create(model=GPU_MODEL, messages=CHAT,
                                                      max_tokens=4)
            assert down.value.status_code == 503
        assert down.value.code == "region_unavailable"
        assert clients["sg"].chat.completions.create(model=GPU_MODEL, messages=CHAT,
                                                     max_tokens=4).choices
        after = _mock_requests(ray_server)
        assert after["sg"] - before["sg"] == 1  # only sg's own request reached sg
    finally:
        httpx.post(f"{ray_server.mocks['eu']}/config", json={"failure": "none"})
