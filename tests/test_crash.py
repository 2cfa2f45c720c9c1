"""The ledger survives `kill -9` of the server under load (RELIABILITY.md row 7), on SQLite and
PostgreSQL.

A real server process with a fast fake engine streams to many concurrent clients of a prepaid
organization; the test kills it mid-load, checks the database files, and starts it again with a
short reservation timeout, so its sweeper releases what the dead process held.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from serai.storage.db import Database
from serai.storage.tables import BalanceEntry, Organization, Reservation, UsageRow
from serai.testing.processes import free_port, wait_until_ready
from tests.conftest import REPO
from tests.support.tenants import customer

INPUT_MICROS, OUTPUT_MICROS = 1_500_000, 2_500_000
BALANCE = 10_000_000
PROMPT = "tell me a long story"  # five prompt tokens for the fake engine
CLIENTS = 24
COMPLETE_BEFORE_KILL = 40  # kill once this many streams finished ...
CUT_BY_KILL = 8  # ... while the server holds at least this many streams part-way through
WRITTEN_BEFORE_KILL = 20  # ... and has written this many usage rows


def price(prompt_tokens: int, completion_tokens: int) -> int:
    return -(-(prompt_tokens * INPUT_MICROS + completion_tokens * OUTPUT_MICROS) // 1_000_000)


@dataclass
class Server:
    url: str
    database_url: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, *, reservation_timeout_s: float) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERAI_")}
        env.update(PYTHONPATH=str(REPO), SERAI_CONFIG=str(self.data_dir / "absent.toml"),
                   SERAI_RESERVATION_TIMEOUT_S=str(reservation_timeout_s))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.fake_server", "--port", str(port),
                 "--data-dir", str(self.data_dir), "--database-url", self.database_url],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.url = f"http://127.0.0.1:{port}"
        wait_until_ready(self.process, f"{self.url}/ready", self.log_path, timeout=60)

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Outcome:
    """One request as its client saw it."""

    max_tokens: int
    request_id: str | None = None  # known once the response headers arrived
    status_code: int | None = None
    tokens: int = 0  # content chunks received, one token each
    complete: bool = False  # the whole stream, up to [DONE] and the end of the body


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    killed: bool = False

    @property
    def complete(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.complete]

    @property
    def part_way(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.tokens and not o.complete]


async def stream_until_killed(server: Server, key: str, load: Load,
                              committed: dict[str, tuple[str, int]]) -> None:
    """Keep CLIENTS streams running, and SIGKILL the server at a moment unrelated to any one
    stream, once enough finished (and were written) while enough are part-way. `committed`
    gets the usage rows in the database just before the kill.

    Part-way is judged by the server's reservations, not by what clients have read: on a busy
    machine a client can lag its socket by more than a whole stream, so streams it has only
    begun to read may already be finished on the server."""
    rng = random.Random(7)

    async def client(http: httpx.AsyncClient) -> None:
        while not load.killed:
            outcome = Outcome(max_tokens=rng.randint(5, 40))
            load.outcomes.append(outcome)
            done = False
            try:
                async with http.stream("POST", "/v1/chat/completions", json={
                        "model": "fake-model", "stream": True, "max_tokens": outcome.max_tokens,
                        "messages": [{"role": "user", "content": PROMPT}]}) as response:
                    outcome.status_code = response.status_code
                    outcome.request_id = response.headers.get("x-request-id")
                    async for line in response.aiter_lines():
                        if '"content":"w' in line:
                            outcome.tokens += 1
                        elif line == "data: [DONE]":
                            done = True
                    outcome.complete = response.status_code == 200 and done
            except httpx.TransportError:
                pass  # the server died under this request

    async def killer() -> None:
        database = Database(server.database_url)
        try:
            while True:
                await asyncio.sleep(0.05)
                if len(load.complete) < COMPLETE_BEFORE_KILL:
                    continue
                # Read and kill with no await between: no stream can finish in between. (The
                # server can settle a few in that instant, hence the margin.)
                rows, held = read_rows(database), reservations_held(database)
                written = sum(status == "ok" for status, _ in rows.values())
                if written >= WRITTEN_BEFORE_KILL and held >= CUT_BY_KILL + 4:
                    committed.update(rows)
                    server.kill()
                    load.killed = True
                    return
        finally:
            database.dispose()

    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30,
                                 headers={"authorization": f"Bearer {key}"}) as http:
        await asyncio.gather(killer(), *(client(http) for _ in range(CLIENTS)))


def reservations_held(database: Database) -> int:
    with database.session() as session:
        return session.scalar(select(func.count()).select_from(Reservation)) or 0


def read_rows(database: Database) -> dict[str, tuple[str, int]]:
    with database.session() as session:
        return {r.request_id: (r.status, r.cost_micros) for r in session.scalars(select(UsageRow))}


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    server = Server("", database_url, tmp_path / "serai-data", tmp_path / "server.log")
    yield server
    server.stop()


def test_kill_9_under_load_loses_no_money_and_no_row(server: Server, database_url: str) -> None:
    database = Database(database_url)
    database.upgrade()
    with database.session() as session:
        made = customer(session, prices=(INPUT_MICROS, OUTPUT_MICROS), balance=BALANCE)
    key, org_id = made.secret, made.org_id
    database.dispose()

    server.start(reservation_timeout_s=1800)  # nothing of a live process is ever swept
    load = Load()
    committed: dict[str, tuple[str, int]] = {}
    # A wall-clock cap only so a broken server cannot hang the suite; nothing is timed.
    asyncio.run(asyncio.wait_for(stream_until_killed(server, key, load, committed), 120))
    assert load.killed, "the load never reached the point where the server is killed"
    assert server.process is not None and server.process.wait(timeout=10) == -signal.SIGKILL

    admitted = {o.request_id: o for o in load.outcomes if o.status_code == 200 and o.request_id}
    cut = [o for o in load.part_way if o.status_code == 200]
    if database_url.startswith("sqlite"):
        # The files as the dead process left them, write-ahead log included.
        raw = sqlite3.connect(database_url.removeprefix("sqlite:///"))
        try:
            assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            raw.close()
    database = Database(database_url)
    with database.session() as session:
        stale = set(session.scalars(select(Reservation.request_id)))
    assert len(stale) >= CUT_BY_KILL, "the kill cut too few streams to test anything"
    # A stream the crash cut still holds its reservation (only the sweeper can free it), unless
    # it had finished on the server: its row is committed before its last bytes leave, so the
    # kill can land between the two. Those are billed in full, checked below.
    finished = {o.request_id for o in cut} - stale

    server.start(reservation_timeout_s=1)
    deadline = time.monotonic() + 30
    while (held := reservations_held(database)) > 0:
        assert time.monotonic() < deadline, f"{held} reservations were never swept"
        time.sleep(0.2)

    with database.session() as session:
        rows = list(session.scalars(select(UsageRow)))
        balance = session.scalar(select(Organization.balance_micros)
                                 .where(Organization.id == org_id))
        topped_up = session.scalar(select(func.sum(BalanceEntry.amount_micros)))
    database.dispose()
    by_request: dict[str, list[UsageRow]] = {}
    for row in rows:
        by_request.setdefault(row.request_id, []).append(row)
    assert [r for r, found in by_request.items() if len(found) > 1] == []
    assert set(admitted) <= set(by_request), "an admitted request has no usage row"
    assert {r: (row.status, row.cost_micros) for r, [row] in by_request.items()
            if r in committed} == committed, "rows committed before the crash changed"

    # The sweeper gave each stale reservation an `interrupted` row, and nothing else has one.
    interrupted = {r for r, [row] in by_request.items() if row.status == "interrupted"}
    assert interrupted == stale
    for request_id in stale:
        [row] = by_request[request_id]
        assert (row.cost_micros, row.charged) == (0, False)
    for outcome in cut:
        [row] = by_request[outcome.request_id]  # type: ignore[index]
        if outcome.request_id in finished:
            assert (row.status, row.completion_tokens, row.cost_micros) == (
                "ok", outcome.max_tokens, price(5, outcome.max_tokens))
            continue
        # Finding: these streams delivered tokens, but their record died with the process;
        # the sweeper bills them nothing.
        assert row.status == "interrupted"
    for outcome in load.complete:
        # A complete answer's row is committed before its last bytes leave the server, so
        # whatever a client received in full is billed in full, crash or not.
        [row] = by_request[outcome.request_id]  # type: ignore[index]
        assert row.status == "ok", outcome
        assert (row.prompt_tokens, row.completion_tokens) == (5, outcome.tokens)
        assert outcome.tokens == outcome.max_tokens
        assert row.charged and row.cost_micros == price(5, outcome.tokens)
    assert {row.status for row in rows} <= {"ok", "interrupted"}

    charged = sum(row.cost_micros for row in rows if row.charged)
    assert topped_up == BALANCE
    assert balance == BALANCE - charged >= 0

    # The restarted server bills as before.
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": "fake-model", "max_tokens": 3,
                                "messages": [{"role": "user", "content": PROMPT}]})
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 10
    database = Database(database_url)
    while (found := read_rows(database).get(request_id)) is None:
        assert time.monotonic() < deadline, "the restarted server wrote no usage row"
        time.sleep(0.1)
    database.dispose()
    assert found == ("ok", price(5, 3))
