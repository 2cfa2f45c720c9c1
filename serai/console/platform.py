"""The platform operator's pages: the live overview, organizations, plans, price books,
deployments, and the audit log (which an organization's admins also read, for their own).

Every read and change calls the admin service layer (serai/api/administration.py) with the
signed-in key's scope: the operator-only lists refuse other keys with the admin API's own 403,
and a refused form shows the same message with its status and changes nothing.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import FormData
from starlette.responses import Response

from serai.api import administration
from serai.api.administration import (
    BalanceChange,
    OrgCreate,
    OrgUpdate,
    PlanCreate,
    PlanUpdate,
    PriceBookCreate,
    PricedBook,
    PriceSet,
)
from serai.api.deps import Services, ServicesDep
from serai.billing import invoices
from serai.billing.plans import METRICS, parse_duration
from serai.console.sessions import SignedIn
from serai.console.web import (
    PAGE_SIZE,
    REFUSALS,
    FormDep,
    Page,
    UserDep,
    error_status,
    form_text,
    problem,
    render,
    scope_of,
)
from serai.errors import InvalidRequest
from serai.governance.accounts import OrgInfo
from serai.observability.traffic import Minute
from serai.storage.tables import Plan

router = APIRouter(prefix="/console", include_in_schema=False)

WINDOW_ROWS = 3  # window rows the plan form offers; empty ones are ignored



def _id_or_none(form: FormData, name: str) -> str | None:
    """A select's value: "" is "none", anything else goes to the request model to check."""
    return form_text(form, name) or None


def _micros(text: str, what: str) -> int:
    """An amount a person types in currency units ("12.50") as micro-units, as the CLI reads
    one; the refusal names the field."""
    try:
        return invoices.parse_money(text)
    except InvalidRequest as error:
        raise InvalidRequest(f"{what}: {error.message}") from None


# -- overview ---------------------------------------------------------------------------------


def _minute_chart(minutes: list[Minute], field: str, label: str, unit: str) -> dict[str, Any]:
    return {"x": [m.start_ms // 1000 for m in minutes],
            "unit": unit, "series": [{"label": label,
                                      "values": [getattr(m, field) for m in minutes]}]}


@router.get("/overview")
async def overview(request: Request, user: UserDep, services: ServicesDep) -> Response:
    found = await administration.platform_traffic(services=services, scope=scope_of(user))
    deployments = await administration.list_deployments(services=services, scope=scope_of(user))
    minutes = found.minutes
    template = "overview_panel.html" if request.headers.get("hx-request") else "overview.html"
    return render(request, template, user, now=found.now_ms,
                  rates={rates.seconds: rates for rates in found.rates},
                  quiet=not any(m.requests for m in minutes),
                  requests_chart=_minute_chart(minutes, "requests", "requests", "requests / min"),
                  failed_total=sum(m.failed for m in minutes),
                  tokens_chart=_minute_chart(minutes, "output_tokens", "output tokens",
                                             "output tokens / min"),
                  deployments=deployments)


# -- organizations ----------------------------------------------------------------------------


async def _catalogue(user: SignedIn, services: Services) -> tuple[list[Plan], list[PricedBook]]:
    """Every plan and price book: what an organization can be put on (operators only)."""
    scope = scope_of(user)
    return (await administration.list_plans(services=services, scope=scope),
            await administration.list_price_books(services=services, scope=scope))


async def _organizations_page(request: Request, user: SignedIn, services: Services, *,
                              page: int = 1, status: int = 200, **context: Any) -> Response:
    all_plans, books = await _catalogue(user, services)
    orgs = await administration.list_organizations(services=services, scope=scope_of(user))
    return render(request, "organizations.html", user, status=status,
                  orgs=Page.newest_first(orgs, page), plans={p.id: p for p in all_plans},
                  books={b.id: b for b in books}, **context)


@router.get("/organizations")
async def organizations(request: Request, user: UserDep, services: ServicesDep,
                        page: int = 1) -> Response:
    return await _organizations_page(request, user, services, page=page)


@router.post("/organizations")
async def create_organization(request: Request, user: UserDep, form: FormDep,
                              services: ServicesDep) -> Response:
    try:
        new = OrgCreate.model_validate({"name": form_text(form, "name"),
                                        "plan_id": _id_or_none(form, "plan_id"),
                                        "price_book_id": _id_or_none(form, "price_book_id")})
        made = await administration.create_organization(services=services, scope=scope_of(user),
                                                        new=new)
    except REFUSALS as error:
        return await _organizations_page(request, user, services, status=error_status(error),
                                         error=problem(error))
    return await _organizations_page(request, user, services, status=201,
                                     notice=f"Created organization {made.name}.")


async def _organization_page(request: Request, org_id: int, user: SignedIn, services: Services,
                             *, status: int = 200, org: OrgInfo | None = None,
                             **context: Any) -> Response:
    """An organization's page; `org`: the organization as a change just returned it."""
    all_plans, books = await _catalogue(user, services)
    scope = scope_of(user)
    if org is None:
        org = await administration.get_organization(services=services, scope=scope,
                                                    org_id=org_id)
    balance = await administration.get_balance(services=services, scope=scope, org_id=org_id)
    book = next((b for b in books if b.id == org.price_book_id), None)
    return render(request, "organization_admin.html", user, status=status, org=org,
                  balance=balance, plans=all_plans, books=books,
                  currency=book.currency if book else "", **context)


@router.get("/organizations/{org_id}")
async def organization(request: Request, org_id: int, user: UserDep,
                       services: ServicesDep) -> Response:
    return await _organization_page(request, org_id, user, services)


@router.post("/organizations/{org_id}")
async def change_organization(request: Request, org_id: int, user: UserDep, form: FormDep,
                              services: ServicesDep) -> Response:
    try:
        changes = OrgUpdate.model_validate({"plan_id": _id_or_none(form, "plan_id"),
                                            "price_book_id": _id_or_none(form, "price_book_id"),
                                            "disabled": form.get("disabled") is not None})
        changed = await administration.update_organization(
            services=services, scope=scope_of(user), org_id=org_id, changes=changes)
    except REFUSALS as error:
        return await _organization_page(request, org_id, user, services,
                                        status=error_status(error), error=problem(error))
    return await _organization_page(request, org_id, user, services, org=changed,
                                    notice="Saved.")


@router.post("/organizations/{org_id}/balance")
async def top_up(request: Request, org_id: int, user: UserDep, form: FormDep,
                 services: ServicesDep) -> Response:
    try:
        change = BalanceChange(amount_micros=_micros(form_text(form, "amount"), "Amount"),
                               reason=form_text(form, "reason"), kind="topup")
        changed = await administration.change_balance(services=services, scope=scope_of(user),
                                                      org_id=org_id, change=change)
    except REFUSALS as error:
        return await _organization_page(request, org_id, user, services,
                                        status=error_status(error), error=problem(error))
    return await _organization_page(request, org_id, user, services,
                                    notice=f"Topped up {changed.name}.")


# -- plans ------------------------------------------------------------------------------------


async def _plans_page(request: Request, user: SignedIn, services: Services, *, page: int = 1,
                      status: int = 200, **context: Any) -> Response:
    found = await administration.list_plans(services=services, scope=scope_of(user))
    return render(request, "plans.html", user, status=status, plans=Page.newest_first(found, page),
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
        new = PlanCreate.model_validate({"name": form_text(form, "name"),
                                         "windows": _windows(form),
                                         "draws_balance": form.get("draws_balance") is not None})
        made = await administration.create_plan(services=services, scope=scope_of(user), new=new)
    except REFUSALS as error:
        return await _plans_page(request, user, services, status=error_status(error),
                                 error=problem(error))
    return await _plans_page(request, user, services, status=201,
                             notice=f"Created plan {made.name}.")


@router.post("/plans/{plan_id}/disabled")
async def disable_plan(request: Request, plan_id: int, user: UserDep, form: FormDep,
                       services: ServicesDep) -> Response:
    disabled = form_text(form, "disabled") == "true"
    try:
        changed = await administration.update_plan(services=services, scope=scope_of(user),
                                                   plan_id=plan_id,
                                                   changes=PlanUpdate(disabled=disabled))
    except REFUSALS as error:
        return await _plans_page(request, user, services, status=error_status(error),
                                 error=problem(error))
    return await _plans_page(request, user, services, notice=(
        f"Plan {changed.name} is {'disabled' if disabled else 'enabled'}."))


# -- price books ------------------------------------------------------------------------------


async def _books_page(request: Request, user: SignedIn, services: Services, *, page: int = 1,
                      status: int = 200, **context: Any) -> Response:
    found = await administration.list_price_books(services=services, scope=scope_of(user))
    return render(request, "price_books.html", user, status=status,
                  books=Page.newest_first(found, page), **context)


@router.get("/price-books")
async def price_books(request: Request, user: UserDep, services: ServicesDep,
                      page: int = 1) -> Response:
    return await _books_page(request, user, services, page=page)


@router.post("/price-books")
async def create_price_book(request: Request, user: UserDep, form: FormDep,
                            services: ServicesDep) -> Response:
    try:
        new = PriceBookCreate(name=form_text(form, "name"),
                              currency=form_text(form, "currency") or "USD")
        made = await administration.create_price_book(services=services, scope=scope_of(user),
                                                      new=new)
    except REFUSALS as error:
        return await _books_page(request, user, services, status=error_status(error),
                                 error=problem(error))
    return await _books_page(request, user, services, status=201,
                             notice=f"Created price book {made.name}.")


@router.post("/price-books/{book_id}/prices")
async def set_price(request: Request, book_id: int, user: UserDep, form: FormDep,
                    services: ServicesDep) -> Response:
    cached = form_text(form, "cached_input")
    try:
        price = PriceSet(
            model=form_text(form, "model"),
            input_micros=_micros(form_text(form, "input"), "Input price"),
            output_micros=_micros(form_text(form, "output"), "Output price"),
            cached_input_micros=_micros(cached, "Cached input price") if cached else None)
        book = await administration.set_price(services=services, scope=scope_of(user),
                                              book_id=book_id, price=price)
    except REFUSALS as error:
        return await _books_page(request, user, services, status=error_status(error),
                                 error=problem(error))
    return await _books_page(request, user, services,
                             notice=f"Set the price of {price.model} in {book.name}.")


@router.post("/price-books/{book_id}/prices/remove")
async def remove_price(request: Request, book_id: int, user: UserDep, form: FormDep,
                       services: ServicesDep) -> Response:
    model = form_text(form, "model")
    try:
        book = await administration.remove_price(services=services, scope=scope_of(user),
                                                 book_id=book_id, model=model)
    except REFUSALS as error:
        return await _books_page(request, user, services, status=error_status(error),
                                 error=problem(error))
    return await _books_page(request, user, services, notice=(
        f"Removed the price of {model} from {book.name}: its requests are free under "
        f"this book now."))


# -- deployments ------------------------------------------------------------------------------


async def _deployments_page(request: Request, user: SignedIn, services: Services, *,
                            status: int = 200, **context: Any) -> Response:
    found = await administration.list_deployments(services=services, scope=scope_of(user))
    return render(request, "deployments.html", user, status=status, deployments=found,
                  **context)


@router.get("/deployments")
async def deployments(request: Request, user: UserDep, services: ServicesDep) -> Response:
    return await _deployments_page(request, user, services)


@router.post("/deployments/reload")
async def reload_deployments(request: Request, user: UserDep, form: FormDep,
                             services: ServicesDep) -> Response:
    try:
        changes = await administration.reload_deployments(services=services, scope=scope_of(user))
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
    found = await administration.list_audit(services=services, scope=scope_of(user),
                                            org_id=org_id, after=after, limit=PAGE_SIZE)
    org = None
    if org_id is not None:
        org = await administration.get_organization(services=services, scope=scope_of(user),
                                                    org_id=org_id)
    return render(request, "audit.html", user, entries=found.entries, after=after, org=org,
                  older=found.last_id if found.has_more else None)
