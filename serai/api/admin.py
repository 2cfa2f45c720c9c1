"""The admin API under /admin/v1: key management for admin keys.

Admin models forbid unknown fields: a typo in an admin call should fail loudly, not be ignored.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from serai import accounts
from serai.accounts import KeyInfo
from serai.api.deps import AdminKeyDep, ServicesDep
from serai.api.errors import json_response

router = APIRouter(prefix="/admin/v1", tags=["Admin"])


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    admin: bool = False


def _key_object(key: KeyInfo) -> dict[str, Any]:
    return {"id": key.id, "object": "api_key", "name": key.name, "prefix": key.prefix,
            "admin": key.is_admin, "created_at": key.created_at.isoformat(),
            "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None}


@router.post("/keys")
async def create_key(body: KeyCreate, _admin: AdminKeyDep, services: ServicesDep) -> Response:
    """Creates a key; the response is the only time its secret is shown."""

    def create() -> tuple[KeyInfo, str]:
        with services.database.session() as session:
            return accounts.create_key(session=session, name=body.name, is_admin=body.admin)

    key, secret = await asyncio.to_thread(create)
    return json_response(201, {**_key_object(key), "secret": secret})


@router.get("/keys")
async def list_keys(_admin: AdminKeyDep, services: ServicesDep) -> Response:
    """Lists keys (prefixes only, never secrets)."""

    def read() -> list[KeyInfo]:
        with services.database.session() as session:
            return accounts.list_keys(session=session)

    keys = await asyncio.to_thread(read)
    return json_response(200, {"object": "list", "data": [_key_object(k) for k in keys]})


@router.delete("/keys/{ref}")
async def revoke_key(ref: str, _admin: AdminKeyDep, services: ServicesDep) -> Response:
    """Revokes a key by id or prefix; requests with it fail from now on."""

    def revoke() -> KeyInfo:
        with services.database.session() as session:
            return accounts.revoke_key(session=session, ref=ref)

    key = await asyncio.to_thread(revoke)
    return json_response(200, _key_object(key))
