"""Secrets in logs: anything shaped like a Serai key is cut to its display prefix before a log
record reaches any handler. Code should never log a key; this is the second line of defence.
"""

from __future__ import annotations

import logging
import re
import traceback

from serai.governance.accounts import KEY_SCHEME, PREFIX_LENGTH, shown_prefix

# The scheme, the part of the random string a prefix shows, then at least one more character:
# a prefix already cut ("sk-serai-abcdef…") does not match again.
_KEY = re.compile(re.escape(KEY_SCHEME) + rf"[A-Za-z0-9_-]{{{PREFIX_LENGTH - len(KEY_SCHEME) + 1},}}")


def mask(text: str) -> str:
    return _KEY.sub(lambda match: shown_prefix(match[0]), text)


class KeyMask(logging.Filter):
    """Rewrites a record's message (its arguments merged in), exception and stack text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # arguments that do not fit: the handler reports it, unformatted
        if KEY_SCHEME in message:
            record.msg, record.args = mask(message), None
        if record.exc_info and not record.exc_text:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = mask(text)  # formatters print exc_text when it is set
        elif record.exc_text:
            record.exc_text = mask(record.exc_text)
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
        return True


_MASK = KeyMask()


def install() -> None:
    """Mask every record as it is made, whichever logger or handler it goes to.

    A filter on a logger does not see its children's records, and handlers come and go (uvicorn
    and pytest add their own), so the filter runs in the record factory instead. Installing
    twice changes nothing.
    """
    factory = logging.getLogRecordFactory()
    if getattr(factory, "masks_keys", False):
        return

    def masked_record(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        _MASK.filter(record)
        return record

    # A mark on the factory, read by the check that it is installed once; functions take
    # attributes, which mypy does not model.
    masked_record.masks_keys = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(masked_record)
