"""Database engine, schema upgrades and the database clock.

SQLite is the zero-setup default (WAL, so readers never wait on the ledger writer); PostgreSQL is
reached with a `postgresql+psycopg://` URL. The same Alembic migrations build both.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import CursorResult, Engine, Result, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class Database:
    """One SQLAlchemy engine and its session factory for the whole process."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"check_same_thread": False})
            event.listen(self.engine, "connect", _on_sqlite_connect)
            # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in
            # its busy handler (1, 2, 5 ... 100 ms) instead of being woken when it frees. Writers
            # of this process queue on a lock of their own instead, which hands over at once:
            # under load that is the difference between a few ms and a second of waiting.
            self._write_lock: threading.RLock | None = threading.RLock()
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
            self._write_lock = None  # PostgreSQL's row locks already queue writers fairly
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """A session that commits on success and rolls back on error. `write`: the session
        writes on a hot path (admission, settlement); SQLite's writers of this process then
        take turns on a lock instead of sleeping in SQLite's busy handler."""
        turn = self._write_lock if write and self._write_lock is not None else nullcontext()
        with turn, self._sessions() as session, session.begin():
            yield session

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (safe to run on every start)."""
        with self.engine.begin() as connection:
            config = _alembic_config(self.url)
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def is_current(self) -> bool:
        head = ScriptDirectory.from_config(_alembic_config(self.url)).get_current_head()
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision() == head

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def _alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser treats % as interpolation; URLs may carry %-escapes (search_path options).
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def db_now_ms(session: Session) -> int:
    """The database clock in epoch milliseconds: every process measures windows by it."""
    if session.get_bind().dialect.name == "sqlite":
        query = "SELECT CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
    else:
        query = "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    return int(session.execute(text(query)).scalar_one())


def iso_from_ms(ms: int) -> str:
    """Epoch milliseconds (the database clock's readings) as ISO 8601 in UTC."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def utc(moment: datetime) -> datetime:
    """A stored time as an aware UTC datetime: SQLite hands back naive ones, and Serai stores
    UTC everywhere."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched. Session.execute is typed as returning a Result,
    which has no rowcount; a DML statement's is a CursorResult, which does."""
    return int(cast(CursorResult[Any], result).rowcount)
