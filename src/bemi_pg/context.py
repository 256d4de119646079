"""Passing application context from Python: transaction-local, so that a pooled
connection (pgbouncer in transaction mode included) never carries one request's context
into another's.

- :func:`set_context` sets it for the rest of the current transaction (psycopg 3 or psycopg2);
- :func:`transaction` opens a transaction with a context;
- :func:`annotate` appends a ``/*Bemi … Bemi*/`` comment to one statement, for code that runs
  in autocommit mode (each statement its own transaction);
- :func:`use_context` / :func:`current_context` hold the context of the request in hand,
  for the framework integrations in :mod:`bemi_pg.integrations`.

When ``opentelemetry-api`` is importable and a span is recording, every helper adds the span's
``trace_id`` and ``span_id`` (32 and 16 lowercase hex digits, as in a W3C traceparent) to the
context, under the application's own keys; :func:`use_opentelemetry` turns that off. bemi-pg does
not depend on OpenTelemetry.

Context is what the application asserts, not authentication.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

from .errors import BemiError

__all__ = ["set_context", "transaction", "annotate", "sql_comment", "use_context", "current_context", "with_trace",
           "use_opentelemetry"]

_SET = "SELECT bemi.set_context(%s::jsonb)"
_current: ContextVar[Mapping[str, Any] | None] = ContextVar("bemi_pg_context", default=None)


_opentelemetry = {"enabled": True}


def use_opentelemetry(enabled: bool) -> None:
    """Whether the helpers add the current OpenTelemetry span's ids to the context (on by default)."""
    _opentelemetry["enabled"] = bool(enabled)


@lru_cache(maxsize=1)
def _otel_trace() -> Any:
    """``opentelemetry.trace``, or None when opentelemetry-api is not installed."""
    try:
        return importlib.import_module("opentelemetry.trace")
    except ImportError:
        return None


def with_trace(context: Mapping[str, Any] | None) -> dict[str, Any]:
    """``context`` with the recording OpenTelemetry span's ``trace_id`` and ``span_id`` under it
    (the context's own keys win); ``context`` alone when there is none or it is turned off."""
    if context is not None and not isinstance(context, Mapping):
        raise TypeError(f"context must be a mapping, not {type(context).__name__}")
    trace = _otel_trace() if _opentelemetry["enabled"] else None
    span = trace.get_current_span() if trace is not None else None
    if span is None or not span.is_recording():
        return dict(context or {})
    ids = span.get_span_context()
    return {"trace_id": format(ids.trace_id, "032x"), "span_id": format(ids.span_id, "016x"), **(context or {})}


def _payload(context: Mapping[str, Any]) -> str:
    return json.dumps(with_trace(context), default=str, separators=(",", ":"), ensure_ascii=False)


def _is_psycopg3(conn: Any) -> bool:
    return type(conn).__module__.startswith("psycopg.") or hasattr(conn, "pgconn")


def set_context(conn: Any, context: Mapping[str, Any]) -> None:
    """Set the context of the changes made by the rest of the current transaction.

    Works with psycopg 3 and psycopg2 connections. In autocommit mode, with no transaction
    open, the context would vanish with the ``SELECT`` that sets it: that raises BemiError
    (use :func:`transaction` or :func:`annotate` instead)."""
    payload = _payload(context)
    if _is_psycopg3(conn):
        from psycopg.pq import TransactionStatus

        if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
            raise BemiError("set_context needs an open transaction: use `with bemi_pg.transaction(conn, context):`")
        conn.execute(_SET, (payload,))
        return
    if getattr(conn, "autocommit", False):
        raise BemiError("set_context needs an open transaction: use `with bemi_pg.transaction(conn, context):`")
    with conn.cursor() as cur:
        cur.execute(_SET, (payload,))


@contextmanager
def transaction(conn: Any, context: Mapping[str, Any]) -> Iterator[Any]:
    """``with transaction(conn, {...}):`` a transaction whose changes carry ``context``;
    committed at the end of the block, rolled back on an exception."""
    if _is_psycopg3(conn):
        with conn.transaction() as tx:
            conn.execute(_SET, (_payload(context),))
            yield tx
        return
    with conn:  # psycopg2: commit or roll back at the end of the block
        with conn.cursor() as cur:
            cur.execute(_SET, (_payload(context),))
        yield conn


def sql_comment(context: Mapping[str, Any]) -> str:
    """`` /*Bemi {json} Bemi*/`` for ``context``, safe to append to any statement: the JSON
    holds no ``/`` (so no ``*/`` or ``/*``) and no ``%`` (so no driver placeholder)."""
    text = _payload(context).replace("/", "\\u002f").replace("%", "\\u0025")
    return f" /*Bemi {text} Bemi*/"


def annotate(statement: str, context: Mapping[str, Any] | None = None) -> str:
    """``statement`` with the context comment appended (before a final semicolon);
    ``context`` defaults to :func:`current_context`. Unchanged when there is none."""
    context = with_trace(current_context() if context is None else context)
    if not context:
        return statement
    stripped = statement.rstrip()
    if stripped.endswith(";"):
        return stripped[:-1] + sql_comment(context) + ";"
    return stripped + sql_comment(context)


@contextmanager
def use_context(context: Mapping[str, Any] | None) -> Iterator[None]:
    """Make ``context`` the current one (for this thread or task) inside the block."""
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)


def current_context() -> Mapping[str, Any] | None:
    """The context set by the innermost :func:`use_context`, or None."""
    return _current.get()
