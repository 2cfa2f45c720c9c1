"""Turning a stream of token bytes into client text: UTF-8 reassembly and stop sequences.

A token can end in the middle of a UTF-8 character, and a stop sequence can arrive split over
several tokens. Text is only released once it can no longer become part of either, so a client
never sees half a character or the first letters of a stop sequence.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class StopMatcher:
    """Releases text that cannot be the start of a stop sequence; reports when one is hit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop sequence that was hit

    def feed(self, text: str) -> str:
        """Add generated text; return the part that is safe to send. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        return self._resolve(self._held + text, final=False)

    def flush(self) -> str:
        """The generation ended: settle what was held back (a complete stop in it still cuts)."""
        if self.stopped or not self._held:
            return ""
        held, self._held = self._held, ""
        return self._resolve(held, final=True)

    def _resolve(self, buffer: str, *, final: bool) -> str:
        found = [(i, s) for s in self._stops if (i := buffer.find(s)) >= 0]
        match, stop = min(found, key=lambda f: f[0], default=(-1, None))
        # A longer stop that started earlier may still be completing ("\nUser" of "\nUser:" while
        # "User" already matched): wait for it, so the cut never depends on how text was split.
        keep = 0 if final else self._longest_stop_prefix_suffix(buffer)
        pending = len(buffer) - keep if keep else -1
        if match >= 0 and not 0 <= pending < match:
            self.stopped = True
            self.matched = stop
            self._held = ""
            return buffer[:match]
        cut = pending if pending >= 0 else len(buffer)
        self._held = buffer[cut:]
        return buffer[:cut]

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best


class TextAssembler:
    """Token bytes in, safe text out: UTF-8 reassembly followed by stop matching."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    @property
    def stop_sequence(self) -> str | None:
        """The stop sequence that ended the text, if one did."""
        return self._stops.matched

    def feed(self, piece: bytes) -> str:
        return self._stops.feed(self._utf8.decode(piece))

    def finish(self) -> str:
        return self._stops.feed(self._utf8.decode(b"", final=True)) + self._stops.flush()
