"""The explorer's reads of the trail: filters from a query string, keyset pages, one transaction
or request, a row's extent, the overview. Every read is filtered by the source the explorer
serves and runs in a read-only transaction with a statement timeout; request text reaches SQL
only as parameters (and the changes table as an identifier from the installed settings)."""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from ..db import connect
from ..errors import BemiError
from ..queries import query

__all__ = ["Filters", "Page", "BadRequest", "Trail", "parse_filters", "parse_context"]

OPERATIONS = ("CREATE", "UPDATE", "DELETE", "TRUNCATE")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
IDLE_CONNECTIONS = 4  # kept open between reads, per explorer


class BadRequest(BemiError):
    """A filter, cursor or form field the explorer cannot use; the message names the fix."""


@dataclass(frozen=True)
class Filters:
    """What a changes page shows: every field optional, all of them ANDed."""

    table: str | None = None
    operation: str | None = None
    pk: str | None = None
    transaction_id: int | None = None
    context: dict[str, Any] | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = DEFAULT_LIMIT
    cursor: tuple[datetime, int, int] | None = None

    def query_string(self, **override: Any) -> dict[str, str]:
        """These filters as query parameters (for links), with ``override`` applied."""
        values: dict[str, Any] = {"table": self.table, "operation": self.operation, "pk": self.pk,
                                  "transaction_id": self.transaction_id,
                                  "context": json.dumps(self.context, sort_keys=True) if self.context else None,
                                  "since": self.since.isoformat() if self.since else None,
                                  "until": self.until.isoformat() if self.until else None,
                                  "limit": self.limit if self.limit != DEFAULT_LIMIT else None}
        values.update(override)
        return {k: str(v) for k, v in values.items() if v is not None and v != ""}


def parse_context(text: str) -> dict[str, Any]:
    """A context filter: a JSON object (containment, ``{"user_id": 42}``) or ``key=value``
    (the value read as JSON where it is JSON, else as a string)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            raise BadRequest(f"context {text!r} is not JSON: pass an object such as {{\"user_id\": 42}} or key=value") from None
        if not isinstance(value, dict):
            raise BadRequest("context must be a JSON object such as {\"user_id\": 42}")
        return value
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise BadRequest(f"context {text!r} not understood: pass a JSON object such as {{\"user_id\": 42}} or key=value")
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = raw
    return {key.strip(): parsed}


def _timestamp(name: str, text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.strip().replace(" ", "T", 1) if "T" not in text else text.strip())
    except ValueError:
        raise BadRequest(f"{name} {text!r} is not a timestamp: use ISO 8601, e.g. 2024-05-01T12:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def encode_cursor(committed_at: datetime, commit_position: int, seq: int) -> str:
    raw = json.dumps([committed_at.isoformat(), commit_position, seq]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(text: str) -> tuple[datetime, int, int]:
    try:
        at, position, seq = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        return datetime.fromisoformat(at), int(position), int(seq)
    except (ValueError, TypeError, binascii.Error):
        raise BadRequest("cursor is not one this explorer gave: take `next` from the previous page") from None


def parse_filters(params: Mapping[str, str]) -> Filters:
    """Filters from a query string (or form); BadRequest names a bad field and its fix."""
    def get(name: str) -> str | None:
        value = params.get(name)
        return value.strip() if value and value.strip() else None

    operation = get("operation")
    if operation is not None:
        operation = operation.upper()
        if operation == "INSERT":
            operation = "CREATE"
        if operation not in OPERATIONS:
            raise BadRequest(f"operation {operation!r} is not one of {', '.join(OPERATIONS)}")
    xid = get("transaction_id")
    if xid is not None and not xid.isdigit():
        raise BadRequest(f"transaction_id {xid!r} is not a number")
    limit_text = get("limit")
    if limit_text is not None and not limit_text.isdigit():
        raise BadRequest(f"limit {limit_text!r} is not a number (1 to {MAX_LIMIT})")
    limit = int(limit_text) if limit_text else DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit {limit} is out of range: 1 to {MAX_LIMIT}")
    context, since, until, cursor = get("context"), get("since"), get("until"), get("cursor")
    return Filters(table=get("table"), operation=operation, pk=get("pk"), transaction_id=int(xid) if xid else None,
                   context=parse_context(context) if context else None,
                   since=_timestamp("since", since) if since else None, until=_timestamp("until", until) if until else None,
                   limit=limit, cursor=_decode_cursor(cursor) if cursor else None)


@dataclass
class Page:
    """One page of changes, newest first: each change as ``to_jsonb`` of its row (exact JSON
    text, parsed for templates), and the cursor of the next page (None on the last)."""

    raw: list[str]
    next: str | None
    changes: list[dict[str, Any]] = field(default_factory=list)

    def json(self) -> str:
        return '{"changes": [' + ", ".join(self.raw) + '], "next": ' + json.dumps(self.next) + "}"


class Trail:
    """Reads of one source's trail in a destination database."""

    def __init__(self, destination_dsn: str, source: str, changes_table: tuple[str, str], *,
                 statement_timeout_ms: int = 5000, context_keys: tuple[str, ...] = ()) -> None:
        self.destination_dsn = destination_dsn
        self.source = source
        self.changes_table = changes_table
        self.statement_timeout_ms = statement_timeout_ms
        self.context_keys = context_keys  # destination.context_indexes: keys with a btree of their own
        self._changes = sql.Identifier(*changes_table)
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    @contextmanager
    def read(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection in a read-only transaction with this explorer's statement timeout.

        Connections are kept for the next read (up to IDLE_CONNECTIONS): a new session pays
        for the connection and for compiling the time-travel functions again, about 45 ms of a
        row page on 5M changes. Every read is one transaction, rolled back, and its settings
        are local to it, so a kept session carries nothing from one read to the next."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            try:
                conn.execute("SET TRANSACTION READ ONLY")
            except psycopg.OperationalError:  # the server closed it while it was idle
                conn.close()
                conn = None
        if conn is None:
            conn = connect(self.destination_dsn, autocommit=False, role="destination database")
            conn.execute("SET TRANSACTION READ ONLY")
        try:
            conn.execute("SELECT pg_catalog.set_config('statement_timeout', %s, true)", (str(self.statement_timeout_ms),))
            yield conn
        finally:
            self._give_back(conn)

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        try:
            conn.rollback()
        except psycopg.Error:
            conn.close()
        with self._lock:
            if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def _sql(self, name: str, where: sql.Composable | None = None) -> sql.Composed:
        return sql.SQL(query(name)).format(changes=self._changes, where=where or sql.SQL("true"))

    def split_table(self, conn: psycopg.Connection[Any], table: str) -> tuple[str | None, str]:
        """``table`` or ``schema.table`` as ``bemi.split_table_name`` reads it (parse_ident rules)."""
        try:
            with conn.transaction():
                row = conn.execute("SELECT schema_name, relation_name FROM bemi.split_table_name(%s)", (table,)).fetchone()
        except psycopg.errors.InvalidParameterValue:
            raise BadRequest(f"table {table!r} is not a table name: write table or schema.table") from None
        assert row is not None
        return row[0], row[1]

    def _conditions(self, conn: psycopg.Connection[Any], f: Filters, params: dict[str, Any]) -> sql.Composable:
        parts: list[sql.Composable] = []
        if f.table:
            params["schema"], params["table"] = self.split_table(conn, f.table)
            parts.append(sql.SQL('c."table" = %(table)s'))
            if params["schema"] is not None:
                parts.append(sql.SQL('c."schema" = %(schema)s'))
        if f.operation:
            params["operation"] = f.operation
            parts.append(sql.SQL("c.operation = %(operation)s"))
        if f.pk is not None:
            params["pk"] = f.pk
            parts.append(sql.SQL("c.primary_key = %(pk)s"))
        if f.transaction_id is not None:
            position = conn.execute(self._sql("explorer_transaction_position"),
                                    {"source": self.source, "xid": f.transaction_id}).fetchone()
            params["xid"], params["xid_position"] = f.transaction_id, position[0] if position else None
            parts.append(sql.SQL("c.transaction_id = %(xid)s AND c.commit_position = %(xid_position)s"))
        if f.context:
            rest = dict(f.context)
            key = next((k for k in self.context_keys if _scalar(rest.get(k, {}))), None)
            if key is not None:
                # For a scalar, containment is jsonb equality of the key's value (1.0 = 1 too), and
                # in that form the key's btree gives the newest matches first; the GIN cannot.
                params["context_value"] = json.dumps(rest.pop(key))
                parts.append(sql.SQL("c.context -> {} = %(context_value)s::jsonb").format(sql.Literal(key)))
            if rest or key is None:
                params["context"] = json.dumps(rest)
                parts.append(sql.SQL("c.context @> %(context)s::jsonb"))
        if f.since:
            params["since"] = f.since
            parts.append(sql.SQL("c.committed_at >= %(since)s"))
        if f.until:
            params["until"] = f.until
            parts.append(sql.SQL("c.committed_at < %(until)s"))
        if f.cursor:
            params["c_at"], params["c_pos"], params["c_seq"] = f.cursor
            # The first condition bounds the index scan; the row comparison is the exact keyset.
            parts.append(sql.SQL("c.committed_at <= %(c_at)s AND (c.committed_at, c.commit_position, c.seq) < "
                                 "(%(c_at)s, %(c_pos)s, %(c_seq)s)"))
        return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")

    def changes_query(self, conn: psycopg.Connection[Any], f: Filters) -> tuple[sql.Composed, dict[str, Any]]:
        """The SQL and parameters of a changes page (for the plan test and the benchmark too)."""
        params: dict[str, Any] = {"source": self.source, "limit": f.limit + 1}
        return self._sql("explorer_changes", self._conditions(conn, f, params)), params

    def changes(self, conn: psycopg.Connection[Any], f: Filters) -> Page:
        """A page of changes matching ``f``, newest first; ``next`` resumes after its last."""
        statement, params = self.changes_query(conn, f)
        rows = conn.execute(statement, params).fetchall()
        more = len(rows) > f.limit
        rows = rows[: f.limit]
        nxt = encode_cursor(rows[-1][1], rows[-1][2], rows[-1][3]) if more else None
        page = Page([r[0] for r in rows], nxt)
        page.changes = [_change(text) for text in page.raw]
        return page

    def row_extent(self, conn: psycopg.Connection[Any], table: str, pk: str) -> dict[str, Any]:
        """When the trail first and last saw the row, how often, and how its record begins."""
        schema, name = self.split_table(conn, table)
        with conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(self._sql("explorer_row_extent"),
                              {"source": self.source, "table": name, "schema": schema, "pk": pk}).fetchone()
        assert row is not None
        return row

    def overview(self, conn: psycopg.Connection[Any], days: int = 30) -> dict[str, Any]:
        """Per table, changes per day over the last ``days``; the busiest contexts of the last day."""
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        since = now - timedelta(days=days)
        volume: dict[str, dict[datetime, int]] = {}
        for relation, bucket, count in conn.execute(self._sql("explorer_volume"),
                                                    {"source": self.source, "since": since, "unit": "day"}):
            volume.setdefault(relation, {})[bucket] = count
        with conn.cursor(row_factory=dict_row) as cur:
            contexts = cur.execute(self._sql("explorer_busiest_contexts"),
                                   {"source": self.source, "since": now - timedelta(days=1)}).fetchall()
        return {"now": now, "since": since, "days": days, "volume": volume, "contexts": contexts,
                "tracking": self.tracking(conn)}

    def tracking(self, conn: psycopg.Connection[Any]) -> list[dict[str, Any]] | None:
        """Per table, its tracking periods (began, ended: None while tracked, and why) and the gaps
        between them, from ``bemi.trail_periods``; None where the destination has no such record."""
        try:
            with conn.transaction():
                rows = conn.execute(query("trail_periods"), {"source": self.source}).fetchall()
        except psycopg.errors.UndefinedFunction:
            return None
        tables: dict[str, dict[str, Any]] = {}
        for name, began, began_why, ended, ended_why in rows:
            table = tables.setdefault(name, {"table": name, "periods": [], "gaps": []})
            if table["periods"] and table["periods"][-1]["ended_at"] is not None:
                last = table["periods"][-1]
                table["gaps"].append({"from": last["ended_at"], "from_reason": last["ended_reason"],
                                      "to": began.isoformat(), "to_reason": began_why})
            table["periods"].append({"began_at": began.isoformat(), "began_reason": began_why,
                                     "ended_at": ended.isoformat() if ended else None, "ended_reason": ended_why})
        return list(tables.values())


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float)


def _change(text: str) -> dict[str, Any]:
    """A change for a template: its JSON, with the diff (old → new per column) worked out."""
    change: dict[str, Any] = json.loads(text, parse_float=Decimal)
    before, after = change.get("before") or {}, change.get("after") or {}
    keys = list(dict.fromkeys([*before, *after]))
    change["diff"] = [(k, before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)
                      or change["operation"] in ("CREATE", "DELETE")]
    change["unchanged"] = [(k, after.get(k)) for k in keys if before.get(k) == after.get(k)
                           and change["operation"] == "UPDATE"]
    return change
