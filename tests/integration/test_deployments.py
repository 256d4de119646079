"""The trail on real deployments: settings that live where the cron job does not look, several
servers writing into one destination, partitions, tables moving in and out of tracking."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from bemi_pg import commands
from bemi_pg._localpg import throwaway_cluster
from bemi_pg.config import load_settings
from bemi_pg.errors import ConfigError

from ..conftest import run_cli

NON_DEFAULT_TOML = """
[source]
schemas = ["public", "app"]
[columns]
exclude = ["*.password_hash"]
"""


def _tables(db) -> None:
    db.execute("CREATE SCHEMA app; CREATE TABLE app.items (id int PRIMARY KEY, name text, password_hash text);"
               "CREATE TABLE public.users (id int PRIMARY KEY, password_hash text)")


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "bemi.toml").write_text(NON_DEFAULT_TOML)
    return project


def test_a_poller_without_the_settings_file_decodes_with_the_installed_settings(db, tmp_path):
    _tables(db)
    installed = run_cli("install", env={"DATABASE_URL": db.dsn}, cwd=_project(tmp_path))
    assert installed.returncode == 0, installed.stderr
    db.execute("INSERT INTO app.items VALUES (1, 'a', 'secret'); INSERT INTO users VALUES (1, 'secret')")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    polled = run_cli("poll", "--once", env={"DATABASE_URL": db.dsn}, cwd=elsewhere)
    assert polled.returncode == 0, polled.stderr
    rows = db.execute('SELECT "schema", "table", after FROM changes ORDER BY "schema"')
    assert rows == [("app", "items", {"id": 1, "name": "a"}), ("public", "users", {"id": 1})]
    status = run_cli("status", "--json", env={"DATABASE_URL": db.dsn}, cwd=elsewhere)
    assert status.returncode == 0, status.stderr
    assert '"change_count": 2' in status.stdout


def test_a_poller_whose_settings_contradict_the_installed_ones_stops_before_reading(db, tmp_path):
    _tables(db)
    assert run_cli("install", env={"DATABASE_URL": db.dsn}, cwd=_project(tmp_path)).returncode == 0
    db.execute("INSERT INTO app.items VALUES (1, 'a', 'secret')")
    slot = load_settings(None).slot_for(db.name)
    [(before,)] = db.execute("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    other = tmp_path / "other"
    other.mkdir()
    (other / "bemi.toml").write_text('[source]\nschemas = ["public"]\n[poll]\nbatch_size = 100\n')
    polled = run_cli("poll", "--once", env={"DATABASE_URL": db.dsn}, cwd=other)
    assert polled.returncode == 2
    lines = polled.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bemi.toml sets source.schemas = [\"public\"]"), polled.stderr
    assert "installed with" in lines[0]
    assert db.execute("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == [(before,)]
    assert db.execute("SELECT count(*) FROM changes") == [(0,)]
    # A file that only says how the poller runs is welcome.
    (other / "bemi.toml").write_text("[poll]\nbatch_size = 100\n")
    assert run_cli("poll", "--once", env={"DATABASE_URL": db.dsn}, cwd=other).returncode == 0
    assert db.execute("SELECT count(*) FROM changes") == [(1,)]
    with pytest.raises(ConfigError, match="source.schemas"):
        commands.poll_once(db.dsn, None, load_settings(None, schemas=("public",)))


def _cron_command() -> str:
    """The README's cron line, without its schedule."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"```cron\n(.*?)\n```", readme, re.S)
    assert block, "the README has a cron example"
    return block.group(1).strip().split(None, 5)[5]


def test_the_readme_cron_line_runs_as_cron_would(db, tmp_path):
    """Cron runs the line in the user's home with a bare environment: no bemi.toml, no venv on PATH."""
    _tables(db)
    assert run_cli("install", env={"DATABASE_URL": db.dsn}, cwd=_project(tmp_path)).returncode == 0
    db.execute("INSERT INTO app.items VALUES (1, 'a', 'secret')")
    line = _cron_command()
    assert "postgresql://bemi@db/shop" in line and "/opt/bemi/bin/bemi-pg" in line and "/var/log/bemi-pg.log" in line
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "bemi-pg.log"
    bemi_pg = Path(sys.executable).parent / "bemi-pg"
    line = (line.replace("postgresql://bemi@db/shop", shlex.quote(db.dsn)).replace("/opt/bemi/bin/bemi-pg", str(bemi_pg))
            .replace("/var/log/bemi-pg.log", str(log)))
    env = {"HOME": str(home), "LOGNAME": "root", "PATH": "/usr/bin:/bin", "SHELL": "/bin/sh"}
    done = subprocess.run(["/bin/sh", "-c", line], cwd=home, env=env, timeout=120)
    assert done.returncode == 0, log.read_text()
    assert "wrote 1 change" in log.read_text()
    assert db.execute('SELECT "schema", after FROM changes') == [("app", {"id": 1, "name": "a"})]


def test_two_servers_with_databases_of_one_name_share_a_destination(other_db):
    """Each change is filed under its own source (server and database), none is skipped."""
    settings = load_settings(None)
    with throwaway_cluster("app", prefix="bemi-pg-a-") as a, throwaway_cluster("app", prefix="bemi-pg-b-") as b:
        sources = []
        for cluster, name in ((a, "on a"), (b, "on b")):
            dsn = cluster.dsn("app")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE todo (id int PRIMARY KEY, task text)")
            commands.install(dsn, other_db.dsn, settings)
            with psycopg.connect(dsn, autocommit=True) as conn:
                for n in range(1, 4):
                    conn.execute("INSERT INTO todo VALUES (%s, %s)", (n, name))
                [(source,)] = conn.execute("SELECT bemi.source_identity()").fetchall()
            sources.append(source)
        assert sources[0] != sources[1] and all(s.endswith("/app") for s in sources)
        for cluster in (a, b):
            assert commands.poll_once(cluster.dsn("app"), other_db.dsn, settings).changes == 3
        rows = other_db.execute('SELECT source, "database", after ->> \'task\', count(*) FROM changes GROUP BY 1, 2, 3 ORDER BY 3')
        assert rows == [(sources[0], "app", "on a", 3), (sources[1], "app", "on b", 3)]
        assert other_db.execute("SELECT count(DISTINCT id) FROM changes") == [(6,)]
        assert sorted(r[0] for r in other_db.execute("SELECT source FROM bemi.checkpoint")) == sorted(sources)
        for cluster in (a, b):  # nothing more, nothing twice
            assert commands.poll_once(cluster.dsn("app"), other_db.dsn, settings).changes == 0
        status = commands.status(b.dsn("app"), other_db.dsn, settings)
        assert status["source"] == sources[1] and status["change_count"] == 3


def test_an_installation_from_before_sources_upgrades_and_files_its_rows(db):
    """Rows and checkpoints written by 0.3.0 (keyed by database name) are adopted by the source
    that installs 0.4.0; a poller refuses to run until then."""
    db.execute("CREATE TABLE todo (id int PRIMARY KEY)")
    db.install()
    db.execute("INSERT INTO todo VALUES (1)")
    assert db.poll().changes == 1
    # The catalog and rows of 0.3.0.
    db.execute("""
        ALTER TABLE changes ALTER COLUMN source DROP NOT NULL, DROP CONSTRAINT changes_source_commit_position_seq_key,
          ADD CONSTRAINT changes_database_commit_position_seq_key UNIQUE ("database", commit_position, seq);
        UPDATE changes SET source = NULL; UPDATE bemi.checkpoint SET source = NULL; UPDATE bemi.installation SET source = NULL;
        DROP INDEX bemi.checkpoint_source_slot_name_key;
        ALTER TABLE bemi.checkpoint ADD PRIMARY KEY ("database", slot_name);
        DROP TABLE bemi.seal; DROP TRIGGER bemi_append_only ON changes; DROP TRIGGER bemi_append_only_truncate ON changes;
    """)
    db.execute("INSERT INTO todo VALUES (2)")
    with pytest.raises(Exception, match="run `bemi-pg install` to upgrade it first"):
        db.poll()
    db.install()
    assert db.poll().changes == 1
    assert db.execute("SELECT source, count(*) FROM changes GROUP BY 1") == [(db.source, 2)]
    assert db.execute("SELECT attnotnull FROM pg_attribute WHERE attrelid = 'changes'::regclass AND attname = 'source'") == [(True,)]
    assert db.execute("SELECT conname FROM pg_constraint WHERE conrelid = 'changes'::regclass AND contype = 'u'") == [
        ("changes_source_commit_position_seq_key",)]
    verdict = commands.verify(db.dsn, None, db.settings)  # the upgrade sealed the change 0.3.0 wrote
    assert verdict.intact and verdict.changes == 2 and verdict.seals == 2, verdict.lines()



MODES = ["wal", "triggers"]


def _settle(db, mode: str) -> None:
    """Wal mode's changes reach `changes` when the poller runs; trigger mode's are there already."""
    if mode == "wal":
        db.poll()


def _tracked(db) -> set[str]:
    """Every table bemi-pg watches, by what it installed on it: capture triggers, publication."""
    rows = db.execute("""
        SELECT c.oid::regclass::text FROM pg_class c
         WHERE EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname LIKE 'bemi\\_capture%')
            OR EXISTS (SELECT FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                        WHERE p.pubname = 'bemi' AND pr.prrelid = c.oid)""")
    return {r[0] for r in rows}


@pytest.mark.parametrize("mode", MODES)
def test_monthly_partitions_of_the_trail_are_never_tracked(db, mode):
    db.execute("CREATE TABLE todo (id int PRIMARY KEY, task text)")
    db.install(capture_mode=mode, partition_by_month=True)
    db.execute("INSERT INTO todo VALUES (1, 'a')")
    _settle(db, mode)
    db.execute("UPDATE todo SET task = 'b'")
    for _ in range(3):
        _settle(db, mode)
    rows = db.execute('SELECT "table", operation FROM changes ORDER BY committed_at, seq')
    assert rows == [("todo", "CREATE"), ("todo", "UPDATE")]
    assert db.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'changes'::regclass") != [(0,)]
    assert _tracked(db) == {"todo"}
    status = commands.status(db.dsn, None, db.settings)
    assert [t for t in status["tracked_tables"] if "changes" in t] == [], status["tracked_tables"]


@pytest.mark.parametrize("mode", MODES)
def test_a_partition_in_another_schema_is_recorded_under_its_partitioned_table(db, mode):
    db.execute("""
        CREATE SCHEMA parts;
        CREATE TABLE public.ev (id int, at date, what text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
        CREATE TABLE parts.ev_2024 PARTITION OF public.ev FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
    """)
    db.install(capture_mode=mode)
    db.execute("INSERT INTO ev VALUES (1, '2024-03-01', 'a')")
    db.execute("UPDATE ev SET what = 'b' WHERE id = 1")
    # A partition attached later, from another schema, is followed too.
    db.execute("CREATE TABLE parts.ev_2025 (LIKE public.ev INCLUDING ALL);"
               "ALTER TABLE public.ev ATTACH PARTITION parts.ev_2025 FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    db.execute("INSERT INTO ev VALUES (2, '2025-03-01', 'c')")
    db.execute("DELETE FROM ev WHERE id = 1")
    _settle(db, mode)
    rows = db.execute('SELECT "schema", "table", operation, after ->> \'what\', before ->> \'what\' '
                      'FROM changes ORDER BY committed_at, seq')
    assert rows == [("public", "ev", "CREATE", "a", None), ("public", "ev", "UPDATE", "b", "a"),
                    ("public", "ev", "CREATE", "c", None), ("public", "ev", "DELETE", None, "b")]
    status = commands.status(db.dsn, None, db.settings)
    assert "public.ev" in status["tracked_tables"]
    # Detached, a partition in an untracked schema is no longer watched.
    db.execute("ALTER TABLE public.ev DETACH PARTITION parts.ev_2025")
    assert "parts.ev_2025" not in _tracked(db)
    db.execute("INSERT INTO parts.ev_2025 VALUES (3, '2025-04-01', 'd')")
    _settle(db, mode)
    assert db.execute("SELECT count(*) FROM changes") == [(4,)]


@pytest.mark.parametrize("mode", MODES)
def test_tables_entering_and_leaving_tracking_are_followed(db, mode):
    db.execute("""
        CREATE SCHEMA staging;
        CREATE TABLE staging.imp (id int PRIMARY KEY, v text, note text);
        INSERT INTO staging.imp VALUES (1, 'a', 'kept');
        CREATE TABLE public.outgoing (id int PRIMARY KEY, v text);
        CREATE TABLE public.renamed (id int PRIMARY KEY, v text);
    """)
    db.install(capture_mode=mode, exclude_tables=("public.secret",))
    assert _tracked(db) == {"outgoing", "renamed"}
    # Moved in: tracked as a table created there (capture, full before, context).
    db.execute("ALTER TABLE staging.imp SET SCHEMA public")
    db.execute("UPDATE imp SET v = 'b' /*Bemi {\"who\": \"mover\"} Bemi*/")
    # Moved out and renamed to an excluded name: no longer tracked.
    db.execute("CREATE SCHEMA elsewhere; ALTER TABLE public.outgoing SET SCHEMA elsewhere")
    db.execute("ALTER TABLE public.renamed RENAME TO secret")
    db.execute("INSERT INTO elsewhere.outgoing VALUES (1, 'x'); INSERT INTO public.secret VALUES (1, 'x')")
    _settle(db, mode)
    rows = db.execute('SELECT "table", operation, before, context FROM changes ORDER BY committed_at, seq')
    assert rows == [("imp", "UPDATE", {"id": 1, "v": "a", "note": "kept"}, {"who": "mover"})]
    assert _tracked(db) == {"imp"}
    # And back: renamed to a tracked name, the table is tracked again.
    db.execute("ALTER TABLE public.secret RENAME TO open")
    db.execute("INSERT INTO public.open VALUES (2, 'y')")
    _settle(db, mode)
    assert db.execute('SELECT "table", after FROM changes WHERE operation = \'CREATE\'') == [("open", {"id": 2, "v": "y"})]
    # Replica identity is given back to a table that left (wal mode set it to FULL).
    assert db.execute("SELECT relreplident FROM pg_class WHERE oid = 'elsewhere.outgoing'::regclass") == [("d",)]


@pytest.mark.parametrize("mode", MODES)
def test_a_table_excluded_by_a_later_install_is_no_longer_recorded(db, mode):
    db.execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    db.install(capture_mode=mode)
    assert _tracked(db) == {"a", "b"}
    db.install(capture_mode=mode, exclude_tables=("public.b",))
    assert _tracked(db) == {"a"}
    db.execute("INSERT INTO a VALUES (1); INSERT INTO b VALUES (1)")
    _settle(db, mode)
    assert db.execute('SELECT "table" FROM changes') == [("a",)]
    assert commands.status(db.dsn, None, db.settings)["tracked_tables"] == ["public.a"]


def test_a_poller_that_forgot_the_destination_stops_before_reading(db, other_db, tmp_path):
    """Installed with a destination of its own, the trail must not start again in the source."""
    db.execute("CREATE TABLE todo (id int PRIMARY KEY)")
    db.install(other_db.dsn)
    db.execute("INSERT INTO todo VALUES (1)")
    slot = db.settings.slot_for(db.name)
    [(before,)] = db.execute("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    polled = run_cli("poll", "--once", env={"DATABASE_URL": db.dsn}, cwd=tmp_path)
    assert polled.returncode == 2
    lines = polled.stderr.strip().splitlines()
    assert len(lines) == 1 and f"database {other_db.name!r}" in lines[0] and "--destination-dsn" in lines[0], polled.stderr
    assert db.execute("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s", (slot,)) == [(before,)]
    assert db.execute("SELECT to_regclass('public.changes')") == [(None,)]
    status = run_cli("status", env={"DATABASE_URL": db.dsn}, cwd=tmp_path)
    assert status.returncode == 2 and "--destination-dsn" in status.stderr
    polled = run_cli("poll", "--once", env={"DATABASE_URL": db.dsn, "BEMI_DESTINATION_DSN": other_db.dsn}, cwd=tmp_path)
    assert polled.returncode == 0, polled.stderr
    assert other_db.execute("SELECT count(*) FROM changes") == [(1,)]


def test_two_sources_under_load_with_pollers_killed_share_one_destination(other_db):
    """Both servers' databases are called "app"; their pollers are killed at random while
    writers commit: every change of each source is in the destination once, under its source."""
    from ..faults import EXCLUDE, SCHEMA, Ledger, Writer, compare, kill_pollers

    settings = load_settings(None, exclude_tables=EXCLUDE)
    with throwaway_cluster("app", prefix="bemi-pg-a-") as a, throwaway_cluster("app", prefix="bemi-pg-b-") as b:
        clusters = [a, b]
        ledgers = [Ledger(), Ledger()]
        stop = threading.Event()
        for cluster in clusters:
            with psycopg.connect(cluster.dsn("app"), autocommit=True) as conn:
                conn.execute(SCHEMA)
            commands.install(cluster.dsn("app"), other_db.dsn, settings)
        writers = [Writer(c.dsn("app"), w, ledger, stop, seed=i) for i, (c, ledger) in enumerate(zip(clusters, ledgers, strict=True))
                   for w in range(2)]
        figures: list[dict[str, int]] = [{}, {}]

        def killer(i: int) -> None:
            figures[i] = kill_pollers(clusters[i].dsn("app"), 12, seed=i, fault_every=4, destination=other_db.dsn)

        killers = [threading.Thread(target=killer, args=(i,)) for i in range(2)]
        for thread in (*writers, *killers):
            thread.start()
        for thread in killers:
            thread.join()
        stop.set()
        for writer in writers:
            writer.join()
        results = []
        for cluster, ledger in zip(clusters, ledgers, strict=True):
            assert commands.poll_once(cluster.dsn("app"), other_db.dsn, settings) is not None
            with psycopg.connect(cluster.dsn("app")) as conn:
                [(source,)] = conn.execute("SELECT bemi.source_identity()").fetchall()
            results.append(compare(cluster.dsn("app"), other_db.dsn, ledger, source=source))
        print("\nfigures:", figures, results)
        for result in results:
            assert result["expected"] > 100
            assert {k: result[k] for k in ("lost", "duplicated", "misattributed", "phantom")} == {
                "lost": 0, "duplicated": 0, "misattributed": 0, "phantom": 0}
        assert other_db.execute("SELECT count(*) FROM changes") == [(sum(r["found"] for r in results),)]
        # One source leaves with its trail; the other's stays whole and its poller keeps going.
        [(source_a,)] = other_db.execute("SELECT DISTINCT source FROM changes WHERE source LIKE %s AND source <> %s",
                                         ("%/app", source))
        commands.uninstall(a.dsn("app"), other_db.dsn, settings, drop_changes=True)
        assert other_db.execute("SELECT source, count(*) FROM changes GROUP BY 1") == [(source, results[1]["found"])]
        with psycopg.connect(b.dsn("app"), autocommit=True) as conn:
            conn.execute("INSERT INTO item (w, n, k) VALUES (99, 1, 1)")
        assert commands.poll_once(b.dsn("app"), other_db.dsn, settings).changes == 1
        assert other_db.execute("SELECT count(*) FROM changes WHERE source = %s", (source,)) == [(results[1]["found"] + 1,)]
        assert other_db.execute("SELECT count(*) FROM changes WHERE source = %s", (source_a,)) == [(0,)]
        assert other_db.execute("SELECT source FROM bemi.checkpoint") == [(source,)]


def test_an_idle_follower_writes_nothing_and_logs_nothing(db):
    """Its own checkpoint write comes back through the slot as an empty transaction: that must
    not be written again, or an idle poller writes and logs for ever."""
    db.execute("CREATE TABLE todo (id int PRIMARY KEY)")
    db.install()
    db.execute("INSERT INTO todo VALUES (1)")
    from ..faults import poller_env

    poller = subprocess.Popen([sys.executable, "-m", "bemi_pg", "poll", "--follow", "--interval", "0.05"],
                              env=poller_env(db.dsn), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while db.execute("SELECT count(*) FROM changes") != [(1,)] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        [(xmin,)] = db.execute("SELECT xmin::text FROM bemi.checkpoint")
        time.sleep(3)
        assert db.execute("SELECT xmin::text FROM bemi.checkpoint") == [(xmin,)]
    finally:
        poller.send_signal(signal.SIGTERM)
        _, err = poller.communicate(timeout=60)
    assert poller.returncode == 0, err
    assert sum(line.startswith("bemi-pg: wrote") for line in err.splitlines()) == 1, err
