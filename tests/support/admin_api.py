"""The admin API in process, as an operator calls it: an app on a fake engine, an operator key,
and an httpx client over the ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from fastapi import FastAPI

from serai.api.deps import Services
from serai.app import create_app
from serai.config import Settings
from serai.governance import accounts
from tests.support.fake_engine import FakeEngine


@dataclass
class Admin:
    app: FastAPI
    http: httpx.AsyncClient
    operator: str  # a platform operator's admin key
    services: Services

    def as_(self, key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    async def call(self, method: str, path: str, key: str | None = None,
                   **kwargs: Any) -> httpx.Response:
        return await self.http.request(method, path, headers=self.as_(key or self.operator),
                                       **kwargs)

    async def ok(self, method: str, path: str, key: str | None = None,
                 **kwargs: Any) -> dict[str, Any]:
        response = await self.call(method, path, key, **kwargs)
        assert response.status_code in (200, 201), response.text
        body: dict[str, Any] = response.json()
        return body

    def sdk(self, key: str) -> openai.AsyncOpenAI:
        return sdk(self.http, key)


def sdk(http: httpx.AsyncClient, key: str) -> openai.AsyncOpenAI:
    """The official OpenAI SDK on an in-process app's client (no retries: a test sees the
    first answer)."""
    return openai.AsyncOpenAI(base_url="http://serai/v1", api_key=key, http_client=http,
                              max_retries=0)


@asynccontextmanager
async def admin_api(settings: Settings, engine: FakeEngine) -> AsyncIterator[Admin]:
    """Serai on `settings` serving `engine`, with a new operator key."""
    app = create_app(settings, engines=[engine])
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        with services.database.session() as session:
            _, operator = accounts.create_key(session=session, name="ops", is_admin=True)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serai") as http:
            yield Admin(app, http, operator, services)
