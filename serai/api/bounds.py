"""The ranges of the numbers and times a client may send, as types the request models use.

Python's ints and JSON's numbers have no size, but a PostgreSQL INTEGER column, SQLite's 64
bits, orjson, Redis's Lua numbers and llama.cpp's C ints all do. A value out of range is
refused while the request is parsed (a 400 naming the parameter, before anything is admitted or
held), instead of failing later in whatever first cannot hold it. The ranges are published in
/openapi.json, so clients and fuzzers see them too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, Field

from serai.storage.named import MAX_ID

# OpenAI's own bound on integer parameters, a PostgreSQL INTEGER, and a C int in llama.cpp.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The most a multiplier (a plan's per-model multiplier, its price ratio, a peak period) may
# scale a price or a quota by: no tariff is a thousand times its base, and the bound keeps
# the quota arithmetic of a request of INT32_MAX tokens within 64 bits.
MAX_MULTIPLIER = 1000

# max_tokens and its kin: how many tokens a request may ask for at most.
TokenCount = Annotated[int, Field(ge=1, le=INT32_MAX)]
# OpenAI's and vLLM's seeds are 64-bit; an embedded engine uses the low 32 bits.
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
# The id of a row (an organization, a plan, a price book, an audit entry): INTEGER columns.
RowId = Annotated[int, Field(ge=1, le=MAX_ID)]
# A positive count an INTEGER column keeps: rpm, tpm, max_concurrency, a window's seconds.
PositiveInt = Annotated[int, Field(ge=1, le=INT32_MAX)]


def _on_the_utc_calendar(moment: datetime) -> datetime:
    """`moment` in UTC; one whose offset carries it past year 9999 (or before year 1) is
    refused here rather than where it is first converted."""
    try:
        return moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    except OverflowError:
        raise ValueError("the time is outside the years 1 to 9999 in UTC") from None


# A time a client gives (an expiry): read as UTC when it has no offset, as stored.
Moment = Annotated[datetime, AfterValidator(_on_the_utc_calendar)]
