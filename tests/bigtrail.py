"""A large synthetic changes table (millions of rows), for the plan test and the benchmark.

Rows are generated in SQL with the keys dropped and rebuilt afterwards, which is several times
faster than inserting into the indexed table; `bemi-pg install` (idempotent) then recreates the
secondary indexes exactly as it defines them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from bemi_pg import commands
from bemi_pg._localpg import throwaway_cluster
from bemi_pg.config import Settings, load_settings

TABLES = 20  # t0 .. t19
KEYS = 50_000  # primary keys per table
BASELINE_KEYS = 10_000  # rows per table in the baseline only
# Each change's context: {"request": g % REQUESTS, "user": g % USERS}. The explorer's plan test
# and benchmark install with `context_indexes = ["request"]` (CONTEXT_SETTINGS), so "request" has a
# btree of its own and "user" only the GIN index: both ways of reading a context are measured.
REQUESTS = 1000
USERS = 997
CONTEXT_SETTINGS = {"context_indexes": ("request",)}


def fill_changes(dsn: str, settings: Settings, rows: int) -> None:
    commands.install(dsn, None, settings)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE changes DROP CONSTRAINT changes_pkey, DROP CONSTRAINT changes_source_commit_position_seq_key")
        for (index,) in conn.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'changes'::regclass").fetchall():
            conn.execute(f"DROP INDEX {index}")  # every secondary index, the settings' context ones too
        conn.execute(f"""
            INSERT INTO changes (source, "database", "schema", "table", primary_key, operation, before, after, context,
                                 committed_at, queued_at, transaction_id, "position", commit_position, seq)
            SELECT bemi.source_identity(), current_database(), 'public', 't' || (g % {TABLES}), (g / {TABLES} % {KEYS})::text,
                   CASE WHEN g < {TABLES * KEYS} THEN 'CREATE' ELSE 'UPDATE' END,
                   CASE WHEN g < {TABLES * KEYS} THEN '{{}}'::jsonb
                        ELSE jsonb_build_object('id', g / {TABLES} % {KEYS}, 'v', g - {TABLES * KEYS}) END,
                   jsonb_build_object('id', g / {TABLES} % {KEYS}, 'v', g),
                   jsonb_build_object('request', g % {REQUESTS}, 'user', g % {USERS}),
                   timestamptz '2024-01-01' + g * interval '1 second', now(), g, g * 100, g * 100, 0
              FROM generate_series(0, {rows - 1}) g
        """)
        conn.execute("""
            ALTER TABLE changes ADD CONSTRAINT changes_pkey PRIMARY KEY (id),
              ADD CONSTRAINT changes_source_commit_position_seq_key UNIQUE (source, commit_position, seq)
        """)
    commands.install(dsn, None, settings)  # recreates the secondary indexes
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The trail is dated 2024: tracking began before it, the poller wrote all of it, and each
        # table has a baseline of BASELINE_KEYS rows (keys from KEYS on) that no change tells about.
        conn.execute("UPDATE bemi.installation SET installed_at = '2023-12-31'")
        conn.execute("""
            INSERT INTO bemi.checkpoint (source, "database", slot_name, commit_position, end_position)
            SELECT source, "database", 'bemi_bigtrail', max(commit_position), max(commit_position) FROM changes GROUP BY 1, 2
        """)
        conn.execute(f"""
            WITH s AS (INSERT INTO bemi.snapshot (source, "schema", "table", taken_at, wal_position, completed_at)
                       SELECT bemi.source_identity(), 'public', 't' || t, '2023-12-31', 0, now()
                         FROM generate_series(0, {TABLES - 1}) t RETURNING id)
            INSERT INTO bemi.snapshot_row
            SELECT s.id, k::text, jsonb_build_object('id', k) FROM s, generate_series({KEYS}, {KEYS + BASELINE_KEYS - 1}) k
        """)
        # Each table's tracking period began then, and some UPDATEs of t7 moved a row from another
        # key (KEYS + BASELINE_KEYS on: keys no change or baseline otherwise knows).
        conn.execute(f"""
            INSERT INTO bemi.trail_event (source, "schema", "table", event, reason, at, "position")
            SELECT bemi.source_identity(), 'public', 't' || t, 'began', 'install', '2023-12-31', 0
              FROM generate_series(0, {TABLES - 1}) t
        """)
        conn.execute(f"""
            INSERT INTO bemi.key_move (source, "schema", "table", old_key, new_key, committed_at, commit_position, seq)
            SELECT source, "schema", "table", (primary_key::int + {KEYS + BASELINE_KEYS})::text, primary_key, committed_at,
                   commit_position, seq
              FROM changes WHERE operation = 'UPDATE' AND commit_position % 100000 = 700
        """)
        conn.execute("ANALYZE bemi.key_move")
        conn.execute("VACUUM ANALYZE changes")
        conn.execute("ANALYZE bemi.snapshot_row")


def explain_everything(conn: psycopg.Connection[Any]) -> list[str]:
    """From now on, every statement's plan on ``conn`` (nested ones too) lands in the returned list."""
    plans: list[str] = []
    conn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    conn.execute("SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on; "
                 "SET auto_explain.log_level = notice")
    return plans


@contextmanager
def big_trail(rows: int, settings: Settings | None = None) -> Iterator[str]:
    """A throwaway cluster whose database holds ``rows`` synthetic changes (for the benchmarks); its DSN."""
    with throwaway_cluster("trail", settings=(), prefix="bemi-pg-bench-") as cluster:
        dsn = cluster.dsn("trail")
        started = time.monotonic()
        fill_changes(dsn, settings or load_settings(None), rows)
        print(f"filled {rows:,} changes in {time.monotonic() - started:.0f}s", flush=True)
        yield dsn
