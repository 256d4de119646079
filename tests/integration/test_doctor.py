"""doctor and the preflight: one line per check, each FAIL with its fix."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import conninfo

from bemi_pg import commands
from bemi_pg._localpg import throwaway_cluster
from bemi_pg.config import load_settings
from bemi_pg.errors import ConfigError, PreflightError

from ..conftest import run_cli


def test_a_missing_plugin_names_the_package(db):
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        if conn.execute("SELECT count(*) FROM pg_settings WHERE name = 'output_plugin_libraries'").fetchone()[0]:
            conn.execute("SET output_plugin_libraries = 'no_such_plugin'")  # so that the file is looked for
        check = commands._plugin_check(conn, "no_such_plugin", "unused", False)
    assert check.status == "FAIL" and "not installed" in check.detail and "apt-get install" in check.fix


def test_debian_output_plugin_libraries_is_explained(db):
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        if conn.execute("SELECT count(*) FROM pg_settings WHERE name = 'output_plugin_libraries'").fetchone()[0] == 0:
            pytest.skip("this server build has no output_plugin_libraries (Debian's 15.20, 17 and 18 do)")
        conn.execute("CREATE ROLE bemi_rep LOGIN REPLICATION")
        conn.execute(f'GRANT CREATE ON DATABASE "{db.name}" TO bemi_rep')
        # As a role setting, it overrides the test server's command line, for this role only.
        conn.execute("ALTER ROLE bemi_rep SET output_plugin_libraries = 'pgoutput'")
    try:
        result = run_cli("doctor", env={"BEMI_DSN": conninfo.make_conninfo(db.dsn, user="bemi_rep")})
        assert result.returncode == 1
        line = next(x for x in result.stdout.splitlines() if x.startswith("FAIL wal2json"))
        assert "output_plugin_libraries = 'pgoutput', 'test_decoding', 'wal2json'; SELECT pg_reload_conf()" in line
    finally:
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute(f'REVOKE CREATE ON DATABASE "{db.name}" FROM bemi_rep')
            conn.execute("DROP ROLE bemi_rep")


def _wal2json_line(dsn: str) -> str:
    result = run_cli("doctor", env={"BEMI_DSN": dsn})
    return next(x for x in result.stdout.splitlines() if x.split(":")[0].endswith(" wal2json"))


def test_the_printed_output_plugin_libraries_fix_makes_wal2json_loadable():
    """On a server that has Debian's setting (15.20, 17, 18: `make test PG=17`) left as shipped,
    doctor's fix, run as printed, makes wal2json loadable; the old single-string value does not."""
    with throwaway_cluster("app", list_output_plugins=False) as cluster:
        dsn = cluster.dsn("app")
        with psycopg.connect(dsn, autocommit=True) as conn:
            if conn.execute("SELECT count(*) FROM pg_settings WHERE name = 'output_plugin_libraries'").fetchone()[0] == 0:
                pytest.skip("this server build has no output_plugin_libraries (Debian's 15.20, 17 and 18 do)")
            # The value the README used to give: one element, which refuses wal2json.
            conn.execute("ALTER SYSTEM SET output_plugin_libraries = 'pgoutput,test_decoding,wal2json'")
            conn.execute("SELECT pg_reload_conf()")
        line = _wal2json_line(dsn)
        assert line.startswith("FAIL wal2json: the server refuses it"), line
        fix = line.split("(fix: ", 1)[1].removesuffix(")")
        assert "'test_decoding', 'wal2json'; SELECT pg_reload_conf()" in fix
        with psycopg.connect(dsn, autocommit=True) as conn:
            for statement in fix.split("; "):
                conn.execute(statement)
        assert _wal2json_line(dsn) == "OK   wal2json: loadable as an output plugin"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot('w', 'wal2json')")
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
            conn.execute("INSERT INTO t VALUES (1)")
            rows = conn.execute("SELECT data FROM pg_logical_slot_get_changes('w', NULL, NULL, 'format-version', '2')").fetchall()
        assert any('"action":"I"' in data for (data,) in rows)


@pytest.fixture(scope="module")
def replica_level_server():
    with throwaway_cluster(settings=("wal_level=replica", "max_wal_senders=10")) as cluster:
        yield cluster.dsn()


def test_wal_level_not_logical_fails_with_the_fix(replica_level_server):
    result = run_cli("doctor", env={"BEMI_DSN": replica_level_server})
    assert result.returncode == 1
    assert "FAIL wal_level: replica (fix: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL)" in result.stdout
    install = run_cli("install", env={"BEMI_DSN": replica_level_server})
    assert install.returncode == 1
    assert install.stderr.startswith("error: FAIL wal_level: replica") and len(install.stderr.splitlines()) == 1
    with pytest.raises(PreflightError):
        commands.install(replica_level_server, None, load_settings(None))
    with psycopg.connect(replica_level_server) as conn:
        assert conn.execute("SELECT to_regnamespace('bemi')").fetchone() == (None,)


def test_no_free_slot_fails_with_the_fix():
    with throwaway_cluster(settings=("max_replication_slots=1",)) as cluster:
        dsn = cluster.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot('someone_else', 'test_decoding')")
        result = run_cli("doctor", env={"BEMI_DSN": dsn})
        assert result.returncode == 1
        assert "FAIL replication slots: 0 of 1 free (fix: raise max_replication_slots" in result.stdout
        install = run_cli("install", env={"BEMI_DSN": dsn})
        assert install.returncode == 1 and install.stderr.startswith("error: FAIL replication slots")


def test_without_logical_decoding_auto_installs_trigger_mode(replica_level_server, tmp_path):
    config = tmp_path / "bemi.toml"
    config.write_text('[capture]\nmode = "auto"\n')
    with psycopg.connect(replica_level_server, autocommit=True) as conn:
        conn.execute("CREATE DATABASE auto_mode")
    dsn = conninfo.make_conninfo(replica_level_server, dbname="auto_mode")
    env = {"BEMI_DSN": dsn, "BEMI_CONFIG": str(config)}
    doctor = run_cli("doctor", env=env)
    assert doctor.returncode == 0, doctor.stdout
    assert "WARN wal_level: replica; auto will choose trigger mode" in doctor.stdout
    install = run_cli("install", env=env)
    assert install.returncode == 0, install.stderr
    assert ("capture mode triggers (capture.mode auto, and logical decoding is not available (wal_level: replica))"
            in install.stderr)
    assert "no poller needed" in install.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1) /*Bemi {\"job\": \"import\"} Bemi*/")
        assert conn.execute("SELECT operation, context FROM changes").fetchall() == [("CREATE", {"job": "import"})]
    poll = run_cli("poll", "--once", env=env)
    assert poll.returncode == 1 and "nothing to poll" in poll.stderr


def test_the_server_line_names_the_supported_versions(db):
    with psycopg.connect(db.dsn) as conn:
        version = conn.info.server_version
    result = run_cli("doctor", env={"BEMI_DSN": db.dsn})
    line = next(x for x in result.stdout.splitlines() if x.split(":")[0].endswith(" server"))
    assert line == f"OK   server: PostgreSQL {version // 10000}.{version % 10000}"
    assert commands._server_check(160004).line() == (
        "WARN server: PostgreSQL 16.4 should work but is not tested (tested: 15, 17 and 18) "
        "(fix: to run what is tested, use PostgreSQL 15, 17 or 18)")
    assert commands._server_check(130012).line() == (
        "FAIL server: PostgreSQL 13.12 is not supported (bemi-pg needs 14 or later; tested: 15, 17 and 18) "
        "(fix: upgrade to PostgreSQL 18)")


def test_slot_failover_needs_17_and_a_standby_to_wait_for(db, tmp_path):
    """On 15, slot.failover = true is one clear line from doctor and install; on 17+, a primary
    whose decoding does not wait for a standby (synchronized_standby_slots) is refused."""
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    (tmp_path / "bemi.toml").write_text("[slot]\nfailover = true\n")
    env = {"BEMI_DSN": db.dsn, "BEMI_CONFIG": str(tmp_path / "bemi.toml")}
    doctor = run_cli("doctor", env=env)
    install = run_cli("install", env=env)
    assert doctor.returncode == 1 and install.returncode != 0
    assert install.stderr.startswith("error: ") and len(install.stderr.strip().splitlines()) == 1, install.stderr
    version = int(db.execute("SHOW server_version_num")[0][0])
    if version < 170000:
        assert f"FAIL failover slots: slot.failover = true needs PostgreSQL 17 or later; this server is {version // 10000}." \
            in doctor.stdout, doctor.stdout
        assert "slot.failover = true needs PostgreSQL 17 or later" in install.stderr
        with pytest.raises(ConfigError, match="slot.failover = true needs PostgreSQL 17 or later; this server is 15"):
            commands.install(db.dsn, None, load_settings(tmp_path / "bemi.toml"), preflight=False)
    else:
        assert "FAIL synchronized_standby_slots: is empty" in doctor.stdout, doctor.stdout
        assert "fix: ALTER SYSTEM SET synchronized_standby_slots = '<the standby's physical slot>'" in doctor.stdout
        assert "WARN synchronous_standby_names: commits do not wait for a standby" in doctor.stdout
        assert "WARN standby: none to check" in doctor.stdout
        assert "synchronized_standby_slots" in install.stderr
    assert db.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()") == [(0,)]
