"""Admission through Redis shared by several Serai processes (RELIABILITY.md rows 1, 2, 8, 9, 10),
against PostgreSQL and Redis.

Each test gets its own PostgreSQL schema and its own Redis key prefix. Real uvicorn servers serve
Serai with a fast fake engine; every figure is read back from the database the servers wrote.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from serai.app import create_app
from serai.config import Settings
from tests.support.fake_engine import FakeEngine
from tests.support.serving import serving
from tests.test_admission import (
    REPLY,
    Served,
)
from tests.test_admission import (
    test_a_thousand_concurrent_requests_on_a_hundred_request_quota as test_row_1_with_redis,
)
from tests.test_admission import (
    test_fifty_concurrent_priced_requests_never_spend_past_the_balance as test_row_2_with_redis,
)
from tests.test_admission import (
    test_the_sixty_first_request_in_a_minute_is_rate_limited as test_row_9_with_redis,
)

__all__ = ["test_row_1_with_redis", "test_row_2_with_redis", "test_row_9_with_redis"]


def redis_settings(tmp_path: Path, postgres_url: str, redis_url: str, prefix: str) -> Settings:
    return Settings(data_dir=tmp_path, database_url=postgres_url, redis_url=redis_url,
                    redis_prefix=prefix)


@pytest.fixture
def served(postgres_url: str, redis_url: str, redis_prefix: str,
           tmp_path: Path) -> Iterator[Served]:
    """test_admission's server, admitting through Redis (its tests run here as rows 1, 2, 9)."""
    engine = FakeEngine(reply=REPLY, context_length=4096, delay=0.002)
    app = create_app(redis_settings(tmp_path, postgres_url, redis_url, redis_prefix),
                     engines=[engine])
    with serving(app) as base_url:
        yield Served(base_url, app.state.services.database, engine)
