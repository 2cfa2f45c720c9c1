"""The playground: chat with any model the signed-in key may use. The page's script calls the
public API (/v1/models, /v1/chat/completions) with the key itself, exactly as a customer's
program would; the console only adds what a turn cost, read from the usage ledger."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from serai.api import administration
from serai.api.deps import ServicesDep
from serai.api.errors import json_response
from serai.console.web import UserDep, render, scope_of
from serai.errors import NotFound

router = APIRouter(prefix="/console/playground", include_in_schema=False)


@router.get("")
async def playground(request: Request, user: UserDep) -> Response:
    return render(request, "playground.html", user)


@router.get("/requests/{request_id}")
async def turn_usage(request_id: str, user: UserDep, services: ServicesDep) -> Response:
    """What one of the playground's requests used and cost, once the ledger has it."""
    found = await administration.request_usage(services=services, scope=scope_of(user),
                                               request_id=request_id)
    if found is None:
        raise NotFound("No settled request with that id yet.")
    return json_response(200, found)
