"""Signing in to the console with an admin key, and out again.

The sign-in form has no session yet to carry a CSRF token, so it uses a double-submit token: a
random value in a SameSite=Strict cookie that the form must repeat.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from starlette.responses import RedirectResponse, Response

from serai.api.deps import ServicesDep, client_address, record_failed_authentication
from serai.console import sessions
from serai.console.sessions import SignedIn
from serai.console.web import FormDep, UserDep, render, scope_of
from serai.errors import AuthenticationFailed
from serai.governance import audit

router = APIRouter(prefix="/console", include_in_schema=False)

LOGIN_COOKIE = "serai_console_login"


def home_of(user: SignedIn) -> str:
    """Where a signed-in key starts: the platform's overview, or its organization's usage."""
    if scope_of(user).operator:
        return "/console/overview"
    return f"/console/orgs/{user.key.org_id}/usage"


def _safe_next(target: str | None) -> str | None:
    # Only a console path: an attacker's link must not send a fresh session elsewhere.
    if target and target.startswith("/console/") and not target.startswith("/console//"):
        return target
    return None


def _set_cookie(request: Request, response: Response, name: str, value: str,
                max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/console", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


def _login_page(request: Request, *, error: str | None = None, status: int = 200,
                next_path: str | None = None) -> Response:
    token = secrets.token_urlsafe(32)
    response = render(request, "login.html", None, status=status, error=error,
                      login_token=token, next_path=next_path or "")
    _set_cookie(request, response, LOGIN_COOKIE, token, max_age=3600)
    return response


@router.get("/login")
async def login_page(request: Request, next: str | None = None) -> Response:
    return _login_page(request, next_path=_safe_next(next))


@router.post("/login")
async def login(request: Request, services: ServicesDep,
                key: Annotated[str, Form()] = "", login_token: Annotated[str, Form()] = "",
                next: Annotated[str, Form()] = "") -> Response:
    target = _safe_next(next)
    if not sessions.csrf_matches(request.cookies.get(LOGIN_COOKIE, ""), login_token or None):
        return _login_page(request, status=403, next_path=target,
                           error="The sign-in form expired. Please try again.")
    secret = key.strip()
    if not secret:
        return _login_page(request, status=400, next_path=target,
                           error="Paste an admin API key to sign in.")

    client = client_address(request)

    def open_session() -> tuple[str, SignedIn]:
        with services.database.session(write=True) as session:
            return sessions.sign_in(session=session, secret=secret, client=client)

    try:
        token, user = await asyncio.to_thread(open_session)
    except AuthenticationFailed as error:
        await record_failed_authentication(request, services, secret, error)
        return _login_page(request, status=401, error=error.message, next_path=target)
    except sessions.SignInRefused as refused:
        # In a transaction of its own: the refused sign-in's rolled back.
        await asyncio.to_thread(audit.record_alone, services.database,
                                action="console.sign_in_refused", actor=refused.key.shown,
                                target=f"key:{refused.key.shown}", org_id=refused.key.org_id,
                                details={"reason": refused.message, "client": client})
        return _login_page(request, status=403, error=refused.message, next_path=target)
    response = RedirectResponse(target or home_of(user), status_code=303)
    _set_cookie(request, response, sessions.COOKIE, token, max_age=sessions.LIFETIME_S)
    response.delete_cookie(LOGIN_COOKIE, path="/console")
    return response


@router.post("/logout")
async def logout(request: Request, user: UserDep, form: FormDep,
                 services: ServicesDep) -> Response:
    token = request.cookies.get(sessions.COOKIE, "")

    def close() -> None:
        with services.database.session(write=True) as session:
            sessions.sign_out(session=session, token=token)
            audit.record(session, action="console.sign_out", target=f"key:{user.key.shown}",
                         org_id=user.key.org_id, actor=user.key.shown)

    await asyncio.to_thread(close)
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(sessions.COOKIE, path="/console")
    return response


@router.get("")
@router.get("/")
async def home(user: UserDep) -> Response:
    return RedirectResponse(home_of(user), status_code=303)
