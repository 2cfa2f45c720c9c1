"""Where an organization stands in its plan's rolling windows right now: used, left, and when
room next frees up. What admission enforces (serai/billing/terms.py), shown to the people it limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from serai.billing.plans import WINDOW_COLUMN, WINDOW_SCALE, Window
from serai.billing.windows import WindowReader
from serai.storage.db import db_now_ms


@dataclass(frozen=True, slots=True)
class WindowState:
    window: Window
    used: int  # settled, plus what running requests hold
    now_ms: int
    frees_ms: int | None  # when the oldest request counted leaves the window (None: none is)

    @property
    def left(self) -> int:
        return max(self.window.limit - self.used, 0)

    def as_dict(self) -> dict[str, Any]:
        return {**self.window.as_dict(), "used": self.used, "remaining": self.left,
                "now_ms": self.now_ms, "frees_at_ms": self.frees_ms}


def window_states(*, session: Session, org_id: int, windows: list[Window]) -> list[WindowState]:
    """Each window's use, measured as admission measures it (the database clock, running
    totals, reservations held)."""
    now = db_now_ms(session)
    reader = WindowReader(session, org_id=org_id, key_id=0)
    states = []
    for window in windows:
        scale = WINDOW_SCALE[window.metric]
        use = reader.use(WINDOW_COLUMN[window.metric], key=False,
                         since_ms=now - window.seconds * 1000)
        frees = None if use.oldest_ms is None else use.oldest_ms + window.seconds * 1000
        states.append(WindowState(window, -(-use.used // scale), now, frees))
    return states
