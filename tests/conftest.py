"""Shared fixtures: databases (SQLite always, PostgreSQL when configured) and a live server.

PostgreSQL tests run when SERAI_TEST_POSTGRES_URL is set; each test gets a schema of its own, so
runs never see each other's rows. Redis tests run when SERAI_TEST_REDIS_URL is set; each test
gets a key prefix of its own. Browser tests run when Chromium is at /usr/bin/chromium (or
SERAI_TEST_CHROMIUM). Without them they skip, unless SERAI_TEST_REQUIRE_SERVICES=1 (set by
.ci/run), which turns a missing service into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from serai.config import Settings
from serai.storage.db import Database
from serai.testing.processes import free_port, wait_until_ready
from tests.support.admin_api import Admin, admin_api
from tests.support.fake_engine import FakeEngine
from tests.support.traces import Backend

POSTGRES_URL = os.environ.get("SERAI_TEST_POSTGRES_URL")
REDIS_URL = os.environ.get("SERAI_TEST_REDIS_URL")
REQUIRE_SERVICES = os.environ.get("SERAI_TEST_REQUIRE_SERVICES") == "1"
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("SERAI_TEST_CHROMIUM", "/usr/bin/chromium"))
# Screenshots and other files a person may want to look at after a run.
ARTIFACTS = Path(os.environ.get("SERAI_TEST_ARTIFACTS", REPO / "test-artifacts"))


def _missing(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (SERAI_TEST_REQUIRE_SERVICES=1 makes this a failure)")
    pytest.skip(reason)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    if not POSTGRES_URL:
        _missing("SERAI_TEST_POSTGRES_URL is not set: PostgreSQL tests need a server")
    import psycopg

    assert POSTGRES_URL is not None
    plain = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
    schema = f"serai_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as exc:
        _missing(f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc}")
    separator = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def redis_url() -> str:
    """The URL of a Redis server that answers."""
    if not REDIS_URL:
        _missing("SERAI_TEST_REDIS_URL is not set: Redis tests need a server")
    import redis

    assert REDIS_URL is not None
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        _missing(f"Redis at {REDIS_URL} is unreachable: {exc}")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted afterwards."""
    import redis

    prefix = f"serai-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass  # a test that stopped its own Redis leaves nothing behind here
    finally:
        client.close()


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI sees none of the caller's SERAI_* variables (conftest read SERAI_TEST_* at import
    already), and runs in the test's directory: no stray serai.toml, and a default data dir
    lands there."""
    for name in [n for n in os.environ if n.startswith("SERAI_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings and child servers see none of the caller's SERAI_* variables and no serai.toml
    (SERAI_CONFIG names a file that does not exist), wherever they run."""
    for name in [n for n in os.environ if n.startswith("SERAI_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SERAI_CONFIG", str(tmp_path / "absent.toml"))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'serai.db'}"
    return request.getfixturevalue("postgres_url")


# The in-process admin tests' engine replies with this many tokens: every request costs the
# same, so a test can count.
REPLY_WORDS = 10


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(reply=" ".join(f"w{i}" for i in range(REPLY_WORDS)))


@pytest.fixture
async def admin(database_url: str, tmp_path: Path, engine: FakeEngine) -> AsyncIterator[Admin]:
    """The admin API in process on SQLite and on PostgreSQL, with an operator key."""
    async with admin_api(Settings(data_dir=tmp_path, database_url=database_url), engine) as api:
        yield api


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """A migrated database, on SQLite and on PostgreSQL."""
    db = Database(database_url)
    db.upgrade()
    yield db
    db.dispose()


@dataclass
class LiveServer:
    base_url: str
    admin_key: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def database(self) -> Database:
        return Database(f"sqlite:///{self.data_dir / 'serai.db'}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `serai ARGS --data-dir <this server's data dir>`."""
        return subprocess.run(
            [sys.executable, "-m", "serai", *args, "--data-dir", str(self.data_dir)],
            capture_output=True, text=True, timeout=60, cwd=self.data_dir.parent,
        )


def start_server(data_dir: Path, *, extra_env: dict[str, str] | None = None) -> LiveServer:
    port = free_port()
    log_path = data_dir.parent / f"{data_dir.name}-server-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERAI_")}
    env.update(extra_env or {})
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "serai", "serve", "--port", str(port),
             "--data-dir", str(data_dir)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data_dir.parent,
        )
    base_url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, f"{base_url}/ready", log_path, timeout=120)
    keys = re.findall(r"sk-serai-[A-Za-z0-9_-]{43}", log_path.read_text())
    return LiveServer(base_url, keys[0] if keys else "", data_dir, log_path, process)


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`serai serve` on a new data dir, serving the real bundled model on an ephemeral port."""
    root = tmp_path_factory.mktemp("live")
    server = start_server(root / "serai-data")
    assert server.admin_key, f"no admin key printed on a new data dir:\n{server.log()}"
    yield server
    stop_server(server)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def api_key(live_server: LiveServer) -> str:
    """An ordinary (non-admin) key, made with the CLI on the server's data dir."""
    result = live_server.cli("keys", "create", "--name", "tests")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="session")
def bundled_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real bundled model file, prepared once per test session."""
    from serai.engines.models import prepare_bundled_model

    return prepare_bundled_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(params=["sqlite", "postgresql+redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A new data dir, on SQLite, and on PostgreSQL with Redis for limits."""
    data_dir = tmp_path / "serai-data"
    if request.param == "sqlite":
        return Backend(Settings(data_dir=data_dir))
    redis_url = request.getfixturevalue("redis_url")
    return Backend(Settings(data_dir=data_dir,
                            database_url=request.getfixturevalue("postgres_url"),
                            redis_url=redis_url,
                            redis_prefix=request.getfixturevalue("redis_prefix")), redis_url)


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    """Debian's Chromium, headless, driven by Playwright (never Playwright's own download).
    Module-scoped: Playwright's sync API runs an event loop of its own, which must be gone
    before asyncio tests run theirs."""
    if not CHROMIUM.exists():
        _missing(f"Chromium is not at {CHROMIUM}: `apt-get install chromium` (or set "
                 "SERAI_TEST_CHROMIUM) for the console's browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # The flags keep Chromium from calling Google's services, which a closed network
        # refuses (slowly, and many times over).
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
        yield browser
        browser.close()
