"""The admin API under /admin/v1: organizations, keys, plans, price books, balances, redemption
codes, usage, invoices, the deployments serving the models and the platform's traffic.

Who may do what is decided by the key's role (see `AdminScope`): a platform operator manages
everything; an organization's owner manages its keys, its admin only model and viewer keys
(GRANTS), both redeem codes; a viewer reads.
Another organization's objects answer 404, exactly like objects that do not exist. Routes only
check the scope and call domain functions; admin models forbid unknown fields, so a typo in an
admin call fails loudly instead of being ignored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.responses import Response

from serai import accounts, audit, invoices, plans, quota, traffic
from serai import retention as retention_policy
from serai.accounts import CodeInfo, KeyInfo, OrgInfo
from serai.api.bounds import MAX_MULTIPLIER, Moment, PositiveInt, RowId
from serai.api.deps import AdminScope, ScopeDep, ServicesDep
from serai.api.errors import json_response
from serai.engines.router import Deployment
from serai.errors import InvalidRequest, NotFound, PermissionDenied
from serai.retention import MAX_DAYS as MAX_RETENTION_DAYS
from serai.storage.db import iso_from_ms, utc
from serai.storage.tables import Plan, PriceBook, Reservation

router = APIRouter(prefix="/admin/v1", tags=["Admin"])

T = TypeVar("T")

DateParam = Annotated[date | None, Query(description="A UTC day, YYYY-MM-DD.")]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


async def in_session(services: ServicesDep, scope: AdminScope | None,
                     work: Callable[[Session], T]) -> T:
    """Run `work` in a session whose changes the audit log records as the scope's key's
    (None: a model key that only reads). A refusal beyond the key's grant is recorded too."""
    def run() -> T:
        try:
            with services.database.session() as session:
                return work(audit.act_as(session, scope.actor) if scope is not None else session)
        except BeyondGrant as refused:
            # In a transaction of its own: the refused one rolled back, its record must stay.
            audit.record_alone(services.database, **refused.entry)
            raise

    return await asyncio.to_thread(run)


def _time(moment: datetime | None) -> str | None:
    """ISO 8601 with its offset: a time without one is read as local time by browsers and most
    clients."""
    return None if moment is None else utc(moment).isoformat()


def _set_fields(body: BaseModel) -> dict[str, Any]:
    """The fields a PATCH body actually carries: absent means unchanged, null means cleared."""
    return {name: getattr(body, name) for name in body.model_fields_set}


# -- organizations ----------------------------------------------------------------------------


class OrgCreate(_Strict):
    name: Name
    plan_id: RowId | None = None
    price_book_id: RowId | None = None
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    max_concurrency: PositiveInt | None = None


Region = Annotated[str, Field(min_length=1, max_length=64)]


class OrgUpdate(_Strict):
    name: Name | None = None
    disabled: bool | None = None
    plan_id: RowId | None = None
    price_book_id: RowId | None = None
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    max_concurrency: PositiveInt | None = None
    allowed_regions: list[Region] | None = Field(
        None, description="Regions whose deployments may serve the organization; null or [] "
        "lifts the restriction.")
    retention: retention_policy.Policy | None = Field(
        None, description="What may be kept of its calls' content: 'zero' (nothing) or 'store' "
        "(stored completions, for retention_days).")
    retention_days: Annotated[int, Field(ge=1, le=MAX_RETENTION_DAYS)] | None = None


def _org_object(org: OrgInfo) -> dict[str, Any]:
    return {"id": org.id, "object": "organization", "name": org.name, "disabled": org.disabled,
            "plan_id": org.plan_id, "price_book_id": org.price_book_id,
            "balance_micros": org.balance_micros, "rpm": org.rpm, "tpm": org.tpm,
            "max_concurrency": org.max_concurrency, "allowed_regions": org.allowed_regions,
            "retention": org.retention.policy, "retention_days": org.retention.days}


def _check_links(session: Session, plan_id: int | None, price_book_id: int | None) -> None:
    if plan_id is not None and session.get(Plan, plan_id) is None:
        raise NotFound(f"No plan {plan_id}.", param="plan_id")
    if price_book_id is not None and session.get(PriceBook, price_book_id) is None:
        raise NotFound(f"No price book {price_book_id}.", param="price_book_id")


def _visible_org(session: Session, scope: AdminScope, org_id: int) -> OrgInfo:
    scope.see(org_id, f"organization {org_id}")
    try:
        return accounts.find_org(session=session, ref=org_id)
    except NotFound:
        raise NotFound(f"No organization {org_id}.", param="org") from None


@router.post("/organizations", status_code=201)
async def create_organization(body: OrgCreate, scope: ScopeDep,
                              services: ServicesDep) -> Response:
    """Creates an organization (platform operators only)."""
    scope.operate("create organizations")

    def create(session: Session) -> OrgInfo:
        _check_links(session, body.plan_id, body.price_book_id)
        return accounts.create_org(session=session, **body.model_dump())

    return json_response(201, _org_object(await in_session(services, scope, create)))


@router.get("/organizations")
async def list_organizations(scope: ScopeDep, services: ServicesDep) -> Response:
    """Lists the organizations this key may see (its own, or all for an operator)."""
    orgs = await in_session(services, scope, lambda s: accounts.list_orgs(session=s,
                                                                   org_id=scope.org_id))
    return json_response(200, {"object": "list", "data": [_org_object(o) for o in orgs]})


@router.get("/organizations/{org_id}")
async def get_organization(org_id: RowId, scope: ScopeDep, services: ServicesDep) -> Response:
    org = await in_session(services, scope, lambda s: _visible_org(s, scope, org_id))
    return json_response(200, _org_object(org))


@router.patch("/organizations/{org_id}")
async def update_organization(org_id: RowId, body: OrgUpdate, scope: ScopeDep,
                              services: ServicesDep) -> Response:
    """Renames, disables, or changes an organization's plan, price book or limits (platform
    operators only); `null` clears a plan, price book or limit."""
    scope.see(org_id, f"organization {org_id}")
    scope.operate("change an organization's plan, prices or limits")
    fields = _set_fields(body)

    def update(session: Session) -> OrgInfo:
        _check_links(session, fields.get("plan_id"), fields.get("price_book_id"))
        return accounts.update_org(session=session, org_id=org_id, **fields)

    return json_response(200, _org_object(await in_session(services, scope, update)))


# -- balances and redemption codes ------------------------------------------------------------


Micros = Annotated[int, Field(ge=0, le=invoices.MAX_MONEY_MICROS)]  # an amount or a price


class BalanceChange(_Strict):
    amount_micros: int = Field(ge=-invoices.MAX_MONEY_MICROS, le=invoices.MAX_MONEY_MICROS,
                               description="Micro-units to add (top-up) or, if negative, take.")
    reason: Annotated[str, Field(min_length=1, max_length=500)]
    kind: Literal["topup", "adjustment"] = "topup"


@router.get("/organizations/{org_id}/balance")
async def get_balance(org_id: RowId, scope: ScopeDep, services: ServicesDep) -> Response:
    """The balance, what running requests hold of it, and its latest entries."""

    def read(session: Session) -> dict[str, Any]:
        org = _visible_org(session, scope, org_id)
        held = int(session.scalar(select(func.coalesce(func.sum(Reservation.amount_micros), 0))
                                  .where(Reservation.org_id == org_id)) or 0)
        entries = accounts.balance_entries(session=session, org_id=org_id)
        return {"object": "balance", "org_id": org.id, "balance_micros": org.balance_micros,
                "held_micros": held, "available_micros": max(org.balance_micros - held, 0),
                "entries": [{"id": e.id, "amount_micros": e.amount_micros, "kind": e.kind,
                             "reason": e.reason, "created_at": _time(e.created_at)}
                            for e in entries]}

    return json_response(200, await in_session(services, scope, read))


@router.get("/organizations/{org_id}/windows")
async def get_windows(org_id: RowId, scope: ScopeDep, services: ServicesDep) -> Response:
    """The organization's plan windows now: each one's limit, what is used (including running
    requests), what remains, and when the oldest counted request leaves it."""
    await services.gateway.ledger.flush()

    def read(session: Session) -> dict[str, Any]:
        org = _visible_org(session, scope, org_id)
        plan = plans.find_plan(session=session, ref=org.plan_id) if org.plan_id else None
        windows = [plans.Window.parse(raw) for raw in (plan.windows if plan else [])]
        states = quota.window_states(session=session, org_id=org.id, windows=windows)
        return {"object": "list", "org_id": org.id,
                "plan": None if plan is None else {"id": plan.id, "name": plan.name},
                "data": [state.as_dict() for state in states]}

    return json_response(200, await in_session(services, scope, read))


@router.post("/organizations/{org_id}/balance")
async def change_balance(org_id: RowId, body: BalanceChange, scope: ScopeDep,
                         services: ServicesDep) -> Response:
    """Tops up or adjusts a balance with a reason (platform operators only)."""
    scope.see(org_id, f"organization {org_id}")
    scope.operate("change a balance")
    if body.kind == "topup" and body.amount_micros <= 0:
        raise InvalidRequest("A top-up adds money: amount_micros > 0. Use kind 'adjustment' "
                             "to take some.", param="amount_micros")

    def change(session: Session) -> OrgInfo:
        return accounts.adjust_balance(session=session, org_id=org_id,
                                       amount_micros=body.amount_micros, kind=body.kind,
                                       reason=body.reason)

    return json_response(200, _org_object(await in_session(services, scope, change)))


class Redemption(_Strict):
    code: Annotated[str, Field(min_length=1, max_length=100)]


@router.post("/organizations/{org_id}/redeem")
async def redeem(org_id: RowId, body: Redemption, scope: ScopeDep,
                 services: ServicesDep) -> Response:
    """Redeems a code into the organization's balance (owner or admin of it)."""
    scope.change(org_id, f"organization {org_id}")
    org = await in_session(services, scope, lambda s: accounts.redeem_code(session=s, org_id=org_id,
                                                                    code=body.code))
    return json_response(200, _org_object(org))


class CodeBatch(_Strict):
    count: Annotated[int, Field(ge=1, le=accounts.MAX_CODES_PER_BATCH)]
    amount_micros: Annotated[Micros, Field(gt=0)]
    batch: Annotated[str, Field(min_length=1, max_length=100)]
    expires_at: Moment | None = None


def _code_object(code: CodeInfo) -> dict[str, Any]:
    return {"id": code.id, "object": "redemption_code", "prefix": code.prefix,
            "batch": code.batch, "amount_micros": code.amount_micros,
            "expires_at": _time(code.expires_at), "disabled": code.disabled,
            "redeemed_by_org_id": code.redeemed_by_org_id, "redeemed_at": _time(code.redeemed_at)}


@router.post("/redemption_codes", status_code=201)
async def generate_codes(body: CodeBatch, scope: ScopeDep, services: ServicesDep) -> Response:
    """Generates a batch of codes; the response is the only time the codes are shown."""
    scope.operate("generate redemption codes")
    minted = await in_session(services, scope, lambda s: accounts.generate_codes(
        session=s, count=body.count, amount_micros=body.amount_micros, batch=body.batch,
        expires_at=body.expires_at))
    return json_response(201, {"object": "list", "data": [
        {**_code_object(info), "code": code} for info, code in minted]})


@router.get("/redemption_codes")
async def list_codes(scope: ScopeDep, services: ServicesDep,
                     batch: str | None = None) -> Response:
    """Lists codes (prefixes only), optionally of one batch."""
    scope.operate("list redemption codes")
    codes = await in_session(services, scope, lambda s: accounts.list_codes(session=s, batch=batch))
    return json_response(200, {"object": "list", "data": [_code_object(c) for c in codes]})


class CodeDisable(_Strict):
    batch: Annotated[str, Field(min_length=1, max_length=100)]


@router.post("/redemption_codes/disable")
async def disable_codes(body: CodeDisable, scope: ScopeDep, services: ServicesDep) -> Response:
    """Disables the codes of a batch not yet redeemed."""
    scope.operate("disable redemption codes")
    count = await in_session(services, scope, lambda s: accounts.disable_codes(session=s,
                                                                        batch=body.batch))
    return json_response(200, {"object": "redemption_code_batch", "batch": body.batch,
                               "disabled": count})


# -- keys -------------------------------------------------------------------------------------


class KeyCreate(_Strict):
    name: Name
    # Kept for old callers: an admin key with no role and no org is a platform operator.
    admin: bool = False
    org_id: RowId | None = None
    role: Literal["operator", "owner", "admin", "viewer"] | None = None
    allowed_models: list[str] | None = None
    allowed_cidrs: list[str] | None = None
    expires_at: Moment | None = None
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None


class KeyUpdate(_Strict):
    name: Name | None = None
    allowed_models: list[str] | None = None
    allowed_cidrs: list[str] | None = None
    expires_at: Moment | None = None
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    retention: retention_policy.Policy | None = Field(
        None, description="A retention stricter than the organization's; null follows the "
        "organization's.")
    retention_days: Annotated[int, Field(ge=1, le=MAX_RETENTION_DAYS)] | None = None


def _key_object(key: KeyInfo) -> dict[str, Any]:
    return {"id": key.id, "object": "api_key", "name": key.name, "prefix": key.prefix,
            "admin": key.is_admin, "role": key.role, "org_id": key.org_id,
            "allowed_models": key.allowed_models, "allowed_cidrs": key.allowed_cidrs,
            "expires_at": _time(key.expires_at), "rpm": key.rpm, "tpm": key.tpm,
            "retention": None if key.retention is None else key.retention.policy,
            "retention_days": None if key.retention is None else key.retention.days,
            "created_at": _time(key.created_at), "revoked_at": _time(key.revoked_at)}


# Which roles each role may hand out inside its organization (None: a model key), in the order
# the console offers them; an operator may hand out what an owner may. A key manages (changes,
# revokes) only the keys of roles it may hand out: an admin never reaches an owner's key,
# another admin's, or its own limits.
GRANTS: dict[str, tuple[str | None, ...]] = {"owner": (None, "viewer", "admin", "owner"),
                                             "admin": (None, "viewer")}
GRANTS["operator"] = GRANTS["owner"]


def _a(role: str | None) -> str:
    kind = role or "model"
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


class BeyondGrant(PermissionDenied):
    """A key acting on a key of a role it may not hand out (see GRANTS). `in_session` records
    the refusal in the audit log as `key.refused`."""

    def __init__(self, message: str, *, scope: AdminScope, attempted: str, role: str | None,
                 target: str, org_id: int | None) -> None:
        super().__init__(message, param="role")
        self.entry: dict[str, Any] = {
            "action": "key.refused", "actor": scope.actor, "target": target, "org_id": org_id,
            "details": {"attempted": attempted, "role": role or "model",
                        "by_role": scope.key.role, "reason": message}}


def _check_grant(scope: AdminScope, role: str | None, *, attempted: str, target: str,
                 org_id: int | None, key: KeyInfo | None = None) -> None:
    """Refuse creating (`key` None), changing or revoking `key` when its role is not one
    the scope's key may hand out. A key may always revoke itself: that gives up access."""
    if scope.operator or role in GRANTS.get(scope.key.role or "", ()):
        return
    if key is not None and key.id == scope.key.id and attempted == "revoke":
        return
    by = scope.key.role or "model"
    kinds = " and ".join(r or "model" for r in GRANTS.get(by, ())) or "no"
    if key is None:
        message = (f"A key with role {by} may create {kinds} keys only, not {_a(role)} key. "
                   "Ask an owner of your organization to create it.")
    elif key.id == scope.key.id:
        message = (f"A key with role {by} manages {kinds} keys only: it cannot change its own "
                   "name or limits. Ask an owner of your organization to change it.")
    else:
        message = (f"A key with role {by} manages {kinds} keys only; {key.shown} is {_a(role)} "
                   f"key. Ask an owner of your organization to {attempted} it.")
    raise BeyondGrant(message, scope=scope, attempted=attempted, role=role, target=target,
                      org_id=org_id)


@router.post("/keys", status_code=201)
async def create_key(body: KeyCreate, scope: ScopeDep, services: ServicesDep) -> Response:
    """Creates a key; the response is the only time its secret is shown. Without org_id, an
    organization's admin creates it in their organization; an operator in the default one.
    An organization's key creates only the roles it may hand out (an admin: model and viewer
    keys); a refusal is a 403 and a `key.refused` entry in the audit log."""
    org_id = body.org_id if body.org_id is not None else scope.org_id
    role = body.role
    if scope.operator:
        if body.admin and role is None and body.org_id is None:
            role = "operator"
    else:
        scope.change(org_id, f"organization {org_id}")
        if body.admin and role is None:
            role = "admin"

    def create(session: Session) -> tuple[KeyInfo, str]:
        if org_id is not None:
            _visible_org(session, scope, org_id)
        _check_grant(scope, role, attempted="create", target=f"org:{org_id}", org_id=org_id)
        return accounts.create_key(session=session, name=body.name, is_admin=role is not None,
                                   org_id=org_id, role=role, allowed_models=body.allowed_models,
                                   allowed_cidrs=body.allowed_cidrs, expires_at=body.expires_at,
                                   rpm=body.rpm, tpm=body.tpm)

    key, secret = await in_session(services, scope, create)
    return json_response(201, {**_key_object(key), "secret": secret})


@router.get("/keys")
async def list_keys(scope: ScopeDep, services: ServicesDep,
                    org_id: RowId | None = None) -> Response:
    """Lists keys (prefixes only, never secrets) of this key's organization, or of `org_id`."""
    if org_id is not None:
        scope.see(org_id, f"organization {org_id}")
    wanted = org_id if org_id is not None else scope.org_id
    keys = await in_session(services, scope, lambda s: accounts.list_keys(session=s, org_id=wanted))
    return json_response(200, {"object": "list", "data": [_key_object(k) for k in keys]})


def _managed_key(session: Session, scope: AdminScope, ref: str, *,
                 attempted: Literal["change", "revoke"]) -> KeyInfo:
    """The key `ref` names, once the scope may `attempted` it: in its organization, not a
    viewer, and of a role it may hand out."""
    try:
        key = accounts.key_info(accounts.find_key(session=session, ref=ref))
    except NotFound:
        raise NotFound("No API key with that id or prefix.", param="key") from None
    scope.change(key.org_id, "API key with that id or prefix")
    _check_grant(scope, key.role, attempted=attempted, target=f"key:{key.shown}",
                 org_id=key.org_id, key=key)
    return key


@router.patch("/keys/{ref}")
async def update_key(ref: str, body: KeyUpdate, scope: ScopeDep,
                     services: ServicesDep) -> Response:
    """Renames a key or changes its limits; `null` lifts a limit. An organization's admin
    changes model and viewer keys only: not an owner's, another admin's, or its own."""
    fields = _set_fields(body)

    def update(session: Session) -> KeyInfo:
        _managed_key(session, scope, ref, attempted="change")
        return accounts.update_key(session=session, ref=ref, **fields)

    return json_response(200, _key_object(await in_session(services, scope, update)))


@router.delete("/keys/{ref}")
async def revoke_key(ref: str, scope: ScopeDep, services: ServicesDep) -> Response:
    """Revokes a key by id or prefix; requests with it fail from now on. An organization's
    admin revokes model and viewer keys, and its own; not an owner's or another admin's."""

    def revoke(session: Session) -> KeyInfo:
        _managed_key(session, scope, ref, attempted="revoke")
        return accounts.revoke_key(session=session, ref=ref)

    return json_response(200, _key_object(await in_session(services, scope, revoke)))


# -- plans and price books (the platform's catalogue) -----------------------------------------


# A per-model multiplier (1.0 = 1x), and a price ratio or a peak period's multiplier in
# thousandths (1000 = 1x).
Multiplier = Annotated[float, Field(ge=0, le=MAX_MULTIPLIER)]
MilliMultiplier = Annotated[int, Field(ge=0, le=MAX_MULTIPLIER * plans.MILLI)]


class WindowBody(_Strict):
    metric: Literal["requests", "tokens", "credits"]
    # A credits window's limit is an amount; so many requests or tokens is no limit at all.
    limit: Annotated[int, Field(ge=0, le=invoices.MAX_MONEY_MICROS)]
    seconds: PositiveInt


class PlanCreate(_Strict):
    name: Name
    windows: list[WindowBody] = []
    model_multipliers: dict[str, Multiplier] = {}
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    max_concurrency: PositiveInt | None = None
    draws_balance: bool = True
    price_ratio_milli: MilliMultiplier = plans.MILLI


class PlanUpdate(_Strict):
    name: Name | None = None
    windows: list[WindowBody] | None = None
    model_multipliers: dict[str, Multiplier] | None = None
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    max_concurrency: PositiveInt | None = None
    draws_balance: bool | None = None
    price_ratio_milli: MilliMultiplier | None = None
    disabled: bool | None = None


def _plan_object(plan: Plan) -> dict[str, Any]:
    return {"id": plan.id, "object": "plan", "name": plan.name, "windows": plan.windows,
            "model_multipliers": plan.model_multipliers, "rpm": plan.rpm, "tpm": plan.tpm,
            "max_concurrency": plan.max_concurrency, "draws_balance": plan.draws_balance,
            "price_ratio_milli": plan.price_ratio_milli, "disabled": plan.disabled}


def _own_org_uses(session: Session, scope: AdminScope, *, plan_id: int | None = None,
                  price_book_id: int | None = None) -> bool:
    """An organization's admins may read the plan and price book their organization is on."""
    if scope.operator:
        return True
    if scope.org_id is None:
        return False
    org = accounts.find_org(session=session, ref=scope.org_id)
    return (plan_id is not None and org.plan_id == plan_id) or (
        price_book_id is not None and org.price_book_id == price_book_id)


@router.post("/plans", status_code=201)
async def create_plan(body: PlanCreate, scope: ScopeDep, services: ServicesDep) -> Response:
    scope.operate("create plans")
    fields = body.model_dump()
    plan = await in_session(services, scope, lambda s: plans.create_plan(session=s, **fields))
    return json_response(201, _plan_object(plan))


@router.get("/plans")
async def list_plans(scope: ScopeDep, services: ServicesDep) -> Response:
    scope.operate("list every plan")
    rows = await in_session(services, scope, lambda s: plans.list_plans(session=s))
    return json_response(200, {"object": "list", "data": [_plan_object(p) for p in rows]})


@router.get("/plans/{plan_id}")
async def get_plan(plan_id: RowId, scope: ScopeDep, services: ServicesDep) -> Response:
    def read(session: Session) -> Plan:
        if not _own_org_uses(session, scope, plan_id=plan_id):
            raise NotFound(f"No plan {plan_id}.", param="plan")
        return plans.find_plan(session=session, ref=plan_id)

    return json_response(200, _plan_object(await in_session(services, scope, read)))


@router.patch("/plans/{plan_id}")
async def update_plan(plan_id: RowId, body: PlanUpdate, scope: ScopeDep,
                      services: ServicesDep) -> Response:
    scope.operate("change plans")
    fields = body.model_dump(include=body.model_fields_set)
    plan = await in_session(services, scope, lambda s: plans.update_plan(session=s, plan_id=plan_id,
                                                                  **fields))
    return json_response(200, _plan_object(plan))


class PeakPeriod(_Strict):
    start_hour: Annotated[int, Field(ge=0, le=23)]
    end_hour: Annotated[int, Field(ge=0, le=24)]
    multiplier_milli: MilliMultiplier


class PriceBookCreate(_Strict):
    name: Name
    currency: str = "USD"
    peak_hours: list[PeakPeriod] = []


class PriceBookUpdate(_Strict):
    name: Name | None = None
    currency: str | None = None
    peak_hours: list[PeakPeriod] | None = None


class PriceSet(_Strict):
    model: Name
    input_micros: Annotated[Micros, Field(description="Per million input tokens.")]
    output_micros: Annotated[Micros, Field(description="Per million output tokens.")]
    cached_input_micros: Micros | None = None


def _book_object(session: Session, book: PriceBook) -> dict[str, Any]:
    return {"id": book.id, "object": "price_book", "name": book.name, "currency": book.currency,
            "peak_hours": book.peak_hours,
            "prices": [{"model": p.model, "input_micros": p.input_micros,
                        "cached_input_micros": p.cached_input_micros,
                        "output_micros": p.output_micros}
                       for p in plans.prices(session=session, price_book_id=book.id)]}


@router.post("/price_books", status_code=201)
async def create_price_book(body: PriceBookCreate, scope: ScopeDep,
                            services: ServicesDep) -> Response:
    scope.operate("create price books")
    fields = body.model_dump()
    book = await in_session(services, scope, lambda s: _book_object(
        s, plans.create_price_book(session=s, **fields)))
    return json_response(201, book)


@router.get("/price_books")
async def list_price_books(scope: ScopeDep, services: ServicesDep) -> Response:
    scope.operate("list every price book")
    books = await in_session(services, scope, lambda s: [
        _book_object(s, b) for b in plans.list_price_books(session=s)])
    return json_response(200, {"object": "list", "data": books})


@router.get("/price_books/{book_id}")
async def get_price_book(book_id: RowId, scope: ScopeDep, services: ServicesDep) -> Response:
    def read(session: Session) -> dict[str, Any]:
        if not _own_org_uses(session, scope, price_book_id=book_id):
            raise NotFound(f"No price book {book_id}.", param="price_book")
        return _book_object(session, plans.find_price_book(session=session, ref=book_id))

    return json_response(200, await in_session(services, scope, read))


@router.patch("/price_books/{book_id}")
async def update_price_book(book_id: RowId, body: PriceBookUpdate, scope: ScopeDep,
                            services: ServicesDep) -> Response:
    scope.operate("change price books")
    fields = body.model_dump(include=body.model_fields_set)
    book = await in_session(services, scope, lambda s: _book_object(
        s, plans.update_price_book(session=s, price_book_id=book_id, **fields)))
    return json_response(200, book)


@router.put("/price_books/{book_id}/prices")
async def set_price(book_id: RowId, body: PriceSet, scope: ScopeDep,
                    services: ServicesDep) -> Response:
    """Sets one model's prices (per million tokens, in micro-units of the book's currency)."""
    scope.operate("set prices")

    def put(session: Session) -> dict[str, Any]:
        book = plans.find_price_book(session=session, ref=book_id)
        plans.set_price(session=session, price_book_id=book.id, **body.model_dump())
        return _book_object(session, book)

    return json_response(200, await in_session(services, scope, put))


@router.delete("/price_books/{book_id}/prices")
async def remove_price(book_id: RowId, scope: ScopeDep, services: ServicesDep,
                       model: Annotated[str, Query(min_length=1)]) -> Response:
    """Removes a model's prices: requests for it are free under this book from now on."""
    scope.operate("remove prices")

    def remove(session: Session) -> dict[str, Any]:
        book = plans.find_price_book(session=session, ref=book_id)
        plans.remove_price(session=session, price_book_id=book.id, model=model)
        return _book_object(session, book)

    return json_response(200, await in_session(services, scope, remove))


# -- usage and invoices -----------------------------------------------------------------------


def usage_object(lines: list[invoices.UsageLine], org_id: int) -> Response:
    return json_response(200, {"object": "list", "org_id": org_id,
            "data": [{"date": line.period, "model": line.model, "requests": line.requests,
                      "input_tokens": line.input_tokens,
                      "cached_input_tokens": line.cached_input_tokens,
                      "output_tokens": line.output_tokens, "cost_micros": line.cost_micros,
                      "charged_micros": line.charged_micros} for line in lines]})


def invoice_response(invoice: invoices.Invoice, format: str) -> Response:
    if format == "csv":
        return Response(invoice.as_csv(), media_type="text/csv", headers={
            "content-disposition":
                f'attachment; filename="invoice-{invoice.org_id}-{invoice.month}.csv"'})
    return json_response(200, invoice.as_dict())


@router.get("/organizations/{org_id}/usage")
async def organization_usage(org_id: RowId, scope: ScopeDep, services: ServicesDep,
                             start_date: DateParam = None,
                             end_date: DateParam = None) -> Response:
    """Usage by day and model (UTC days; the last 30 by default)."""
    start, end = invoices.date_range(start_date, end_date)
    await services.gateway.ledger.flush()

    def read(session: Session) -> list[invoices.UsageLine]:
        _visible_org(session, scope, org_id)
        return invoices.daily_usage(session=session, org_id=org_id, start=start, end=end)

    return usage_object(await in_session(services, scope, read), org_id)


@router.get("/organizations/{org_id}/invoices/{month}")
async def organization_invoice(org_id: RowId, month: str, scope: ScopeDep, services: ServicesDep,
                               format: Literal["json", "csv"] = "json") -> Response:
    """The invoice of one month (YYYY-MM, UTC) as JSON or CSV."""
    await services.gateway.ledger.flush()

    def read(session: Session) -> invoices.Invoice:
        _visible_org(session, scope, org_id)
        return invoices.invoice(session=session, org_id=org_id, month=month)

    return invoice_response(await in_session(services, scope, read), format)


# -- deployments ------------------------------------------------------------------------------


def _deployment_object(deployment: Deployment, *, draining: bool = False) -> dict[str, Any]:
    """What an operator sees of a deployment. Deliberately no base_url nor anything read from
    the upstream's settings beyond routing: nothing here can carry an API key."""
    probe = deployment.probe
    return {"id": deployment.id, "object": "deployment", "model": deployment.engine.model.name,
            "aliases": list(deployment.aliases), "kind": deployment.kind,
            "region": deployment.region, "weight": deployment.weight,
            "max_concurrency": deployment.max_concurrency,
            "outstanding": deployment.outstanding, "draining": draining,
            "health": {"circuit": deployment.circuit,
                       "consecutive_failures": deployment.failures,
                       "last_probe": None if probe is None else {
                           "ok": probe.ok, "detail": probe.detail,
                           "at": datetime.fromtimestamp(probe.at, UTC).isoformat()}}}


@router.get("/deployments")
async def list_deployments(scope: ScopeDep, services: ServicesDep) -> Response:
    """Lists the deployments with their load and health, then removed ones still finishing
    their requests (platform operators only)."""
    scope.operate("list deployments")
    fleet = services.fleet
    data = [_deployment_object(d) for d in services.gateway.router.all()]
    data += [_deployment_object(d, draining=True) for d in (fleet.draining if fleet else ())]
    return json_response(200, {"object": "list", "data": data})


@router.post("/deployments/reload")
async def reload_deployments(scope: ScopeDep, services: ServicesDep) -> Response:
    """Re-reads serai.toml and the SERAI_* variables and applies the deployments they declare:
    new ones are added, removed ones drained, changed ones replaced. An invalid configuration
    changes nothing and answers 400 (platform operators only)."""
    scope.operate("reload deployments")
    if services.fleet is None:
        raise InvalidRequest("This server has no declared deployments to reload.")
    changes = await services.fleet.reload()
    await asyncio.to_thread(audit.record_alone, services.database, action="deployments.reload",
                            actor=scope.actor, target="deployments", details=changes.as_dict())
    return json_response(200, {"object": "deployment_reload", **changes.as_dict()})


@router.get("/traffic")
async def platform_traffic(scope: ScopeDep, services: ServicesDep) -> Response:
    """The whole platform's traffic from the usage ledger (so every gateway's requests count):
    requests, output tokens and the error rate over the last minute and the last 5 minutes,
    and each of the last 60 minutes' counts (platform operators only)."""
    scope.operate("read the platform's traffic")
    await services.gateway.ledger.flush()
    found = await in_session(services, None, lambda s: traffic.traffic(session=s))
    return json_response(200, {
        "object": "traffic",
        "now": iso_from_ms(found.now_ms),
        "windows": [rates.as_dict() for rates in found.rates],
        "minutes": [minute.as_dict() for minute in found.minutes]})


# -- audit log --------------------------------------------------------------------------------


@router.get("/audit")
async def list_audit(scope: ScopeDep, services: ServicesDep,
                     org_id: RowId | None = None,
                     after: Annotated[RowId | None, Query(
                         description="An entry id: list the entries older than it (the "
                         "previous page's last_id).")] = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Response:
    """Audit entries, newest first: all of them for an operator, only its organization's for
    an organization's admin. Page with `after` = the previous page's `last_id`."""
    if org_id is not None:
        scope.see(org_id, f"organization {org_id}")
    wanted = org_id if org_id is not None else scope.org_id
    page, has_more = await in_session(services, scope, lambda s: audit.entries(
        session=s, org_id=wanted, after=after, limit=limit))
    return json_response(200, {"object": "list", "data": page, "has_more": has_more,
                               "first_id": page[0]["id"] if page else None,
                               "last_id": page[-1]["id"] if page else None})
