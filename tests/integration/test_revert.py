"""Revert, right (issue 14, items 4, 6 and 7): guards that compare only what the trail holds, as
typed values; refusals where a change cannot be undone exactly; all or nothing (exit 4) unless
--skip-conflicts; a printed script that is correct whoever runs it; revert --since T, which brings
the tables back to a moment, checked against to_jsonb snapshots of a randomized workload."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from bemi_pg import commands, revert, timetravel
from bemi_pg.config import load_settings
from bemi_pg.errors import CannotSay

from ..conftest import run_cli

KOLKATA = {"PGTZ": "Asia/Kolkata", "PGOPTIONS": "-c search_path=elsewhere,public"}


def _psql(dsn: str, script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a printed revert script as a DBA would: psql -f, stopping at the first error."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    return subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", "-"], input=script, text=True,
                          capture_output=True, env={"PATH": "/usr/bin:/bin", **(env or {})}, timeout=300)


def _rows(dsn: str, table: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        return sorted(r for (r,) in conn.execute(f"SELECT to_jsonb(x)::text FROM {table} x"))


def _in_context(dsn: str, *transactions: tuple[str, str]) -> None:
    """Run each (context, statements) pair as one transaction under that context."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for context, statements in transactions:
            with conn.transaction():
                conn.execute("SELECT bemi.set_context(%s::jsonb)", (context,))
                conn.execute(statements)


def _poll(db: Any, mode: str) -> None:
    db.poll()  # wal mode: the slot; trigger mode: the mover moves the queue


# -- item 6: excluded columns, keyless tables, all or nothing, the script ------------------------

@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_excluded_columns_no_false_conflict_and_refusals_with_the_reason(db, mode):
    db.execute("CREATE TABLE users (id int PRIMARY KEY, email text, password_hash text NOT NULL)")
    db.install(exclude_columns=("*.password_hash",), capture_mode=mode)
    db.execute("INSERT INTO users VALUES (1, 'a@x', 'h1'), (2, 'b@x', 'h2')")
    db.execute("UPDATE users SET email = 'new@x' WHERE id = 1")
    db.execute("UPDATE users SET password_hash = 'h3' WHERE id = 2")  # recorded without the column
    db.execute("DELETE FROM users WHERE id = 2")
    _poll(db, mode)
    [update, secret, delete] = [c["id"] for c in sorted(db.changes("operation <> 'CREATE'"), key=lambda c: c["committed_at"])]
    env = {"BEMI_DSN": db.dsn}
    applied = run_cli("revert", "--change", str(update), "--apply", env=env)
    assert applied.returncode == 0, applied.stderr
    assert db.execute("SELECT id, email, password_hash FROM users") == [(1, "a@x", "h1")]  # the hash left alone
    for change, reason in ((delete, "does not hold column(s) password_hash"),
                           (secret, "may have changed only password_hash")):
        refused = run_cli("revert", "--change", str(change), "--apply", env=env)
        assert refused.returncode == 4 and reason in refused.stderr and "refused: change" in refused.stderr, refused.stderr
        assert db.execute("SELECT count(*) FROM users") == [(1,)]  # never a NULL hash, never a raw error


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_keyless_deletes_are_refused_and_reruns_change_nothing(db, mode):
    db.execute("CREATE TABLE log (msg text, n int)")
    db.install(capture_mode=mode)
    _in_context(db.dsn, ('{"job": 1}', "INSERT INTO log VALUES ('a', 1), ('b', 2)"),
                ('{"job": 2}', "DELETE FROM log WHERE msg = 'a'"))
    _poll(db, mode)
    env = {"BEMI_DSN": db.dsn}
    refused = run_cli("revert", "--context", '{"job": 2}', "--apply", env=env)
    assert refused.returncode == 4 and "has no primary key" in refused.stderr
    assert db.execute("SELECT msg FROM log") == [("b",)]
    db.execute("INSERT INTO log VALUES ('a', 1)")  # put back by hand: undoing job 1 now deletes each row once
    for expected in (0, 4):  # a second run finds nothing to delete: a conflict, not another row gone
        result = run_cli("revert", "--context", '{"job": 1}', "--apply", env=env)
        assert result.returncode == expected, result.stderr
        assert db.execute("SELECT count(*) FROM log") == [(0,)]
        _poll(db, mode)


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_the_printed_script_is_right_in_any_time_zone_and_search_path_and_all_or_nothing(db, mode):
    db.execute("CREATE SCHEMA app; CREATE SCHEMA elsewhere;"
               "CREATE TABLE app.event (id int PRIMARY KEY, at timestamptz, price numeric, tags text[]);"
               "CREATE TABLE elsewhere.event (id int PRIMARY KEY);"  # a decoy a bare name would find
               "INSERT INTO app.event SELECT i, '2024-03-01 10:00+00'::timestamptz + i * interval '1 hour', i * 1.50, '{x}'"
               "  FROM generate_series(1, 4) i")
    db.install(schemas=("app",), capture_mode=mode)
    before = _rows(db.dsn, "app.event")
    _in_context(db.dsn, ('{"req": "r-1"}', "SET LOCAL TimeZone = 'America/New_York';"  # the trail holds what it wrote
                         "UPDATE app.event SET at = at + interval '1 day', price = price * 2 WHERE id <= 2;"
                         "DELETE FROM app.event WHERE id = 3; INSERT INTO app.event VALUES (9, now(), 0.10, NULL);"
                         "UPDATE app.event SET id = 19 WHERE id = 4"))  # the key moves
    _poll(db, mode)
    env = {"BEMI_DSN": db.dsn}
    printed = run_cli("revert", "--context", '{"req": "r-1"}', env=env)
    assert printed.returncode == 0, printed.stderr
    script = printed.stdout
    db.execute("UPDATE app.event SET tags = '{changed}' WHERE id = 1")  # one row changed since
    failed = _psql(db.dsn, script, KOLKATA)
    assert failed.returncode != 0 and "bemi-pg revert: conflict" in failed.stderr
    db.execute("UPDATE app.event SET tags = '{x}' WHERE id = 1")
    after_conflict = _rows(db.dsn, "app.event")
    assert after_conflict != before and len(after_conflict) == 4  # nothing of it applied
    ran = _psql(db.dsn, script, KOLKATA)
    assert ran.returncode == 0, ran.stderr
    assert _rows(db.dsn, "app.event") == before
    again = _psql(db.dsn, script, KOLKATA)  # a second run: every guard fails, nothing changes
    assert again.returncode != 0 and _rows(db.dsn, "app.event") == before


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_all_or_nothing_by_default_and_skip_conflicts(db, mode):
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    db.install(capture_mode=mode)
    _in_context(db.dsn, ('{"batch": 1}', "INSERT INTO t SELECT g, g FROM generate_series(1, 3) g; TRUNCATE t;"
                                         "INSERT INTO t SELECT g, g FROM generate_series(1, 3) g"))
    db.execute("UPDATE t SET v = 20 WHERE id = 2")
    _poll(db, mode)
    env = {"BEMI_DSN": db.dsn}
    dry = run_cli("revert", "--context", '{"batch": 1}', env=env)
    assert dry.returncode == 4 and "refused: " in dry.stderr and "a TRUNCATE cannot be reverted" in dry.stderr
    assert "conflict: " in dry.stderr and "row 2 was changed or deleted after" in dry.stderr
    nothing = run_cli("revert", "--context", '{"batch": 1}', "--apply", env=env)
    assert nothing.returncode == 4 and "nothing was applied" in nothing.stderr
    assert db.execute("SELECT id, v FROM t ORDER BY id") == [(1, 1), (2, 20), (3, 3)]
    printed = run_cli("revert", "--context", '{"batch": 1}', "--skip-conflicts", env=env)
    assert printed.returncode == 0 and printed.stderr.count("skipped: ") == 5, printed.stderr
    ran = _psql(db.dsn, printed.stdout, KOLKATA)  # the printed script skips the same ones, with a NOTICE each
    assert ran.returncode == 0 and ran.stderr.count("bemi-pg revert: skipped: ") == 5, ran.stderr
    # skipped: the second CREATE of row 2 (changed since), the TRUNCATE, the first CREATEs (those rows are not there)
    assert db.execute("SELECT id, v FROM t ORDER BY id") == [(2, 20)]
    _poll(db, mode)
    skipped = run_cli("revert", "--context", '{"batch": 1}', "--apply", "--skip-conflicts", env=env)
    assert skipped.returncode == 0 and skipped.stderr.count("skipped: ") == 7, skipped.stderr  # a second run: all skipped
    assert db.execute("SELECT id, v FROM t ORDER BY id") == [(2, 20)]


def test_revert_since_scopes_tables_to_this_source_and_one_schema(db, other_db):
    db.execute("CREATE SCHEMA a; CREATE SCHEMA b; CREATE TABLE a.t (id int PRIMARY KEY); CREATE TABLE b.t (id int PRIMARY KEY)")
    other_db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    settings = load_settings(None, schemas=("a", "b"), capture_mode="triggers")
    commands.install(db.dsn, None, settings)
    moment = db.execute("SELECT clock_timestamp()::text")[0][0]
    db.execute("INSERT INTO a.t VALUES (1); INSERT INTO b.t VALUES (2)")
    db.poll()  # (trigger mode: the mover moves the queue)
    env = {"BEMI_DSN": db.dsn}
    ambiguous = run_cli("revert", "--since", moment, "--table", "t", env=env)
    assert ambiguous.returncode == 1 and "t is ambiguous (in schemas a, b): name it as schema.table" in ambiguous.stderr
    # another database's changes in this trail (as if it shared the destination) are never picked
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("""INSERT INTO changes (source, "database", "schema", "table", primary_key, operation, before, after,
                                             committed_at, queued_at, transaction_id, position, commit_position, seq)
                        SELECT '1/other', 'other', 'a', 't', '1', 'DELETE', '{"id": 1}', '{}', now(), now(), 1, 1, 1, 0""")
    applied = run_cli("revert", "--since", moment, "--table", "a.t", "--apply", env=env)
    assert applied.returncode == 0, applied.stderr
    assert db.execute("SELECT (SELECT count(*) FROM a.t), (SELECT count(*) FROM b.t)") == [(0, 1)]
    early = run_cli("revert", "--since", "2000-01-01", "--table", "b.t", env=env)
    assert early.returncode == 5 and "before tracking of b.t began" in early.stderr


# -- item 7: revert --since, a randomized workload ----------------------------------------------

TABLES = """
CREATE TABLE item (id int PRIMARY KEY, price numeric, tags text[], doc jsonb, seen timestamptz);
CREATE TABLE line (order_id int, n int, qty numeric(12, 3), note text, PRIMARY KEY (order_id, n));
INSERT INTO item SELECT i, i * 1.25, ARRAY['a' || i, NULL], jsonb_build_object('i', i, 'f', 2.50), '2024-01-01 00:00+02'
  FROM generate_series(1, 12) AS i;
INSERT INTO line SELECT i % 3, i, i / 7.0, 'n''' || i FROM generate_series(1, 9) AS i;
"""
NAMES = ("item", "line")


def _snapshot(conn: psycopg.Connection) -> dict[str, list[str]]:
    return {t: sorted(r for (r,) in conn.execute(f"SELECT to_jsonb(x)::text FROM {t} x")) for t in NAMES}


def _canonical(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, default=str)


def _free(conn: psycopg.Connection, sql: str, params: tuple[Any, ...]) -> bool:
    return conn.execute(sql, params).fetchone() is None


def _step(conn: psycopg.Connection, rng: random.Random) -> None:
    i = rng.randint(1, 16)
    roll = rng.random()
    if roll < 0.22:
        conn.execute("INSERT INTO item VALUES (%s, %s, %s, '{\"x\": [1, 2.50]}', now()) ON CONFLICT (id) DO UPDATE "
                     "SET price = excluded.price, tags = excluded.tags, seen = excluded.seen",
                     (i, Decimal(rng.randint(0, 10**9)) / 10**4, [str(i), None]))
    elif roll < 0.36:
        conn.execute("UPDATE item SET doc = jsonb_build_object('n', %s::numeric), price = price + 0.10 WHERE id %% 4 = %s",
                     (Decimal(rng.randint(0, 999)) / 7, i % 4))
    elif roll < 0.46:
        conn.execute("DELETE FROM item WHERE id = %s", (i,))
    elif roll < 0.56:  # the key moves, to a free one
        new = rng.randint(1, 40)
        if _free(conn, "SELECT FROM item WHERE id = %s", (new,)):
            conn.execute("UPDATE item SET id = %s, seen = seen + interval '1 minute' WHERE id = %s", (new, i))
    elif roll < 0.72:
        conn.execute("INSERT INTO line VALUES (%s, %s, %s, NULL) ON CONFLICT (order_id, n) DO UPDATE SET qty = excluded.qty",
                     (i % 3, rng.randint(1, 10), Decimal(rng.randint(0, 10**6)) / 1000))
    elif roll < 0.8:
        conn.execute("UPDATE line SET n = n + 100, note = 'moved' WHERE order_id = %s AND n < 100", (i % 3,))  # many keys move
    elif roll < 0.88:
        o, n, to = i % 3, rng.randint(1, 10), rng.randint(0, 5)
        if _free(conn, "SELECT FROM line WHERE order_id = %s AND n = %s", (to, n)):
            conn.execute("UPDATE line SET order_id = %s WHERE order_id = %s AND n = %s", (to, o, n))
    else:
        conn.execute("DELETE FROM line WHERE order_id = %s AND n > %s", (i % 3, rng.randint(1, 8)))


def _workload(db: Any, mode: str, destination: str | None = None) -> tuple[Any, list[tuple[str, dict[str, list[str]]]]]:
    """Tables that held rows before install, 160 random transactions, a snapshot every 20."""
    db.execute(TABLES)
    settings = load_settings(None, capture_mode=mode)
    commands.install(db.dsn, destination, settings)
    rng = random.Random(7)
    moments: list[tuple[str, dict[str, list[str]]]] = []
    with psycopg.connect(db.dsn, autocommit=True) as conn, psycopg.connect(db.dsn, autocommit=True) as watch:
        conn.execute("SET TimeZone = 'Asia/Kolkata'")  # in trigger mode the trail holds timestamps as this session wrote them
        watch.execute("SET TimeZone = 'UTC'")
        for step in range(160):
            with conn.transaction():
                for _ in range(rng.randint(1, 3)):
                    _step(conn, rng)
            if step % 20 == 19:
                time.sleep(0.002)
                moments.append((watch.execute("SELECT clock_timestamp()::text").fetchone()[0], _snapshot(watch)))
                time.sleep(0.002)
    commands.poll_once(db.dsn, destination, settings)
    return settings, moments


@pytest.mark.parametrize("mode,separate", [("wal", False), ("wal", True), ("triggers", False)])
def test_revert_since_brings_every_table_back_to_its_snapshot(db, other_db, mode, separate):
    destination = other_db.dsn if separate else None
    settings, moments = _workload(db, mode, destination)
    # Back to each moment, latest first; each revert is itself in the trail, so an earlier moment undoes it too.
    # Even rounds: `revert --since --apply` run with PGTZ=Asia/Kolkata; odd: the printed plan through psql there.
    env = {"BEMI_DSN": db.dsn, "PGTZ": "Asia/Kolkata", **({"BEMI_DESTINATION_DSN": destination} if destination else {})}
    for n, (moment, snap) in enumerate(reversed(moments[1:])):
        if n % 2 == 0:
            result = run_cli("revert", "--since", moment, "--apply", env=env)
            assert result.returncode == 0, result.stderr
        else:
            plan = run_cli("revert", "--since", moment, env=env)
            assert plan.returncode == 0 and plan.stdout.startswith("-- bemi-pg revert"), plan.stderr
            ran = _psql(db.dsn, plan.stdout, KOLKATA)
            assert ran.returncode == 0, ran.stderr
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute("SET TimeZone = 'UTC'")
            assert _snapshot(conn) == snap, (n, moment)
        commands.poll_once(db.dsn, destination, settings)
    # One table only, back to the first moment: the other stays as it is.
    first, snap = moments[0]
    with psycopg.connect(db.dsn, autocommit=True) as conn, psycopg.connect(destination or db.dsn, autocommit=True) as dest:
        conn.execute("SET TimeZone = 'UTC'")
        lines_now = _snapshot(conn)["line"]
        plan = revert.plan_revert(conn, dest, "public.changes", since=first, tables=["item"])
        revert.apply_revert(conn, plan, commit=True)
        assert plan.committed and _snapshot(conn) == {"item": snap["item"], "line": lines_now}


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_as_of_all_agrees_with_the_snapshots_revert_since_restores(db, mode):
    _, moments = _workload(db, mode)
    disagree = []
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        for moment, snap in moments:
            for table in NAMES:
                try:  # as typed values: in trigger mode the trail holds timestamps in the writing session's zone
                    with timetravel.answers():
                        rows = sorted(r for (r,) in conn.execute(
                            f"SELECT to_jsonb(jsonb_populate_record(NULL::public.{table}, a.row_data))::text "
                            "FROM bemi.as_of_all(%s, %s::timestamptz) AS a", (table, moment)))
                except CannotSay:
                    continue
                if rows != snap[table]:
                    disagree.append((table, moment))
    assert not disagree, f"as-of --all disagrees with the snapshots at {disagree}"


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_a_cascade_is_undone_parents_first(db, mode):
    db.execute("CREATE TABLE parent (id int PRIMARY KEY, name text);"
               "CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent ON DELETE CASCADE,"
               "                    other_id int REFERENCES parent ON DELETE SET NULL);"
               "INSERT INTO parent VALUES (1, 'a'), (2, 'b'); INSERT INTO child VALUES (10, 1, 2), (11, 1, NULL), (12, 2, 1)")
    db.install(capture_mode=mode)
    before = {t: _rows(db.dsn, t) for t in ("parent", "child")}
    moment = db.execute("SELECT clock_timestamp()::text")[0][0]
    db.execute("DELETE FROM parent WHERE id = 1")  # deletes children 10 and 11, sets 12's other_id NULL
    db.execute("UPDATE child SET other_id = 2 WHERE id = 12")
    _poll(db, mode)
    env = {"BEMI_DSN": db.dsn}
    plan = run_cli("revert", "--since", moment, env=env)
    assert plan.returncode == 0, plan.stderr
    ran = _psql(db.dsn, plan.stdout, KOLKATA)  # the printed order is one that works
    assert ran.returncode == 0, ran.stderr
    assert {t: _rows(db.dsn, t) for t in ("parent", "child")} == before


# -- columns a plan's aliases name, and the vector types -----------------------------------------

ODD = """
CREATE TABLE odd (id int PRIMARY KEY, t text, a int, b int, x int, v int2vector, o oidvector, vs int2vector[],
                  os oidvector[]);
"""
ODD_ROWS = """
INSERT INTO odd VALUES (1, 't1', 1, 2, 3, '1 2', '', ARRAY['1 2', '', NULL]::int2vector[], '{}'),
                       (2, 't2', 0, 0, 0, '', '7 8', '{}', ARRAY['', '9']::oidvector[]),
                       (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
                       (4, 't4', 4, 4, 4, '', '', ARRAY['']::int2vector[], ARRAY[NULL]::oidvector[]);
"""


def _odd_rows(conn: psycopg.Connection[Any]) -> list[str]:
    return sorted(r for (r,) in conn.execute("SELECT to_jsonb(r.*)::text FROM odd AS r"))


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_columns_named_as_a_plans_aliases_and_vectors_are_reverted_exactly(db, mode):
    """Columns named t, a, b and x (the plan's aliases: a bare to_jsonb(t) would be the column),
    and int2vector and oidvector values (an empty one populated from JSON is a vector no server can
    print: stored, it would stop wal2json, and so the poller, at that change)."""
    db.execute(ODD)
    db.install(capture_mode=mode)
    db.execute(ODD_ROWS)
    _poll(db, mode)
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        moment = conn.execute("SELECT clock_timestamp()::text").fetchone()[0]
        before = _odd_rows(conn)
    db.execute("UPDATE odd SET t = 'changed', v = '3', vs = '{}' WHERE id = 1; DELETE FROM odd WHERE id IN (2, 4);"
               "UPDATE odd SET a = 5, o = '1' WHERE id = 3; INSERT INTO odd (id, x, v) VALUES (5, 1, '')")
    _poll(db, mode)
    plan = run_cli("revert", "--since", moment, env={"BEMI_DSN": db.dsn})
    assert plan.returncode == 0 and "to_jsonb(t.*)" in plan.stdout, plan.stderr
    applied = run_cli("revert", "--since", moment, "--apply", env={"BEMI_DSN": db.dsn})
    assert applied.returncode == 0, applied.stderr
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        assert _odd_rows(conn) == before
    polled = run_cli("poll", "--once", env={"BEMI_DSN": db.dsn})  # the revert's own changes decode
    assert polled.returncode == 0, polled.stderr
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        typed = sorted(r for (r,) in conn.execute(
            "SELECT to_jsonb(r.*)::text FROM bemi.as_of(NULL::public.odd, %s::timestamptz) AS r", (moment,)))
        assert typed == before
        assert revert.vector_text([[1, 2], [], None], True) == '{"1 2","",NULL}'
        assert conn.execute("SELECT bemi.vector_text('[[[1, 2]], [[]]]', true), bemi.vector_text('[]', true), "
                            "bemi.vector_text('[\"7\", \"8\"]', false)").fetchone() == ('{{"1 2"},{""}}', "{}", "7 8")
