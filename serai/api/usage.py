"""What a model key's organization used and owes: GET /v1/usage and GET /v1/invoices/{month}.

Any key of the organization may read these, so an application can show its own spending. The
ledger writer is flushed first, so the answer includes the caller's latest request.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from starlette.responses import Response

from serai import invoices
from serai.api.admin import DateParam, in_session, invoice_response, usage_object
from serai.api.deps import KeyDep, ServicesDep
from serai.errors import InvalidRequest

router = APIRouter(tags=["Usage"])


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
