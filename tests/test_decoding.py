"""Token bytes to client text: what a streaming client receives, piece by piece.

A client must never see half a UTF-8 character, the first letters of a stop sequence, or the
stop sequence itself; and when no stop comes, it must receive every character in the end.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serai.engines.decoding import StopMatcher, TextAssembler


def stream(assembler: TextAssembler, pieces: Iterable[bytes]) -> list[str]:
    """What the client receives for each piece, then for the end of the generation."""
    return [assembler.feed(piece) for piece in pieces] + [assembler.finish()]


def first_stop(text: str, stops: Iterable[str]) -> str:
    """The text a client should get: everything before the earliest stop sequence."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(hits)] if hits else text


def test_stop_split_across_pieces_is_never_shown() -> None:
    assembler = TextAssembler(["\nUser:"])
    sent = stream(assembler, [b"Tokyo.", b"\nUs", b"er", b": and Osaka?", b" more"])
    assert sent == ["Tokyo.", "", "", "", "", ""]
    assert assembler.stopped


def test_the_stop_that_ended_the_text_is_named() -> None:
    assembler = TextAssembler(["\nUser:", "END"])
    assert assembler.stop_sequence is None
    stream(assembler, [b"Tokyo", b" EN", b"D and\nUser:"])
    assert assembler.stop_sequence == "END"
    # The earliest match wins, whatever order the stops were given in.
    held = TextAssembler(["END", "\nUser:"])
    stream(held, [b"Tokyo\nUser: END"])
    assert held.stop_sequence == "\nUser:"
    # The start of a stop that never completes is text, and names no stop.
    flushed = TextAssembler(["END"])
    assert stream(flushed, [b"x EN"]) == ["x ", "EN"] and flushed.stop_sequence is None


def test_text_before_a_stop_is_released_at_once() -> None:
    assembler = TextAssembler(["\nUser:"])
    # Nothing here can begin the stop, so a streaming client gets it without waiting.
    assert assembler.feed(b"The answer is 4") == "The answer is 4"
    assert assembler.feed(b".\nUser: thanks") == "."
    assert assembler.stopped


def test_held_back_text_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    assembler = TextAssembler(["\nUser:"])
    assert assembler.feed(b"Hi\nUs") == "Hi"
    assert assembler.feed(b"ually fine") == "\nUsually fine"
    assert not assembler.stopped


def test_earliest_of_several_stops_wins() -> None:
    # The stop listed last occurs first in the text.
    assert "".join(stream(TextAssembler(["END", "STOP"]), [b"one STOP two END"])) == "one "
    # A longer stop starting earlier beats a shorter one that completes inside it.
    assert "".join(stream(TextAssembler(["cd", "bcde"]), [b"abc", b"def"])) == "a"


def test_nothing_after_a_stop_is_sent() -> None:
    assembler = TextAssembler(["###"])
    assert assembler.feed(b"done###") == "done"
    assert assembler.feed(b"more text") == ""
    assert assembler.finish() == ""


def test_without_a_stop_everything_is_sent_by_finish() -> None:
    assembler = TextAssembler(["\nUser:"])
    sent = stream(assembler, [b"See you", b" soon\nUse"])
    assert sent == ["See you", " soon", "\nUse"]
    assert not assembler.stopped


def test_without_stops_text_passes_straight_through() -> None:
    assembler = TextAssembler([])
    assert assembler.feed(b"\nUser:") == "\nUser:"
    assert assembler.finish() == ""


def test_empty_stop_string_never_ends_the_answer() -> None:
    assembler = TextAssembler(["", "\nUser:"])
    assert "".join(stream(assembler, [b"abc"])) == "abc"
    assert StopMatcher([""]).feed("abc") == "abc"


def test_multibyte_character_split_across_pieces_is_never_sent_half() -> None:
    for char in ("é", "東", "🍣"):
        raw = char.encode()
        assembler = TextAssembler([])
        sent = stream(assembler, [raw[i : i + 1] for i in range(len(raw))])
        assert sent == [""] * (len(raw) - 1) + [char, ""]


def test_multibyte_text_fed_byte_by_byte_arrives_whole() -> None:
    text = "Café in 東京 🍣!"
    assembler = TextAssembler(["\nUser:"])
    received = ""
    for byte in text.encode():
        received += assembler.feed(bytes([byte]))
        assert text.startswith(received)  # never a replacement character, never ahead of the text
    received += assembler.finish()
    assert received == text


def test_multibyte_stop_split_inside_a_character() -> None:
    raw = "答え：東京。次の質問".encode()
    cut = raw.index("。".encode()) + 1  # between the bytes of the stop's only character
    assert "".join(stream(TextAssembler(["。"]), [raw[:cut], raw[cut:]])) == "答え：東京"


@st.composite
def generations(draw: st.DrawFn) -> tuple[str, list[str], list[bytes]]:
    """A text, stop strings (often taken from the text itself), and its bytes cut anywhere."""
    text = draw(st.text(st.characters(codec="utf-8"), max_size=40))
    stop = st.text(st.characters(codec="utf-8"), min_size=1, max_size=5)
    if text:
        start = st.integers(0, len(text) - 1)
        stop = stop | st.builds(lambda i, n: text[i : i + n], start, st.integers(1, 5))
    # Stops may nest ("User" in "\nUser:"): the cut is at whichever begins first in the text.
    stops = draw(st.lists(stop, max_size=3))
    raw = text.encode()
    cuts = sorted(draw(st.sets(st.integers(0, len(raw)), max_size=12)))
    bounds = [0, *cuts, len(raw)]
    return text, stops, [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=400, deadline=None)
@given(generations())
def test_any_split_yields_the_text_up_to_the_first_stop(case: tuple[str, list[str], list[bytes]]) -> None:
    text, stops, pieces = case
    assembler = TextAssembler(stops)
    received = ""
    expected = first_stop(text, stops)
    for piece in pieces:
        received += assembler.feed(piece)
        assert expected.startswith(received)
    received += assembler.finish()
    assert received == expected
    assert assembler.stopped == any(s in text for s in stops)


def test_nested_stops_cut_the_same_whatever_the_split() -> None:
    # A client's stop "User" next to the transcript's own "\nUser:" stop.
    stops = ["\nUser:", "User"]
    raw = b"hi\nUser: next"
    whole = "".join(stream(TextAssembler(stops), [raw]))
    byte_by_byte = "".join(stream(TextAssembler(stops), [raw[i : i + 1] for i in range(len(raw))]))
    assert whole == byte_by_byte


# --- bounded work: linear in the text, whatever the stops ----------------------------------------

def fed(stops: list[str], text: str, piece: int) -> tuple[StopMatcher, str]:
    """The matcher after `text` arrived `piece` characters at a time, and what it released;
    at every step it holds back less than the longest stop."""
    matcher = StopMatcher(stops)
    longest = max(map(len, stops))
    sent = ""
    for i in range(0, len(text), piece):
        sent += matcher.feed(text[i : i + piece])
        assert matcher.held < longest
        assert len(text[: i + piece]) == len(sent) + matcher.held or matcher.stopped
    return matcher, sent + matcher.flush()


# Many stops sharing prefixes, against a text that keeps almost matching them: the worst case
# for searching each stop in the text again at every step.
SHARED_PREFIXES = ["a" * n + "b" for n in range(1, 300)] + ["a" * 255 + "c", "b" * 256]


def test_matching_work_grows_with_the_text_not_with_the_stops() -> None:
    short, short_sent = fed(SHARED_PREFIXES, "a" * 1_000, piece=3)
    long, long_sent = fed(SHARED_PREFIXES, "a" * 10_000, piece=3)
    assert (short_sent, long_sent) == ("a" * 1_000, "a" * 10_000)  # no stop: all of it, at last
    # Each character is one transition, plus failure links its own arrival paid for.
    assert short.work <= 2 * 1_000 and long.work <= 2 * 10_000
    assert long.work - short.work <= 2 * 9_000  # the extra 9,000 characters, two steps each
    one, _ = fed(["a" * 255 + "c"], "a" * 10_000, piece=3)
    assert long.work <= one.work + 300  # three hundred stops cost what one does


@pytest.mark.timeout(30)  # searching every stop again at every step took minutes here
def test_long_stops_fed_a_character_at_a_time_cost_one_step_each() -> None:
    stops = ["b" * 20_000, "a" * 20_000 + "c"]
    matcher, sent = fed(stops, "a" * 30_000 + "c" + "a" * 20_000 + "c", piece=1)
    assert matcher.stopped and matcher.matched == stops[1]
    assert sent == "a" * 10_000
    assert matcher.work <= 2 * (30_001 + 20_001)


def test_a_stop_split_across_pieces_behind_many_near_misses_is_found() -> None:
    stops = ["abcabd", "bcx", "cab", "abcabc"]
    text = "zabcab" + "cab" + "d tail"  # "abcabc" starts before "cab" completes
    for piece in range(1, len(text) + 1):
        matcher, sent = fed(stops, text, piece)
        assert sent == first_stop(text, stops) == "z"
        assert matcher.matched == "abcabc"


@settings(max_examples=300, deadline=None)
@given(st.text("ab", max_size=60), st.lists(st.text("ab", min_size=1, max_size=6), min_size=1,
                                             max_size=8), st.integers(1, 7))
def test_the_cut_and_the_held_text_over_a_small_alphabet(text: str, stops: list[str],
                                                         piece: int) -> None:
    # Two letters make stops overlap, share prefixes and nest as often as they can.
    matcher, sent = fed(stops, text, piece)
    assert sent == first_stop(text, stops)
    assert matcher.stopped == any(s in text for s in stops)
    assert matcher.work <= 2 * len(text)
