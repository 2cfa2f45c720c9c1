"""The platform operator's pages: the live overview, organizations, plans, price books,
deployments, and the audit log (which an organization's admins also read, for their own).

Every read and change calls the admin API's handlers with the signed-in key's scope: the
operator-only lists refuse other keys with the API's own 403, and a refused form shows the
API's message with its status and changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import FormData
from starlette.responses import Response

from serai import invoices
from serai.api import admin
from serai.api.deps import ServicesDep
from serai.console.web import (
    PAGE_SIZE,
    REFUSALS,
    FormDep,
    Page,
    UserDep,
    admin_call,
    error_status,
    form_text,
    problem,
    render,
    scope_of,
)
from serai.errors import InvalidRequest
from serai.plans import METRICS, parse_duration

router = APIRouter(prefix="/console", include_in_schema=False)

WINDOW_ROWS = 3  # window rows the plan form offers; empty ones are ignored



def _id_or_none(form: FormData, name: str) -> str | None:
    """A select's value: "" is "none", anything else goes to the API's model to check."""
    return form_text(form, name) or None


def _micros(text: str, what: str) -> int:
    """An amount a person types in currency units ("12.50") as micro-units, as the CLI reads
    one; the refusal names the field."""
    try:
        return invoices.parse_money(text)
    except InvalidRequest as error:
        raise InvalidRequest(f"{what}: {error.message}") from None


# -- overview ---------------------------------------------------------------------------------


def _minute_chart(minutes: list[dict[str, Any]], field: str, label: str,
                  unit: str) -> dict[str, Any]:
    return {"x": [int(datetime.fromisoformat(m["start"]).timestamp()) for m in minutes],
            "unit": unit, "series": [{"label": label, "values": [m[field] for m in minutes]}]}


@router.get("/overview")
async def overview(request: Request, user: UserDep, services: ServicesDep) -> Response:
    found = await admin_call(admin.platform_traffic(scope_of(user), services))
    deployments = await admin_call(admin.list_deployments(scope_of(user), services))
    minutes = found["minutes"]
    template = "overview_panel.html" if request.headers.get("hx-request") else "overview.html"
    return render(request, template, user, now=found["now"],
                  rates={w["seconds"]: w for w in found["windows"]},
                  quiet=not any(m["requests"] for m in minutes),
                  requests_chart=_minute_chart(minutes, "requests", "requests", "requests / min"),
                  failed_total=sum(m["failed"] for m in minutes),
                  tokens_chart=_minute_chart(minutes, "output_tokens", "output tokens",
                                             "output tokens / min"),
                  deployments=deployments["data"])


# -- organizations ----------------------------------------------------------------------------


async def _catalogue(user: Any, services: Any) -> tuple[list[Any], list[Any]]:
    """Every plan and price book: what an organization can be put on (operators only)."""
    found_plans = await admin_call(admin.list_plans(scope_of(user), services))
    books = await admin_call(admin.list_price_books(scope_of(user), services))
    return found_plans["data"], books["data"]


async def _organizations_page(request: Request, user: Any, services: Any, *, page: int = 1,
                              status: int = 200, **context: Any) -> Response:
    all_plans, books = await _catalogue(user, services)
    orgs = await admin_call(admin.list_organizations(scope_of(user), services))
    return render(request, "organizations.html", user, status=status,
                  orgs=Page.newest_first(orgs["data"], page), plans={p["id"]: p for p in all_plans},
                  books={b["id"]: b for b in books}, **context)


@router.get("/organizations")
async def organizations(request: Request, user: UserDep, services: ServicesDep,
                        page: int = 1) -> Response:
    return await _organizations_page(request, user, services, page=page)


@router.post("/organizations")
async def create_organization(request: Request, user: UserDep, form: FormDep,
                              services: ServicesDep) -> Response:
    try:
        body = admin.OrgCreate(name=form_text(form, "name"),
                               plan_id=_id_or_none(form, "plan_id"),  # type: ignore[arg-type]
                               price_book_id=_id_or_none(form, "price_book_id"))  # type: ignore[arg-type]
        made = await admin_call(admin.create_organization(body, scope_of(user), services))
    except REFUSALS as error:
        return await _organizations_page(request, user, services, status=error_status(error),
                                         error=problem(error))
    return await _organizations_page(request, user, services, status=201,
                                     notice=f"Created organization {made['name']}.")


async def _organization_page(request: Request, org_id: int, user: Any, services: Any, *,
                             status: int = 200, org: dict[str, Any] | None = None,
                             **context: Any) -> Response:
    """An organization's page; `org`: its object as a change just returned it."""
    all_plans, books = await _catalogue(user, services)
    if org is None:
        org = await admin_call(admin.get_organization(org_id, scope_of(user), services))
    balance = await admin_call(admin.get_balance(org_id, scope_of(user), services))
    book = next((b for b in books if b["id"] == org["price_book_id"]), None)
    return render(request, "organization_admin.html", user, status=status, org=org,
                  balance=balance, plans=all_plans, books=books,
                  currency=book["currency"] if book else "", **context)


@router.get("/organizations/{org_id}")
async def organization(request: Request, org_id: int, user: UserDep,
                       services: ServicesDep) -> Response:
    return await _organization_page(request, org_id, user, services)


@router.post("/organizations/{org_id}")
async def change_organization(request: Request, org_id: int, user: UserDep, form: FormDep,
                              services: ServicesDep) -> Response:
    try:
        body = admin.OrgUpdate(plan_id=_id_or_none(form, "plan_id"),  # type: ignore[arg-type]
                               price_book_id=_id_or_none(form, "price_book_id"),  # type: ignore[arg-type]
                               disabled=form.get("disabled") is not None)
        changed = await admin_call(admin.update_organization(org_id, body, scope_of(user),
                                                             services))
    except REFUSALS as error:
        return await _organization_page(request, org_id, user, services,
                                        status=error_status(error), error=problem(error))
    return await _organization_page(request, org_id, user, services, org=changed,
                                    notice="Saved.")


@router.post("/organizations/{org_id}/balance")
async def top_up(request: Request, org_id: int, user: UserDep, form: FormDep,
                 services: ServicesDep) -> Response:
    try:
        body = admin.BalanceChange(amount_micros=_micros(form_text(form, "amount"), "Amount"),
                                   reason=form_text(form, "reason"), kind="topup")
        changed = await admin_call(admin.change_balance(org_id, body, scope_of(user), services))
    except REFUSALS as error:
        return await _organization_page(request, org_id, user, services,
                                        status=error_status(error), error=problem(error))
    return await _organization_page(request, org_id, user, services,
                                    notice=f"Topped up {changed['name']}.")


# -- plans ------------------------------------------------------------------------------------


async def _plans_page(request: Request, user: Any, services: Any, *, page: int = 1,
                      status: int = 200, **context: Any) -> Response:
    found = await admin_call(admin.list_plans(scope_of(user), services))
    return render(request, "plans.html", user, status=status, plans=Page.newest_first(found["data"], page),
                  rows=range(WINDOW_ROWS), metrics=METRICS, **context)


@router.get("/plans")
async def plans(request: Request, user: UserDep, services: ServicesDep,
                page: int = 1) -> Response:
    return await _plans_page(request, user, services, page=page)


def _windows(form: FormData) -> list[dict[str, Any]]:
    """The form's window rows; a row without limit and length is ignored."""
    windows = []
    for n in range(WINDOW_ROWS):
        limit, length = form_text(form, f"limit_{n}"), form_text(form, f"seconds_{n}")
        if not limit and not length:
            continue
        try:
            seconds = parse_duration(length)
        except ValueError:
            raise InvalidRequest(f"Window {n + 1}: write its length as seconds or like 30m, "
                                 f"5h, 7d.") from None
        windows.append({"metric": form_text(form, f"metric_{n}"), "limit": limit,
                        "seconds": seconds})
    return windows


@router.post("/plans")
async def create_plan(request: Request, user: UserDep, form: FormDep,
                      services: ServicesDep) -> Response:
    try:
        body = admin.PlanCreate(name=form_text(form, "name"),
                                windows=_windows(form),  # type: ignore[arg-type]
                                draws_balance=form.get("draws_balance") is not None)
        made = await admin_call(admin.create_plan(body, scope_of(user), services))
    except REFUSALS as error:
        return await _plans_page(request, user, services, status=error_status(error),
                                 error=problem(error))
    return await _plans_page(request, user, services, status=201,
                             notice=f"Created plan {made['name']}.")


@router.post("/plans/{plan_id}/disabled")
async def disable_plan(request: Request, plan_id: int, user: UserDep, form: FormDep,
                       services: ServicesDep) -> Response:
    disabled = form_text(form, "disabled") == "true"
    try:
        changed = await admin_call(admin.update_plan(plan_id, admin.PlanUpdate(disabled=disabled),
                                                     scope_of(user), services))
    except REFUSALS as error:
        return await _plans_page(request, user, services, status=error_status(error),
                                 error=problem(error))
    return await _plans_page(request, user, services, notice=(
        f"Plan {changed['name']} is {'disabled' if disabled else 'enabled'}."))


# -- price books ------------------------------------------------------------------------------


async def _books_page(request: Request, user: Any, services: Any, *, page: int = 1,
                      status: int = 200, **context: Any) -> Response:
    found = await admin_call(admin.list_price_books(scope_of(user), services))
    return render(request, "price_books.html", user, status=status,
                  books=Page.newest_first(found["data"], page), **context)


@router.get("/price-books")
async def price_books(request: Request, user: UserDep, services: ServicesDep,
                      page: int = 1) -> Response:
    return await _books_page(request, user, services, page=page)


@router.post("/price-books")
async def create_price_book(request: Request, user: UserDep, form: FormDep,
                            services: ServicesDep) -> Response:
    try:
        body = admin.PriceBookCreate(name=form_text(form, "name"),
                                     currency=form_text(form, "currency") or "USD")
        made = await admin_call(admin.create_price_book(body, scope_of(user), services))
    except REFUSALS as error:
        return await _books_page(request, user, services, status=error_status(error),
                                 error=problem(error))
    return await _books_page(request, user, services, status=201,
                             notice=f"Created price book {made['name']}.")


@router.post("/price-books/{book_id}/prices")
async def set_price(request: Request, book_id: int, user: UserDep, form: FormDep,
                    services: ServicesDep) -> Response:
    cached = form_text(form, "cached_input")
    try:
        body = admin.PriceSet(
            model=form_text(form, "model"),
            input_micros=_micros(form_text(form, "input"), "Input price"),
            output_micros=_micros(form_text(form, "output"), "Output price"),
            cached_input_micros=_micros(cached, "Cached input price") if cached else None)
        book = await admin_call(admin.set_price(book_id, body, scope_of(user), services))
    except REFUSALS as error:
        return await _books_page(request, user, services, status=error_status(error),
                                 error=problem(error))
    return await _books_page(request, user, services,
                             notice=f"Set the price of {body.model} in {book['name']}.")


@router.post("/price-books/{book_id}/prices/remove")
async def remove_price(request: Request, book_id: int, user: UserDep, form: FormDep,
                       services: ServicesDep) -> Response:
    model = form_text(form, "model")
    try:
        book = await admin_call(admin.remove_price(book_id, scope_of(user), services,
                                                   model=model))
    except REFUSALS as error:
        return await _books_page(request, user, services, status=error_status(error),
                                 error=problem(error))
    return await _books_page(request, user, services, notice=(
        f"Removed the price of {model} from {book['name']}: its requests are free under "
        f"this book now."))


# -- deployments ------------------------------------------------------------------------------


async def _deployments_page(request: Request, user: Any, services: Any, *, status: int = 200,
                            **context: Any) -> Response:
    found = await admin_call(admin.list_deployments(scope_of(user), services))
    return render(request, "deployments.html", user, status=status, deployments=found["data"],
                  **context)


@router.get("/deployments")
async def deployments(request: Request, user: UserDep, services: ServicesDep) -> Response:
    return await _deployments_page(request, user, services)


@router.post("/deployments/reload")
async def reload_deployments(request: Request, user: UserDep, form: FormDep,
                             services: ServicesDep) -> Response:
    try:
        changes = await admin_call(admin.reload_deployments(scope_of(user), services))
    except REFUSALS as error:
        return await _deployments_page(request, user, services, status=error_status(error),
                                       error=problem(error))
    return await _deployments_page(request, user, services, changes=changes,
                                   notice="Deployments reloaded.")


# -- audit log --------------------------------------------------------------------------------


@router.get("/audit")
async def audit_log(request: Request, user: UserDep, services: ServicesDep,
                    after: int | None = None, org_id: int | None = None) -> Response:
    """Newest first; `after` is the previous page's last entry (the API's cursor), `org_id`
    narrows an operator's view to one organization."""
    found = await admin_call(admin.list_audit(scope_of(user), services, org_id=org_id,
                                              after=after, limit=PAGE_SIZE))
    org = None
    if org_id is not None:
        org = await admin_call(admin.get_organization(org_id, scope_of(user), services))
    return render(request, "audit.html", user, entries=found["data"], after=after, org=org,
                  older=found["last_id"] if found["has_more"] else None)
