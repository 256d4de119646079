"""The poller: kill -9 at any moment, fault points, another destination, one poller per slot, heartbeats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from bemi_pg import commands

from ..conftest import create_database, drop_database, run_cli


def test_destination_in_another_database(db, other_db):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install(destination=other_db.dsn)
    db.execute("INSERT INTO todo (task) VALUES ('a'), ('b'); UPDATE todo SET task = 'c' WHERE id = 1")
    db.poll(destination=other_db.dsn)
    assert db.execute("SELECT to_regclass('public.changes')") == [(None,)]
    got = [(c["database"], c["operation"], c["after"]) for c in db.changes(dsn=other_db.dsn)]
    assert got == [(db.name, "CREATE", {"id": 1, "task": "a"}), (db.name, "CREATE", {"id": 2, "task": "b"}),
                   (db.name, "UPDATE", {"id": 1, "task": "c"})]
    commands.uninstall(db.dsn, other_db.dsn, db.settings)
    assert other_db.execute("SELECT to_regnamespace('bemi'), count(*) FROM changes GROUP BY 1") == [(None, 3)]


def test_a_second_poller_exits_without_touching_anything(db):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install()
    with psycopg.connect(db.dsn, autocommit=True) as holder:
        key = holder.execute("SELECT hashtextextended('bemi-pg poller ' || %s, 0)", (db.settings.slot_for(db.name),)).fetchone()[0]
        holder.execute("SELECT pg_advisory_lock(%s)", (key,))
        db.execute("INSERT INTO todo (task) VALUES ('a')")
        result = run_cli("poll", "--once", env={"BEMI_DSN": db.dsn})
        assert result.returncode == 75
        assert result.stderr.startswith("error: another bemi-pg poller is running for slot") and "pid" in result.stderr
        assert db.execute("SELECT count(*) FROM changes") == [(0,)]


def test_heartbeats_let_a_quiet_slot_advance(db, server_dsn):
    db.install()
    slot = db.settings.slot_for(db.name)
    db.poll()
    before = db.execute("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s", (slot,))[0][0]
    busy = create_database(server_dsn, "busy")
    try:
        with psycopg.connect(server_dsn.rsplit("/", 1)[0] + "/" + busy, autocommit=True) as conn:
            conn.execute("CREATE TABLE noise AS SELECT g FROM generate_series(1, 20000) g")
        db.poll()
        after, lag = db.execute("SELECT confirmed_flush_lsn, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) "
                                "FROM pg_replication_slots WHERE slot_name = %s", (slot,))[0]
        assert after > before and lag < 1_000_000
    finally:
        drop_database(server_dsn, busy)


def test_follow_finishes_the_batch_and_stops_on_sigterm(db):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BEMI_")}, "BEMI_DSN": db.dsn}
    proc = subprocess.Popen([sys.executable, "-m", "bemi_pg", "poll", "--follow", "--interval", "0.1"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        db.execute("INSERT INTO todo (task) SELECT 'x' FROM generate_series(1, 100)")
        for _ in range(100):
            if db.execute("SELECT count(*) FROM changes") == [(100,)]:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err and "stopped after writing 100 changes" in err


def test_changes_the_destination_already_holds_are_written_once(db, caplog):
    """Rows go straight into the changes table by COPY; when its unique key meets a change it
    already holds (here: a batch committed, the slot not advanced, and the checkpoint lost),
    the batch is written again through the staging table, skipping those, then COPY resumes."""
    from bemi_pg.poller import Poller

    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install()
    db.execute("INSERT INTO todo (task) SELECT 'a' || g FROM generate_series(1, 30) g")

    class Crash(Exception):
        pass

    def crash(point: str) -> None:
        if point == "after_commit":
            raise Crash

    with Poller(db.dsn, None, db.settings, fault=crash) as poller, pytest.raises(Crash):
        poller.run_once()
    assert db.execute("SELECT count(*) FROM changes") == [(30,)]
    db.execute("DELETE FROM bemi.checkpoint")
    for _ in range(3):  # three more transactions, in their own batches after the one written twice
        db.execute("INSERT INTO todo (task) SELECT 'b' || g FROM generate_series(1, 10) g")
    with caplog.at_level("INFO", logger="bemi_pg"), Poller(db.dsn, None, db.settings, batch_size=5) as poller:
        stats = poller.run_once()
        assert not poller._dedupe  # back to COPY straight into the table once a batch had no duplicate
    assert "already holds some changes of this batch" in caplog.text
    assert (stats.changes, stats.sent) == (30, 60)
    assert db.execute("SELECT count(*), count(DISTINCT (commit_position, seq)) FROM changes") == [(60, 60)]
    assert db.execute("SELECT count(*) FROM changes WHERE after->>'task' LIKE 'b%'") == [(30,)]


def test_ids_follow_the_wal_and_an_id_met_without_its_change_stops_the_poller(db):
    """The poller's ids (stitch.change_id) grow with the WAL. A row of another change holding the
    id a change would get (two databases' names hashing alike, their WAL positions equal) makes
    the poller fail, slot unmoved, rather than skip the change as a duplicate."""
    import uuid

    from bemi_pg.poller import Poller
    from bemi_pg.stitch import change_id

    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install()
    for n in range(3):
        db.execute("INSERT INTO todo (task) SELECT %s FROM generate_series(1, 4)", (f"t{n}",))
    assert db.poll().changes == 12
    rows = db.execute("SELECT id, commit_position, seq FROM changes ORDER BY commit_position, seq")
    assert [r[0] for r in rows] == [uuid.UUID(int=change_id(db.source, cp, seq)) for _, cp, seq in rows]
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)

    db.execute("INSERT INTO todo (task) VALUES ('next')")
    slot = db.settings.slot_for(db.name)
    [(commit_lsn,)] = db.execute(
        "WITH r AS (SELECT data::jsonb AS d FROM pg_logical_slot_peek_changes(%s, NULL, NULL, 'format-version', '2', "
        "'include-lsn', '1', 'include-xids', '1')) "
        "SELECT (b.d ->> 'lsn')::pg_lsn - '0/0' FROM r AS b JOIN r AS i ON i.d -> 'xid' = b.d -> 'xid' "
        "WHERE b.d ->> 'action' = 'B' AND i.d ->> 'table' = 'todo'", (slot,))
    taken = uuid.UUID(int=change_id(db.source, int(commit_lsn), 0))
    db.execute("INSERT INTO changes (id, source, database, schema, \"table\", operation, committed_at, queued_at, "
               "transaction_id, position, commit_position, seq) "
               "VALUES (%s, '1/elsewhere', 'elsewhere', 'public', 'todo', 'CREATE', now(), now(), 1, 1, 1, 0)", (taken,))
    with Poller(db.dsn, None, db.settings) as poller, pytest.raises(psycopg.errors.UniqueViolation, match="changes_pkey"):
        poller.run_once()
    db.execute("DELETE FROM changes WHERE database = 'elsewhere'")
    assert db.poll().changes == 1
    assert db.execute("SELECT id FROM changes WHERE after->>'task' = 'next'") == [(taken,)]


def test_a_stop_ends_a_read_after_the_batch_in_hand(db):
    """A peek reads many batches; asked to stop, the poller commits the batch in hand, advances
    the slot to it and returns, leaving the rest of the read to the next start."""
    import threading

    from bemi_pg.poller import Poller

    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install()
    for n in range(5):
        db.execute("INSERT INTO todo (task) SELECT %s FROM generate_series(1, 10)", (f"t{n}",))
    stop = threading.Event()
    slot = db.settings.slot_for(db.name)
    with Poller(db.dsn, None, db.settings, batch_size=10, fault=lambda point: point == "after_commit" and stop.set()) as poller:
        stats = poller.run_follow(0.1, stop)
    assert (stats.batches, stats.changes) == (1, 10)
    assert db.execute("SELECT count(*), min(after->>'task'), max(after->>'task') FROM changes") == [(10, "t0", "t0")]
    assert db.execute("SELECT pg_wal_lsn_diff(s.confirmed_flush_lsn, '0/0')::bigint = c.end_position "
                      "FROM pg_replication_slots s, bemi.checkpoint c WHERE s.slot_name = %s", (slot,)) == [(True,)]
    assert db.poll().changes == 40
    assert db.execute("SELECT count(*), count(DISTINCT (commit_position, seq)) FROM changes") == [(50, 50)]


def test_a_batch_spanning_two_months_into_monthly_partitions(db):
    """With partition_by_month the writer ends its COPY at a row of a month not seen yet in the
    batch, makes sure that month's partition exists, and goes on with a new COPY."""
    from bemi_pg.poller import _Writer
    from bemi_pg.stitch import ChangeRow, change_id

    db.install(partition_by_month=True)
    rows = [ChangeRow(db.name, "public", "t", str(n), "CREATE", b"{}", b'{"n":%d}' % n, "{}", committed_at, 7, n, 100, n,
                      change_id(db.source, 100, n))
            for n, committed_at in enumerate(["2024-01-31 23:59:59+00", "2024-01-31 23:59:59+00", "2024-02-01 00:00:00+00"])]
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        with conn.transaction(), _Writer(conn, psycopg.sql.Identifier("public", "changes"), partitioned=True) as writer:
            for row in rows:
                tail = [db.source.encode(), db.name.encode(), b"{}", row.committed_at.encode(), b"7", b"100", b"2026-11-26 00:00:00+00"]
                writer.add(row, b"\t".join(tail) + b"\n")
            assert writer.finish() == 3
    assert db.execute("SELECT tableoid::regclass::text, count(*) FROM changes GROUP BY 1 ORDER BY 1") == [
        ("bemi.changes_p202401", 2), ("bemi.changes_p202402", 1)]
