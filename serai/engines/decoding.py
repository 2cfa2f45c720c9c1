"""Turning a stream of token bytes into client text: UTF-8 reassembly and stop sequences.

A token can end in the middle of a UTF-8 character, and a stop sequence can arrive split over
several tokens. Text is only released once it can no longer become part of either, so a client
never sees half a character or the first letters of a stop sequence.
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Sequence


class _StopAutomaton:
    """The stop sequences as one Aho-Corasick automaton. A state is the longest tail of the text
    read so far that is the beginning of some stop; each character read is one transition plus
    failure links, which the text's own length pays for (a state's depth grows by at most one
    per character and every failure link lowers it). So reading costs the same whatever the
    number and the length of the stops; building costs their total length."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.next: list[dict[str, int]] = [{}]
        self.depth = [0]
        self.fail = [0]
        self.ending: list[str | None] = [None]  # the longest stop that ends at this state
        for stop in stops:
            state = 0
            for c in stop:
                if c not in self.next[state]:
                    self.next.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.fail.append(0)
                    self.ending.append(None)
                    self.next[state][c] = len(self.next) - 1
                state = self.next[state][c]
            self.ending[state] = stop
        # Breadth first, so a state's failure target (shallower) is complete before it.
        queue = list(self.next[0].values())
        for state in queue:
            for c, child in self.next[state].items():
                self.fail[child] = self.step(self.fail[state], c)[0] if state else 0
                if self.ending[child] is None:  # else its own stop is the longest
                    self.ending[child] = self.ending[self.fail[child]]
                queue.append(child)

    def step(self, state: int, c: str) -> tuple[int, int]:
        """The state after reading `c`, and the transitions that took."""
        work = 1
        while c not in self.next[state] and state:
            state = self.fail[state]
            work += 1
        return self.next[state].get(c, 0), work


class StopMatcher:
    """Releases text that cannot be the start of a stop sequence; reports when one is hit.

    Each character is read once, by the stops' automaton, and copied once, when it is released:
    what is held back is the tail the automaton may still complete, so it is shorter than the
    longest stop. The cut is at the stop that begins earliest in the text, so it never depends
    on how the text was split: a longer stop that began before one that has just completed is
    waited for.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._automaton = _StopAutomaton(self._stops) if self._stops else None
        self._state = 0
        self._pieces: deque[str] = deque()  # the held text, as fed, its first _skip chars sent
        self._skip = 0
        self._read = 0  # characters read, in all
        self._sent = 0  # characters released, in all
        self._found: tuple[int, str] | None = None  # (where, stop) of the earliest stop read
        self.stopped = False
        self.matched: str | None = None  # the stop sequence that was hit
        self.work = 0  # automaton transitions taken: what matching has cost so far

    @property
    def held(self) -> int:
        """Characters read but not released: a possible start of a stop."""
        return 0 if self.stopped else self._read - self._sent

    def feed(self, text: str) -> str:
        """Add generated text; return the part that is safe to send. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        automaton = self._automaton
        if automaton is None:
            return text
        self._pieces.append(text)
        state, found, read = self._state, self._found, self._read
        for c in text:
            state, work = automaton.step(state, c)
            self.work += work
            read += 1
            stop = automaton.ending[state]
            if stop is not None and (found is None or read - len(stop) < found[0]):
                found = (read - len(stop), stop)
            # No stop still pending began before the one found: it is the earliest there is.
            if found is not None and read - automaton.depth[state] >= found[0]:
                self._read = read
                return self._stop(found)
        self._state, self._found, self._read = state, found, read
        return self._release(read - automaton.depth[state])

    def flush(self) -> str:
        """The generation ended: settle what was held back (a complete stop in it still cuts)."""
        if self.stopped:
            return ""
        if self._found is not None:
            return self._stop(self._found)
        return self._release(self._read)

    def _stop(self, found: tuple[int, str]) -> str:
        text = self._release(found[0])
        self.stopped = True
        self.matched = found[1]
        self._pieces.clear()
        return text

    def _release(self, until: int) -> str:
        """The held text up to character `until` (counted from the start), no longer held."""
        out = []
        while self._sent < until:
            piece = self._pieces[0]
            take = min(len(piece) - self._skip, until - self._sent)
            out.append(piece[self._skip:self._skip + take])
            self._sent += take
            self._skip += take
            if self._skip == len(piece):
                self._pieces.popleft()
                self._skip = 0
        return "".join(out)


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
