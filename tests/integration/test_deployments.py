"""The trail on real deployments: settings that live where the cron job does not look, several
servers writing into one destination, partitions, tables moving in and out of tracking."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
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

