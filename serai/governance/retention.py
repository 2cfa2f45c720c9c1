"""Retention policies: whether the content of an organization's model calls (prompts and
completions) may be kept at all, and for how long.

`zero` (every new organization's) keeps no content anywhere: only usage metadata is recorded.
`store` with a number of days allows stored completions (`store: true`), encrypted at rest and
deleted after those days. A key may be stricter than its organization, never looser; the policy
a request runs under is the stricter of the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from serai.errors import InvalidRequest

Policy = Literal["zero", "store"]
POLICIES: tuple[str, ...] = get_args(Policy)
MAX_DAYS = 3650


@dataclass(frozen=True, slots=True)
class Retention:
    policy: Policy = "zero"
    days: int | None = None  # of `store`; a key's `store` without days takes its org's

    @property
    def stores(self) -> bool:
        return self.policy == "store"

    def describe(self) -> str:
        return f"store for {self.days} days" if self.stores else "zero retention"


ZERO = Retention()


def check(policy: str, days: int | None, *, days_required: bool = True) -> Retention:
    """A policy as given by an operator; `store` needs 1 to MAX_DAYS days (a key's may leave
    them to its organization), `zero` none."""
    if policy not in POLICIES:
        raise InvalidRequest(f"A retention policy is 'zero' or 'store' (got {policy!r}).",
                             param="retention")
    if policy == "zero":
        if days is not None:
            raise InvalidRequest("Zero retention keeps nothing: it takes no retention_days.",
                                 param="retention_days")
        return ZERO
    if days is None and days_required:
        raise InvalidRequest("The 'store' retention policy needs retention_days (how many days "
                             "content is kept).", param="retention_days")
    if days is not None and not 1 <= days <= MAX_DAYS:
        raise InvalidRequest(f"retention_days must be 1 to {MAX_DAYS}.", param="retention_days")
    return Retention("store", days)


def check_key_override(org: Retention, key: Retention | None) -> None:
    """Refuse a key policy looser than its organization's."""
    if key is None or not key.stores:
        return
    if not org.stores:
        raise InvalidRequest(
            "The organization's retention policy is zero retention: a key may only be stricter "
            "than its organization, so it cannot store content. Change the organization's "
            "policy first.", param="retention")
    if key.days is not None and org.days is not None and key.days > org.days:
        raise InvalidRequest(
            f"The organization keeps content for {org.days} days: a key may only be stricter, "
            f"so its retention_days must be at most {org.days}.", param="retention_days")


def effective(org: Retention, key: Retention | None) -> Retention:
    """The stricter of the two: zero if either is zero, else the fewer days."""
    if not org.stores or (key is not None and not key.stores):
        return ZERO
    days = org.days if key is None or key.days is None else min(key.days, org.days or key.days)
    return Retention("store", days)
