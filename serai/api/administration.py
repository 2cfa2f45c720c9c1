"""What an admin key may do, written once for the admin API (/admin/v1) and the console: each
function takes the key's AdminScope, refuses what its role does not allow, runs the change in a
session the audit log records as the key's, and returns typed results that each surface renders
its own way (JSON, pages).

Who may do what is decided by the key's role (see `AdminScope`): a platform operator manages
everything; an organization's owner manages its keys, its admin only model and viewer keys
(GRANTS), both redeem codes; a viewer reads. Another organization's objects answer 404, exactly
like objects that do not exist. The request models below are what both surfaces accept: they
forbid unknown fields, so a typo in an admin call fails loudly instead of being ignored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from serai.api.bounds import MAX_MULTIPLIER, Moment, PositiveInt, RowId
from serai.api.deps import AdminScope, Services
from serai.billing import invoices, plans, quota
from serai.engines.router import Deployment, Probe
from serai.errors import InvalidRequest, NotFound, PermissionDenied
from serai.fleet import Changes
from serai.governance import accounts, audit
from serai.governance import retention as retention_policy
from serai.governance.accounts import BalanceEntryInfo, CodeInfo, KeyInfo, OrgInfo
from serai.governance.retention import MAX_DAYS as MAX_RETENTION_DAYS
from serai.observability import traffic
from serai.storage.tables import Plan, Price, PriceBook, Reservation

T = TypeVar("T")

Name = Annotated[str, Field(min_length=1, max_length=200)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


async def in_session(services: Services, scope: AdminScope | None,
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


async def create_organization(*, services: Services, scope: AdminScope,
                              new: OrgCreate) -> OrgInfo:
    """Creates an organization (platform operators only)."""
    scope.operate("create organizations")

    def create(session: Session) -> OrgInfo:
        _check_links(session, new.plan_id, new.price_book_id)
        return accounts.create_org(session=session, **new.model_dump())

    return await in_session(services, scope, create)


async def list_organizations(*, services: Services, scope: AdminScope) -> list[OrgInfo]:
    """The organizations this key may see (its own, or all for an operator)."""
    return await in_session(services, scope, lambda s: accounts.list_orgs(session=s,
                                                                          org_id=scope.org_id))


async def get_organization(*, services: Services, scope: AdminScope, org_id: int) -> OrgInfo:
    return await in_session(services, scope, lambda s: _visible_org(s, scope, org_id))


async def update_organization(*, services: Services, scope: AdminScope, org_id: int,
                              changes: OrgUpdate) -> OrgInfo:
    """Renames, disables, or changes an organization's plan, price book or limits (platform
    operators only); `None` clears a plan, price book or limit."""
    scope.see(org_id, f"organization {org_id}")
    scope.operate("change an organization's plan, prices or limits")
    fields = _set_fields(changes)

    def update(session: Session) -> OrgInfo:
        _check_links(session, fields.get("plan_id"), fields.get("price_book_id"))
        return accounts.update_org(session=session, org_id=org_id, **fields)

    return await in_session(services, scope, update)


# -- balances and redemption codes ------------------------------------------------------------


Micros = Annotated[int, Field(ge=0, le=invoices.MAX_MONEY_MICROS)]  # an amount or a price


class BalanceChange(_Strict):
    amount_micros: int = Field(ge=-invoices.MAX_MONEY_MICROS, le=invoices.MAX_MONEY_MICROS,
                               description="Micro-units to add (top-up) or, if negative, take.")
    reason: Annotated[str, Field(min_length=1, max_length=500)]
    kind: Literal["topup", "adjustment"] = "topup"


@dataclass(frozen=True, slots=True)
class Balance:
    """An organization's balance, what its running requests hold of it, and its latest
    entries (newest first)."""

    org_id: int
    balance_micros: int
    held_micros: int
    entries: list[BalanceEntryInfo]

    @property
    def available_micros(self) -> int:
        return max(self.balance_micros - self.held_micros, 0)


async def get_balance(*, services: Services, scope: AdminScope, org_id: int) -> Balance:
    def read(session: Session) -> Balance:
        org = _visible_org(session, scope, org_id)
        held = int(session.scalar(select(func.coalesce(func.sum(Reservation.amount_micros), 0))
                                  .where(Reservation.org_id == org_id)) or 0)
        entries = accounts.balance_entries(session=session, org_id=org_id)
        return Balance(org.id, org.balance_micros, held, entries)

    return await in_session(services, scope, read)


@dataclass(frozen=True, slots=True)
class PlanWindows:
    """An organization's plan (None: it has none) and where it stands in each of its windows."""

    org_id: int
    plan: Plan | None
    windows: list[quota.WindowState]


async def get_windows(*, services: Services, scope: AdminScope, org_id: int) -> PlanWindows:
    """The organization's plan windows now: each one's limit, what is used (including running
    requests), what remains, and when the oldest counted request leaves it."""
    await services.gateway.ledger.flush()

    def read(session: Session) -> PlanWindows:
        org = _visible_org(session, scope, org_id)
        plan = plans.find_plan(session=session, ref=org.plan_id) if org.plan_id else None
        windows = [plans.Window.parse(raw) for raw in (plan.windows if plan else [])]
        return PlanWindows(org.id, plan, quota.window_states(session=session, org_id=org.id,
                                                              windows=windows))

    return await in_session(services, scope, read)


async def change_balance(*, services: Services, scope: AdminScope, org_id: int,
                         change: BalanceChange) -> OrgInfo:
    """Tops up or adjusts a balance with a reason (platform operators only)."""
    scope.see(org_id, f"organization {org_id}")
    scope.operate("change a balance")
    if change.kind == "topup" and change.amount_micros <= 0:
        raise InvalidRequest("A top-up adds money: amount_micros > 0. Use kind 'adjustment' "
                             "to take some.", param="amount_micros")

    def adjust(session: Session) -> OrgInfo:
        return accounts.adjust_balance(session=session, org_id=org_id,
                                       amount_micros=change.amount_micros, kind=change.kind,
                                       reason=change.reason)

    return await in_session(services, scope, adjust)


class Redemption(_Strict):
    code: Annotated[str, Field(min_length=1, max_length=100)]


async def redeem(*, services: Services, scope: AdminScope, org_id: int, code: str) -> OrgInfo:
    """Redeems a code into the organization's balance (owner or admin of it)."""
    scope.change(org_id, f"organization {org_id}")
    return await in_session(services, scope, lambda s: accounts.redeem_code(
        session=s, org_id=org_id, code=code))


class CodeBatch(_Strict):
    count: Annotated[int, Field(ge=1, le=accounts.MAX_CODES_PER_BATCH)]
    amount_micros: Annotated[Micros, Field(gt=0)]
    batch: Annotated[str, Field(min_length=1, max_length=100)]
    expires_at: Moment | None = None


async def generate_codes(*, services: Services, scope: AdminScope,
                         batch: CodeBatch) -> list[tuple[CodeInfo, str]]:
    """A batch of codes, each with the code itself: the only time it is shown."""
    scope.operate("generate redemption codes")
    return await in_session(services, scope, lambda s: accounts.generate_codes(
        session=s, count=batch.count, amount_micros=batch.amount_micros, batch=batch.batch,
        expires_at=batch.expires_at))


async def list_codes(*, services: Services, scope: AdminScope,
                     batch: str | None) -> list[CodeInfo]:
    """Codes (prefixes only), optionally of one batch."""
    scope.operate("list redemption codes")
    return await in_session(services, scope, lambda s: accounts.list_codes(session=s,
                                                                           batch=batch))


class CodeDisable(_Strict):
    batch: Annotated[str, Field(min_length=1, max_length=100)]


async def disable_codes(*, services: Services, scope: AdminScope, batch: str) -> int:
    """Disables the codes of a batch not yet redeemed; returns how many."""
    scope.operate("disable redemption codes")
    return await in_session(services, scope, lambda s: accounts.disable_codes(session=s,
                                                                              batch=batch))


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


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just created, with its secret: the only time the secret is shown."""

    key: KeyInfo
    secret: str


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


async def create_key(*, services: Services, scope: AdminScope, new: KeyCreate) -> NewKey:
    """Creates a key. Without org_id, an organization's admin creates it in their
    organization; an operator in the default one. An organization's key creates only the roles
    it may hand out (an admin: model and viewer keys); a refusal is a PermissionDenied and a
    `key.refused` entry in the audit log."""
    org_id = new.org_id if new.org_id is not None else scope.org_id
    role = new.role
    if scope.operator:
        if new.admin and role is None and new.org_id is None:
            role = "operator"
    else:
        scope.change(org_id, f"organization {org_id}")
        if new.admin and role is None:
            role = "admin"

    def create(session: Session) -> NewKey:
        if org_id is not None:
            _visible_org(session, scope, org_id)
        _check_grant(scope, role, attempted="create", target=f"org:{org_id}", org_id=org_id)
        return NewKey(*accounts.create_key(
            session=session, name=new.name, is_admin=role is not None, org_id=org_id, role=role,
            allowed_models=new.allowed_models, allowed_cidrs=new.allowed_cidrs,
            expires_at=new.expires_at, rpm=new.rpm, tpm=new.tpm))

    return await in_session(services, scope, create)


async def list_keys(*, services: Services, scope: AdminScope,
                    org_id: int | None) -> list[KeyInfo]:
    """Keys (prefixes only, never secrets) of this key's organization, or of `org_id`."""
    if org_id is not None:
        scope.see(org_id, f"organization {org_id}")
    wanted = org_id if org_id is not None else scope.org_id
    return await in_session(services, scope, lambda s: accounts.list_keys(session=s,
                                                                          org_id=wanted))


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


async def update_key(*, services: Services, scope: AdminScope, ref: str,
                     changes: KeyUpdate) -> KeyInfo:
    """Renames a key or changes its limits; `None` lifts a limit. An organization's admin
    changes model and viewer keys only: not an owner's, another admin's, or its own."""
    fields = _set_fields(changes)

    def update(session: Session) -> KeyInfo:
        _managed_key(session, scope, ref, attempted="change")
        return accounts.update_key(session=session, ref=ref, **fields)

    return await in_session(services, scope, update)


async def revoke_key(*, services: Services, scope: AdminScope, ref: str) -> KeyInfo:
    """Revokes a key by id or prefix. An organization's admin revokes model and viewer keys,
    and its own; not an owner's or another admin's."""

    def revoke(session: Session) -> KeyInfo:
        _managed_key(session, scope, ref, attempted="revoke")
        return accounts.revoke_key(session=session, ref=ref)

    return await in_session(services, scope, revoke)


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


async def create_plan(*, services: Services, scope: AdminScope, new: PlanCreate) -> Plan:
    scope.operate("create plans")
    fields = new.model_dump()
    return await in_session(services, scope, lambda s: plans.create_plan(session=s, **fields))


async def list_plans(*, services: Services, scope: AdminScope) -> list[Plan]:
    scope.operate("list every plan")
    return await in_session(services, scope, lambda s: plans.list_plans(session=s))


async def get_plan(*, services: Services, scope: AdminScope, plan_id: int) -> Plan:
    def read(session: Session) -> Plan:
        if not _own_org_uses(session, scope, plan_id=plan_id):
            raise NotFound(f"No plan {plan_id}.", param="plan")
        return plans.find_plan(session=session, ref=plan_id)

    return await in_session(services, scope, read)


async def update_plan(*, services: Services, scope: AdminScope, plan_id: int,
                      changes: PlanUpdate) -> Plan:
    scope.operate("change plans")
    fields = changes.model_dump(include=changes.model_fields_set)
    return await in_session(services, scope, lambda s: plans.update_plan(
        session=s, plan_id=plan_id, **fields))


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


@dataclass(frozen=True, slots=True)
class PricedBook:
    """A price book with its models' prices."""

    id: int
    name: str
    currency: str
    peak_hours: list[dict[str, int]]
    prices: list[Price]


def _priced(session: Session, book: PriceBook) -> PricedBook:
    return PricedBook(book.id, book.name, book.currency, book.peak_hours,
                      plans.prices(session=session, price_book_id=book.id))


async def create_price_book(*, services: Services, scope: AdminScope,
                            new: PriceBookCreate) -> PricedBook:
    scope.operate("create price books")
    fields = new.model_dump()
    return await in_session(services, scope, lambda s: _priced(
        s, plans.create_price_book(session=s, **fields)))


async def list_price_books(*, services: Services, scope: AdminScope) -> list[PricedBook]:
    scope.operate("list every price book")
    return await in_session(services, scope, lambda s: [
        _priced(s, b) for b in plans.list_price_books(session=s)])


async def get_price_book(*, services: Services, scope: AdminScope, book_id: int) -> PricedBook:
    def read(session: Session) -> PricedBook:
        if not _own_org_uses(session, scope, price_book_id=book_id):
            raise NotFound(f"No price book {book_id}.", param="price_book")
        return _priced(session, plans.find_price_book(session=session, ref=book_id))

    return await in_session(services, scope, read)


async def update_price_book(*, services: Services, scope: AdminScope, book_id: int,
                            changes: PriceBookUpdate) -> PricedBook:
    scope.operate("change price books")
    fields = changes.model_dump(include=changes.model_fields_set)
    return await in_session(services, scope, lambda s: _priced(
        s, plans.update_price_book(session=s, price_book_id=book_id, **fields)))


async def set_price(*, services: Services, scope: AdminScope, book_id: int,
                    price: PriceSet) -> PricedBook:
    """Sets one model's prices (per million tokens, in micro-units of the book's currency)."""
    scope.operate("set prices")

    def put(session: Session) -> PricedBook:
        book = plans.find_price_book(session=session, ref=book_id)
        plans.set_price(session=session, price_book_id=book.id, **price.model_dump())
        return _priced(session, book)

    return await in_session(services, scope, put)


async def remove_price(*, services: Services, scope: AdminScope, book_id: int,
                       model: str) -> PricedBook:
    """Removes a model's prices: requests for it are free under this book from now on."""
    scope.operate("remove prices")

    def remove(session: Session) -> PricedBook:
        book = plans.find_price_book(session=session, ref=book_id)
        plans.remove_price(session=session, price_book_id=book.id, model=model)
        return _priced(session, book)

    return await in_session(services, scope, remove)


# -- usage and invoices -----------------------------------------------------------------------


async def organization_usage(*, services: Services, scope: AdminScope, org_id: int,
                             start_date: date | None = None,
                             end_date: date | None = None) -> list[invoices.UsageLine]:
    """Usage by day and model (UTC days; the last 30 by default)."""
    start, end = invoices.date_range(start_date, end_date)
    await services.gateway.ledger.flush()

    def read(session: Session) -> list[invoices.UsageLine]:
        _visible_org(session, scope, org_id)
        return invoices.daily_usage(session=session, org_id=org_id, start=start, end=end)

    return await in_session(services, scope, read)


async def organization_invoice(*, services: Services, scope: AdminScope, org_id: int,
                               month: str) -> invoices.Invoice:
    """The invoice of one month (YYYY-MM, UTC)."""
    await services.gateway.ledger.flush()

    def read(session: Session) -> invoices.Invoice:
        _visible_org(session, scope, org_id)
        return invoices.invoice(session=session, org_id=org_id, month=month)

    return await in_session(services, scope, read)


async def request_usage(*, services: Services, scope: AdminScope,
                        request_id: str) -> dict[str, object] | None:
    """What one request used and cost, once the ledger has it: any organization's for an
    operator, only its own organization's for any other key."""
    await services.gateway.ledger.flush()
    return await in_session(services, scope, lambda s: invoices.request_usage(
        session=s, request_id=request_id, org_id=scope.org_id))


# -- deployments, traffic and the audit log ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeploymentState:
    """What an operator sees of a deployment, as it is now. Deliberately no base_url nor
    anything read from the upstream's settings beyond routing: nothing here can carry an API
    key."""

    id: str
    model: str
    aliases: list[str]
    kind: str
    region: str
    weight: int
    max_concurrency: int | None
    outstanding: int
    draining: bool  # removed by a reload, still finishing its requests
    circuit: str
    consecutive_failures: int
    last_probe: Probe | None

    @classmethod
    def of(cls, deployment: Deployment, *, draining: bool = False) -> DeploymentState:
        return cls(deployment.id, deployment.engine.model.name, list(deployment.aliases),
                   deployment.kind, deployment.region, deployment.weight,
                   deployment.max_concurrency, deployment.outstanding, draining,
                   deployment.circuit, deployment.failures, deployment.probe)

    @property
    def last_probe_at(self) -> datetime | None:
        return None if self.last_probe is None else datetime.fromtimestamp(self.last_probe.at,
                                                                            UTC)


async def list_deployments(*, services: Services, scope: AdminScope) -> list[DeploymentState]:
    """The deployments with their load and health, then removed ones still finishing their
    requests (platform operators only)."""
    scope.operate("list deployments")
    fleet = services.fleet
    return ([DeploymentState.of(d) for d in services.gateway.router.all()]
            + [DeploymentState.of(d, draining=True) for d in (fleet.draining if fleet else ())])


async def reload_deployments(*, services: Services, scope: AdminScope) -> Changes:
    """Re-reads serai.toml and the SERAI_* variables and applies the deployments they declare
    (platform operators only); an invalid configuration changes nothing."""
    scope.operate("reload deployments")
    if services.fleet is None:
        raise InvalidRequest("This server has no declared deployments to reload.")
    changes = await services.fleet.reload()
    await asyncio.to_thread(audit.record_alone, services.database, action="deployments.reload",
                            actor=scope.actor, target="deployments", details=changes.as_dict())
    return changes


async def platform_traffic(*, services: Services, scope: AdminScope) -> traffic.Traffic:
    """The whole platform's traffic from the usage ledger, so every gateway's requests count
    (platform operators only)."""
    scope.operate("read the platform's traffic")
    await services.gateway.ledger.flush()
    return await in_session(services, None, lambda s: traffic.traffic(session=s))


@dataclass(frozen=True, slots=True)
class AuditPage:
    """Audit entries, newest first, as the audit log shows them, and whether older ones
    remain."""

    entries: Sequence[dict[str, Any]]
    has_more: bool

    @property
    def first_id(self) -> int | None:
        return self.entries[0]["id"] if self.entries else None

    @property
    def last_id(self) -> int | None:
        return self.entries[-1]["id"] if self.entries else None


async def list_audit(*, services: Services, scope: AdminScope, org_id: int | None = None,
                     after: int | None = None, limit: int = 100) -> AuditPage:
    """Audit entries, newest first: all of them for an operator, only its organization's for
    an organization's admin; `after` is the previous page's `last_id`."""
    if org_id is not None:
        scope.see(org_id, f"organization {org_id}")
    wanted = org_id if org_id is not None else scope.org_id
    page, has_more = await in_session(services, scope, lambda s: audit.entries(
        session=s, org_id=wanted, after=after, limit=limit))
    return AuditPage(page, has_more)
