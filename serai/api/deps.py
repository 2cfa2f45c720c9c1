"""Request dependencies: the process's services and the API key a request authenticates with.
(A model call's Idempotency-Key: serai.api.idempotency.)"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from serai.config import Settings
from serai.errors import AuthenticationFailed, NotFound, PermissionDenied
from serai.fleet import Fleet
from serai.gateway import Gateway
from serai.governance import accounts
from serai.governance.accounts import KeyInfo
from serai.governance.crypto import ContentKeys
from serai.governance.failed_authentications import FailedAuthentications
from serai.observability.metrics import Metrics
from serai.observability.request_log import RequestRecord
from serai.storage.db import Database


@dataclass(frozen=True, slots=True)
class Services:
    """Everything a request handler may use, built once by create_app's lifespan."""

    settings: Settings  # as at start-up: a reload changes the deployments, not these
    database: Database
    gateway: Gateway
    # Refused keys, counted here and written to the audit log once a minute.
    failed_authentications: FailedAuthentications
    fleet: Fleet | None = None  # the declared deployments, for reloads
    content_keys: ContentKeys | None = None  # None: stored completions are refused
    metrics: Metrics | None = None  # what /metrics shows


# Dependencies are coroutines, even where nothing is awaited: FastAPI runs a plain function
# dependency in a worker thread, a thread hop per request for a lookup.
async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

NO_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY) or in an x-api-key header. "
    "`serai keys create` makes one."
)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def api_key_header(request: Request) -> str | None:
    """Anthropic's way: `x-api-key: KEY`. Either protocol's clients may use either header."""
    value = request.headers.get("x-api-key", "").strip()
    return value or None


async def current_key(request: Request, services: ServicesDep) -> KeyInfo:
    secret = bearer_token(request) or api_key_header(request)
    if secret is None:
        raise AuthenticationFailed(NO_KEY_MESSAGE)

    def lookup() -> KeyInfo:
        with services.database.session() as session:
            return accounts.authenticate(session=session, secret=secret)

    try:
        key = await asyncio.to_thread(lookup)
    except AuthenticationFailed as error:
        await record_failed_authentication(request, services, secret, error)
        raise
    record: RequestRecord = request.state.record  # made by the RequestContext middleware
    record.org_id, record.key_prefix = key.org_id, key.prefix
    check_network(request, key)
    return key


def client_address(request: Request) -> str | None:
    """The address a request comes from, as the server's transport reports it: the peer's,
    or, when the peer is a proxy uvicorn trusts (its --forwarded-allow-ips, 127.0.0.1 unless
    set), the address that proxy forwarded. A key's allowed networks, in the API and in the
    console, are judged by this one address; no header is read here."""
    return request.client.host if request.client is not None else None


def check_network(request: Request, key: KeyInfo) -> None:
    """Refuse (403) a key used from outside its allowed networks: every API request and every
    request of a console session. Not written to the audit log one entry per request: a leaked
    key would grow the log as fast as it is sent (a refused console sign-in is recorded)."""
    accounts.check_client(key, client_address(request))


async def record_failed_authentication(request: Request, services: Services, secret: str,
                                       error: AuthenticationFailed) -> None:
    """Count a refused key; the counts reach the audit log once a minute, so a failure writes
    nothing to the database (serai.governance.failed_authentications). Only the prefix the error message
    shows is kept: a mistyped key is still a secret."""
    reason = error.reason if isinstance(error, accounts.KeyRefused) else "unknown"
    services.failed_authentications.count(prefix=accounts.shown_prefix(secret), reason=reason,
                                          client=client_address(request))


async def admin_key(key: Annotated[KeyInfo, Depends(current_key)]) -> KeyInfo:
    if not key.is_admin:
        raise PermissionDenied("This endpoint needs an admin key; your key can only call the "
                               "model API.")
    return key


@dataclass(frozen=True, slots=True)
class AdminScope:
    """What an admin key may reach. A platform operator reaches everything; an organization's
    owner, admin or viewer only that organization's objects, and a viewer only reads."""

    key: KeyInfo

    @property
    def operator(self) -> bool:
        return self.key.role == "operator"

    @property
    def actor(self) -> str:
        """Who the audit log names for this key's changes."""
        return self.key.shown

    @property
    def org_id(self) -> int | None:
        """The only organization this key may see, or None for all of them."""
        return None if self.operator else self.key.org_id

    def see(self, org_id: int | None, what: str) -> None:
        """Another organization's object answers as if it did not exist: its id, name or
        existence is never revealed."""
        if not self.operator and (org_id is None or org_id != self.key.org_id):
            raise NotFound(f"No {what}.")

    @property
    def may_change(self) -> bool:
        return self.key.role != "viewer"

    def change(self, org_id: int | None, what: str) -> None:
        self.see(org_id, what)
        if not self.may_change:
            raise PermissionDenied("This admin key has the viewer role: it can read, not change. "
                                   "Ask an owner or admin of your organization.")

    def operate(self, action: str) -> None:
        if not self.operator:
            raise PermissionDenied(f"Only a platform operator can {action}.")


async def admin_scope(key: Annotated[KeyInfo, Depends(admin_key)]) -> AdminScope:
    return AdminScope(key)


KeyDep = Annotated[KeyInfo, Depends(current_key)]
AdminKeyDep = Annotated[KeyInfo, Depends(admin_key)]
ScopeDep = Annotated[AdminScope, Depends(admin_scope)]

