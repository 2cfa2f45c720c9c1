"""Blocking work that must not be torn in half by a client leaving."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def finish_or_undo(work: Callable[[], T], undo: Callable[[T], Awaitable[None]]) -> T:
    """Run `work` in a thread to its end even if the caller is cancelled meanwhile; if it was,
    `undo` what the work did (a reservation or a claim nobody will use) and re-raise."""
    held = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(held)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await undo(await held)
        raise
