"""The console mounted on an app: its pages, static files, headers and HTML error pages. Kept
out of the package's __init__, so a page module never imports the package that imports it."""

from __future__ import annotations

from typing import cast

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from serai.console import organization, platform, playground, signin
from serai.console.web import (
    HERE,
    ConsoleHeaders,
    Handler,
    SignInNeeded,
    pages_answer_in_html,
    sign_in_needed,
)
from serai.errors import SeraiError


def install(app: FastAPI) -> None:
    """Mount the console on an app whose API error handlers are already installed."""
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.include_router(signin.router)
    app.include_router(organization.router)
    app.include_router(platform.router)
    app.include_router(playground.router)
    app.add_exception_handler(SignInNeeded, sign_in_needed)
    for error in (SeraiError, RequestValidationError, HTTPException):
        # Starlette types a handler as sync or async; the API's (serai.api.errors) are async.
        api_handler = cast(Handler, app.exception_handlers[error])
        app.add_exception_handler(error, pages_answer_in_html(api_handler))
    app.add_middleware(ConsoleHeaders)
