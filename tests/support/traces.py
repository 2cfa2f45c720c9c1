"""Where a server keeps what it keeps, searched for what it must not keep: every file of its
data dir, every row of its database, every Redis key; and a debug-level log to search too."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from serai.config import Settings
from serai.storage.db import Database
from serai.storage.tables import Base


@dataclass
class Backend:
    """Where a server keeps what it keeps: its data dir, its database and its Redis (if any)."""

    settings: Settings
    redis_url: str | None = None

    def scan_database(self, database: Database, needle: str) -> list[str]:
        """Every row of every table, as text, that contains `needle`."""
        found = []
        with database.engine.connect() as connection:
            for table in Base.metadata.sorted_tables:
                for row in connection.execute(select(table)):
                    if needle in repr(tuple(row)) or any(
                            isinstance(v, bytes) and needle.encode() in v for v in row):
                        found.append(f"{table.name}: {tuple(row)!r}"[:300])
        return found

    def scan_files(self, needle: str) -> list[str]:
        return [str(p) for p in self.settings.data_dir.rglob("*")
                if p.is_file() and needle.encode() in p.read_bytes()]

    def scan_redis(self, needle: str) -> list[str]:
        if self.redis_url is None:
            return []
        import redis

        client = redis.Redis.from_url(self.redis_url)
        found = []
        try:
            for key in client.scan_iter(count=1000):
                kind = client.type(key).decode()
                value: Any = (client.get(key) if kind == "string" else
                              client.hgetall(key) if kind == "hash" else
                              client.zrange(key, 0, -1, withscores=True) if kind == "zset" else
                              client.lrange(key, 0, -1) if kind == "list" else
                              client.smembers(key) if kind == "set" else
                              client.xrange(key) if kind == "stream" else b"")
                if needle.encode() in key or needle.encode() in repr(value).encode():
                    found.append(key.decode(errors="replace"))
        finally:
            client.close()
        return found


@contextmanager
def debug_log_in(path: Path) -> Iterator[None]:
    """Everything every logger says, at debug level, into `path` (a file Serai writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
