"""The metering seam: what admission hands a request (`Admission`), what a finished request
hands back (`UsageRecord`), and the `Limiter` that holds what running requests may use.

A Limiter admits a request (`reserve`: every limit checked, the worst case held) and settles it
(`settle`: one usage row, the hold given back, the cost taken from the balance), each exactly
once. Its two backends evaluate the same terms (terms.py): database_limits.py in the database
alone, redis_limits.py in Redis shared by several processes; both settle through settlement.py.
The ledger writer (ledger.py) hands finished requests' records to `settle` in batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from serai.billing.plans import MILLI, Pricing
from serai.governance.accounts import KeyInfo

UsageStatus = Literal["ok", "cancelled", "error", "interrupted"]


@dataclass(frozen=True, slots=True)
class Admission:
    """A request let in: what it holds, how it is priced, and the rate-limit headers to send."""

    reservation_id: str | None  # None: not metered against any limit (operator keys)
    org_id: int | None
    amount_micros: int = 0
    pricing: Pricing = field(default_factory=Pricing)
    charged: bool = False
    multiplier_milli: int = MILLI
    headers: dict[str, str] = field(default_factory=dict)


UNMETERED = Admission(reservation_id=None, org_id=None)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """A finished request's usage, under the admission that let it in."""

    request_id: str
    key_id: int | None
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    status: UsageStatus
    ttft_ms: float | None
    latency_ms: float
    cached_tokens: int = 0
    admission: Admission = UNMETERED
    region: str | None = None  # of the deployment that served it
    deployment: str | None = None


class Limiter(Protocol):
    """Where admission state lives. Every method is blocking: callers run it in a thread."""

    def reserve(self, *, key: KeyInfo, request_id: str, model: str, endpoint: str,
                prompt_tokens: int, max_tokens: int) -> Admission:
        "Check every limit and hold the worst case; raise RateLimited/QuotaExceeded otherwise."

    def settle(self, records: list[UsageRecord]) -> None:
        "Write the usage rows and give back what each request held, each exactly once."

    def release(self, admission: Admission) -> None:
        "Give back the hold of a request that never ran."

    def renew(self) -> int:
        "Renew the holds of the requests this process is running; returns how many."

    def abandon(self, record: UsageRecord) -> None:
        "Stop renewing the hold of a record that can never be settled (the sweeper takes it)."

    def sweep(self, older_than_s: float) -> int:
        "Release holds nobody renewed for `older_than_s` (a crashed process's); returns how many."

    def close(self) -> None:
        "Let go of connections."
