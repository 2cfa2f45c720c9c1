"""Stored completions: chat completions kept on request (`store: true`) for an organization
whose retention policy allows it, readable only inside that organization.

The request's messages and the response are one JSON document, encrypted with the server's
content keys (serai/governance/crypto.py) and bound to its organization and id; only the model, the
caller's metadata and the times stay in clear, for listing. A completion past its retention is
never served, and the sweeper deletes it. A key limited to some models reaches only the
completions of those models: the others answer as if they did not exist.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from serai.errors import InvalidRequest, NotFound
from serai.governance.crypto import ContentKeys, Sealed
from serai.storage.db import db_now_ms, rowcount
from serai.storage.tables import StoredCompletion

DAY_MS = 24 * 3600 * 1000
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


@dataclass(frozen=True, slots=True)
class Completion:
    """A stored completion, opened."""

    id: str
    model: str
    metadata: dict[str, str]
    messages: list[dict[str, Any]]
    response: dict[str, Any]


def check_metadata(metadata: dict[str, Any] | None) -> dict[str, str]:
    """OpenAI's limits: up to 16 pairs, keys up to 64 characters, string values up to 512."""
    metadata = metadata or {}
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(f"'metadata' takes at most {MAX_METADATA_PAIRS} pairs.",
                             param="metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or not isinstance(value, str) or len(
                value) > MAX_METADATA_VALUE:
            raise InvalidRequest(f"'metadata' keys are strings of at most {MAX_METADATA_KEY} "
                                 f"characters, values strings of at most {MAX_METADATA_VALUE}.",
                                 param=f"metadata.{key}")
    return metadata


def _context(org_id: int, completion_id: str) -> bytes:
    return f"stored completion {org_id} {completion_id}".encode()


def save(*, session: Session, keys: ContentKeys, org_id: int, key_id: int | None,
         completion_id: str, model: str, metadata: dict[str, str],
         messages: list[dict[str, Any]], response: dict[str, Any], days: int) -> None:
    now = db_now_ms(session)
    sealed = keys.seal(orjson.dumps({"messages": messages, "response": response}),
                       context=_context(org_id, completion_id))
    session.add(StoredCompletion(
        completion_id=completion_id, org_id=org_id, key_id=key_id, model=model, tags=metadata,
        created_ms=now, expires_ms=now + days * DAY_MS, cipher_key=sealed.key_id,
        content=sealed.data))
    session.flush()


def _open(keys: ContentKeys, row: StoredCompletion) -> Completion:
    document = orjson.loads(keys.open(Sealed(row.cipher_key, row.content),
                                      context=_context(row.org_id, row.completion_id)))
    return Completion(row.completion_id, row.model, dict(row.tags or {}),
                      document["messages"], document["response"])


def _live(session: Session, org_id: int, models: Collection[str] | None) -> tuple[Any, ...]:
    """What a reader may reach: its organization's completions within their retention, and
    of its allowed `models` (None: any)."""
    reach = (StoredCompletion.org_id == org_id, StoredCompletion.expires_ms > db_now_ms(session))
    return reach if models is None else (*reach, StoredCompletion.model.in_(list(models)))


def _row(session: Session, org_id: int, models: Collection[str] | None,
         completion_id: str) -> StoredCompletion:
    row = session.scalar(select(StoredCompletion).where(
        StoredCompletion.completion_id == completion_id, *_live(session, org_id, models)))
    if row is None:  # another organization's (or model's) answers exactly like none at all
        raise NotFound(f"No stored chat completion {completion_id!r}.", param="completion_id")
    return row


# Every reader names its allowed models (None: any), with no default: a caller cannot forget
# to narrow what a limited key reaches.
def find(*, session: Session, keys: ContentKeys, org_id: int, models: Collection[str] | None,
         completion_id: str) -> Completion:
    return _open(keys, _row(session, org_id, models, completion_id))


def page(*, session: Session, keys: ContentKeys, org_id: int, models: Collection[str] | None,
         limit: int = 20, after: str | None = None, model: str | None = None,
         metadata: dict[str, str] | None = None,
         order: Literal["asc", "desc"] = "asc") -> tuple[list[Completion], bool]:
    """One page of the organization's completions of `models` and whether more follow."""
    query = select(StoredCompletion).where(*_live(session, org_id, models))
    if model is not None:
        query = query.where(StoredCompletion.model == model)
    for key, value in (metadata or {}).items():
        query = query.where(StoredCompletion.tags[key].as_string() == value)
    if after is not None:
        cursor = _row(session, org_id, models, after).id
        query = query.where(StoredCompletion.id > cursor if order == "asc"
                            else StoredCompletion.id < cursor)
    query = query.order_by(StoredCompletion.id if order == "asc" else StoredCompletion.id.desc())
    rows = list(session.scalars(query.limit(limit + 1)))
    return [_open(keys, r) for r in rows[:limit]], len(rows) > limit


def remove(*, session: Session, org_id: int, models: Collection[str] | None,
           completion_id: str) -> None:
    session.delete(_row(session, org_id, models, completion_id))
    session.flush()


def forget_expired(*, session: Session) -> int:
    """Delete the completions past their retention; returns how many."""
    gone = session.execute(delete(StoredCompletion).where(
        StoredCompletion.expires_ms <= db_now_ms(session)))
    return rowcount(gone)


def count(*, session: Session) -> int:
    return session.scalar(select(func.count()).select_from(StoredCompletion)) or 0
