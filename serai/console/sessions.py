"""Console sessions: signing in with an admin key, the session a browser then holds, and the
CSRF token its forms send back.

The cookie carries a random token and the database only its SHA-256, so neither a stolen
database nor the log opens a session. A session lives as long as its key: revoking or expiring
the key ends every session it opened, at the next page; a key's allowed networks hold at sign-in
and on every request of its sessions.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from serai.errors import PermissionDenied
from serai.governance import accounts, audit
from serai.governance.accounts import KeyInfo
from serai.storage.db import db_now_ms
from serai.storage.tables import ApiKey, ConsoleSession

COOKIE = "serai_console"
LIFETIME_S = 12 * 3600


@dataclass(frozen=True, slots=True)
class SignedIn:
    """Who a console request comes from: the admin key it signed in with, and the token its
    forms must carry."""

    key: KeyInfo
    csrf_token: str


class SignInRefused(PermissionDenied):
    """A genuine key that may not open a session here: a model key, or an admin key used from
    outside its allowed networks. It names the key, so the refusal can be audited as its."""

    def __init__(self, message: str, *, key: KeyInfo) -> None:
        super().__init__(message)
        self.key = key


def sign_in(*, session: Session, secret: str, client: str | None) -> tuple[str, SignedIn]:
    """Open a session for an admin key's secret, signing in from `client` (an IP address);
    returns the cookie's token. A wrong, revoked or expired key raises AuthenticationFailed; a
    model key, or a key whose allowed networks do not hold `client`, SignInRefused."""
    key = accounts.authenticate(session=session, secret=secret)
    if not key.is_admin:
        raise SignInRefused(f"The key {key.shown} can only call the model API. Sign in with an "
                            "admin key (`serai keys create --admin`).", key=key)
    try:
        accounts.check_client(key, client)
    except PermissionDenied as refused:
        raise SignInRefused(refused.message, key=key) from None
    now = db_now_ms(session)
    session.execute(delete(ConsoleSession).where(ConsoleSession.expires_ms <= now))
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    session.add(ConsoleSession(token_hash=accounts.secret_hash(token), key_id=key.id, csrf_token=csrf,
                               created_ms=now, expires_ms=now + LIFETIME_S * 1000))
    audit.record(session, action="console.sign_in", target=f"key:{key.shown}",
                 org_id=key.org_id, actor=key.shown)
    return token, SignedIn(key, csrf)


def signed_in(*, session: Session, token: str) -> SignedIn | None:
    """The live session a cookie's token names, or None (unknown, expired, or its key was
    revoked or has expired since). Its key's allowed networks are the caller's to check against
    the request's address (`deps.check_network`), on every request."""
    found = session.execute(
        select(ConsoleSession, ApiKey).join(ApiKey, ApiKey.id == ConsoleSession.key_id)
        .where(ConsoleSession.token_hash == accounts.secret_hash(token))).first()
    if found is None:
        return None
    held, row = found
    if held.expires_ms <= db_now_ms(session) or accounts.why_unusable(row) is not None:
        return None
    return SignedIn(accounts.key_info(row), held.csrf_token)


def sign_out(*, session: Session, token: str) -> None:
    session.execute(delete(ConsoleSession).where(ConsoleSession.token_hash == accounts.secret_hash(token)))


def csrf_matches(expected: str, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(expected.encode(), sent.encode())
