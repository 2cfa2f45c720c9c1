"""The console as a browser drives it, in process: signing in, reading a form's CSRF token, and
an organization with the admin key that signs in to its pages."""

from __future__ import annotations

import re
from typing import Any

from serai.governance import accounts
from tests.support.admin_api import Admin
from tests.support.tenants import customer

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


async def sign_in(admin: Admin, key: str, *, next_path: str = "") -> Any:
    """Sign in as a browser would: the form's token and cookie, then the key."""
    page = await admin.http.get("/console/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert token is not None
    return await admin.http.post("/console/login", data={
        "key": key, "login_token": token[1], "next": next_path})


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found is not None, "the page has no form with a CSRF token"
    return found[1]


def org_key(admin: Admin, *, role: str, name: str = "acme", plan: dict[str, Any] | None = None,
            prices: tuple[int, int] | None = None, balance: int = 0) -> tuple[int, str, str]:
    """An organization with a model key, and an admin key of `role` in it."""
    with admin.services.database.session() as session:
        found = customer(session, name=name, plan=plan, prices=prices, balance=balance)
        _, secret = accounts.create_key(session=session, name=f"{role}-key", org_id=found.org_id,
                                        role=role, is_admin=True)
    return found.org_id, found.secret, secret
