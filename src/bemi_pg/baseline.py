"""The baseline: every tracked table's rows as one consistent snapshot of the source saw them.

Time travel answers from the changes first; the baseline answers for a row that has no change
since tracking began (issue 14). It is read in one REPEATABLE READ, READ ONLY transaction (so
every table stands for the same moment, and nothing stronger than ACCESS SHARE is taken),
through a server-side cursor in batches, and written to ``bemi.snapshot_row`` with COPY, one
destination transaction per batch. A table's rows count only once its ``bemi.snapshot``
header is completed; a run that is killed leaves a header without ``completed_at``, which
time travel ignores and the next run deletes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

import psycopg
from psycopg import sql

from .config import Settings
from .db import connect, installation, installed_source
from .errors import BemiError
from .queries import query
from .stitch import ColumnRules

__all__ = ["SnapshotResult", "BaselineTable", "take_snapshot", "select_tables"]

BATCH_ROWS = 5_000


@dataclass(frozen=True)
class BaselineTable:
    """A tracked table as the baseline reads it."""

    schema: str
    table: str
    key_columns: tuple[str, ...]
    columns: tuple[str, ...]
    estimate: int

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True)
class SnapshotResult:
    """One table's completed baseline."""

    table: str
    rows: int
    taken_at: datetime
    wal_position: int
    seconds: float


def select_tables(tracked: Sequence[BaselineTable], names: Sequence[str]) -> list[BaselineTable]:
    """The tracked tables named ``table`` or ``schema.table`` (all of them without names).

    A bare name found in two schemas is an error that asks for ``schema.table``."""
    if not names:
        return list(tracked)
    chosen: list[BaselineTable] = []
    for name in names:
        schema, _, table = name.rpartition(".")
        found = [t for t in tracked if t.table == table and (not schema or t.schema == schema)]
        if not found:
            raise BemiError(f"{name} is not a tracked table: name one of `bemi-pg status`'s tracked tables "
                            "(schema.table), or add it to source.schemas and run `bemi-pg install`")
        if len(found) > 1:
            raise BemiError(f"{name} is ambiguous ({', '.join(t.name for t in found)}): name it as schema.table")
        if found[0] not in chosen:
            chosen.append(found[0])
    return chosen


def _tracked(src: psycopg.Connection[Any]) -> list[BaselineTable]:
    return [BaselineTable(s, t, tuple(key), tuple(cols or ()), est) for s, t, key, cols, est in src.execute(query("baseline_tables"))]


def _row_query(table: BaselineTable, excluded: set[str]) -> sql.Composed:
    """primary_key as the changes table writes it, and the row as to_jsonb gives it less the
    excluded columns (the trigger mode's own expressions, so both agree)."""
    row: sql.Composable = sql.SQL("pg_catalog.to_jsonb(t.*)")
    if excluded:
        row = sql.SQL("(pg_catalog.to_jsonb(t.*) - {}::text[])").format(sql.Literal(sorted(excluded)))
    keys = table.key_columns
    if not keys:
        key: sql.Composable = sql.SQL("NULL::text")
    elif len(keys) == 1:
        key = sql.SQL("{} ->> {}").format(row, sql.Literal(keys[0]))
    else:
        key = sql.SQL("pg_catalog.jsonb_build_array({})::text").format(
            sql.SQL(", ").join(sql.SQL("{} -> {}").format(row, sql.Literal(k)) for k in keys))
    return sql.SQL("SELECT {key}, {row}::text FROM {table} AS t").format(
        key=key, row=row, table=sql.Identifier(table.schema, table.table))


def _progress_printer(stream: TextIO) -> Callable[[BaselineTable, int], None] | None:
    if not stream.isatty():
        return None

    def show(table: BaselineTable, rows: int) -> None:
        total = f" of ~{table.estimate}" if table.estimate else ""
        stream.write(f"\rsnapshot {table.name}: {rows}{total} rows")
        stream.flush()

    return show


def take_snapshot(source_dsn: str, destination_dsn: str | None, settings: Settings, tables: Sequence[str] = (), *,
                  batch_rows: int = BATCH_ROWS, progress: Callable[[BaselineTable, int], None] | None = None,
                  show_progress: bool = True, missing_only: bool = False) -> list[SnapshotResult]:
    """Take (or refresh) the baseline of the named tracked tables, or of every one.

    Uses the installation's settings (its column rules, its source identity). Each table's
    new baseline replaces its previous one only once it is complete. With ``missing_only``
    (what ``install`` does), only the tables without a complete baseline are read."""
    if progress is None and show_progress:
        progress = _progress_printer(sys.stderr)
    results: list[SnapshotResult] = []
    with connect(source_dsn, role="source database") as src, \
            connect(destination_dsn or source_dsn, role="destination database") as dst:
        inst = installation(src)
        if inst is None:
            raise BemiError("bemi-pg is not installed in this database: run `bemi-pg install` first")
        settings, source = settings.with_installed(inst.settings), installed_source(src, inst)
        rules = ColumnRules(settings.ignore_columns, settings.exclude_columns)
        with src.transaction():
            src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            taken_at, wal_position = src.execute(query("snapshot_moment")).fetchone()  # type: ignore[misc]
            chosen = select_tables(_tracked(src), tables)
            if missing_only:
                have = {(s, t) for s, t in dst.execute(query("snapshot_tables"), {"source": source})}
                chosen = [t for t in chosen if (t.schema, t.table) not in have]
            for table in chosen:
                started = time.monotonic()
                ident = {"source": source, "schema": table.schema, "table": table.table}
                with dst.transaction():
                    dst.execute(query("snapshot_discard_incomplete"), ident)
                    snapshot_id = dst.execute(query("snapshot_begin"), {**ident, "taken_at": taken_at,
                                                                       "wal_position": wal_position}).fetchone()[0]  # type: ignore[index]
                rows = 0
                excluded = rules.excluded(table.schema, table.table, table.columns)
                with src.cursor(name="bemi_snapshot") as cur:
                    cur.itersize = batch_rows
                    cur.execute(_row_query(table, excluded))
                    while batch := cur.fetchmany(batch_rows):
                        with dst.transaction(), dst.cursor().copy(
                                "COPY bemi.snapshot_row (snapshot_id, primary_key, row_data) FROM STDIN") as copy:
                            for key, data in batch:
                                copy.write_row((snapshot_id, key, data))
                        rows += len(batch)
                        if progress:
                            progress(table, rows)
                with dst.transaction():
                    dst.execute(query("snapshot_replace"), ident)
                    dst.execute(query("snapshot_complete"), {"id": snapshot_id, "rows": rows})
                if progress and show_progress and sys.stderr.isatty():
                    sys.stderr.write("\n")
                results.append(SnapshotResult(table.name, rows, taken_at, wal_position, time.monotonic() - started))
    return results
