"""Reliability under faults: kill -9, fault points, server crashes, an unreachable destination,
a lost slot, DDL while polling, one huge transaction, a least-privilege poller role.
Each compares the changes table with a ledger the writers kept: nothing lost, nothing
duplicated, nothing misattributed. `make soak` runs the same with bigger numbers."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psycopg
import pytest

from bemi_pg import commands
from bemi_pg._localpg import LocalCluster, throwaway_cluster
from bemi_pg.config import Settings, load_settings
from bemi_pg.render import render_roles

from ..conftest import run_cli
from ..faults import EXCLUDE, SCHEMA, Ledger, Writer, compare, kill_pollers, poller_env, scaled, stop_workload

CLEAN = {"lost": 0, "duplicated": 0, "misattributed": 0, "phantom": 0}


def _figures(figures: dict[str, int]) -> dict[str, int]:
    print("\nfigures:", json.dumps(figures))
    return {k: figures[k] for k in CLEAN}


def _writers(dsn: str, count: int, ledger: Ledger, stop: threading.Event, copy_rows: int) -> list[Writer]:
    writers = [Writer(dsn, w, ledger, stop, copy_rows=copy_rows if w == 0 else 0) for w in range(count)]
    for writer in writers:
        writer.start()
    return writers


def _assert_verifies(dsn: str, destination: str | None, settings: Settings) -> None:
    """The trail the faults left verifies: every change sealed, no seal broken."""
    verdict = commands.verify(dsn, destination, settings)
    print("\n".join(verdict.lines()))
    assert verdict.intact and verdict.changes > 0 and not verdict.unsealed


def _wait_for_the_poller(destination_dsn: str, timeout: float = 60) -> None:
    """Until the poller started has written changes: a fault injected before it is running
    would only test its start (which stops on an unreachable database, by design)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg.connect(destination_dsn, autocommit=True) as conn:
            if conn.execute("SELECT EXISTS (SELECT FROM changes)").fetchone()[0]:
                return
        time.sleep(0.1)
    raise AssertionError(f"the poller wrote nothing in {timeout:.0f} s")


def test_kill_9_and_fault_points_under_a_mixed_workload(db):
    db.execute(SCHEMA)
    db.install(exclude_tables=EXCLUDE)
    ledger, stop = Ledger(), threading.Event()
    writers = _writers(db.dsn, 4, ledger, stop, copy_rows=scaled(20_000))
    try:
        figures = kill_pollers(db.dsn, scaled(60), seed=1, fault_every=6)
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    db.poll()
    result = compare(db.dsn, db.dsn, ledger)
    figures.update(result)
    assert figures["kills"] >= scaled(50) and figures["faults"] >= scaled(10) and result["expected"] > scaled(20_000)
    assert _figures(figures) == CLEAN
    _assert_verifies(db.dsn, None, db.settings)


@pytest.fixture
def own_cluster():
    """A cluster of this test's own, for faults that would disturb the shared one."""
    with ExitStack() as stack:

        def start(*settings: str) -> tuple[LocalCluster, str]:
            cluster = stack.enter_context(throwaway_cluster("app", settings=settings, prefix="bemi-pg-fault-"))
            return cluster, cluster.dsn("app")

        yield start


def test_postgres_crash_under_load(own_cluster):
    cluster, dsn = own_cluster()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
    settings = load_settings(None, exclude_tables=EXCLUDE)
    commands.install(dsn, None, settings)
    config = Path(tempfile.mkdtemp(prefix="bemi-pg-conf-")) / "bemi.toml"
    config.write_text('[source]\nexclude_tables = ["public.ledger_tx"]\n')
    ledger, stop = Ledger(), threading.Event()
    writers = _writers(dsn, 3, ledger, stop, copy_rows=scaled(5_000))
    poller = subprocess.Popen([sys.executable, "-m", "bemi_pg", "poll", "--follow", "--interval", "0.05"],
                              env=poller_env(dsn, config=str(config)), stderr=subprocess.PIPE, text=True)
    crashes = 0
    try:
        _wait_for_the_poller(dsn)
        for _ in range(3):
            time.sleep(1.5)
            cluster.stop("immediate")
            crashes += 1
            time.sleep(0.3)
            cluster.start()
        time.sleep(1.0)
    finally:
        err = stop_workload(stop, writers, poller)
    assert "unreachable" in err and "retrying" in err  # the poller said what happened, and kept going
    commands.poll_once(dsn, None, settings)
    result = compare(dsn, dsn, ledger)
    assert result["expected"] > scaled(5_000)
    assert _figures({"crashes": crashes, **result}) == CLEAN
    _assert_verifies(dsn, None, settings)


def test_destination_unreachable_then_back(db, other_db):
    db.execute(SCHEMA)
    db.install(destination=other_db.dsn, exclude_tables=EXCLUDE)
    config = Path(tempfile.mkdtemp(prefix="bemi-pg-conf-")) / "bemi.toml"
    config.write_text('[source]\nexclude_tables = ["public.ledger_tx"]\n')
    ledger, stop = Ledger(), threading.Event()
    writers = _writers(db.dsn, 2, ledger, stop, copy_rows=0)
    poller = subprocess.Popen(
        [sys.executable, "-m", "bemi_pg", "poll", "--follow", "--interval", "0.05", "--destination-dsn", other_db.dsn],
        env=poller_env(db.dsn, config=str(config)), stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_the_poller(other_db.dsn)
        db.execute(f'ALTER DATABASE "{other_db.name}" ALLOW_CONNECTIONS false')
        db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (other_db.name,))
        time.sleep(4.0)
        during = other_db.name
        db.execute(f'ALTER DATABASE "{during}" ALLOW_CONNECTIONS true')
        time.sleep(4.0)  # backoff is at most a few seconds here; it catches up
    finally:
        err = stop_workload(stop, writers, poller, settle=1.0)
    assert poller.returncode == 0, err
    assert "the destination database is unreachable" in err and "retrying in" in err and "reconnected" in err
    commands.poll_once(db.dsn, other_db.dsn, db.settings)
    assert _figures(compare(db.dsn, other_db.dsn, ledger)) == CLEAN
    _assert_verifies(db.dsn, other_db.dsn, db.settings)


def test_a_lost_slot_is_reported_and_never_recreated(own_cluster):
    cluster, dsn = own_cluster("max_slot_wal_keep_size=1MB", "max_wal_size=32MB", "min_wal_size=32MB")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
    settings = load_settings(None)
    commands.install(dsn, None, settings)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 200000) g")
        for _ in range(3):
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
        status = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'bemi_app'").fetchone()
    assert status == ("lost",)
    result = run_cli("poll", "--once", env={"BEMI_DSN": dsn})
    assert result.returncode == 3
    assert result.stderr.startswith("error: replication slot bemi_app is invalidated (wal_status lost")
    status = json.loads(run_cli("status", "--json", env={"BEMI_DSN": dsn}).stdout)
    assert status["wal_status"] == "lost"
    with psycopg.connect(dsn) as conn:  # still the invalidated slot: a gap stays visible
        assert conn.execute("SELECT count(*), min(wal_status) FROM pg_replication_slots").fetchone() == (1, "lost")


def test_status_shows_the_transaction_holding_the_slot_back(db):
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.install()
    with psycopg.connect(db.dsn) as holder:
        holder.execute("INSERT INTO t VALUES (1)")  # an xid, and the transaction stays open
        pid = holder.info.backend_pid
        status = json.loads(run_cli("status", "--json", env={"BEMI_DSN": db.dsn}).stdout)
        holder.rollback()
    assert status["oldest_open_transaction"]["pid"] == pid
    assert status["oldest_open_transaction"]["state"] == "idle in transaction"
    assert isinstance(status["lag_bytes"], int) and status["wal_status"] in ("reserved", "extended")


def test_ddl_while_polling(db):
    db.execute("CREATE TABLE t (id int PRIMARY KEY, a int, b text)")
    db.install()
    expected = []

    def write(statement: str) -> None:
        rows = db.execute(statement + " RETURNING id, to_jsonb(t)::text")
        op = statement.split()[0].upper()
        expected.extend((str(i), {"INSERT": "CREATE"}.get(op, op), after if op != "DELETE" else "{}") for i, after in rows)

    write("INSERT INTO t VALUES (1, 1, 'one')")
    db.execute("ALTER TABLE t ADD COLUMN c numeric DEFAULT 1.5")
    write("INSERT INTO t VALUES (2, 2, 'two', 2.25)")
    db.poll()
    db.execute("ALTER TABLE t DROP COLUMN a")
    write("UPDATE t SET b = 'uno' WHERE id = 1")
    db.execute("ALTER TABLE t RENAME COLUMN b TO label")
    write("INSERT INTO t VALUES (3, 'three', 3)")
    db.execute("ALTER TABLE t ALTER COLUMN label TYPE varchar(10), ALTER COLUMN c TYPE text USING c::text")
    write("UPDATE t SET c = 'text now' WHERE id = 2")
    db.poll()
    db.execute("CREATE TABLE t2 (id int PRIMARY KEY, t_id int)")
    db.execute("INSERT INTO t2 VALUES (1, 1)")
    write("DELETE FROM t WHERE id = 3")
    db.execute("DROP TABLE t2")
    db.poll()
    rows = db.execute("SELECT \"table\", primary_key, operation, after::text FROM changes ORDER BY commit_position, seq")
    assert [r[1:] for r in rows if r[0] == "t"] == expected
    assert [r[:3] for r in rows if r[0] == "t2"] == [("t2", "1", "CREATE")]


def test_one_500k_row_transaction_with_bounded_memory(db):
    db.execute("CREATE TABLE big (id int PRIMARY KEY, label text, amount numeric)")
    db.install()
    db.execute("INSERT INTO big SELECT g, md5(g::text), g / 7.0 FROM generate_series(1, 500000) g")
    # The poller reports its own peak RSS when it exits: VmHWM, its memory's high-water mark
    # (ru_maxrss would count the pytest process it was forked from).
    program = ("import re, sys\nfrom bemi_pg.cli import main\nrc = main(['poll', '--once'])\n"
               "print('peak_kb', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\nsys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", program], env=poller_env(db.dsn), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.split()[-1]) / 1024
    print(f"\nfigures: 500000 changes, poller peak RSS {peak_mb:.0f} MB")
    assert db.execute("SELECT count(*), count(DISTINCT seq) FROM changes") == [(500000, 500000)]
    assert peak_mb < 200


def test_a_least_privilege_poller_role(db):
    db.execute("CREATE TABLE t (id int PRIMARY KEY, x float8)")
    db.install()
    db.execute("DROP ROLE IF EXISTS bemi_poller")
    db.execute(render_roles(db.settings))
    poller = db.dsn.replace("user=postgres", "user=bemi_poller")
    try:
        assert db.execute("SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = 'bemi_poller'") == [(False, True)]
        db.execute("INSERT INTO t VALUES (1, 'NaN'), (2, NULL)")  # NaN: the poller must also patch it
        result = run_cli("poll", "--once", env={"BEMI_DSN": poller})
        assert result.returncode == 0, result.stderr
        assert [c["after"] for c in db.changes()] == [{"id": 1, "x": "NaN"}, {"id": 2, "x": None}]
        assert run_cli("status", env={"BEMI_DSN": poller}).returncode == 0
        verified = run_cli("verify", env={"BEMI_DSN": poller})
        assert verified.returncode == 0 and "intact: 2 changes in 1 seal" in verified.stdout, verified
        with psycopg.connect(poller, autocommit=True) as conn:  # it writes the trail, and may not rewrite it
            for statement in ("UPDATE changes SET after = '{}'", "DELETE FROM changes", "TRUNCATE changes",
                              "DELETE FROM bemi.seal"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
    finally:
        db.execute("DROP OWNED BY bemi_poller; DROP ROLE bemi_poller")
    # The functions running with raised privileges pin their search_path (the event trigger's, the
    # mover's, the sealing's), all but trigger mode's capture triggers, which name every type,
    # function, operator and table with its schema instead (a SET clause cost each call 5-20%).
    # The sealing also pins its client_encoding: it hashes the text of the changes.
    definers = db.execute("SELECT proname, proconfig FROM pg_proc WHERE prosecdef AND pronamespace = 'bemi'::regnamespace "
                          "ORDER BY 1")
    pinned = ["search_path=pg_catalog, pg_temp"]
    assert definers == [("capture_changes", None), ("capture_rows", None), ("move_changes", pinned), ("move_queued", pinned),
                        ("queue_backlog", pinned), ("queue_holds", pinned), ("seal", [*pinned, "client_encoding=UTF8"]),
                        ("seal_batch", [*pinned, "client_encoding=UTF8"]),
                        ("track_new_tables", pinned)]
