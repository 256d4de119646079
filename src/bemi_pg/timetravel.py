"""Questions to the audit trail: a row's history, the row (or table) as of a moment, blame.

Each function takes a connection to the destination database and calls the SQL functions
that bemi-pg installs there (``bemi.history``, ``bemi.as_of``, ``bemi.as_of_all``,
``bemi.blame``). JSON values come back with numbers as Decimal, so nothing is rounded.
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

__all__ = ["answers", "history", "as_of", "as_of_all", "blame"]


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


def history(conn: psycopg.Connection[Any], table: str, primary_key: str, limit: int = 100) -> list[dict[str, Any]]:
    """The row's changes, newest first, each with its context and ``changed``: {column: [old, new]}."""
    with _cursor(conn) as cur:
        return cur.execute("SELECT * FROM bemi.history(%s, %s, %s)", (table, str(primary_key), limit)).fetchall()


def as_of(conn: psycopg.Connection[Any], table: str, primary_key: str, at: datetime | str) -> dict[str, Any] | None:
    """The row as ``to_jsonb`` gave it at ``at``, or None where it did not exist then;
    :class:`CannotSay` where the trail cannot know."""
    with answers(), _cursor(conn) as cur:
        row = cur.execute("SELECT bemi.as_of(%s, %s, %s::timestamptz) AS row_data", (table, str(primary_key), at)).fetchone()
    return row["row_data"] if row else None


def as_of_all(conn: psycopg.Connection[Any], table: str, at: datetime | str) -> dict[str, dict[str, Any]]:
    """Every row of the table at ``at``, by primary key; :class:`CannotSay` where the trail cannot know."""
    with answers(), _cursor(conn) as cur:
        rows = cur.execute("SELECT primary_key, row_data FROM bemi.as_of_all(%s, %s::timestamptz)", (table, at)).fetchall()
    return {r["primary_key"]: r["row_data"] for r in rows}


def blame(conn: psycopg.Connection[Any], table: str, primary_key: str) -> list[dict[str, Any]]:
    """For each column of the row as it is now, the change that last set its value; a column
    unchanged since tracking began has ``id`` None and ``operation`` "BEFORE TRACKING"."""
    with answers(), _cursor(conn) as cur:
        return cur.execute('SELECT * FROM bemi.blame(%s, %s) ORDER BY "column"', (table, str(primary_key))).fetchall()
