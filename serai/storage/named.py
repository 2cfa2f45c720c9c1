"""Rows people refer to by id or by name (organizations, plans, price books), whose names are
unique: one lookup and one uniqueness check for all of them."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from serai.errors import Conflict, NotFound

Row = TypeVar("Row", bound=Any)

MAX_ID = 2**31 - 1  # PostgreSQL INTEGER; SQLite accepts more, but no id gets that far


def row_id(ref: str) -> int | None:
    """`ref` as a row id, or None; ids past the integer column's range cannot exist (the
    database would raise instead of finding nothing)."""
    return int(ref) if ref.isascii() and ref.isdigit() and int(ref) <= MAX_ID else None


def find_named(session: Session, table: type[Row], ref: str | int, *, missing: str,
               param: str) -> Row:
    """The row whose id or name is `ref`; NotFound with `missing` (which may use {ref})."""
    text = str(ref)
    row = session.get(table, number) if (number := row_id(text)) is not None else None
    if row is None:
        row = session.scalar(select(table).where(table.name == text))
    if row is None:
        raise NotFound(missing.format(ref=repr(text)), param=param)
    return row


def claim_name(session: Session, table: type[Any], name: str, *, what: str,
               row: Any | None = None) -> None:
    """Refuse `name` if another row of `table` has it (`row` itself may keep its own)."""
    if row is not None and row.name == name:
        return
    if session.scalar(select(table).where(table.name == name)) is not None:
        raise Conflict(f"{what} named {name!r} exists already.", param="name")
