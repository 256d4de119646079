"""Undoing changes: SQL that puts rows back as they were before, newest change first.

Every statement is guarded: it only touches a row still exactly as the change left it (the
row's columns that the trail holds equal to the change's ``after``), or, to undo a DELETE, only
inserts where no row with that key exists again. A row changed since is a conflict: listed with
the reason, never overwritten. A change that cannot be undone exactly (a TRUNCATE, whose rows
the trail does not hold; a DELETE of a row with columns the trail does not hold, or of a row
without a key) is refused with the reason. A revert is all or nothing unless told to skip
conflicts. It runs with a context naming what it reverts, so it is itself in the audit trail.

Values are compared as typed values (both sides go through ``jsonb_populate_record`` and back
through ``to_jsonb`` in the same session), so the guards hold whatever the session's TimeZone or
DateStyle, and every name is schema-qualified, so they hold whatever its search_path.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row

from . import timetravel
from .db import installation, installed_source, source_identity
from .errors import BemiError, CannotSay, ConfigError
from .render import quote_ident, quote_literal

__all__ = ["RevertStep", "RevertPlan", "context_filter", "plan_revert", "apply_revert"]

_COLUMNS = """
SELECT a.attname::text, a.attgenerated <> '' AS generated, a.attidentity = 'a' AS identity_always,
       coalesce(a.attnum = ANY (i.indkey), false) AS key, pg_catalog.array_position(i.indkey::int2[], a.attnum) AS key_order,
       t.typnamespace = 'pg_catalog'::regnamespace AS builtin,
       CASE WHEN coalesce(nullif(t.typbasetype, 0), t.oid) IN ('pg_catalog.int2vector'::regtype, 'pg_catalog.oidvector'::regtype)
            THEN 'vector'
            WHEN coalesce(nullif(t.typbasetype, 0), t.oid) IN ('pg_catalog.int2vector[]'::regtype, 'pg_catalog.oidvector[]'::regtype)
            THEN 'vector array' END AS vector
  FROM pg_catalog.pg_attribute a
  JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
  LEFT JOIN pg_catalog.pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
 WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
"""

EQ = "OPERATOR(pg_catalog.=)"
MINUS = "OPERATOR(pg_catalog.-)"


@dataclass
class RevertStep:
    """How one change is undone: ``sql`` changes exactly one row when its guard holds; None where
    the change cannot be undone exactly (``refused``) or needs nothing undone."""

    change_id: str
    description: str
    sql: str | None
    conflict: str  # what it means when the guard matches no row, or why the change cannot be undone
    refused: bool = False
    outcome: str = "pending"  # applied, conflict, refused, nothing (nothing to undo)
    row: tuple[str, str | None] = ("", None)  # the table and key it touches

    @property
    def ok(self) -> bool:
        return self.outcome in ("applied", "nothing")


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

    @property
    def problems(self) -> list[RevertStep]:
        """The steps that met a conflict or were refused."""
        return [s for s in self.steps if s.outcome in ("conflict", "refused") or (s.outcome == "pending" and s.refused)]

    def script(self, *, skip_conflicts: bool = False) -> str:
        """The SQL, for review or ``psql -f``: one transaction, newest change first. Each guarded
        statement checks that it changed its one row; where it did not (or a change cannot be
        undone), the script raises and the whole transaction rolls back, unless ``skip_conflicts``
        (then it notes what it skipped and goes on)."""
        lines = [f"-- bemi-pg revert of {json.dumps(self.what, sort_keys=True, default=str)}: {len(self.steps)} change(s), newest first",
                 "-- Each statement only touches a row still as the change left it. Names are schema-qualified and values",
                 "-- compared as typed values, so it is correct whatever the session's search_path and TimeZone.",
                 ("-- A row changed since is skipped (NOTICE), the rest is applied." if skip_conflicts else
                  "-- All or nothing: a row changed since raises an error and nothing is applied."),
                 "-- Run it with: psql -v ON_ERROR_STOP=1 -f FILE",
                 "BEGIN;",
                 "SET CONSTRAINTS ALL DEFERRED;  -- deferrable foreign keys are checked at the end",
                 f"SELECT bemi.set_context({quote_literal(self.context)}::pg_catalog.jsonb);"]
        for step in self.steps:
            lines.append(f"-- {step.description}")
            if step.sql is None and not step.refused:
                lines.append(f"-- nothing to undo: {step.conflict}")
                continue
            lines.append(_guarded(step, skip_conflicts))
        lines.append("COMMIT;")
        return "\n".join(lines) + "\n"


def _guarded(step: RevertStep, skip: bool) -> str:
    """One step as a DO block that raises (or, skipping, notes) unless its statement changed a row."""
    what = "skipped" if skip else ("cannot be reverted" if step.refused else "conflict")
    message = quote_literal(f"bemi-pg revert: {what}: {step.description}: {step.conflict}")
    fail = f"RAISE NOTICE '%', {message};" if skip else f"RAISE EXCEPTION USING ERRCODE = 'BEM04', MESSAGE = {message};"
    if step.sql is None:
        lines = [fail]
    else:
        lines = [f"{step.sql};", "IF NOT FOUND THEN", f"  {fail}", "END IF;"]
        if skip:  # a key taken again, a foreign key: skipped like a guard that matched nothing
            lines = ["BEGIN", *("  " + line for line in lines), "EXCEPTION WHEN integrity_constraint_violation THEN",
                     f"  RAISE NOTICE '%: %', {message}, SQLERRM;", "END;"]
    body = "\n".join("  " + line for line in lines)
    tag, n = "$bemi$", 0
    while tag in body:
        n += 1
        tag = f"$bemi{n}$"
    return f"DO {tag}\nBEGIN\n{body}\nEND\n{tag};"


def _select(dest: psycopg.Connection[Any], source: str, *, change_id: str | None, transaction_id: int | None,
            context: dict[str, Any] | None, since: str | None, tables: list[tuple[str, str]] | None,
            changes_table: str) -> list[dict[str, Any]]:
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
        if since is not None:
            if tables:
                where = " AND (" + " OR ".join('("schema" = %s AND "table" = %s)' for _ in tables) + ")"
                return cur.execute(base + " AND committed_at > %s::timestamptz" + where + order,
                                   (source, since, *[part for t in tables for part in t])).fetchall()
            return cur.execute(base + " AND committed_at > %s::timestamptz" + order, (source, since)).fetchall()
        return cur.execute(base + " AND context @> %s::jsonb" + order, (source, json.dumps(context))).fetchall()


def _resolve_tables(dest: psycopg.Connection[Any], source: str, names: list[str], changes_table: str) -> list[tuple[str, str]]:
    """``schema.table`` or a bare ``table`` as (schema, table), among this source's recorded changes;
    a bare name recorded in two schemas is ambiguous."""
    resolved = []
    for name in names:
        try:
            parts = dest.execute("SELECT pg_catalog.parse_ident(%s)", (name,)).fetchone()[0]  # type: ignore[index]
        except psycopg.errors.InvalidParameterValue:
            dest.rollback()
            raise ConfigError(f"--table {name!r} is not a table name: give table or schema.table") from None
        if len(parts) == 2:
            resolved.append((parts[0], parts[1]))
            continue
        if len(parts) != 1:
            raise ConfigError(f"--table {name!r} is not a table name: give table or schema.table")
        schemas: list[str] = []
        for _ in range(2):  # two index probes, not a DISTINCT over every change of the table
            row = dest.execute(f'SELECT "schema" FROM {changes_table} WHERE source = %s AND "table" = %s'
                               ' AND NOT "schema" = ANY (%s) LIMIT 1', (source, parts[0], schemas)).fetchone()
            if row is None:
                break
            schemas.append(row[0])
        schemas.sort()
        if len(schemas) > 1:
            raise BemiError(f"{parts[0]} is ambiguous (in schemas {', '.join(schemas)}): name it as schema.table")
        if not schemas:
            raise ConfigError(f"--table {name}: the trail of this database records no change of a table {parts[0]}")
        resolved.append((schemas[0], parts[0]))
    return resolved


def _check_covered(dest: psycopg.Connection[Any], source: str, since: str, tables: set[tuple[str, str]],
                   changes_table: str) -> None:
    """CannotSay unless the trail of each table began at or before ``since``: changes before
    tracking began are not in the trail, so undoing the rest would not bring the table back."""
    for schema, table in sorted(tables):
        name = quote_ident(schema, table)
        with timetravel.answers():
            # The tracking period that holds the moment (CannotSay before tracking or in a gap) must
            # go on to now: a gap after it means changes the trail never saw.
            recorded, ended_at = dest.execute(
                "SELECT p.recorded, p.ended_at FROM bemi.period_at(%s, %s, %s, %s::timestamptz) AS p",
                (source, schema, table, since)).fetchone()  # type: ignore[misc]
            if recorded and ended_at is not None:
                raise CannotSay(f"the trail of {name} has a gap after {since} (tracking ended at {ended_at.isoformat()}): "
                                "the changes in it are not in the trail, so undoing the others would not bring it back")
            if recorded:
                continue
            # (A trail from before 0.4.0 records no periods: where its knowledge begins.)
            began = dest.execute(
                "SELECT coalesce(e.began, (SELECT min(c.committed_at) FROM " + changes_table + " AS c"
                ' WHERE c.source = %s AND c."schema" = %s AND c."table" = %s)) <= %s::timestamptz'
                " FROM bemi.trail_extent(%s, %s) AS e", (source, schema, table, since, source, name)).fetchone()[0]  # type: ignore[index]
        if not began:
            raise CannotSay(f"{since} is before tracking of {name} began: the changes before then are not in the trail, "
                            "so undoing the later ones would not bring it back to that moment")


def vector_text(value: Any, array: bool) -> str:
    """The text of an int2vector or oidvector (``array``: an array of them) from its JSON as
    to_jsonb gives it: [1, 2] is '1 2'; [[1, 2], [], null] is '{"1 2","",NULL}' (a vector's list
    holds numbers or strings; an array level holds lists and nulls, and no level but the top is empty)."""
    def vector(items: list[Any]) -> str:
        return " ".join(str(i) for i in items)

    def level(items: Any, top: bool) -> str:
        if items is None:
            return "NULL"
        if not isinstance(items, list):
            return str(items)
        if top or any(isinstance(i, list) or i is None for i in items):
            return "{" + ",".join(level(i, False) for i in items) + "}"
        return '"' + vector(items) + '"'

    if not isinstance(value, list):
        return str(value)
    return level(value, True) if array else vector(value)


def _raw(value: Any) -> str:
    """A JSON value's text as to_jsonb wrote it (numbers keep their scale: 2.50 is not 2.5)."""
    return json.dumps(value, sort_keys=True, default=str)


def _step(source: psycopg.Connection[Any], change: dict[str, Any], columns_cache: dict[str, list[dict[str, Any]]]) -> RevertStep:
    table = quote_ident(change["schema"], change["table"])
    desc = (f"change {change['id']}: {change['operation']} {table} "
            f"{change['primary_key'] or '(no key)'} at {change['committed_at'].isoformat()}")
    op = change["operation"]

    def refuse(reason: str) -> RevertStep:
        return RevertStep(change["id"], desc, None, reason, refused=True)

    if op == "TRUNCATE":
        return refuse("a TRUNCATE cannot be reverted: the trail does not record the rows it removed")
    if table not in columns_cache:
        try:
            with source.transaction():
                columns_cache[table] = source.cursor(row_factory=dict_row).execute(_COLUMNS, (table,)).fetchall()
        except psycopg.errors.UndefinedTable:
            columns_cache[table] = []
    columns = columns_cache[table]
    if not columns:
        return refuse(f"table {table} no longer exists")
    keys = sorted((c for c in columns if c["key"]), key=lambda c: c["key_order"])
    row_text = change["after"] if op != "DELETE" else change["before"]
    row = json.loads(row_text, parse_float=Decimal)
    names = {c["attname"] for c in columns}
    gone = sorted(set(row) - names)
    if gone:
        return refuse(f"column(s) {', '.join(gone)} of the change no longer exist in {table}")
    # Columns the trail does not hold (excluded, or added since): left out of every comparison.
    unheld = [c["attname"] for c in columns if c["attname"] not in row]
    rowtype = f"NULL::{table}"
    populate = "pg_catalog.jsonb_populate_record"

    vectors = {c["attname"]: c["vector"] for c in columns if c["vector"]}

    def lit(text: str) -> str:
        """The change's row as jsonb that jsonb_populate_record reads back exactly: int2vector and
        oidvector values (and arrays of them) as their text, which their input function validates
        (populate reads a JSON array as an array: '[]' makes an int2vector no server can print)."""
        value = f"{quote_literal(text)}::pg_catalog.jsonb"
        held = json.loads(text, parse_float=Decimal)
        texts = {n: vector_text(held[n], kind == "vector array") for n, kind in vectors.items() if held.get(n) is not None}
        if not texts:
            return value
        return f"({value} || {quote_literal(json.dumps(texts, ensure_ascii=False))}::pg_catalog.jsonb)"

    def same(alias: str, other: str) -> str:
        """The row ``alias`` as ``other`` (a record of the change's values), on the columns the trail holds."""
        less = f" {MINUS} ARRAY[{', '.join(quote_literal(n) for n in unheld)}]::pg_catalog.text[]" if unheld else ""
        if not less:
            return f"pg_catalog.to_jsonb({alias}.*) {EQ} pg_catalog.to_jsonb({other}.*)"
        return f"(pg_catalog.to_jsonb({alias}.*){less}) {EQ} (pg_catalog.to_jsonb({other}.*){less})"

    def key_match(alias: str, other: str) -> str:
        return " AND ".join(f"{alias}.{quote_ident(k['attname'])} {EQ if k['builtin'] else '='} {other}.{quote_ident(k['attname'])}"
                            for k in keys)

    def where(values: str) -> str:
        """The guard: this row, still exactly as the change left it (without a key: the only such row)."""
        if keys:
            return f"{key_match('t', values)} AND {same('t', values)}"
        return f"{same('t', values)} AND (SELECT pg_catalog.count(*) FROM {table} AS x WHERE {same('x', values)}) {EQ} 1"

    pk = change["primary_key"]
    changed_since = f"row {pk or '(no key)'} was changed or deleted after change {change['id']}"
    if not keys:
        changed_since += " (or, without a primary key, several identical rows leave it unclear which)"
    if op == "CREATE":
        sql = f"DELETE FROM {table} AS t USING {populate}({rowtype}, {lit(change['after'])}) AS a WHERE {where('a')}"
        return RevertStep(change["id"], desc, sql, changed_since)
    if op == "UPDATE":
        before = json.loads(change["before"], parse_float=Decimal)
        by_name = {c["attname"]: c for c in columns}
        differ = [n for n in row if not by_name[n]["generated"] and _raw(before.get(n)) != _raw(row.get(n))]
        if set(before) != set(row):
            return refuse("its before and after hold different columns (the table changed shape in between)")
        if not differ:
            if unheld:
                return refuse(f"it changed no column the trail holds, so it may have changed only {', '.join(unheld)}, "
                              "which the trail does not hold")
            return RevertStep(change["id"], desc, None, "the change altered no column")
        always = [n for n in differ if by_name[n]["identity_always"]]
        if always:
            return refuse(f"it changed {', '.join(always)}, an identity column GENERATED ALWAYS, which can only be set to DEFAULT")
        sets = ", ".join(f"{quote_ident(n)} = b.{quote_ident(n)}" for n in differ)
        sql = (f"UPDATE {table} AS t SET {sets} FROM {populate}({rowtype}, {lit(change['before'])}) AS b, "
               f"{populate}({rowtype}, {lit(change['after'])}) AS a WHERE {where('a')}")
        return RevertStep(change["id"], desc, sql, changed_since)
    # DELETE: insert the row again, where its key is free.
    missing = [n for n in unheld if not next(c for c in columns if c["attname"] == n)["generated"]]
    if missing:
        return refuse(f"the trail does not hold column(s) {', '.join(missing)} (excluded, or added since), "
                      "so the row cannot be restored exactly")
    if not keys:
        return refuse(f"{table} has no primary key: the trail cannot tell how many identical rows it should hold, "
                      "so inserting the row again could duplicate it")
    cols = [c["attname"] for c in columns if not c["generated"]]
    overriding = " OVERRIDING SYSTEM VALUE" if any(c["identity_always"] for c in columns) else ""
    sql = (f"INSERT INTO {table} ({', '.join(quote_ident(n) for n in cols)}){overriding} "
           f"SELECT {', '.join('b.' + quote_ident(n) for n in cols)} FROM {populate}({rowtype}, {lit(change['before'])}) AS b "
           f"WHERE NOT EXISTS (SELECT FROM {table} AS t WHERE {key_match('t', 'b')})")
    return RevertStep(change["id"], desc, sql, f"a row with key {pk} exists again")


def context_filter(value: Any) -> dict[str, Any]:
    """``--context``'s value, which selects the changes whose context contains it: an object."""
    if not isinstance(value, dict):
        raise ConfigError(f"--context {json.dumps(value)} is not a JSON object: pass an object, e.g. '{{\"user_id\": 42}}'")
    return value


def plan_revert(source: psycopg.Connection[Any], dest: psycopg.Connection[Any], changes_table: str, *,
                change_id: str | None = None, transaction_id: int | None = None,
                context: dict[str, Any] | None = None, since: str | None = None,
                tables: list[str] | None = None) -> RevertPlan:
    """The statements that undo the selected changes, newest first: one change, a transaction,
    the changes whose context contains ``context``, or every change committed after ``since``
    (of ``tables``, or of every table), so that the tables are as they were then."""
    if sum(x is not None for x in (change_id, transaction_id, context, since)) != 1:
        raise BemiError("choose what to revert: exactly one of --change, --transaction, --context or --since")
    if tables and since is None:
        raise ConfigError("--table chooses the tables of a revert --since: use it with --since")
    if change_id is not None:
        try:
            change_id = str(uuid.UUID(change_id))
        except ValueError:
            raise ConfigError(f"--change {change_id!r} is not a change id: pass the uuid in changes.id, "
                              "e.g. as `bemi-pg blame` prints it") from None
    if context is not None:
        context = context_filter(context)
    if since is not None:
        try:
            since = source.execute("SELECT %s::timestamptz", (since,)).fetchone()[0].isoformat()  # type: ignore[index]
        except psycopg.errors.DataError:
            source.rollback()
            raise ConfigError(f"--since {since!r} is not a timestamp: use ISO 8601, e.g. '2024-05-01 12:00+00'") from None
    # This source's changes only: a destination may hold other servers' databases of the same name.
    inst = installation(source)
    source_id = installed_source(source, inst) if inst is not None else source_identity(source)
    resolved = _resolve_tables(dest, source_id, tables, changes_table) if tables else None
    what: dict[str, Any] = ({"change": change_id} if change_id is not None else
                            {"transaction": transaction_id} if transaction_id is not None else
                            {"context": context} if context is not None else
                            {"since": since, **({"tables": [quote_ident(*t) for t in resolved]} if resolved else {})})
    changes = _select(dest, source_id, change_id=change_id, transaction_id=transaction_id, context=context,
                      since=since, tables=resolved, changes_table=changes_table)
    if not changes and since is None:
        database = source.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        raise BemiError(f"no change matches {json.dumps(what)} in {changes_table} for database {database}")
    if since is not None:
        _check_covered(dest, source_id, since, {(c["schema"], c["table"]) for c in changes} | set(resolved or ()),
                       changes_table)
    cache: dict[str, list[dict[str, Any]]] = {}
    steps = []
    for change in changes:
        steps.append(_step(source, change, cache))
        steps[-1].row = (quote_ident(change["schema"], change["table"]), change["primary_key"])
    return RevertPlan(what, steps)


def apply_revert(source: psycopg.Connection[Any], plan: RevertPlan, *, commit: bool, skip_conflicts: bool = False) -> RevertPlan:
    """Run the plan in one transaction; each step is applied, a conflict (its row changed since,
    or its key taken again), refused, or had nothing to undo. All or nothing: rolled back if any
    step was not applied, unless ``skip_conflicts`` (then the rest is committed). Rolled back too
    unless ``commit``, so a dry run finds the conflicts without changing anything.

    A step that breaks a foreign key (a child row put back before the parent that a cascade
    deleted with it) waits until the steps after it have run, or until one of them touches its
    row, and is tried again; ``plan.steps`` is left in the order that ran, which the script follows."""
    ran: list[RevertStep] = []
    waiting: list[RevertStep] = []

    def run(step: RevertStep, *, last_try: bool) -> bool:
        try:
            with source.transaction():
                step.outcome = "applied" if source.execute(step.sql).rowcount == 1 else "conflict"  # type: ignore[arg-type]
        except psycopg.errors.ForeignKeyViolation as exc:
            if not last_try:
                return False
            step.outcome, step.conflict = "conflict", f"it cannot be applied now: {' '.join(str(exc).split())}"
        except psycopg.errors.IntegrityConstraintViolation as exc:  # a key taken again
            step.outcome, step.conflict = "conflict", f"it cannot be applied now: {' '.join(str(exc).split())}"
        ran.append(step)
        return True

    def retry(*, last_try: bool) -> None:
        progress = True
        while waiting and progress:
            progress = False
            for step in list(waiting):
                if run(step, last_try=last_try):
                    waiting.remove(step)
                    progress = True

    with source.transaction(force_rollback=not commit) as tx:
        source.execute("SET CONSTRAINTS ALL DEFERRED")
        source.execute("SELECT bemi.set_context(%s::jsonb)", (plan.context,))
        for step in plan.steps:
            if step.sql is None:
                step.outcome = "refused" if step.refused else "nothing"
                ran.append(step)
                continue
            if any(w.row == step.row for w in waiting):  # an older change of a waiting row: that row's turn is now
                retry(last_try=False)
                for late in [w for w in waiting if w.row == step.row]:
                    run(late, last_try=True)
                    waiting.remove(late)
            if not run(step, last_try=False):
                waiting.append(step)
            elif step.outcome == "applied":
                retry(last_try=False)
        retry(last_try=True)
        plan.steps = ran
        if commit and not skip_conflicts and plan.problems:
            raise psycopg.Rollback(tx)
    plan.committed = commit and (skip_conflicts or not plan.problems)
    return plan
