"""Questions to the audit trail: a row's history, the row (or table) as of a moment, blame.

Each function takes a connection to the destination database and calls the SQL functions
that bemi-pg installs there (``bemi.history``, ``bemi.as_of``, ``bemi.as_of_all``,
``bemi.blame``). JSON values come back with numbers as Decimal, so nothing is rounded.

``source`` names the trail to answer from (a source's identity, ``<system_identifier>/<database>``,
as ``bemi.source_identity()`` gives it in the tracked database); without it, the destination's
only source (or, in the tracked database, its own). A table is ``table`` or ``schema.table``; a
bare name found in several schemas is an error asking for ``schema.table``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads

from .errors import BemiError, CannotSay

__all__ = ["answers", "history", "as_of", "as_of_all", "blame", "periods"]


@contextmanager
def answers() -> Iterator[None]:
    """Turn the time-travel functions' own errors into bemi-pg's: SQLSTATE BEM05 ("the trail
    cannot say", exit 5) and BEM01 (a question to ask otherwise, e.g. an ambiguous table name)."""
    try:
        yield
    except psycopg.Error as exc:
        if exc.sqlstate == "BEM05":
            raise CannotSay(exc.diag.message_primary or str(exc)) from None
        if exc.sqlstate == "BEM01":
            raise BemiError(exc.diag.message_primary or str(exc)) from None
        raise


def _cursor(conn: psycopg.Connection[Any]) -> psycopg.Cursor[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    set_json_loads(partial(json.loads, parse_float=Decimal), cur)
    return cur


def _source(source: str | None) -> tuple[str, str]:
    """The source argument of a SQL call: the one named, or the destination's own choice."""
    return ("%s", source) if source is not None else ("bemi.trail_source()", "")


def _call(conn: psycopg.Connection[Any], text: str, source: str | None, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Run a time-travel call whose first argument ({source}) is the source."""
    placeholder, value = _source(source)
    with answers(), _cursor(conn) as cur:
        return cur.execute(text.format(source=placeholder), ((value,) if source is not None else ()) + args).fetchall()


def history(conn: psycopg.Connection[Any], table: str, primary_key: str, limit: int = 100, *,
            source: str | None = None) -> list[dict[str, Any]]:
    """The row's changes, newest first, each with its context and ``changed``: {column: [old, new]}."""
    return _call(conn, "SELECT * FROM bemi.history({source}, %s, %s, %s)", source, (table, str(primary_key), limit))


def as_of(conn: psycopg.Connection[Any], table: str, primary_key: str, at: datetime | str, *,
          source: str | None = None) -> dict[str, Any] | None:
    """The row as ``to_jsonb`` gave it at ``at``, or None where it did not exist then;
    :class:`CannotSay` where the trail cannot know."""
    rows = _call(conn, "SELECT bemi.as_of({source}, %s, %s, %s::timestamptz) AS row_data", source, (table, str(primary_key), at))
    return rows[0]["row_data"] if rows else None


def as_of_all(conn: psycopg.Connection[Any], table: str, at: datetime | str, *,
              source: str | None = None) -> dict[str, dict[str, Any]]:
    """Every row of the table at ``at``, by primary key; :class:`CannotSay` where the trail cannot know."""
    rows = _call(conn, "SELECT primary_key, row_data FROM bemi.as_of_all({source}, %s, %s::timestamptz)", source, (table, at))
    return {r["primary_key"]: r["row_data"] for r in rows}


def blame(conn: psycopg.Connection[Any], table: str, primary_key: str, *, source: str | None = None) -> list[dict[str, Any]]:
    """For each column of the row as it is now, the change that last set its value; a column
    unchanged since tracking began has ``id`` None and ``operation`` "BEFORE TRACKING"."""
    return _call(conn, 'SELECT * FROM bemi.blame({source}, %s, %s) ORDER BY "column"', source, (table, str(primary_key)))


def periods(conn: psycopg.Connection[Any], *, source: str | None = None) -> list[dict[str, Any]]:
    """The source's tracking periods: per table, when tracking began and ended (None: tracked
    still), and why; the time between two periods of a table is a gap."""
    return _call(conn, "SELECT * FROM bemi.trail_periods({source})", source, ())
