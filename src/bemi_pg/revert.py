"""Undoing changes: SQL that puts rows back as they were before, newest change first.

Every statement is guarded: it only touches a row still exactly as the change left it
(``to_jsonb(row)`` equal to the change's ``after``), or, to undo a DELETE, only inserts
where no row with that key exists again. A row changed since is a conflict: listed with the
reason, never overwritten. The revert runs with a context naming what it reverts, so it is
itself in the audit trail.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from .db import installation, installed_source, source_identity
from .errors import BemiError, ConfigError
from .render import quote_ident, quote_literal

__all__ = ["RevertStep", "RevertPlan", "context_filter", "plan_revert", "apply_revert"]

_COLUMNS = """
SELECT a.attname::text, a.attgenerated <> '' AS generated, a.attidentity = 'a' AS identity_always,
       coalesce(a.attnum = ANY (i.indkey), false) AS key, pg_catalog.array_position(i.indkey::int2[], a.attnum) AS key_order
  FROM pg_catalog.pg_attribute a
  LEFT JOIN pg_catalog.pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
 WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
"""


@dataclass
class RevertStep:
    """How one change is undone: ``sql`` is None where it cannot be."""

    change_id: str
    description: str
    sql: str | None
    conflict: str  # what it means when the guard matches no row
    outcome: str = "pending"  # applied, conflict, impossible


@dataclass
class RevertPlan:
    what: dict[str, Any]
    steps: list[RevertStep] = field(default_factory=list)
    by: dict[str, Any] | None = None  # who asked, recorded in the revert's own context (the explorer's user)
    committed: bool = False

    @property
    def context(self) -> str:
        ctx: dict[str, Any] = {"bemi_revert": self.what, "reverted_changes": len(self.steps)}
        if self.by:
            ctx["bemi_revert_by"] = self.by
        return json.dumps(ctx, sort_keys=True)

    def script(self) -> str:
        """The SQL, for review: one transaction, newest change first."""
        lines = [f"-- bemi-pg revert of {json.dumps(self.what, sort_keys=True)}: {len(self.steps)} change(s), newest first",
                 "-- Each statement only touches a row still as the change left it; a row changed since is left alone.",
                 "BEGIN;", f"SELECT bemi.set_context({quote_literal(self.context)});"]
        for step in self.steps:
            lines.append(f"-- {step.description}")
            lines.append(step.sql + ";" if step.sql else f"-- cannot be reverted: {step.conflict}")
        lines.append("COMMIT;")
        return "\n".join(lines) + "\n"


def _select(dest: psycopg.Connection[Any], source: str, *, change_id: str | None, transaction_id: int | None,
            context: dict[str, Any] | None, changes_table: str) -> list[dict[str, Any]]:
    base = (f'SELECT id::text, "schema", "table", primary_key, operation, before::text, after::text, committed_at, '
            f'transaction_id FROM {changes_table} WHERE source = %s')
    order = " ORDER BY committed_at DESC, commit_position DESC, seq DESC"
    with dest.cursor(row_factory=dict_row) as cur:
        if change_id is not None:
            return cur.execute(base + " AND id = %s::uuid" + order, (source, change_id)).fetchall()
        if transaction_id is not None:  # xids wrap: the most recent transaction with that id (in either capture mode)
            return cur.execute(
                base + f" AND transaction_id = %s AND commit_position = (SELECT commit_position FROM {changes_table}"
                " WHERE source = %s AND transaction_id = %s ORDER BY committed_at DESC LIMIT 1)" + order,
                (source, transaction_id, source, transaction_id)).fetchall()
        return cur.execute(base + " AND context @> %s::jsonb" + order, (source, json.dumps(context))).fetchall()


def _step(source: psycopg.Connection[Any], change: dict[str, Any], columns_cache: dict[str, list[dict[str, Any]]]) -> RevertStep:
    table = quote_ident(change["schema"], change["table"])
    desc = (f"change {change['id']}: {change['operation']} {table} "
            f"{change['primary_key'] or '(no key)'} at {change['committed_at'].isoformat()}")
    if change["operation"] == "TRUNCATE":
        return RevertStep(change["id"], desc, None, "a TRUNCATE cannot be reverted: the rows it removed were not recorded")
    if table not in columns_cache:
        try:
            columns_cache[table] = source.cursor(row_factory=dict_row).execute(_COLUMNS, (table,)).fetchall()
        except psycopg.errors.UndefinedTable:
            source.rollback()
            columns_cache[table] = []
    columns = columns_cache[table]
    if not columns:
        return RevertStep(change["id"], desc, None, f"table {table} no longer exists")
    keys = sorted((c for c in columns if c["key"]), key=lambda c: c["key_order"])
    before, after = json.loads(change["before"]), json.loads(change["after"])
    before_lit, after_lit = quote_literal(change["before"]) + "::jsonb", quote_literal(change["after"]) + "::jsonb"
    pk = change["primary_key"]

    def match(alias: str, other: str) -> str:
        if keys:
            left = ", ".join(f"{alias}.{quote_ident(k['attname'])}" for k in keys)
            right = ", ".join(f"{other}.{quote_ident(k['attname'])}" for k in keys)
            return f"({left}) = ({right})"
        return "true"

    if change["operation"] == "CREATE":
        guard = f"to_jsonb(t) = {after_lit}"
        where = f"{match('t', 'a')} AND {guard}" if keys else f"t.ctid = (SELECT ctid FROM {table} AS t WHERE {guard} LIMIT 1)"
        sql = f"DELETE FROM {table} AS t USING jsonb_populate_record(NULL::{table}, {after_lit}) AS a WHERE {where}"
        return RevertStep(change["id"], desc, sql, f"row {pk} was changed or deleted after change {change['id']}")
    if change["operation"] == "UPDATE":
        names = [c["attname"] for c in columns if not c["generated"] and c["attname"] in before
                 and before.get(c["attname"]) != after.get(c["attname"])]
        if not names:
            return RevertStep(change["id"], desc, None, "the change altered no column that can be set back")
        sets = ", ".join(f"{quote_ident(n)} = b.{quote_ident(n)}" for n in names)
        guard = f"to_jsonb(t) = {after_lit}"
        where = f"{match('t', 'a')} AND {guard}" if keys else f"t.ctid = (SELECT ctid FROM {table} AS t WHERE {guard} LIMIT 1)"
        sql = (f"UPDATE {table} AS t SET {sets} FROM jsonb_populate_record(NULL::{table}, {before_lit}) AS b, "
               f"jsonb_populate_record(NULL::{table}, {after_lit}) AS a WHERE {where}")
        return RevertStep(change["id"], desc, sql, f"row {pk} was changed or deleted after change {change['id']}")
    names = [c["attname"] for c in columns if not c["generated"] and c["attname"] in before]
    cols = ", ".join(quote_ident(n) for n in names)
    overriding = " OVERRIDING SYSTEM VALUE" if any(c["identity_always"] and c["attname"] in names for c in columns) else ""
    exists = f" WHERE NOT EXISTS (SELECT FROM {table} AS t WHERE {match('t', 'b')})" if keys else ""
    sql = (f"INSERT INTO {table} ({cols}){overriding} SELECT {', '.join('b.' + quote_ident(n) for n in names)} "
           f"FROM jsonb_populate_record(NULL::{table}, {before_lit}) AS b{exists}")
    return RevertStep(change["id"], desc, sql, f"a row with key {pk} exists again")


def context_filter(value: Any) -> dict[str, Any]:
    """``--context``'s value, which selects the changes whose context contains it: an object."""
    if not isinstance(value, dict):
        raise ConfigError(f"--context {json.dumps(value)} is not a JSON object: pass an object, e.g. '{{\"user_id\": 42}}'")
    return value


def plan_revert(source: psycopg.Connection[Any], dest: psycopg.Connection[Any], changes_table: str, *,
                change_id: str | None = None, transaction_id: int | None = None,
                context: dict[str, Any] | None = None) -> RevertPlan:
    """The statements that undo the selected changes, newest first."""
    if sum(x is not None for x in (change_id, transaction_id, context)) != 1:
        raise BemiError("choose what to revert: exactly one of --change, --transaction or --context")
    if change_id is not None:
        try:
            change_id = str(uuid.UUID(change_id))
        except ValueError:
            raise ConfigError(f"--change {change_id!r} is not a change id: pass the uuid in changes.id, "
                              "e.g. as `bemi-pg blame` prints it") from None
    if context is not None:
        context = context_filter(context)
    what: dict[str, Any] = ({"change": change_id} if change_id is not None else
                            {"transaction": transaction_id} if transaction_id is not None else {"context": context})
    database = source.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
    # This source's changes only: a destination may hold other servers' databases of the same name.
    inst = installation(source)
    source_id = installed_source(source, inst) if inst is not None else source_identity(source)
    changes = _select(dest, source_id, change_id=change_id, transaction_id=transaction_id, context=context,
                      changes_table=changes_table)
    if not changes:
        raise BemiError(f"no change matches {json.dumps(what)} in {changes_table} for database {database}")
    cache: dict[str, list[dict[str, Any]]] = {}
    return RevertPlan(what, [_step(source, change, cache) for change in changes])


def apply_revert(source: psycopg.Connection[Any], plan: RevertPlan, *, commit: bool, atomic: bool = False) -> RevertPlan:
    """Run the plan in one transaction: each step is applied or marked a conflict. Rolled back
    unless ``commit`` (so a dry run finds the conflicts without changing anything), and, when
    ``atomic``, rolled back too if any step could not be applied (all or nothing)."""
    with source.transaction(force_rollback=not commit) as tx:
        source.execute("SELECT bemi.set_context(%s::jsonb)", (plan.context,))
        for step in plan.steps:
            if step.sql is None:
                step.outcome = "impossible"
                continue
            cur = source.execute(step.sql)
            step.outcome = "applied" if cur.rowcount > 0 else "conflict"
        if commit and atomic and any(s.outcome != "applied" for s in plan.steps):
            raise psycopg.Rollback(tx)
    plan.committed = commit and not (atomic and any(s.outcome != "applied" for s in plan.steps))
    return plan
