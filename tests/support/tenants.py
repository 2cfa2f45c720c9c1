"""A customer for tests: an organization with an optional plan, price book and balance, and
one model key, made through the domain functions an operator's commands use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from serai.billing import plans
from serai.governance import accounts
from serai.governance.accounts import KeyInfo


@dataclass(frozen=True)
class Customer:
    org_id: int
    key: KeyInfo
    secret: str


def customer(session: Session, *, name: str = "acme", model: str = "fake-model",
             plan: dict[str, Any] | None = None, prices: tuple[int, int] | None = None,
             cached_price: int | None = None, balance: int = 0,
             regions: list[str] | None = None) -> Customer:
    """`prices` are (input, output) micro-units per million tokens of `model`; `regions` are
    the organization's allowed regions (None: any)."""
    plan_id = plans.create_plan(session=session, name=f"{name}-plan", **plan).id if plan else None
    book_id = None
    if prices is not None:
        book_id = plans.create_price_book(session=session, name=f"{name}-book").id
        plans.set_price(session=session, price_book_id=book_id, model=model,
                        input_micros=prices[0], output_micros=prices[1],
                        cached_input_micros=cached_price)
    org = accounts.create_org(session=session, name=name, plan_id=plan_id, price_book_id=book_id)
    if regions is not None:
        accounts.update_org(session=session, org_id=org.id, allowed_regions=regions)
    if balance:
        accounts.adjust_balance(session=session, org_id=org.id, amount_micros=balance,
                                kind="topup", reason="test")
    key, secret = accounts.create_key(session=session, name="app", org_id=org.id)
    return Customer(org.id, key, secret)
