"""Failover slots (PostgreSQL 17+): a primary and a streaming standby started here, writers under
load with contexts, the primary killed (``-m immediate``), the standby promoted, and the poller,
on a multi-host DSN, carrying on from the slot the standby synchronized. The destination lives on
the session's cluster, which survives the failover. The fault suite's ledger must show nothing
lost, duplicated or misattributed, and (with synchronous_standby_names set) every commit a
writer saw confirmed on the promoted standby."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bemi_pg._localpg import LocalCluster, PgInstall, standby_of, throwaway_cluster

from ..conftest import run_cli
from ..faults import SCHEMA, Ledger, compare, poller_env, scaled, stop_workload
from .test_faults import CLEAN, _figures, _wait_for_the_poller, _writers


def _major() -> int | None:
    try:
        return PgInstall.from_env().major
    except FileNotFoundError:
        return None


MAJOR = _major()
pytestmark = pytest.mark.skipif(MAJOR is None or MAJOR < 17, reason=(
    f"failover slots need PostgreSQL 17 or later; this run's server binaries are {MAJOR or 'missing'} "
    "(run with BEMI_PG_MAJOR=17 BEMI_PG_ROOT=/var/lib/bemi-pg/roots/pg17, or 18)"))

PHYSICAL_SLOT = "bemi_standby"


@pytest.fixture
def pair() -> Iterator[tuple[LocalCluster, LocalCluster]]:
    """A primary with database ``app`` and its streaming standby, set up for failover slots:
    decoding waits for the standby's physical slot, and commits for the standby to have them."""
    with throwaway_cluster("app", prefix="bemi-pg-failover-") as primary:
        standby = standby_of(primary, primary.datadir.parent / "standby", PHYSICAL_SLOT)
        try:
            with psycopg.connect(primary.dsn(), autocommit=True) as conn:
                conn.execute(f"ALTER SYSTEM SET synchronized_standby_slots = '{PHYSICAL_SLOT}'")
                conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                conn.execute("SELECT pg_reload_conf()")
            yield primary, standby
        finally:
            standby.destroy()


def _multi_host(*clusters: LocalCluster, extra: str = "") -> str:
    hosts = ",".join("127.0.0.1" for _ in clusters)
    ports = ",".join(str(c.port) for c in clusters)
    return f"host={hosts} port={ports} user=postgres dbname=app{extra}"


def _wait_until_synchronized(primary: LocalCluster, standby: LocalCluster, slot: str, timeout: float = 120) -> str:
    """Until the standby holds ``slot`` synchronized (not temporary) at or past where the primary's
    slot was when called: a failover before that would find no slot, or an older one."""
    with psycopg.connect(primary.dsn("app"), autocommit=True) as conn:
        [(wanted,)] = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                                   (slot,)).fetchall()
    deadline = time.monotonic() + timeout
    with psycopg.connect(standby.dsn("app"), autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s AND synced "
                "AND NOT temporary AND invalidation_reason IS NULL AND confirmed_flush_lsn >= %s::pg_lsn",
                (slot, wanted)).fetchone()
            if row is not None:
                return str(row[0])
            time.sleep(0.2)
    raise AssertionError(f"the standby did not synchronize slot {slot} up to {wanted} in {timeout:.0f} s")


def test_the_trail_survives_a_failover(pair, other_db):
    primary, standby = pair
    with psycopg.connect(primary.dsn("app"), autocommit=True) as conn:
        conn.execute(SCHEMA)
    config = Path(tempfile.mkdtemp(prefix="bemi-pg-conf-")) / "bemi.toml"
    config.write_text('[source]\nexclude_tables = ["public.ledger_tx"]\n[slot]\nfailover = true\n')
    # The standby first: libpq passes over it while it is one (bemi-pg asks for read-write of a
    # multi-host DSN), and finds it once promoted.
    dsn = _multi_host(standby, primary)
    env = {"BEMI_DSN": dsn, "BEMI_DESTINATION_DSN": other_db.dsn, "BEMI_CONFIG": str(config)}
    installed = run_cli("install", env=env)
    assert installed.returncode == 0, installed.stderr
    with psycopg.connect(primary.dsn("app")) as conn:
        assert conn.execute("SELECT failover FROM pg_replication_slots WHERE slot_name = 'bemi_app'").fetchone() == (True,)
    doctor = run_cli("doctor", env=env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    where = f"standby 127.0.0.1:{standby.port}"
    for name in ("wal_level", "sync_replication_slots", "hot_standby_feedback", "primary_slot_name", "primary_conninfo"):
        assert f"OK   {where} {name}:" in doctor.stdout, doctor.stdout
    assert "OK   synchronized_standby_slots: bemi_standby" in doctor.stdout
    assert "OK   synchronous_standby_names:" in doctor.stdout

    ledger, stop = Ledger(), threading.Event()
    writers = _writers(_multi_host(standby, primary, extra=" target_session_attrs=read-write"), 3, ledger, stop,
                       copy_rows=scaled(5_000))
    poller = subprocess.Popen([sys.executable, "-m", "bemi_pg", "poll", "--follow", "--interval", "0.05"],
                              env=poller_env(dsn, config=str(config), BEMI_DESTINATION_DSN=other_db.dsn),
                              stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_the_poller(other_db.dsn)
        time.sleep(2.0)
        synced_at = _wait_until_synchronized(primary, standby, "bemi_app")
        time.sleep(1.0)  # writes go on, some decoded after the standby's copy of the slot was taken
        primary.stop("immediate")
        with psycopg.connect(standby.dsn("app"), autocommit=True) as conn:
            assert conn.execute("SELECT pg_promote(true, 60)").fetchone() == (True,)
        time.sleep(4.0)  # the writers and the poller go on against the promoted standby
    finally:
        err = stop_workload(stop, writers, poller, settle=2.0)
    assert poller.returncode == 0, err
    assert "the source database is unreachable" in err and "reconnected" in err, err
    drained = run_cli("poll", "--once", env=env)
    assert drained.returncode == 0, drained.stderr
    status = json.loads(run_cli("status", "--json", env=env).stdout)  # on the promoted standby, through the DSN
    assert status["slot_exists"] and status["slot_failover"] is True and status["lag_bytes"] < 1024 * 1024, status
    result = compare(standby.dsn("app"), other_db.dsn, ledger)
    print("\nsynchronized at", synced_at, json.dumps({"confirmed": len(ledger.confirmed)}))
    assert result["expected"] > scaled(5_000)
    assert sum(w.errors for w in writers) > 0  # the writers did meet the failover
    assert _figures(result) == CLEAN
    assert result["unconfirmed"] == 0  # every commit a writer saw returned is on the promoted standby


def test_install_enables_failover_on_an_existing_slot_and_doctor_checks_the_standby(pair):
    primary, standby = pair
    env = {"BEMI_DSN": primary.dsn("app")}
    assert run_cli("install", env=env).returncode == 0
    with psycopg.connect(primary.dsn("app")) as conn:
        assert conn.execute("SELECT failover FROM pg_replication_slots WHERE slot_name = 'bemi_app'").fetchone() == (False,)
    config = Path(tempfile.mkdtemp(prefix="bemi-pg-conf-")) / "bemi.toml"
    config.write_text("[slot]\nfailover = true\n")
    again = run_cli("install", env={**env, "BEMI_CONFIG": str(config)})
    assert again.returncode == 0, again.stderr
    with psycopg.connect(primary.dsn("app")) as conn:
        assert conn.execute("SELECT failover FROM pg_replication_slots WHERE slot_name = 'bemi_app'").fetchone() == (True,)
    with psycopg.connect(standby.dsn(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET hot_standby_feedback = off")
        conn.execute(f"ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={primary.port} user=postgres'")
        conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)
    doctor = run_cli("doctor", "--standby-dsn", standby.dsn("app"), env={**env, "BEMI_CONFIG": str(config)})
    assert doctor.returncode == 1, doctor.stdout
    where = f"standby 127.0.0.1:{standby.port}"
    lines = doctor.stdout.splitlines()
    assert f"FAIL {where} hot_standby_feedback: off (fix: ALTER SYSTEM SET hot_standby_feedback = on on the standby; " \
        "SELECT pg_reload_conf())" in lines, doctor.stdout
    assert f"FAIL {where} primary_conninfo: names no dbname, so slot synchronization cannot connect (fix: add " \
        "dbname=postgres to primary_conninfo on the standby; SELECT pg_reload_conf())" in lines, doctor.stdout
    assert f"OK   {where} sync_replication_slots: on" in lines and "OK   failover slots: slot bemi_app has failover enabled" in lines
