"""An organization's pages: its usage by model and day, its keys, its plan's windows and
balance, its invoices, and its retention and region settings.

An organization's owner, admin or viewer sees only its own organization; a platform operator
reaches every organization's pages from the organizations list. Reads and changes call the
admin service layer (serai/api/administration.py) with the signed-in key's scope, so a
viewer's form is refused there as its admin API call would be.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Request
from starlette.responses import Response

from serai.api import administration
from serai.api.administration import KeyCreate, OrgUpdate
from serai.api.deps import Services, ServicesDep
from serai.api.usage import invoice_response
from serai.billing.invoices import UsageLine
from serai.console.sessions import SignedIn
from serai.console.web import (
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
from serai.errors import NotFound, SeraiError
from serai.governance.accounts import OrgInfo

router = APIRouter(prefix="/console/orgs/{org_id}", include_in_schema=False)


async def _org(org_id: int, user: SignedIn, services: Services) -> OrgInfo:
    return await administration.get_organization(services=services, scope=scope_of(user),
                                                 org_id=org_id)


# -- usage ------------------------------------------------------------------------------------


def usage_chart(lines: list[UsageLine], start: date, end: date) -> dict[str, Any]:
    """uPlot's data: one point per UTC day from start to end, one series of tokens per model
    (days without use are zeros, so a quiet day shows as one)."""
    days = [(start + timedelta(days=n)).isoformat() for n in range((end - start).days + 1)]
    models = sorted({line.model for line in lines})
    tokens = {model: [0] * len(days) for model in models}
    index = {day: n for n, day in enumerate(days)}
    for line in lines:
        if line.period in index:
            tokens[line.model][index[line.period]] += line.input_tokens + line.output_tokens
    first_s = int(datetime(start.year, start.month, start.day, tzinfo=UTC).timestamp())
    return {"x": [first_s + n * 86_400 for n in range(len(days))], "unit": "tokens",  # seconds
            "series": [{"label": model, "values": tokens[model]} for model in models]}


def _by_model(lines: list[UsageLine]) -> list[dict[str, Any]]:
    totals: dict[str, dict[str, Any]] = {}
    for line in lines:
        total = totals.setdefault(line.model, {"model": line.model, "requests": 0,
                                               "input_tokens": 0, "output_tokens": 0,
                                               "cost_micros": 0})
        for field in ("requests", "input_tokens", "output_tokens", "cost_micros"):
            total[field] += getattr(line, field)
    return sorted(totals.values(), key=lambda total: total["model"])


@router.get("/usage")
async def usage(request: Request, org_id: int, user: UserDep, services: ServicesDep,
                days: int = 30, page: int = 1) -> Response:
    days = min(max(days, 1), 366)
    end = datetime.now(UTC).date()
    start = end - timedelta(days=days - 1)
    org = await _org(org_id, user, services)
    found = await administration.organization_usage(services=services, scope=scope_of(user),
                                                    org_id=org_id, start_date=start,
                                                    end_date=end)
    lines = sorted(found, key=lambda line: (line.period, line.model), reverse=True)
    template = "usage_panel.html" if request.headers.get("hx-request") else "usage.html"
    return render(request, template, user, org=org, days=days, chart=usage_chart(lines, start, end),
                  by_model=_by_model(lines), lines=Page.of(lines, page),
                  currency=await _currency(org, user, services))


async def _currency(org: OrgInfo, user: SignedIn, services: Services) -> str:
    if org.price_book_id is None:
        return ""
    try:
        book = await administration.get_price_book(services=services, scope=scope_of(user),
                                                   book_id=org.price_book_id)
    except SeraiError:
        return ""
    return book.currency


# -- keys -------------------------------------------------------------------------------------


async def _keys_page(request: Request, org_id: int, user: SignedIn, services: Services, *,
                     page: int = 1, status: int = 200, **context: Any) -> Response:
    org = await _org(org_id, user, services)
    found = await administration.list_keys(services=services, scope=scope_of(user),
                                           org_id=org_id)
    keys = sorted(found, key=lambda key: (key.revoked_at is not None, -key.id))
    models = services.gateway.router.models(regions=org.allowed_regions)
    grants = administration.GRANTS.get(user.key.role or "", ())
    return render(request, "keys.html", user, status=status, org=org, keys=Page.of(keys, page),
                  can_change=scope_of(user).may_change,
                  kinds=[role or "model" for role in grants],
                  api_base=f"{str(request.base_url).rstrip('/')}/v1",
                  first_model=models[0].name if models else None, **context)


@router.get("/keys")
async def keys(request: Request, org_id: int, user: UserDep, services: ServicesDep,
               page: int = 1) -> Response:
    return await _keys_page(request, org_id, user, services, page=page)


@router.post("/keys")
async def create_key(request: Request, org_id: int, user: UserDep, form: FormDep,
                     services: ServicesDep) -> Response:
    kind = form_text(form, "kind") or "model"
    try:
        new = KeyCreate.model_validate({"name": form_text(form, "name"), "org_id": org_id,
                                        "role": None if kind == "model" else kind})
        made = await administration.create_key(services=services, scope=scope_of(user), new=new)
    except REFUSALS as error:
        return await _keys_page(request, org_id, user, services, status=error_status(error),
                                error=problem(error))
    return await _keys_page(request, org_id, user, services, status=201, created=made,
                            notice=f"Created key {made.key.name} ({made.key.shown}).")


@router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, org_id: int, key_id: int, user: UserDep, form: FormDep,
                     services: ServicesDep) -> Response:
    try:
        gone = await administration.revoke_key(services=services, scope=scope_of(user),
                                               ref=str(key_id))
        if gone.org_id != org_id:  # a stale page of another organization: nothing to show
            raise NotFound("No API key with that id here.")
    except SeraiError as error:
        return await _keys_page(request, org_id, user, services, status=error.status_code,
                                error=error.message)
    return await _keys_page(request, org_id, user, services,
                            notice=f"Revoked key {gone.name} ({gone.shown}).")


# -- plan windows and balance -----------------------------------------------------------------


@router.get("/plan")
async def plan(request: Request, org_id: int, user: UserDep, services: ServicesDep) -> Response:
    org = await _org(org_id, user, services)
    found = await administration.get_windows(services=services, scope=scope_of(user),
                                             org_id=org_id)
    balance = await administration.get_balance(services=services, scope=scope_of(user),
                                               org_id=org_id)
    return render(request, "plan.html", user, org=org, plan=found.plan, windows=found.windows,
                  balance=balance, currency=await _currency(org, user, services))


# -- invoices ---------------------------------------------------------------------------------


def _months() -> list[str]:
    """The last twelve months, this one first."""
    today = datetime.now(UTC).date()
    year, month = today.year, today.month
    months = []
    for _ in range(12):
        months.append(f"{year:04d}-{month:02d}")
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return months


@router.get("/invoices")
async def invoices(request: Request, org_id: int, user: UserDep,
                   services: ServicesDep) -> Response:
    org = await _org(org_id, user, services)
    return render(request, "invoices.html", user, org=org, months=_months())


@router.get("/invoices/{month}.{format}")
async def invoice(org_id: int, month: str, format: str, user: UserDep,
                  services: ServicesDep) -> Response:
    kind: Literal["csv", "json"]
    if format == "csv":
        kind = "csv"
    elif format == "json":
        kind = "json"
    else:
        raise NotFound("An invoice downloads as .csv or .json.")
    bill = await administration.organization_invoice(services=services, scope=scope_of(user),
                                                     org_id=org_id, month=month)
    response = invoice_response(bill, kind)
    if kind == "json":  # the CSV already downloads as a file
        response.headers["content-disposition"] = (
            f'attachment; filename="invoice-{org_id}-{month}.json"')
    return response


# -- settings ---------------------------------------------------------------------------------


@router.get("/settings")
async def settings(request: Request, org_id: int, user: UserDep,
                   services: ServicesDep) -> Response:
    org = await _org(org_id, user, services)
    return render(request, "settings.html", user, org=org)


@router.post("/settings")
async def change_settings(request: Request, org_id: int, user: UserDep, form: FormDep,
                          services: ServicesDep) -> Response:
    regions = [part.strip() for part in form_text(form, "allowed_regions").split(",")
               if part.strip()]
    retention = form_text(form, "retention") or "zero"
    days = form_text(form, "retention_days") if retention == "store" else ""
    try:
        changes = OrgUpdate.model_validate({"allowed_regions": regions or None,
                                            "retention": retention,
                                            "retention_days": days or None})
        org = await administration.update_organization(services=services, scope=scope_of(user),
                                                       org_id=org_id, changes=changes)
    except REFUSALS as error:
        return render(request, "settings.html", user, status=error_status(error),
                      org=await _org(org_id, user, services), error=problem(error))
    return render(request, "settings.html", user, org=org, notice="Settings saved.")
