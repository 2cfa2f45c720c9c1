"""API keys: minting, authenticating and revoking.

A key is `sk-serai-` followed by 32 random bytes (URL-safe base64). Only its SHA-256 and a short
display prefix are stored; the secret is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from serai.errors import AuthenticationFailed, NotFound
from serai.storage.tables import ApiKey

KEY_SCHEME = "sk-serai-"
# Scheme plus six characters of the random part: enough to tell keys apart in a list and to
# narrow the lookup to one row, far too little to guess the rest.
PREFIX_LENGTH = len(KEY_SCHEME) + 6


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What may be shown about a key: never the secret or its hash."""

    id: int
    name: str
    prefix: str
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.name, row.prefix, row.is_admin, row.created_at, row.revoked_at)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(*, session: Session, name: str, is_admin: bool = False) -> tuple[KeyInfo, str]:
    """Mint a key; returns its public description and the secret (the only time it exists)."""
    secret = KEY_SCHEME + secrets.token_urlsafe(32)
    row = ApiKey(name=name, prefix=secret[:PREFIX_LENGTH], secret_hash=_hash(secret),
                 is_admin=is_admin)
    session.add(row)
    session.flush()
    session.refresh(row)
    return _info(row), secret


def authenticate(*, session: Session, secret: str) -> KeyInfo:
    """The key this secret belongs to; AuthenticationFailed if none, or if it was revoked."""
    if not secret.startswith(KEY_SCHEME) or len(secret) < PREFIX_LENGTH:
        raise AuthenticationFailed(_bad_key_message(secret))
    wanted = _hash(secret)
    rows = session.scalars(select(ApiKey).where(ApiKey.prefix == secret[:PREFIX_LENGTH])).all()
    match = None
    for row in rows:  # compare every candidate, in constant time, so timing reveals nothing
        if hmac.compare_digest(row.secret_hash, wanted):
            match = row
    if match is None:
        raise AuthenticationFailed(_bad_key_message(secret))
    if match.revoked_at is not None:
        raise AuthenticationFailed(f"The API key {match.prefix}… has been revoked.")
    return _info(match)


def _bad_key_message(secret: str) -> str:
    shown = secret[:PREFIX_LENGTH] + "…" if len(secret) > PREFIX_LENGTH else "(too short)"
    return f"Incorrect API key provided: {shown}. Create a key with `serai keys create`."


def list_keys(*, session: Session, include_revoked: bool = True) -> list[KeyInfo]:
    query = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return [_info(row) for row in session.scalars(query)]


MAX_ID = 2**31 - 1  # PostgreSQL INTEGER; SQLite accepts more, but no id gets that far


def find_key(*, session: Session, ref: str) -> ApiKey:
    """A key by numeric id or by its display prefix."""
    if ref.isascii() and ref.isdigit():
        # Ids past the integer column's range cannot exist; the database would raise instead.
        row = session.get(ApiKey, int(ref)) if int(ref) <= MAX_ID else None
    else:
        rows = session.scalars(select(ApiKey).where(ApiKey.prefix == ref[:PREFIX_LENGTH])).all()
        row = rows[0] if len(rows) == 1 else None
    if row is None:
        raise NotFound(f"No API key {ref!r}. `serai keys list` shows the keys.", param="key")
    return row


def revoke_key(*, session: Session, ref: str) -> KeyInfo:
    """Revoke a key by id or prefix; revoking twice keeps the first revocation time."""
    row = find_key(session=session, ref=ref)
    if row.revoked_at is None:
        row.revoked_at = func.now()  # the database clock, not this process's
        session.flush()
        session.refresh(row)
    return _info(row)


def count_keys(*, session: Session) -> int:
    return session.scalar(select(func.count()).select_from(ApiKey)) or 0
