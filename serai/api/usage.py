"""What a model key's organization used and owes: GET /v1/usage and GET /v1/invoices/{month},
and how usage lines and invoices are answered (JSON, or an invoice's CSV) wherever they are
asked for: here, under /admin/v1 and in the console.

Any key of the organization may read these, so an application can show its own spending. The
ledger writer is flushed first, so the answer includes the caller's latest request.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.responses import Response

from serai.api.administration import in_session
from serai.api.deps import KeyDep, ServicesDep
from serai.api.errors import json_response
from serai.billing import invoices
from serai.errors import InvalidRequest

router = APIRouter(tags=["Usage"])

DateParam = Annotated[date | None, Query(description="A UTC day, YYYY-MM-DD.")]


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


def _org_of(key_org: int | None) -> int:
    if key_org is None:
        raise InvalidRequest("A platform operator's key belongs to no organization; use "
                             "/admin/v1/organizations/{id}/usage.")
    return key_org


@router.get("/v1/usage")
async def usage(key: KeyDep, services: ServicesDep, start_date: DateParam = None,
                end_date: DateParam = None) -> Response:
    """Usage of the key's organization by UTC day and model: requests, tokens and cost."""
    org_id = _org_of(key.org_id)
    start, end = invoices.date_range(start_date, end_date)
    await services.gateway.ledger.flush()
    lines = await in_session(services, None, lambda s: invoices.daily_usage(
        session=s, org_id=org_id, start=start, end=end))
    return usage_object(lines, org_id)


@router.get("/v1/invoices/{month}")
async def invoice(month: str, key: KeyDep, services: ServicesDep,
                  format: Literal["json", "csv"] = "json") -> Response:
    """The invoice of the key's organization for one month (YYYY-MM, UTC), JSON or CSV."""
    org_id = _org_of(key.org_id)
    await services.gateway.ledger.flush()
    bill = await in_session(services, None, lambda s: invoices.invoice(session=s, org_id=org_id,
                                                                  month=month))
    return invoice_response(bill, format)
