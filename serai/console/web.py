"""What every console page shares: who is signed in, the CSRF check of every form, rendering a
template, and the headers that keep the pages safe.

The console holds no rules of its own about who may do what. Its pages call the admin service
layer (serai/api/administration.py), the one the admin API's routes call, with the signed-in
key's AdminScope, so a page can never allow what the API refuses.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar
from urllib.parse import quote

import orjson
from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serai.api.deps import AdminScope, ServicesDep, check_network
from serai.billing import invoices
from serai.billing.plans import format_duration
from serai.console import sessions
from serai.console.sessions import SignedIn
from serai.errors import PermissionDenied, SeraiError
from serai.storage.db import iso_from_ms, utc


def iso(moment: datetime | int | None) -> str | None:
    """A moment as ISO 8601 in UTC with its offset, for a <time> element: a stored time, or
    the database clock's epoch milliseconds."""
    if moment is None:
        return None
    return utc(moment).isoformat() if isinstance(moment, datetime) else iso_from_ms(moment)


HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["duration"] = format_duration
templates.env.filters["money"] = invoices.money  # exact, as invoices print it
templates.env.filters["iso"] = iso
# Audit details and the like, shown as one line of JSON (autoescaped as any text).
templates.env.filters["compact_json"] = lambda value: orjson.dumps(
    value, option=orjson.OPT_SORT_KEYS).decode()
PAGE_SIZE = 25
T = TypeVar("T")


class SignInNeeded(Exception):
    """The request carries no live session: the browser goes to the sign-in page."""

    def __init__(self, path: str) -> None:
        self.path = path


async def signed_in(request: Request, services: ServicesDep) -> SignedIn:
    token = request.cookies.get(sessions.COOKIE)
    if token:
        def look() -> SignedIn | None:
            with services.database.session() as session:
                return sessions.signed_in(session=session, token=token)

        found = await asyncio.to_thread(look)
        if found is not None:
            # Every request, not only the sign-in: a key's networks may have narrowed since,
            # and a session's cookie may be presented from somewhere else.
            check_network(request, found.key)
            return found
    raise SignInNeeded(request.url.path)


UserDep = Annotated[SignedIn, Depends(signed_in)]


async def form_of(request: Request, user: UserDep) -> FormData:
    """A submitted form, once its CSRF token (field `csrf_token`, or the X-CSRF-Token header
    htmx sends) matches the session's. SameSite=Strict already keeps the cookie off other
    sites' requests; the token is the second lock."""
    form = await request.form()
    sent = form.get("csrf_token") or request.headers.get("x-csrf-token")
    if not sessions.csrf_matches(user.csrf_token, sent if isinstance(sent, str) else None):
        raise PermissionDenied("This form has expired or did not come from the console. "
                               "Reload the page and try again.")
    return form


FormDep = Annotated[FormData, Depends(form_of)]


def form_text(form: FormData, name: str) -> str:
    """A form field's text, trimmed ("" when absent)."""
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def scope_of(user: SignedIn) -> AdminScope:
    return AdminScope(user.key)


class Identified(Protocol):
    @property
    def id(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a longer list, and where the links to its neighbours point."""

    items: Sequence[Any]
    number: int
    count: int
    total: int

    @classmethod
    def newest_first(cls, objects: Sequence[Identified], number: int) -> Page:
        """A page of rows, the newest (highest id) first."""
        return cls.of(sorted(objects, key=lambda found: -found.id), number)

    @classmethod
    def of(cls, items: Sequence[T], number: int) -> Page:
        size = PAGE_SIZE
        count = max(1, math.ceil(len(items) / size))
        number = min(max(1, number), count)
        return cls(items[(number - 1) * size: number * size], number, count, len(items))


def render(request: Request, template: str, user: SignedIn | None, *, status: int = 200,
           **context: Any) -> HTMLResponse:
    scope = scope_of(user) if user is not None else None
    return templates.TemplateResponse(request, template, {
        "user": user, "scope": scope, "path": request.url.path, **context}, status_code=status)


# A form's action refused by the domain or by the admin request model: the page shows why.
# Anything else is a bug and propagates.
REFUSALS = (SeraiError, ValidationError)


def problem(error: Exception) -> str:
    """What a page shows for a refused action: the domain's own message, or the first field
    the admin request model refused."""
    if isinstance(error, SeraiError):
        return error.message
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        return f"{field}: {first['msg']}"
    return str(error)


def error_status(error: Exception) -> int:
    return error.status_code if isinstance(error, SeraiError) else 400


async def sign_in_needed(request: Request, error: Exception) -> Response:
    assert isinstance(error, SignInNeeded)
    target = "/console/login?next=" + quote(error.path, safe="/")
    if request.headers.get("hx-request"):  # htmx follows this header instead of a 3xx
        return Response(status_code=204, headers={"hx-redirect": target})
    return RedirectResponse(target, status_code=303)


# script-src 'self' forbids inline scripts, so the pages carry their charts' data in
# <template> blocks that static/console.js reads.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                           "frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class ConsoleHeaders:
    """Adds the security headers to every /console answer, and keeps pages (which show keys
    once and balances) out of caches."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/console"):
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/console/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), *SECURITY_HEADERS]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


Handler = Callable[[Request, Exception], Awaitable[Response]]


def pages_answer_in_html(api_handler: Handler) -> Handler:
    """Wraps one of the API's error handlers: a console page's error is a page a person reads,
    with the domain's message; the console's JSON endpoints and the API keep their envelope."""

    async def handle(request: Request, error: Exception) -> Response:
        path = request.url.path
        if not path.startswith("/console") or path.startswith(JSON_PATHS):
            return await api_handler(request, error)
        status = getattr(error, "status_code", 400)
        if isinstance(error, SeraiError):
            message = error.message
        elif status == 404:
            message = "There is no such page in the console."
        else:
            message = "This address is not one the console understands."
        return render(request, "error.html", None, status=status, error=message)

    return handle


JSON_PATHS = ("/console/playground/requests/", "/console/static/")
