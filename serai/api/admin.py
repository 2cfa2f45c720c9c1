"""The admin API under /admin/v1: organizations, keys, plans, price books, balances, redemption
codes, usage, invoices, the deployments serving the models and the platform's traffic.

Who may do what is decided in serai/api/administration.py, which the console's pages call too:
routes parse the request, call it with the key's AdminScope and render its typed result as
JSON. Another organization's objects answer 404, exactly like objects that do not exist; admin
models forbid unknown fields, so a typo in an admin call fails loudly instead of being ignored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from starlette.responses import Response

from serai.api import administration
from serai.api.administration import (
    AuditPage,
    Balance,
    BalanceChange,
    CodeBatch,
    CodeDisable,
    DeploymentState,
    KeyCreate,
    KeyUpdate,
    OrgCreate,
    OrgUpdate,
    PlanCreate,
    PlanUpdate,
    PlanWindows,
    PriceBookCreate,
    PriceBookUpdate,
    PricedBook,
    PriceSet,
    Redemption,
)
from serai.api.bounds import RowId
from serai.api.deps import ScopeDep, ServicesDep
from serai.api.errors import json_response
from serai.api.usage import DateParam, invoice_response, usage_object
from serai.governance.accounts import CodeInfo, KeyInfo, OrgInfo
from serai.storage.db import iso_from_ms, utc
from serai.storage.tables import Plan

router = APIRouter(prefix="/admin/v1", tags=["Admin"])


def _time(moment: datetime | None) -> str | None:
    """ISO 8601 with its offset: a time without one is read as local time by browsers and most
    clients."""
    return None if moment is None else utc(moment).isoformat()


# -- organizations ----------------------------------------------------------------------------


def _org_object(org: OrgInfo) -> dict[str, Any]:
    return {"id": org.id, "object": "organization", "name": org.name, "disabled": org.disabled,
            "plan_id": org.plan_id, "price_book_id": org.price_book_id,
            "balance_micros": org.balance_micros, "rpm": org.rpm, "tpm": org.tpm,
            "max_concurrency": org.max_concurrency, "allowed_regions": org.allowed_regions,
            "retention": org.retention.policy, "retention_days": org.retention.days}


@router.post("/organizations", status_code=201)
async def create_organization(body: OrgCreate, scope: ScopeDep,
                              services: ServicesDep) -> Response:
    """Creates an organization (platform operators only)."""
    org = await administration.create_organization(services=services, scope=scope, new=body)
    return json_response(201, _org_object(org))


@router.get("/organizations")
async def list_organizations(scope: ScopeDep, services: ServicesDep) -> Response:
    """Lists the organizations this key may see (its own, or all for an operator)."""
    orgs = await administration.list_organizations(services=services, scope=scope)
    return json_response(200, {"object": "list", "data": [_org_object(o) for o in orgs]})


@router.get("/organizations/{org_id}")
async def get_organization(org_id: RowId, scope: ScopeDep, services: ServicesDep) -> Response:
    org = await administration.get_organization(services=services, scope=scope, org_id=org_id)
    return json_response(200, _org_object(org))


@router.patch("/organizations/{org_id}")
async def update_organization(org_id: RowId, body: OrgUpdate, scope: ScopeDep,
                              services: ServicesDep) -> Response:
    """Renames, disables, or changes an organization's plan, price book or limits (platform
    operators only); `null` clears a plan, price book or limit."""
    org = await administration.update_organization(services=services, scope=scope,
                                                   org_id=org_id, changes=body)
    return json_response(200, _org_object(org))


# -- balances and redemption codes ------------------------------------------------------------


def _balance_object(balance: Balance) -> dict[str, Any]:
    return {"object": "balance", "org_id": balance.org_id,
            "balance_micros": balance.balance_micros, "held_micros": balance.held_micros,
            "available_micros": balance.available_micros,
            "entries": [{"id": e.id, "amount_micros": e.amount_micros, "kind": e.kind,
                         "reason": e.reason, "created_at": _time(e.created_at)}
                        for e in balance.entries]}


@router.get("/organizations/{org_id}/balance")
async def get_balance(org_id: RowId, scope: ScopeDep, services: ServicesDep) -> Response:
    """The balance, what running requests hold of it, and its latest entries."""
    balance = await administration.get_balance(services=services, scope=scope, org_id=org_id)
    return json_response(200, _balance_object(balance))


def _windows_object(found: PlanWindows) -> dict[str, Any]:
    plan = found.plan
    return {"object": "list", "org_id": found.org_id,
            "plan": None if plan is None else {"id": plan.id, "name": plan.name},
            "data": [state.as_dict() for state in found.windows]}


@router.get("/organizations/{org_id}/windows")
async def get_windows(org_id: RowId, scope: ScopeDep, services: ServicesDep) -> Response:
    """The organization's plan windows now: each one's limit, what is used (including running
    requests), what remains, and when the oldest counted request leaves it."""
    found = await administration.get_windows(services=services, scope=scope, org_id=org_id)
    return json_response(200, _windows_object(found))


@router.post("/organizations/{org_id}/balance")
async def change_balance(org_id: RowId, body: BalanceChange, scope: ScopeDep,
                         services: ServicesDep) -> Response:
    """Tops up or adjusts a balance with a reason (platform operators only)."""
    org = await administration.change_balance(services=services, scope=scope, org_id=org_id,
                                              change=body)
    return json_response(200, _org_object(org))


@router.post("/organizations/{org_id}/redeem")
async def redeem(org_id: RowId, body: Redemption, scope: ScopeDep,
                 services: ServicesDep) -> Response:
    """Redeems a code into the organization's balance (owner or admin of it)."""
    org = await administration.redeem(services=services, scope=scope, org_id=org_id,
                                      code=body.code)
    return json_response(200, _org_object(org))


def _code_object(code: CodeInfo) -> dict[str, Any]:
    return {"id": code.id, "object": "redemption_code", "prefix": code.prefix,
            "batch": code.batch, "amount_micros": code.amount_micros,
            "expires_at": _time(code.expires_at), "disabled": code.disabled,
            "redeemed_by_org_id": code.redeemed_by_org_id, "redeemed_at": _time(code.redeemed_at)}


@router.post("/redemption_codes", status_code=201)
async def generate_codes(body: CodeBatch, scope: ScopeDep, services: ServicesDep) -> Response:
    """Generates a batch of codes; the response is the only time the codes are shown."""
    minted = await administration.generate_codes(services=services, scope=scope, batch=body)
    return json_response(201, {"object": "list", "data": [
        {**_code_object(info), "code": code} for info, code in minted]})


@router.get("/redemption_codes")
async def list_codes(scope: ScopeDep, services: ServicesDep,
                     batch: str | None = None) -> Response:
    """Lists codes (prefixes only), optionally of one batch."""
    codes = await administration.list_codes(services=services, scope=scope, batch=batch)
    return json_response(200, {"object": "list", "data": [_code_object(c) for c in codes]})


@router.post("/redemption_codes/disable")
async def disable_codes(body: CodeDisable, scope: ScopeDep, services: ServicesDep) -> Response:
    """Disables the codes of a batch not yet redeemed."""
    count = await administration.disable_codes(services=services, scope=scope,
                                               batch=body.batch)
    return json_response(200, {"object": "redemption_code_batch", "batch": body.batch,
                               "disabled": count})


# -- keys -------------------------------------------------------------------------------------


def _key_object(key: KeyInfo) -> dict[str, Any]:
    return {"id": key.id, "object": "api_key", "name": key.name, "prefix": key.prefix,
            "admin": key.is_admin, "role": key.role, "org_id": key.org_id,
            "allowed_models": key.allowed_models, "allowed_cidrs": key.allowed_cidrs,
            "expires_at": _time(key.expires_at), "rpm": key.rpm, "tpm": key.tpm,
            "retention": None if key.retention is None else key.retention.policy,
            "retention_days": None if key.retention is None else key.retention.days,
            "created_at": _time(key.created_at), "revoked_at": _time(key.revoked_at)}


@router.post("/keys", status_code=201)
async def create_key(body: KeyCreate, scope: ScopeDep, services: ServicesDep) -> Response:
    """Creates a key; the response is the only time its secret is shown. Without org_id, an
    organization's admin creates it in their organization; an operator in the default one.
    An organization's key creates only the roles it may hand out (an admin: model and viewer
    keys); a refusal is a 403 and a `key.refused` entry in the audit log."""
    made = await administration.create_key(services=services, scope=scope, new=body)
    return json_response(201, {**_key_object(made.key), "secret": made.secret})


@router.get("/keys")
async def list_keys(scope: ScopeDep, services: ServicesDep,
                    org_id: RowId | None = None) -> Response:
    """Lists keys (prefixes only, never secrets) of this key's organization, or of `org_id`."""
    keys = await administration.list_keys(services=services, scope=scope, org_id=org_id)
    return json_response(200, {"object": "list", "data": [_key_object(k) for k in keys]})


@router.patch("/keys/{ref}")
async def update_key(ref: str, body: KeyUpdate, scope: ScopeDep,
                     services: ServicesDep) -> Response:
    """Renames a key or changes its limits; `null` lifts a limit. An organization's admin
    changes model and viewer keys only: not an owner's, another admin's, or its own."""
    key = await administration.update_key(services=services, scope=scope, ref=ref, changes=body)
    return json_response(200, _key_object(key))


@router.delete("/keys/{ref}")
async def revoke_key(ref: str, scope: ScopeDep, services: ServicesDep) -> Response:
    """Revokes a key by id or prefix; requests with it fail from now on. An organization's
    admin revokes model and viewer keys, and its own; not an owner's or another admin's."""
    key = await administration.revoke_key(services=services, scope=scope, ref=ref)
    return json_response(200, _key_object(key))


# -- plans and price books (the platform's catalogue) -----------------------------------------


def _plan_object(plan: Plan) -> dict[str, Any]:
    return {"id": plan.id, "object": "plan", "name": plan.name, "windows": plan.windows,
            "model_multipliers": plan.model_multipliers, "rpm": plan.rpm, "tpm": plan.tpm,
            "max_concurrency": plan.max_concurrency, "draws_balance": plan.draws_balance,
            "price_ratio_milli": plan.price_ratio_milli, "disabled": plan.disabled}


@router.post("/plans", status_code=201)
async def create_plan(body: PlanCreate, scope: ScopeDep, services: ServicesDep) -> Response:
    plan = await administration.create_plan(services=services, scope=scope, new=body)
    return json_response(201, _plan_object(plan))


@router.get("/plans")
async def list_plans(scope: ScopeDep, services: ServicesDep) -> Response:
    rows = await administration.list_plans(services=services, scope=scope)
    return json_response(200, {"object": "list", "data": [_plan_object(p) for p in rows]})


@router.get("/plans/{plan_id}")
async def get_plan(plan_id: RowId, scope: ScopeDep, services: ServicesDep) -> Response:
    plan = await administration.get_plan(services=services, scope=scope, plan_id=plan_id)
    return json_response(200, _plan_object(plan))


@router.patch("/plans/{plan_id}")
async def update_plan(plan_id: RowId, body: PlanUpdate, scope: ScopeDep,
                      services: ServicesDep) -> Response:
    plan = await administration.update_plan(services=services, scope=scope, plan_id=plan_id,
                                            changes=body)
    return json_response(200, _plan_object(plan))


def _book_object(book: PricedBook) -> dict[str, Any]:
    return {"id": book.id, "object": "price_book", "name": book.name, "currency": book.currency,
            "peak_hours": book.peak_hours,
            "prices": [{"model": p.model, "input_micros": p.input_micros,
                        "cached_input_micros": p.cached_input_micros,
                        "output_micros": p.output_micros} for p in book.prices]}


@router.post("/price_books", status_code=201)
async def create_price_book(body: PriceBookCreate, scope: ScopeDep,
                            services: ServicesDep) -> Response:
    book = await administration.create_price_book(services=services, scope=scope, new=body)
    return json_response(201, _book_object(book))


@router.get("/price_books")
async def list_price_books(scope: ScopeDep, services: ServicesDep) -> Response:
    books = await administration.list_price_books(services=services, scope=scope)
    return json_response(200, {"object": "list", "data": [_book_object(b) for b in books]})


@router.get("/price_books/{book_id}")
async def get_price_book(book_id: RowId, scope: ScopeDep, services: ServicesDep) -> Response:
    book = await administration.get_price_book(services=services, scope=scope, book_id=book_id)
    return json_response(200, _book_object(book))


@router.patch("/price_books/{book_id}")
async def update_price_book(book_id: RowId, body: PriceBookUpdate, scope: ScopeDep,
                            services: ServicesDep) -> Response:
    book = await administration.update_price_book(services=services, scope=scope,
                                                  book_id=book_id, changes=body)
    return json_response(200, _book_object(book))


@router.put("/price_books/{book_id}/prices")
async def set_price(book_id: RowId, body: PriceSet, scope: ScopeDep,
                    services: ServicesDep) -> Response:
    """Sets one model's prices (per million tokens, in micro-units of the book's currency)."""
    book = await administration.set_price(services=services, scope=scope, book_id=book_id,
                                          price=body)
    return json_response(200, _book_object(book))


@router.delete("/price_books/{book_id}/prices")
async def remove_price(book_id: RowId, scope: ScopeDep, services: ServicesDep,
                       model: Annotated[str, Query(min_length=1)]) -> Response:
    """Removes a model's prices: requests for it are free under this book from now on."""
    book = await administration.remove_price(services=services, scope=scope, book_id=book_id,
                                             model=model)
    return json_response(200, _book_object(book))


# -- usage and invoices -----------------------------------------------------------------------


@router.get("/organizations/{org_id}/usage")
async def organization_usage(org_id: RowId, scope: ScopeDep, services: ServicesDep,
                             start_date: DateParam = None,
                             end_date: DateParam = None) -> Response:
    """Usage by day and model (UTC days; the last 30 by default)."""
    lines = await administration.organization_usage(services=services, scope=scope,
                                                    org_id=org_id, start_date=start_date,
                                                    end_date=end_date)
    return usage_object(lines, org_id)


@router.get("/organizations/{org_id}/invoices/{month}")
async def organization_invoice(org_id: RowId, month: str, scope: ScopeDep, services: ServicesDep,
                               format: Literal["json", "csv"] = "json") -> Response:
    """The invoice of one month (YYYY-MM, UTC) as JSON or CSV."""
    bill = await administration.organization_invoice(services=services, scope=scope,
                                                     org_id=org_id, month=month)
    return invoice_response(bill, format)


# -- deployments ------------------------------------------------------------------------------


def _deployment_object(deployment: DeploymentState) -> dict[str, Any]:
    probe = deployment.last_probe
    return {"id": deployment.id, "object": "deployment", "model": deployment.model,
            "aliases": deployment.aliases, "kind": deployment.kind,
            "region": deployment.region, "weight": deployment.weight,
            "max_concurrency": deployment.max_concurrency,
            "outstanding": deployment.outstanding, "draining": deployment.draining,
            "health": {"circuit": deployment.circuit,
                       "consecutive_failures": deployment.consecutive_failures,
                       "last_probe": None if probe is None else {
                           "ok": probe.ok, "detail": probe.detail,
                           "at": _time(deployment.last_probe_at)}}}


@router.get("/deployments")
async def list_deployments(scope: ScopeDep, services: ServicesDep) -> Response:
    """Lists the deployments with their load and health, then removed ones still finishing
    their requests (platform operators only)."""
    found = await administration.list_deployments(services=services, scope=scope)
    return json_response(200, {"object": "list", "data": [_deployment_object(d) for d in found]})


@router.post("/deployments/reload")
async def reload_deployments(scope: ScopeDep, services: ServicesDep) -> Response:
    """Re-reads serai.toml and the SERAI_* variables and applies the deployments they declare:
    new ones are added, removed ones drained, changed ones replaced. An invalid configuration
    changes nothing and answers 400 (platform operators only)."""
    changes = await administration.reload_deployments(services=services, scope=scope)
    return json_response(200, {"object": "deployment_reload", **changes.as_dict()})


@router.get("/traffic")
async def platform_traffic(scope: ScopeDep, services: ServicesDep) -> Response:
    """The whole platform's traffic from the usage ledger (so every gateway's requests count):
    requests, output tokens and the error rate over the last minute and the last 5 minutes,
    and each of the last 60 minutes' counts (platform operators only)."""
    found = await administration.platform_traffic(services=services, scope=scope)
    return json_response(200, {
        "object": "traffic",
        "now": iso_from_ms(found.now_ms),
        "windows": [rates.as_dict() for rates in found.rates],
        "minutes": [minute.as_dict() for minute in found.minutes]})


# -- audit log --------------------------------------------------------------------------------


def _audit_object(page: AuditPage) -> dict[str, Any]:
    return {"object": "list", "data": page.entries, "has_more": page.has_more,
            "first_id": page.first_id, "last_id": page.last_id}


@router.get("/audit")
async def list_audit(scope: ScopeDep, services: ServicesDep,
                     org_id: RowId | None = None,
                     after: Annotated[RowId | None, Query(
                         description="An entry id: list the entries older than it (the "
                         "previous page's last_id).")] = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Response:
    """Audit entries, newest first: all of them for an operator, only its organization's for
    an organization's admin. Page with `after` = the previous page's `last_id`."""
    page = await administration.list_audit(services=services, scope=scope, org_id=org_id,
                                           after=after, limit=limit)
    return json_response(200, _audit_object(page))
