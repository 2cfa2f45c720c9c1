"""Reading an in-process app's usage ledger in tests: rows queued in the writer included."""

from __future__ import annotations

from serai.api.deps import Services
from serai.billing import settlement
from serai.storage.tables import UsageRow


async def usage_rows(services: Services, *, limit: int = 100) -> list[UsageRow]:
    """The latest usage rows, oldest first, after the ledger writer flushed what it held."""
    await services.gateway.ledger.flush()
    with services.database.session() as session:
        return list(reversed(settlement.recent_usage(session=session, limit=limit)))
