"""The baseline (issue 14, item 1): the rows a table held when tracking began, kept apart from changes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from bemi_pg import baseline, commands
from bemi_pg.config import load_settings
from bemi_pg.errors import BemiError

from ..conftest import run_cli

TABLES = """
CREATE TABLE account (id int PRIMARY KEY, owner text, balance numeric, tags text[], password_hash text,
                      seen timestamptz, doc jsonb);
CREATE TABLE entry (account_id int, n int, amount numeric(20, 4), PRIMARY KEY (n, account_id));
CREATE TABLE note (body text);
INSERT INTO account SELECT i, 'owner ' || i, 12345678901234567890.123456789 + i, ARRAY['a', NULL], 'secret',
                           '2024-05-01 12:00+05:30', '{"n": 1.10, "x": [1, {"y": null}]}'
  FROM generate_series(1, 25) AS i;
INSERT INTO entry SELECT i % 4, i, i / 3.0 FROM generate_series(1, 30) AS i;
INSERT INTO note VALUES ('one'), ('one'), (NULL);
"""


def _baseline(conn: psycopg.Connection, table: str) -> dict[str | None, list[str]]:
    rows = conn.execute(
        "SELECT r.primary_key, r.row_data::text FROM bemi.snapshot_row r JOIN bemi.snapshot s ON s.id = r.snapshot_id "
        "WHERE s.\"table\" = %s AND s.completed_at IS NOT NULL ORDER BY 1, 2", (table,)).fetchall()
    found: dict[str | None, list[str]] = {}
    for key, data in rows:
        found.setdefault(key, []).append(data)
    return found


def _live(conn: psycopg.Connection, table: str, key: str, excluded: str = "") -> dict[str | None, list[str]]:
    found: dict[str | None, list[str]] = {}
    minus = f" - '{excluded}'" if excluded else ""
    for k, data in conn.execute(f"SELECT {key}, (to_jsonb(t){minus})::text FROM {table} t ORDER BY 1, 2"):
        found.setdefault(k, []).append(data)
    return found


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_install_takes_a_baseline_with_the_keys_changes_use(db, mode):
    db.execute(TABLES)
    db.install(capture_mode=mode, exclude_columns=["*.password_hash"])
    with psycopg.connect(db.dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        assert _baseline(conn, "account") == _live(conn, "account", "id::text", "password_hash")
        assert _baseline(conn, "entry") == _live(conn, "entry", "jsonb_build_array(n, account_id)::text")
        assert _baseline(conn, "note") == _live(conn, "note", "NULL::text")
        assert "password_hash" not in _baseline(conn, "account")["1"][0]
        # not in changes, and each header is complete and stands for one moment
        assert conn.execute("SELECT count(*) FROM changes").fetchone()[0] == 0
        heads = conn.execute("SELECT source, count(*), count(DISTINCT (taken_at, wal_position)), sum(row_count) "
                             "FROM bemi.snapshot WHERE completed_at IS NOT NULL GROUP BY 1").fetchall()
        assert heads == [(db.source, 3, 1, 25 + 30 + 3)]
    # The same primary_key text as the changes of those rows.
    db.execute("UPDATE account SET owner = 'x' WHERE id = 3; UPDATE entry SET amount = 0 WHERE n = 5")
    db.poll()
    keys = {(c["table"], c["primary_key"]) for c in db.changes()}
    with psycopg.connect(db.dsn) as conn:
        assert keys <= {(t, k) for t in ("account", "entry") for k in _baseline(conn, t)}
    # A second install changes nothing: the baseline stays as it was.
    before = db.execute("SELECT id, completed_at FROM bemi.snapshot ORDER BY id")
    db.install()
    assert db.execute("SELECT id, completed_at FROM bemi.snapshot ORDER BY id") == before


def test_no_snapshot_then_snapshot_command_refreshes_one_table(db):
    db.execute(TABLES)
    result = run_cli("install", "--no-snapshot", "--dsn", db.dsn)
    assert result.returncode == 0, result.stderr
    assert db.execute("SELECT count(*) FROM bemi.snapshot") == [(0,)]
    result = run_cli("snapshot", "account", "--dsn", db.dsn)
    assert result.returncode == 0, result.stderr
    assert "baseline of public.account: 25 rows" in result.stderr
    first = db.execute("SELECT id FROM bemi.snapshot")
    db.execute("INSERT INTO account (id) VALUES (100)")
    result = run_cli("snapshot", "public.account", "entry", "--dsn", db.dsn)
    assert result.returncode == 0, result.stderr
    heads = db.execute('SELECT "table", row_count FROM bemi.snapshot WHERE completed_at IS NOT NULL ORDER BY 1')
    assert heads == [("account", 26), ("entry", 30)]
    assert db.execute("SELECT id FROM bemi.snapshot WHERE \"table\" = 'account'") != first
    assert db.execute("SELECT count(*) FROM bemi.snapshot_row") == [(56,)]
    result = run_cli("status", "--dsn", db.dsn)
    assert "baselines: 2: public.account (26 rows as of " in result.stdout, result.stdout


def test_snapshot_names_are_checked(db, other_db):
    db.execute(TABLES + "CREATE SCHEMA shop; CREATE TABLE shop.account (id int PRIMARY KEY);")
    db.install(schemas=["public", "shop"])
    result = run_cli("snapshot", "account", "--dsn", db.dsn)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: account is ambiguous (public.account, shop.account): name it as schema.table")
    result = run_cli("snapshot", "nope", "--dsn", db.dsn)
    assert result.returncode == 1 and "nope is not a tracked table" in result.stderr
    with pytest.raises(BemiError, match="not installed"):
        commands.snapshot(other_db.dsn, None, other_db.settings)


def test_a_killed_snapshot_leaves_nothing_trusted_and_the_next_run_replaces_it(db, other_db):
    db.execute("CREATE TABLE big (id int PRIMARY KEY, pad text)")
    db.execute("INSERT INTO big SELECT i, repeat('x', 200) FROM generate_series(1, 200000) AS i")
    commands.install(db.dsn, other_db.dsn, db.settings, snapshot=False)
    code = ("import sys; from bemi_pg import baseline; from bemi_pg.config import load_settings; "
            "baseline.take_snapshot(sys.argv[1], sys.argv[2], load_settings(None), batch_rows=500)")
    proc = subprocess.Popen([sys.executable, "-c", code, db.dsn, other_db.dsn], env={**os.environ})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if other_db.execute("SELECT count(*) > 2000 FROM bemi.snapshot_row")[0][0]:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    heads = other_db.execute("SELECT completed_at FROM bemi.snapshot")
    assert heads == [(None,)]  # half a baseline, not trusted
    partial = other_db.execute("SELECT count(*) FROM bemi.snapshot_row")[0][0]
    assert 0 < partial < 200000
    commands.snapshot(db.dsn, other_db.dsn, db.settings)
    heads = other_db.execute("SELECT row_count FROM bemi.snapshot WHERE completed_at IS NOT NULL")
    assert heads == [(200000,)]
    assert other_db.execute("SELECT count(*), count(*) FILTER (WHERE completed_at IS NULL) FROM bemi.snapshot") == [(1, 0)]
    assert other_db.execute("SELECT count(*) FROM bemi.snapshot_row") == [(200000,)]


def test_snapshot_is_consistent_and_does_not_block_writers(db):
    db.execute("CREATE TABLE a (id int PRIMARY KEY, v int); CREATE TABLE b (id int PRIMARY KEY, v int)")
    db.execute("INSERT INTO a SELECT i, 0 FROM generate_series(1, 50000) i; INSERT INTO b SELECT i, 0 FROM generate_series(1, 50000) i")
    db.settings = load_settings(None, capture_mode="triggers")
    commands.install(db.dsn, None, db.settings, snapshot=False)
    seen: list[tuple[str, int]] = []

    def progress(table, rows):
        if rows == 500 and table.table == "a":
            # Mid-snapshot: a writer commits to both tables without waiting for the snapshot.
            with psycopg.connect(db.dsn, autocommit=True) as writer:
                writer.execute("SET lock_timeout = '2s'")
                with writer.transaction():
                    writer.execute("UPDATE a SET v = 1 WHERE id = 50000")
                    writer.execute("UPDATE b SET v = 1 WHERE id = 1")
        seen.append((table.table, rows))

    baseline.take_snapshot(db.dsn, None, db.settings, batch_rows=500, progress=progress)
    # Both tables as they were before the writer's transaction: one snapshot for all of them.
    rows = db.execute("SELECT s.\"table\", sum((r.row_data ->> 'v')::int) FROM bemi.snapshot_row r "
                      "JOIN bemi.snapshot s ON s.id = r.snapshot_id GROUP BY 1 ORDER BY 1")
    assert rows == [("a", 0), ("b", 0)]
    assert db.execute("SELECT sum(v) FROM a") == [(1,)]
    assert seen[-1] == ("b", 50000)


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_a_column_named_as_the_row_alias_and_the_history_of_an_unchanged_row(db, mode):
    """A column named t (the alias the baseline and trigger mode's live rows read the table as: a
    bare to_jsonb(t) is the column); history of a row the baseline holds and no change touched."""
    db.execute("CREATE TABLE odd (id int PRIMARY KEY, t text); INSERT INTO odd VALUES (1, 'one'), (2, 'two')")
    db.install(capture_mode=mode)
    with psycopg.connect(db.dsn) as conn:
        assert _baseline(conn, "odd") == {"1": ['{"t": "one", "id": 1}'], "2": ['{"t": "two", "id": 2}']}
    db.execute("UPDATE odd SET t = 'uno' WHERE id = 1")
    db.poll()
    env = {"BEMI_DSN": db.dsn}
    unchanged = run_cli("history", "odd", "2", env=env)
    assert unchanged.returncode == 1 and "no changes recorded for odd 2 since tracking began at " in unchanged.stderr
    assert "the baseline taken at " in unchanged.stderr and "holds it" in unchanged.stderr, unchanged.stderr
    unknown = run_cli("history", "odd", "3", env=env)
    assert unknown.returncode == 1 and "holds it" not in unknown.stderr and "since tracking began at" in unknown.stderr, unknown
    db.execute("DELETE FROM bemi.snapshot")  # trigger mode then reads the live rows; wal mode cannot say
    at = db.execute("SELECT clock_timestamp()::text")[0][0]
    db.poll()  # the trail knows up to now
    as_of = run_cli("as-of", "odd", "--all", at, env=env)
    if mode == "triggers":
        assert as_of.returncode == 0 and as_of.stdout.splitlines() == ['{"t": "uno", "id": 1}', '{"t": "two", "id": 2}'], as_of
    else:
        assert as_of.returncode != 0 and "Traceback" not in as_of.stderr, as_of
