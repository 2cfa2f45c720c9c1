"""The database itself: schema upgrades, WAL on SQLite, and reachability (SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from serai.governance import accounts
from serai.storage.db import Database
from serai.storage.tables import Base


def test_an_empty_database_is_not_current_until_upgraded(database_url: str) -> None:
    database = Database(database_url)
    try:
        assert not database.is_current()
        database.upgrade()
        assert database.is_current()
    finally:
        database.dispose()


def test_upgrading_again_changes_nothing_and_keeps_the_data(database: Database) -> None:
    with database.session() as session:
        _, secret = accounts.create_key(session=session, name="kept")
    database.upgrade()
    database.upgrade()
    assert database.is_current()
    with database.session() as session:
        assert accounts.authenticate(session=session, secret=secret).name == "kept"
        assert accounts.count_keys(session=session) == 1


def test_migrations_build_exactly_the_declared_tables(database: Database) -> None:
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_sqlite_database_file_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "serai.db"
    database = Database(f"sqlite:///{path}")
    try:
        database.upgrade()
        with database.engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        database.dispose()
    # WAL is a property of the file: any other program opening it sees it too.
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_sqlite_creates_missing_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "new" / "data-dir" / "serai.db"
    database = Database(f"sqlite:///{path}")
    try:
        database.upgrade()
    finally:
        database.dispose()
    assert path.is_file()


def test_ping_reaches_the_database(database: Database) -> None:
    database.ping()


def test_ping_fails_when_the_database_is_unreachable() -> None:
    database = Database("postgresql+psycopg://postgres@127.0.0.1:1/nothing?connect_timeout=2")
    try:
        with pytest.raises(OperationalError):
            database.ping()
    finally:
        database.dispose()
