"""The poller: kill -9 at any moment, fault points, another destination, one poller per slot, heartbeats."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import psycopg

from bemi_pg import commands

from ..conftest import create_database, drop_database, run_cli


def _writer(dsn: str, ledger: list[tuple[int, int]], stop: threading.Event, seed: int) -> None:
    """Commit numbered transactions (10% rolled back); record (tx, rows) of those that committed."""
    rng = random.Random(seed)
    with psycopg.connect(dsn) as conn:
        tx = 0
        while not stop.is_set():
            tx += 1
            n = rng.randint(1, 20)
            conn.execute("SELECT bemi.set_context(%s::jsonb)", (f'{{"tx": {tx}, "seed": {seed}}}',))
            conn.execute("INSERT INTO item (tx, seed, k) SELECT %s, %s, g FROM generate_series(1, %s) g", (tx, seed, n))
            if tx % 7 == 0:
                conn.execute("UPDATE item SET v = v + 1 WHERE tx = %s AND seed = %s", (tx, seed))
            if tx == 50:
                with conn.cursor().copy("COPY item (tx, seed, k) FROM STDIN") as copy:
                    for k in range(1000, 6000):
                        copy.write_row((tx, seed, k))
            if rng.random() < 0.1:
                conn.rollback()
                continue
            conn.commit()
            inserted = n + (5000 if tx == 50 else 0)
            ledger.append((tx, inserted + (inserted if tx % 7 == 0 else 0)))
            time.sleep(rng.random() * 0.005)


def test_kill_9_at_any_moment_loses_and_duplicates_nothing(db):
    db.execute("CREATE TABLE item (id bigserial PRIMARY KEY, tx int, seed int, k int, v int DEFAULT 0)")
    db.install()
    ledgers: list[list[tuple[int, int]]] = [[], []]
    stop = threading.Event()
    writers = [threading.Thread(target=_writer, args=(db.dsn, ledgers[i], stop, i)) for i in range(2)]
    for w in writers:
        w.start()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BEMI_")}, "BEMI_DSN": db.dsn}
    rng = random.Random(7)
    kills = 0
    while kills < 15:
        args = ["poll", "--follow", "--interval", "0.05", "--batch-size", str(rng.choice([20, 200, 3000]))]
        proc = subprocess.Popen([sys.executable, "-m", "bemi_pg", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    stop.set()
    for w in writers:
        w.join()
    for point in ("before_commit", "after_commit", "after_advance"):
        db.execute("INSERT INTO item (tx, seed, k) VALUES (-1, -1, 0)")
        result = run_cli("poll", "--once", env={"BEMI_DSN": db.dsn, "BEMI_FAULT": point})
        assert result.returncode == 99
    db.poll()
    assert kills >= 10
    expected = {(seed, tx): rows for seed in (0, 1) for tx, rows in ledgers[seed]}
    got = dict(((s, t), n) for s, t, n in db.execute(
        "SELECT (context->>'seed')::int, (context->>'tx')::int, count(*) FROM changes "
        "WHERE context ? 'tx' GROUP BY 1, 2"))
    assert got == expected
    assert db.execute("SELECT count(*) FROM changes WHERE after->>'tx' = '-1'") == [(3,)]
    dupes = db.execute("SELECT operation, primary_key, after FROM changes GROUP BY 1, 2, 3 HAVING count(*) > 1")
    assert dupes == []


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
