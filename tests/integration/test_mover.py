"""Trigger mode's mover (bemi.move_changes): killed at random under four writers, several at once,
scheduled by pg_cron alone; and the trail's known extent follows it."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bemi_pg import commands, timetravel
from bemi_pg._localpg import PgInstall, throwaway_cluster
from bemi_pg.config import load_settings
from bemi_pg.errors import CannotSay
from bemi_pg.render import render_roles

from ..conftest import run_cli
from ..faults import EXCLUDE, SCHEMA, Ledger, Writer, compare, excluding_config, kill_pollers, order_violations, poller_env, scaled

FAULTS = {"lost": 0, "duplicated": 0, "misattributed": 0, "phantom": 0}


class SqlMover(threading.Thread):
    """Another mover beside `poll`: bemi.move_changes in a loop, as pg_cron would call it, with
    its sessions terminated now and then in the middle of a move."""

    def __init__(self, dsn: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.dsn, self.stop, self.moved, self.killed = dsn, stop, 0, 0
        self.rng = random.Random(7)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    while not self.stop.is_set():
                        self.moved += conn.execute("SELECT bemi.move_changes(%s)", (self.rng.choice([7, 100, 5000]),)).fetchone()[0]
                        time.sleep(self.rng.uniform(0, 0.05))
            except psycopg.OperationalError:
                self.killed += 1

    def terminate_moves(self, dsn: str) -> int:
        """Terminate every session moving changes right now (this thread's and `poll`'s)."""
        with psycopg.connect(dsn, autocommit=True) as conn:
            return len(conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                                    "AND state = 'active' AND query LIKE '%move_changes%'").fetchall())


def test_killing_movers_at_random_under_four_writers_loses_nothing_and_keeps_the_order(db):
    db.execute(SCHEMA)
    db.install(capture_mode="triggers", exclude_tables=EXCLUDE)
    ledger, stop, stop_mover = Ledger(), threading.Event(), threading.Event()
    # Writer 3 holds every third transaction open while the others commit later, newer ones.
    writers = [Writer(db.dsn, w, ledger, stop, copy_rows=2000 if w == 0 else 0, pause=0.005, hold=1.0 if w == 3 else 0.0)
               for w in range(4)]
    sql_mover = SqlMover(db.dsn, stop_mover)
    for thread in (*writers, sql_mover):
        thread.start()
    terminated = 0
    killer_stop = threading.Event()

    def killer() -> None:
        nonlocal terminated
        while not killer_stop.wait(random.uniform(0.05, 0.3)):
            terminated += sql_mover.terminate_moves(db.dsn)

    killing = threading.Thread(target=killer, daemon=True)
    killing.start()
    figures = kill_pollers(db.dsn, scaled(16), config=excluding_config(), fault_every=4, points=("after_move",))
    killer_stop.set()
    killing.join()
    stop.set()
    for writer in writers:
        writer.join()
    stop_mover.set()
    sql_mover.join()
    db.poll()  # the last of the queue
    result = compare(db.dsn, db.dsn, ledger)
    print(f"\nmovers killed: {figures}, sessions terminated mid-move: {terminated}, moved by SQL: {sql_mover.moved}: {result}")
    assert figures["kills"] >= scaled(10) and sum(w.committed for w in writers) > 50 and sql_mover.moved > 0
    assert result["expected"] > 2000
    assert {k: result[k] for k in FAULTS} == FAULTS
    assert order_violations(db.dsn) == []
    assert db.execute("SELECT count(*) FROM bemi.change_queue") == [(0,)]


def test_the_trail_knows_only_up_to_where_the_mover_got(db):
    db.execute("CREATE TABLE account (id int PRIMARY KEY, balance int)")
    db.install(capture_mode="triggers")
    with db.connect() as long_one, db.connect(autocommit=True) as conn:
        long_one.execute("INSERT INTO account VALUES (2, 20)")  # open, with an older id than what follows
        conn.execute("INSERT INTO account VALUES (1, 10)")
        conn.execute("UPDATE account SET balance = 11 WHERE id = 1")
        db.poll()
        # The open transaction holds the horizon: the later UPDATE waits, and so does the trail's extent.
        assert db.execute("SELECT operation FROM changes") == []
        assert db.execute("SELECT count(*) FROM bemi.change_queue") == [(2,)]  # the committed ones
        with pytest.raises(CannotSay, match="later than what the poller has written"):
            timetravel.as_of(conn, "account", "1", conn.execute("SELECT now()").fetchone()[0])
        long_one.commit()
        committed = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        db.poll()
        rows = db.execute("SELECT primary_key, operation, after ->> 'balance' FROM changes ORDER BY committed_at, seq")
        assert rows == [("2", "CREATE", "20"), ("1", "CREATE", "10"), ("1", "UPDATE", "11")]
        assert timetravel.as_of(conn, "account", "1", committed)["balance"] == 11
        status = commands.status(db.dsn, None, db.settings)
        assert status["queue"]["rows"] == 0 and status["queue"]["moved_until"] >= committed


def test_doctor_warns_when_nothing_moves_the_queue(db, monkeypatch):
    db.execute("CREATE TABLE account (id int PRIMARY KEY)")
    db.install(capture_mode="triggers")
    db.execute("INSERT INTO account VALUES (1)")
    checks = {c.name: c for c in commands.doctor(db.dsn, None, db.settings)}
    assert checks["change mover"].status == "OK" and "1 change waiting" in checks["change mover"].detail
    monkeypatch.setattr(commands, "MOVER_STALL_SECONDS", 0)
    time.sleep(0.1)
    check = {c.name: c for c in commands.doctor(db.dsn, None, db.settings)}["change mover"]
    assert check.status == "WARN" and "nothing is moving them (last move: never)" in check.detail
    assert "bemi.move_changes()" in check.fix
    db.poll()
    check = {c.name: c for c in commands.doctor(db.dsn, None, db.settings)}["change mover"]
    assert check.status == "OK" and check.detail == "no change waits to be moved"


def _pg_cron_installed(pg: PgInstall) -> bool:
    lib = Path(pg.root or "/") / pg.bindir.relative_to("/").parent / "lib" / "pg_cron.so"
    return lib.exists()


def test_pg_cron_alone_moves_everything(tmp_path):
    pg = PgInstall.from_env()
    if not _pg_cron_installed(pg):
        pytest.skip("pg_cron is not installed for this PostgreSQL (Debian's postgresql-N-cron)")
    settings = ("shared_preload_libraries=pg_cron", "cron.database_name=app", "cron.use_background_workers=on",
                "max_worker_processes=16", "track_commit_timestamp=on")
    with throwaway_cluster("app", settings=settings, prefix="bemi-pg-cron-", pg=pg) as cluster:
        dsn = cluster.dsn("app")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE account (id int PRIMARY KEY, balance int)")
        commands.install(dsn, None, load_settings(None, capture_mode="triggers"))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_cron")
            version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'").fetchone()[0]
            major, minor = (int(p) for p in re.match(r"(\d+)\.(\d+)", version).groups())  # type: ignore[union-attr]
            every = "1 seconds" if (major, minor) >= (1, 5) else "* * * * *"  # seconds since pg_cron 1.5
            conn.execute("SELECT cron.schedule('bemi-move', %s, 'SELECT bemi.move_changes(10000)')", (every,))
            for i in range(1, 201):
                with conn.transaction():
                    conn.execute("SELECT bemi.set_context(%s)", (f'{{"request": {i}}}',))
                    conn.execute("INSERT INTO account VALUES (%s, 0)", (i,))
                    conn.execute("UPDATE account SET balance = balance + 1 WHERE id = %s", (i,))
            deadline = time.monotonic() + 150
            moved: Any = 0
            while time.monotonic() < deadline:
                moved = conn.execute("SELECT count(*) FROM changes").fetchone()[0]
                if moved == 400:
                    break
                time.sleep(1)
            runs = conn.execute("SELECT count(*), count(*) FILTER (WHERE status = 'succeeded') FROM cron.job_run_details").fetchone()
            assert moved == 400, f"pg_cron moved {moved} of 400 (runs, succeeded: {runs})"
            assert conn.execute("SELECT count(*) FROM bemi.change_queue").fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'bemi-pg'").fetchone()[0] == 0
            # With track_commit_timestamp on, committed_at is the transaction's commit time.
            wrong = conn.execute("SELECT count(*) FROM changes WHERE committed_at IS DISTINCT FROM "
                                 "pg_xact_commit_timestamp(transaction_id::text::xid)").fetchone()[0]
            assert wrong == 0
            contexts = conn.execute("SELECT count(DISTINCT context ->> 'request') FROM changes").fetchone()[0]
            assert contexts == 200


def test_metrics_show_the_queue_and_health_needs_no_slot(db):
    pytest.importorskip("prometheus_client", reason="the metrics extra: pip install -e '.[metrics]'")
    from .test_operations import Stderr, get, samples, wait_until

    db.execute("CREATE TABLE account (id int PRIMARY KEY)")
    db.install(capture_mode="triggers")
    with db.connect() as long_one:
        long_one.execute("SELECT pg_current_xact_id()")  # holds the horizon: what commits after it waits
        db.execute("INSERT INTO account SELECT g FROM generate_series(1, 30) g")
        poller = subprocess.Popen([sys.executable, "-m", "bemi_pg", "poll", "--follow", "--interval", "0.1", "--metrics-port", "0",
                                   "--log-format", "json"], env=poller_env(db.dsn), stderr=subprocess.PIPE, text=True)
        err = Stderr(poller.stderr)
        err.start()
        try:
            base = err.wait_for(lambda line: json.loads(line).get("metrics_url"))
            wait_until(lambda: get(base + "readyz")[0] == 200, what="/readyz")
            waiting = wait_until(lambda: samples(get(base + "metrics")[1]).get("bemi_pg_queue_rows{}") == 30, what="30 queued")
            assert waiting
            metrics = samples(get(base + "metrics")[1])
            assert metrics["bemi_pg_queue_oldest_seconds{}"] > 0
            assert metrics["bemi_pg_poller_info{capture_mode=triggers,version=0.4.0}"] == 1
            assert get(base + "healthz") == (200, "ok\n")
            long_one.rollback()
            wait_until(lambda: samples(get(base + "metrics")[1]).get("bemi_pg_queue_rows{}") == 0, what="the queue moved")
            assert db.execute("SELECT count(*) FROM changes") == [(30,)]
            # The log says what trigger mode did: no slot, no transactions counted.
            moved = err.wait_for(lambda line: "queued changes" in json.loads(line)["message"] and json.loads(line))
            assert moved["message"] == "bemi-pg: moved 30 queued changes into the changes table" and moved["changes"] == 30
        finally:
            poller.terminate()
            poller.wait(timeout=30)


def test_the_least_privilege_poller_moves_the_queue(db):
    db.execute("CREATE TABLE account (id int PRIMARY KEY)")
    db.install(capture_mode="triggers")
    db.execute("DROP ROLE IF EXISTS bemi_mover_test")
    db.execute(render_roles(db.settings, role="bemi_mover_test"))
    try:
        db.execute("INSERT INTO account VALUES (1)")
        result = run_cli("poll", "--once", env={"BEMI_DSN": db.dsn.replace("user=postgres", "user=bemi_mover_test")})
        assert result.returncode == 0, result.stderr
        assert db.execute("SELECT primary_key FROM changes") == [("1",)]
    finally:
        db.execute("DROP OWNED BY bemi_mover_test; DROP ROLE bemi_mover_test")


def test_uninstall_moves_what_waits_in_the_queue(db):
    db.execute("CREATE TABLE account (id int PRIMARY KEY)")
    db.install(capture_mode="triggers")
    with db.connect() as long_one:
        long_one.execute("SELECT pg_current_xact_id()")  # the horizon stays behind what follows
        db.execute("INSERT INTO account VALUES (1), (2)")
        db.poll()
        assert db.execute("SELECT count(*) FROM bemi.change_queue") == [(2,)]
        commands.uninstall(db.dsn, None, db.settings)
    assert db.execute("SELECT primary_key FROM changes ORDER BY seq") == [("1",), ("2",)]
    assert db.execute("SELECT to_regclass('bemi.change_queue')") == [(None,)]
