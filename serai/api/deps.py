"""Request dependencies: the process's services, and the API key a request authenticates with."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from serai import accounts
from serai.accounts import KeyInfo
from serai.config import Settings
from serai.errors import AuthenticationFailed, PermissionDenied
from serai.gateway import Gateway
from serai.storage.db import Database


@dataclass(frozen=True, slots=True)
class Services:
    """Everything a request handler may use, built once by create_app's lifespan."""

    settings: Settings
    database: Database
    gateway: Gateway


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

NO_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). `serai keys create` makes one."
)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def current_key(request: Request, services: ServicesDep) -> KeyInfo:
    secret = bearer_token(request)
    if secret is None:
        raise AuthenticationFailed(NO_KEY_MESSAGE)

    def lookup() -> KeyInfo:
        with services.database.session() as session:
            return accounts.authenticate(session=session, secret=secret)

    key = await asyncio.to_thread(lookup)
    request.state.key_prefix = key.prefix
    return key


async def admin_key(key: Annotated[KeyInfo, Depends(current_key)]) -> KeyInfo:
    if not key.is_admin:
        raise PermissionDenied("This endpoint needs an admin key; your key can only call the "
                               "model API.")
    return key


KeyDep = Annotated[KeyInfo, Depends(current_key)]
AdminKeyDep = Annotated[KeyInfo, Depends(admin_key)]
