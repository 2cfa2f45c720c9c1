"""API keys: minting, authenticating and revoking.

A key is `sk-serai-` followed by 32 random bytes (URL-safe base64). Only its SHA-256 and a short
display prefix are stored; the secret is shown once, when it is created.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from serai.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound, PermissionDenied
from serai.governance import audit
from serai.governance import retention as retention_policy
from serai.governance.retention import ZERO, Retention
from serai.storage.db import rowcount, utc
from serai.storage.named import claim_name, find_named, row_id
from serai.storage.tables import ApiKey, BalanceEntry, Organization, RedemptionCode, Reservation

KEY_SCHEME = "sk-serai-"
# Scheme plus six characters of the random part: enough to tell keys apart in a list and to
# narrow the lookup to one row, far too little to guess the rest.
PREFIX_LENGTH = len(KEY_SCHEME) + 6


ROLES = ("operator", "owner", "admin", "viewer")
DEFAULT_ORG = "default"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What may be shown about a key: never the secret or its hash."""

    id: int
    name: str
    prefix: str
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None
    org_id: int | None = None
    role: str | None = None
    allowed_models: list[str] | None = None
    expires_at: datetime | None = None
    rpm: int | None = None
    tpm: int | None = None
    allowed_cidrs: list[str] | None = None
    # The organization's allowed regions (None or empty: any); read when the key authenticates.
    allowed_regions: list[str] | None = None
    # The key's own retention policy (None: its organization's).
    retention: Retention | None = None
    # The policy its calls run under, the stricter of the key's and its organization's; read
    # when the key authenticates. Zero until then: nothing is kept by mistake.
    effective_retention: Retention = ZERO

    @property
    def shown(self) -> str:
        """The key as errors, logs and the audit log name it: its prefix and an ellipsis."""
        return self.prefix + "…"

    def may_use(self, model: str, *, canonical: Callable[[str], str] = str) -> bool:
        """Whether the key may use `model`. With `canonical` (the router's alias resolution),
        a model is the same model by any of its names: an allowed list naming an alias allows
        the model, and an alias of an allowed model is allowed."""
        if self.allowed_models is None or model in self.allowed_models:
            return True
        wanted = canonical(model)
        return any(canonical(allowed) == wanted for allowed in self.allowed_models)

    @property
    def usable_models(self) -> str:
        """The models a key limited to some may use, as its refusals list them."""
        return ", ".join(self.allowed_models or ()) or "none"

    def check_may_use(self, model: str, *, canonical: Callable[[str], str] = str) -> None:
        """The refusal of a model the key is not allowed (see `may_use`)."""
        if not self.may_use(model, canonical=canonical):
            raise PermissionDenied(f"This key may not use the model {model!r}; it may use: "
                                   f"{self.usable_models}.", param="model")

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def key_info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.name, row.prefix, row.is_admin, row.created_at, row.revoked_at,
                   row.org_id, row.role, row.allowed_models, row.expires_at, row.rpm, row.tpm,
                   row.allowed_cidrs, retention=_key_retention(row))


def _key_retention(row: ApiKey) -> Retention | None:
    # The column holds only a Policy: every write goes through retention.Policy.
    return None if row.retention is None else Retention(row.retention,  # type: ignore[arg-type]
                                                        row.retention_days)


def _org_retention(row: Organization) -> Retention:
    # The column holds only a Policy: every write goes through retention.Policy.
    return Retention(row.retention, row.retention_days)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class OrgInfo:
    id: int
    name: str
    disabled: bool
    plan_id: int | None
    price_book_id: int | None
    balance_micros: int
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    allowed_regions: list[str] | None = None
    retention: Retention = ZERO


def _org_info(row: Organization) -> OrgInfo:
    return OrgInfo(row.id, row.name, row.disabled, row.plan_id, row.price_book_id,
                   row.balance_micros, row.rpm, row.tpm, row.max_concurrency,
                   row.allowed_regions or None, _org_retention(row))


def create_org(*, session: Session, name: str, plan_id: int | None = None,
               price_book_id: int | None = None, rpm: int | None = None, tpm: int | None = None,
               max_concurrency: int | None = None) -> OrgInfo:
    claim_name(session, Organization, name, what="An organization")
    row = Organization(name=name, disabled=False, plan_id=plan_id, price_book_id=price_book_id,
                       balance_micros=0, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency,
                       retention="zero")
    session.add(row)
    session.flush()
    audit.record(session, action="org.create", target=f"org:{row.id}", org_id=row.id,
                 details={"name": name, "plan_id": plan_id, "price_book_id": price_book_id,
                          "rpm": rpm, "tpm": tpm, "max_concurrency": max_concurrency})
    return _org_info(row)


def default_org(*, session: Session) -> OrgInfo:
    """The organization keys go to when none is named (created on first use)."""
    row = session.scalar(select(Organization).where(Organization.name == DEFAULT_ORG))
    return _org_info(row) if row is not None else create_org(session=session, name=DEFAULT_ORG)


def find_org(*, session: Session, ref: str | int) -> OrgInfo:
    """An organization by id or name."""
    return _org_info(find_named(session, Organization, ref, param="org",
                                missing="No organization {ref}. `serai orgs list` shows them."))


def list_orgs(*, session: Session, org_id: int | None = None) -> list[OrgInfo]:
    """Every organization, or only `org_id` (what an organization's own admins may see)."""
    query = select(Organization).order_by(Organization.id)
    if org_id is not None:
        query = query.where(Organization.id == org_id)
    return [_org_info(r) for r in session.scalars(query)]


_UNSET: Any = object()


def update_org(*, session: Session, org_id: int, name: str | None = None,
               disabled: bool | None = None, plan_id: int | None = _UNSET,
               price_book_id: int | None = _UNSET, rpm: int | None = _UNSET,
               tpm: int | None = _UNSET, max_concurrency: int | None = _UNSET,
               allowed_regions: list[str] | None = _UNSET, retention: str | None = None,
               retention_days: int | None = None) -> OrgInfo:
    """Change what is given; `None` clears a plan, price book, limit or region restriction
    (an empty list of regions means any, as `None` does). `retention_days` alone changes the
    days of a `store` policy."""
    row = session.get(Organization, org_id)
    if row is None:
        raise NotFound(f"No organization {org_id}.", param="org")
    changes: dict[str, Any] = {}
    if name is not None:
        claim_name(session, Organization, name, what="An organization", row=row)
        row.name = name
    if disabled is not None:
        row.disabled = disabled
    for field, value in (("plan_id", plan_id), ("price_book_id", price_book_id), ("rpm", rpm),
                         ("tpm", tpm), ("max_concurrency", max_concurrency),
                         ("allowed_regions", allowed_regions or None
                          if allowed_regions is not _UNSET else _UNSET)):
        if value is not _UNSET:
            setattr(row, field, value)
            changes[field] = value
    if retention is not None or retention_days is not None:
        policy = retention_policy.check(
            retention or row.retention,
            retention_days if retention_days is not None or retention == "zero"
            else row.retention_days)
        # A key stricter than the old policy may be looser than the new one: it is never
        # refused here, its calls run under the stricter of the two (retention.effective).
        row.retention, row.retention_days = policy.policy, policy.days
        changes.update(retention=policy.policy, retention_days=policy.days)
    session.flush()
    changes.update({k: v for k, v in (("name", name), ("disabled", disabled)) if v is not None})
    # A plan or price book change is its own action: it is what changes an organization's bill;
    # so is a retention change: it is what may be kept of its data.
    action = ("org.plan_change" if {"plan_id", "price_book_id"} & changes.keys()
              else "org.retention_change" if "retention" in changes else "org.update")
    audit.record(session, action=action, target=f"org:{org_id}", org_id=org_id, details=changes)
    return _org_info(row)


@dataclass(frozen=True, slots=True)
class BalanceEntryInfo:
    id: int
    org_id: int
    amount_micros: int
    kind: str
    reason: str
    created_at: datetime


def balance_entries(*, session: Session, org_id: int, limit: int = 100) -> list[BalanceEntryInfo]:
    rows = session.scalars(select(BalanceEntry).where(BalanceEntry.org_id == org_id)
                           .order_by(BalanceEntry.id.desc()).limit(limit))
    return [BalanceEntryInfo(r.id, r.org_id, r.amount_micros, r.kind, r.reason, r.created_at)
            for r in rows]


def adjust_balance(*, session: Session, org_id: int, amount_micros: int, kind: str,
                   reason: str) -> OrgInfo:
    """Add (top-up) or take (adjustment) money; a balance can never go below zero.

    Money running requests hold cannot be taken: their settlement may charge up to what they
    reserved, and must never find the balance short."""
    if not reason.strip():
        raise InvalidRequest("Say why the balance changes (reason).", param="reason")
    held = (select(func.coalesce(func.sum(Reservation.amount_micros), 0))
            .where(Reservation.org_id == org_id).scalar_subquery())
    floor = held if amount_micros < 0 else 0
    if amount_micros < 0:
        # The organization's lock first, as admission and settlement take it, then the check in
        # a statement of its own. In one statement, PostgreSQL (READ COMMITTED) would wait for
        # a running admission's lock and then re-check the row, but not the reservations: their
        # sum comes from the snapshot taken before the wait, without the hold just committed.
        session.execute(update(Organization).where(Organization.id == org_id)
                        .values(balance_micros=Organization.balance_micros)
                        .execution_options(synchronize_session=False))
    changed = session.execute(
        update(Organization).where(Organization.id == org_id,
                                   Organization.balance_micros + amount_micros >= floor)
        .values(balance_micros=Organization.balance_micros + amount_micros))
    if rowcount(changed) == 0:
        org = find_org(session=session, ref=org_id)
        running = session.scalar(select(held)) if amount_micros < 0 else 0
        raise InvalidRequest(
            f"The balance of {org.name} is {org.balance_micros} micro-units"
            + (f", {running} of them held by running requests" if running else "")
            + "; it cannot go below zero.", param="amount_micros")
    session.add(BalanceEntry(org_id=org_id, amount_micros=amount_micros, kind=kind, reason=reason))
    session.flush()
    audit.record(session, action=f"balance.{kind}", target=f"org:{org_id}", org_id=org_id,
                 details={"amount_micros": amount_micros, "reason": reason})
    return find_org(session=session, ref=org_id)


def secret_hash(secret: str) -> str:
    """What is stored of a secret (a key, a session token): its SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(*, session: Session, name: str, is_admin: bool = False, org_id: int | None = None,
               role: str | None = None, allowed_models: list[str] | None = None,
               expires_at: datetime | None = None, rpm: int | None = None,
               tpm: int | None = None,
               allowed_cidrs: list[str] | None = None) -> tuple[KeyInfo, str]:
    """Mint a key; returns its public description and the secret (the only time it exists).

    A model key belongs to `org_id` (the default organization if none). An admin key has a
    role: `operator` (the whole platform, no organization) unless another role is given.
    """
    if is_admin and role is None:
        role = "operator" if org_id is None else "owner"
    if role is not None:
        if role not in ROLES:
            raise InvalidRequest(f"A role is one of {', '.join(ROLES)}.", param="role")
        is_admin = True
        if role != "operator" and org_id is None:
            raise InvalidRequest(f"A key with role {role} needs an organization.", param="org")
        if role == "operator":
            org_id = None
    elif org_id is None:
        org_id = default_org(session=session).id
    secret = KEY_SCHEME + secrets.token_urlsafe(32)
    row = ApiKey(name=name, prefix=secret[:PREFIX_LENGTH], secret_hash=secret_hash(secret),
                 is_admin=is_admin, org_id=org_id, role=role, allowed_models=allowed_models,
                 expires_at=expires_at, rpm=rpm, tpm=tpm,
                 allowed_cidrs=check_cidrs(allowed_cidrs) if allowed_cidrs else None)
    session.add(row)
    session.flush()
    session.refresh(row)
    audit.record(session, action="key.create", target=f"key:{row.prefix}", org_id=row.org_id,
                 details={"id": row.id, "name": name, "role": role,
                          "allowed_models": allowed_models, "expires_at": expires_at})
    return key_info(row), secret


class KeyRefused(AuthenticationFailed):
    """A presented secret that opens no key, and why: `unknown` (no key has its prefix),
    `wrong_secret` (a key has its prefix, the rest differs), `revoked` or `expired`."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def authenticate(*, session: Session, secret: str) -> KeyInfo:
    """The key this secret belongs to; KeyRefused if none, or if it was revoked or expired."""
    if not secret.startswith(KEY_SCHEME) or len(secret) < PREFIX_LENGTH:
        raise KeyRefused(_bad_key_message(secret), reason="unknown")
    wanted = secret_hash(secret)
    rows = session.scalars(select(ApiKey).where(ApiKey.prefix == secret[:PREFIX_LENGTH])).all()
    match = None
    for row in rows:  # compare every candidate, in constant time, so timing reveals nothing
        if hmac.compare_digest(row.secret_hash, wanted):
            match = row
    if match is None:
        raise KeyRefused(_bad_key_message(secret), reason="wrong_secret" if rows else "unknown")
    if (dead := why_unusable(match)) is not None:
        raise KeyRefused(dead, reason="revoked" if match.revoked_at is not None else "expired")
    info = key_info(match)
    org = session.get(Organization, match.org_id) if match.org_id is not None else None
    if org is not None:
        info = dataclasses.replace(
            info, allowed_regions=list(org.allowed_regions) if org.allowed_regions else None,
            effective_retention=retention_policy.effective(_org_retention(org), info.retention))
    return info


def why_unusable(row: ApiKey) -> str | None:
    """Why a key can no longer be used (revoked, expired), or None while it can."""
    if row.revoked_at is not None:
        return f"The API key {row.prefix}… has been revoked."
    if row.expires_at is not None and has_expired(row.expires_at):
        return f"The API key {row.prefix}… expired at {utc(row.expires_at):%Y-%m-%d %H:%M} UTC."
    return None


def has_expired(expires_at: datetime) -> bool:
    return utc(expires_at) <= datetime.now(UTC)


def shown_prefix(secret: str) -> str:
    """As much of a presented secret as may be shown (in errors, logs, the audit log)."""
    return secret[:PREFIX_LENGTH] + "…" if len(secret) > PREFIX_LENGTH else "(too short)"


def _bad_key_message(secret: str) -> str:
    return (f"Incorrect API key provided: {shown_prefix(secret)}. Create a key with "
            "`serai keys create`.")


def list_keys(*, session: Session, include_revoked: bool = True,
              org_id: int | None = None) -> list[KeyInfo]:
    """Keys, oldest first; only `org_id`'s when given."""
    query = select(ApiKey).order_by(ApiKey.id)
    if org_id is not None:
        query = query.where(ApiKey.org_id == org_id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return [key_info(row) for row in session.scalars(query)]


def find_key(*, session: Session, ref: str) -> ApiKey:
    """A key by numeric id or by its display prefix."""
    if ref.isascii() and ref.isdigit():
        row = session.get(ApiKey, number) if (number := row_id(ref)) is not None else None
    else:
        rows = session.scalars(select(ApiKey).where(ApiKey.prefix == ref[:PREFIX_LENGTH])).all()
        row = rows[0] if len(rows) == 1 else None
    if row is None:
        raise NotFound(f"No API key {ref!r}. `serai keys list` shows the keys.", param="key")
    return row


def revoke_key(*, session: Session, ref: str) -> KeyInfo:
    """Revoke a key by id or prefix; revoking twice keeps the first revocation time."""
    row = find_key(session=session, ref=ref)
    already = row.revoked_at is not None
    if not already:
        row.revoked_at = func.now()  # the database clock, not this process's
        session.flush()
        session.refresh(row)
    audit.record(session, action="key.revoke", target=f"key:{row.prefix}", org_id=row.org_id,
                 details={"id": row.id, "already_revoked": already})
    return key_info(row)


def count_keys(*, session: Session) -> int:
    return session.scalar(select(func.count()).select_from(ApiKey)) or 0


def update_key(*, session: Session, ref: str, name: str | None = None,
               allowed_models: list[str] | None = _UNSET, allowed_cidrs: list[str] | None = _UNSET,
               expires_at: datetime | None = _UNSET, rpm: int | None = _UNSET,
               tpm: int | None = _UNSET, retention: str | None = _UNSET,
               retention_days: int | None = None) -> KeyInfo:
    """Change a key's label or limits; `None` lifts a limit. `retention` (with its days, or
    none to take the organization's) makes the key stricter than its organization; `None`
    makes it follow the organization again."""
    row = find_key(session=session, ref=ref)
    if retention is not _UNSET or retention_days is not None:
        if retention is None:
            row.retention, row.retention_days = None, None
        else:
            policy = retention_policy.check(
                row.retention or "store" if retention is _UNSET else retention,
                retention_days, days_required=False)
            org = session.get(Organization, row.org_id) if row.org_id is not None else None
            retention_policy.check_key_override(ZERO if org is None else _org_retention(org),
                                                policy)
            row.retention, row.retention_days = policy.policy, policy.days
    if name is not None:
        row.name = name
    if allowed_cidrs is not _UNSET and allowed_cidrs is not None:
        allowed_cidrs = check_cidrs(allowed_cidrs)
    changes: dict[str, Any] = {"name": name} if name is not None else {}
    if retention is not _UNSET or retention_days is not None:
        changes.update(retention=row.retention, retention_days=row.retention_days)
    for field, value in (("allowed_models", allowed_models), ("allowed_cidrs", allowed_cidrs),
                         ("expires_at", expires_at), ("rpm", rpm), ("tpm", tpm)):
        if value is not _UNSET:
            setattr(row, field, value)
            changes[field] = value
    session.flush()
    audit.record(session, action="key.retention_change" if "retention" in changes
                 else "key.update", target=f"key:{row.prefix}", org_id=row.org_id,
                 details={"id": row.id, **changes})
    return key_info(row)


def check_cidrs(cidrs: list[str]) -> list[str]:
    """Client networks as canonical CIDR strings; a host address is its own /32 or /128."""
    checked = []
    for cidr in cidrs:
        try:
            checked.append(str(ipaddress.ip_network(cidr.strip(), strict=False)))
        except ValueError:
            raise InvalidRequest(f"{cidr!r} is not an IP network (e.g. 10.0.0.0/8).",
                                 param="allowed_cidrs") from None
    return checked


def client_allowed(key: KeyInfo, client_ip: str | None) -> bool:
    """Whether `client_ip` is inside the key's allowed networks (any address when it has none;
    an unknown address never is)."""
    if not key.allowed_cidrs:
        return True
    if client_ip is None:
        return False
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(cidr) for cidr in key.allowed_cidrs)


def check_client(key: KeyInfo, client_ip: str | None) -> None:
    """The one refusal of a key used from outside its allowed networks: the model and admin
    APIs, the console's sign-in and every request of a console session call it."""
    if not client_allowed(key, client_ip):
        raise PermissionDenied(f"The API key {key.shown} may not be used from "
                               f"{client_ip or 'an unknown address'}; ask its owner to allow "
                               "your network.")


# -- redemption codes -------------------------------------------------------------------------

CODE_SCHEME = "serai-rc-"
CODE_PREFIX_LENGTH = len(CODE_SCHEME) + 4


@dataclass(frozen=True, slots=True)
class CodeInfo:
    """A redemption code as it may be shown after it was generated: never the code itself."""

    id: int
    prefix: str
    batch: str
    amount_micros: int
    expires_at: datetime | None
    disabled: bool
    redeemed_by_org_id: int | None
    redeemed_at: datetime | None
    created_at: datetime


def _code_info(row: RedemptionCode) -> CodeInfo:
    return CodeInfo(row.id, row.prefix, row.batch, row.amount_micros, row.expires_at,
                    row.disabled, row.redeemed_by_org_id, row.redeemed_at, row.created_at)


MAX_CODES_PER_BATCH = 10_000


def generate_codes(*, session: Session, count: int, amount_micros: int, batch: str,
                   expires_at: datetime | None = None) -> list[tuple[CodeInfo, str]]:
    """Mint `count` codes worth `amount_micros` each; the codes exist only in the return value."""
    if not 1 <= count <= MAX_CODES_PER_BATCH:
        raise InvalidRequest(f"Generate between 1 and {MAX_CODES_PER_BATCH} codes at a time.",
                             param="count")
    if amount_micros <= 0:
        raise InvalidRequest("A code must be worth more than zero.", param="amount_micros")
    if not batch.strip():
        raise InvalidRequest("Name the batch, to list or disable its codes later.", param="batch")
    minted = []
    for _ in range(count):
        code = CODE_SCHEME + secrets.token_hex(12)
        row = RedemptionCode(prefix=code[:CODE_PREFIX_LENGTH], code_hash=secret_hash(code),
                             batch=batch, amount_micros=amount_micros, expires_at=expires_at,
                             disabled=False)
        session.add(row)
        minted.append((row, code))
    session.flush()
    for row, _ in minted:
        session.refresh(row)
    audit.record(session, action="codes.generate", target=f"batch:{batch}",
                 details={"count": count, "amount_micros": amount_micros,
                          "expires_at": expires_at})
    return [(_code_info(row), code) for row, code in minted]


def list_codes(*, session: Session, batch: str | None = None) -> list[CodeInfo]:
    query = select(RedemptionCode).order_by(RedemptionCode.id)
    if batch is not None:
        query = query.where(RedemptionCode.batch == batch)
    return [_code_info(r) for r in session.scalars(query)]


def disable_codes(*, session: Session, batch: str) -> int:
    """Disable the unredeemed codes of a batch; returns how many."""
    result = session.execute(update(RedemptionCode).where(
        RedemptionCode.batch == batch, RedemptionCode.redeemed_at.is_(None),
        RedemptionCode.disabled.is_(False)).values(disabled=True))
    audit.record(session, action="codes.disable", target=f"batch:{batch}",
                 details={"disabled": rowcount(result)})
    return rowcount(result)


def redeem_code(*, session: Session, org_id: int, code: str) -> OrgInfo:
    """Credit a code's amount to the organization; a code is redeemed once, ever."""
    code = code.strip()
    row = session.scalar(select(RedemptionCode).where(RedemptionCode.code_hash == secret_hash(code)))
    if row is None:
        raise NotFound("No such redemption code. Check it was typed in full.", param="code")
    if row.disabled:
        raise InvalidRequest("This redemption code was disabled.", param="code")
    if row.expires_at is not None and has_expired(row.expires_at):
        raise InvalidRequest(f"This redemption code expired at "
                             f"{utc(row.expires_at):%Y-%m-%d %H:%M} UTC.", param="code")
    # The claim is one conditional UPDATE: of two redemptions at once, one changes the row.
    claimed = session.execute(update(RedemptionCode).where(
        RedemptionCode.id == row.id, RedemptionCode.redeemed_at.is_(None))
        .values(redeemed_at=func.now(), redeemed_by_org_id=org_id))
    if rowcount(claimed) == 0:
        raise Conflict("This redemption code was redeemed already.", param="code")
    return adjust_balance(session=session, org_id=org_id, amount_micros=row.amount_micros,
                          kind="redemption", reason=f"code {row.prefix}… ({row.batch})")
