"""Failed authentications, counted in memory and written to the audit log once a minute: one
`auth.failed` entry per minute, key and client network, with how many there were.

A request with a wrong key costs the database only the key lookup: no transaction and no row of
its own. Written one entry each, failures would let anyone without a key grow the audit log, and
queue on its append lock, as fast as they can send requests.

What an entry names is bounded too. A key prefix is named only when a key has that prefix (a
revoked or expired key, or a wrong secret for a real key's prefix): prefixes no key has are the
sender's own text, so they count together as `unknown`, with the first few kept as a sample.
Client addresses count by network, /24 for IPv4 and /64 for IPv6 (what one client changes at
will). Past `max_groups` groups held, further ones count in one `other` group of their minute.

Several processes each count and write their own entries: a group's total is the sum of its
entries.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from serai.governance import audit
from serai.storage.db import Database

log = logging.getLogger("serai.audit")

MAX_GROUPS = 1000  # groups held between two writes; past it, the `other` group of the minute
SAMPLE = 5  # prefixes no key has, kept per group to show what was tried
WRITE_INTERVAL_S = 60.0
UNKNOWN = "unknown"  # a prefix no key has, or an address that is not an IP address
OTHER = "other"  # the group past max_groups
IPV4_NETWORK = 24
IPV6_NETWORK = 64


def network_of(client: str | None) -> str:
    """The network a client address counts under: its /24 (IPv4, an IPv4-mapped IPv6 address
    included) or its /64 (IPv6)."""
    try:
        address = ipaddress.ip_address(client or "")
    except ValueError:
        return UNKNOWN
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    bits = IPV4_NETWORK if address.version == 4 else IPV6_NETWORK
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


@dataclass(frozen=True, slots=True, order=True)
class Group:
    """What one entry counts: failures in one minute, for one key prefix, from one network."""

    minute: int  # its first second, epoch
    prefix: str  # a key's display prefix, `unknown` or `other`
    network: str  # `203.0.113.0/24`, `2001:db8::/64`, `unknown` or `other`


@dataclass(slots=True)
class Tally:
    count: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    sample: list[str] = field(default_factory=list)  # prefixes no key has, the first few

    def add(self, other: Tally) -> None:
        self.count += other.count
        self.reasons.update(other.reasons)
        self.sample += [p for p in other.sample if p not in self.sample][:SAMPLE - len(self.sample)]

    def details(self, group: Group) -> dict[str, Any]:
        details: dict[str, Any] = {
            "count": self.count, "network": group.network,
            "minute": datetime.fromtimestamp(group.minute, UTC).isoformat(),
            "reasons": dict(sorted(self.reasons.items()))}
        if self.sample:
            details["prefixes"] = self.sample
        return details


class FailedAuthentications:
    """This process's failed authentications since its last write to the audit log.

    `count` is called on the event loop and never touches the database; `write` (once a minute,
    by `write_forever`, and at shutdown) appends one entry per group in one transaction. The
    minute is this process's clock: it labels entries, it limits nothing.
    """

    def __init__(self, database: Database, *, max_groups: int = MAX_GROUPS,
                 clock: Callable[[], float] = time.time) -> None:
        self._database = database
        self._max_groups = max_groups
        self._clock = clock
        self._groups: dict[Group, Tally] = {}

    def count(self, *, prefix: str, reason: str, client: str | None) -> None:
        """One failure: `prefix` is the presented secret's display prefix, `reason` why it was
        refused (`unknown` when no key has that prefix), `client` the address it came from."""
        known = reason != UNKNOWN
        minute = int(self._clock() // 60) * 60
        self._add(Group(minute, prefix if known else UNKNOWN, network_of(client)),
                  Tally(1, Counter({reason: 1}), [] if known else [prefix]))

    def _add(self, group: Group, tally: Tally) -> None:
        held = self._groups.get(group)
        if held is None and len(self._groups) >= self._max_groups:
            group = Group(group.minute, OTHER, OTHER)
            held = self._groups.get(group)
        if held is None:
            held = self._groups[group] = Tally()
        held.add(tally)

    @property
    def pending(self) -> int:
        """Failures counted and not yet written."""
        return sum(tally.count for tally in self._groups.values())

    async def write(self) -> int:
        """Append one entry per group held, in one transaction; returns how many. If the write
        fails, the counts stay held for the next one (and the error is raised)."""
        taken, self._groups = self._groups, {}
        if not taken:
            return 0
        try:
            await asyncio.to_thread(self._append, taken)
        except Exception:
            # Not on cancellation: the thread may still commit them, and counting them again
            # would write them twice.
            for group, tally in taken.items():
                self._add(group, tally)
            raise
        return len(taken)

    def _append(self, groups: dict[Group, Tally]) -> None:
        with self._database.session(write=True) as session:
            for group, tally in sorted(groups.items()):
                audit.record(session, action="auth.failed", actor=group.prefix,
                             target=f"key:{group.prefix}", details=tally.details(group))

    async def write_forever(self, interval_s: float = WRITE_INTERVAL_S) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.write()
            except Exception:
                log.exception("writing failed authentications to the audit log failed; "
                              "they are kept for the next try")
