"""The PGXS extension (extension/): generated from the templates, installed with make, tested
with pg_regress, upgraded with ALTER EXTENSION, and the same catalog as `bemi-pg install`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from bemi_pg import __version__, commands
from bemi_pg._localpg import PgInstall
from bemi_pg.config import load_settings
from bemi_pg.errors import BemiError

from ..conftest import run_cli

EXTENSION_DIR = Path(__file__).resolve().parents[2] / "extension"

USER_TABLES = """
CREATE TABLE todo (id serial PRIMARY KEY, task text NOT NULL, done boolean NOT NULL DEFAULT false);
CREATE TABLE line (order_id int, sku text, PRIMARY KEY (sku, order_id));
CREATE TABLE note (body text);
"""

# Everything bemi-pg puts in a database, each object with its full definition.
CATALOG = """
WITH bemi_tables AS (
  SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE c.relkind IN ('r', 'p') AND (n.nspname = 'bemi' OR c.oid = 'public.changes'::regclass))
SELECT 'function', p.oid::regprocedure::text, pg_get_functiondef(p.oid) || coalesce(p.proacl::text, '')
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'bemi' OR p.proname = 'bemi_set_context'
UNION ALL
SELECT 'column', a.attrelid::regclass::text || '.' || a.attname,
       format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
       || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '')
  FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE a.attrelid IN (SELECT oid FROM bemi_tables) AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'index', i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
  FROM pg_index i WHERE i.indrelid IN (SELECT oid FROM bemi_tables)
UNION ALL
SELECT 'constraint', c.conrelid::regclass::text || '.' || c.conname, pg_get_constraintdef(c.oid)
  FROM pg_constraint c WHERE c.conrelid IN (SELECT oid FROM bemi_tables)
UNION ALL
SELECT 'trigger', t.tgrelid::regclass::text || '.' || t.tgname, pg_get_triggerdef(t.oid)
  FROM pg_trigger t WHERE NOT t.tgisinternal
UNION ALL
SELECT 'event trigger', e.evtname, e.evtevent || ' ' || e.evttags::text || ' ' || e.evtfoid::regproc::text
  FROM pg_event_trigger e
UNION ALL
SELECT 'publication', p.pubname, coalesce((SELECT string_agg(t.schemaname || '.' || t.tablename, ', ' ORDER BY 1)
                                             FROM pg_publication_tables t WHERE t.pubname = p.pubname), '')
  FROM pg_publication p
UNION ALL
SELECT 'replica identity', c.oid::regclass::text, c.relreplident::text
  FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'
UNION ALL
SELECT 'settings', i.version, i.settings::text FROM bemi.installation i
ORDER BY 1, 2
"""


def catalog(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(CATALOG).fetchall()


@pytest.fixture(scope="module")
def pg() -> PgInstall:
    try:
        return PgInstall.from_env()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def extension_dir(pg: PgInstall) -> Iterator[Path]:
    """extension/, or a copy of it in the Debian root whose make and pg_regress build it."""
    if pg.root is None:
        yield EXTENSION_DIR
        return
    copy = Path(tempfile.mkdtemp(prefix="bemi-pg-extension-", dir=pg.scratch_dir()))
    shutil.copytree(EXTENSION_DIR, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("results", "regression.*"))
    try:
        yield copy
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def _make(pg: PgInstall, directory: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """make in ``directory`` with the pg_config of the server binaries under test."""
    cmd = pg.argv("/usr/bin/make", "-C", pg.inner_path(directory), f"PG_CONFIG={pg.bindir / 'pg_config'}", *args)
    return subprocess.run(cmd, text=True, capture_output=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def installed_extension(server_dsn: str, pg: PgInstall, extension_dir: Path) -> None:
    """`make -C extension install` into the share directory of the server under test."""
    pg_config = pg.host_path(pg.bindir / "pg_config")
    if shutil.which("make", path=str(pg.host_path("/usr/bin"))) is None or not pg_config.exists():
        pytest.skip(f"make or {pg_config} missing")
    sharedir = subprocess.run(pg.argv("pg_config", "--sharedir"), text=True, capture_output=True, check=True).stdout.strip()
    with psycopg.connect(server_dsn) as conn:
        server_share = conn.execute("SELECT setting FROM pg_config WHERE name = 'SHAREDIR'").fetchone()[0]
    if os.path.realpath(pg.host_path(server_share)) != os.path.realpath(pg.host_path(sharedir)):
        pytest.skip(f"the server under test reads extensions from {server_share}, pg_config installs into {sharedir}")
    if not os.access(pg.host_path(sharedir) / "extension", os.W_OK):
        pytest.skip(f"{sharedir}/extension is not writable: run as root (CI does)")
    result = _make(pg, extension_dir, "install")
    assert result.returncode == 0, result.stderr


def test_the_generated_scripts_are_current(tmp_path):
    result = run_cli("render", "--extension", str(EXTENSION_DIR), "--check")
    assert result.returncode == 0, result.stderr
    # And the check does fail on a stale copy.
    for name in os.listdir(EXTENSION_DIR):
        if name.endswith((".sql", ".control")):
            shutil.copy(EXTENSION_DIR / name, tmp_path / name)
    script = tmp_path / f"bemi_pg--{__version__}.sql"
    script.write_text(script.read_text().replace("bemi.capture_changes", "bemi.capture_changez", 1))
    result = run_cli("render", "--extension", str(tmp_path), "--check")
    assert result.returncode == 1
    assert f"stale: {script}" in result.stderr
    assert "make -C extension generate" in result.stderr


def test_pg_regress_installcheck(installed_extension, server_dsn, pg, extension_dir):
    params = conninfo.conninfo_to_dict(server_dsn)
    env = {"PGHOST": params.get("host", ""), "PGPORT": str(params.get("port", "")), "PGUSER": params.get("user", "")}
    result = _make(pg, extension_dir, "installcheck", env=env)
    if extension_dir != EXTENSION_DIR:  # extension/results/ is where a changed expectation is taken from
        shutil.copytree(extension_dir / "results", EXTENSION_DIR / "results", dirs_exist_ok=True)
    diffs = extension_dir / "regression.diffs"
    assert result.returncode == 0, result.stdout + result.stderr + (diffs.read_text() if diffs.exists() else "")
    assert "All 2 tests passed" in result.stdout


def test_create_extension_makes_the_catalog_bemi_pg_install_makes(installed_extension, db, other_db):
    for target in (db, other_db):
        target.execute(USER_TABLES)
    commands.install(db.dsn, None, load_settings(None, capture_mode="triggers"))
    other_db.execute("CREATE EXTENSION bemi_pg")
    installed, extension = catalog(db.dsn), catalog(other_db.dsn)
    assert len(installed) > 80
    assert {row[:2] for row in installed} ^ {row[:2] for row in extension} == set()
    assert installed == extension


@pytest.mark.parametrize(("version", "mode"), [("0.1.0", "wal"), ("0.2.0", "triggers"), ("0.3.0", "triggers")])
def test_alter_extension_update_makes_the_catalog_of_a_fresh_install(installed_extension, db, other_db, version, mode):
    """0.1.0 (wal mode, the only one it had) and 0.2.0 (trigger mode, as CREATE EXTENSION starts),
    updated to this version, equal `bemi-pg install` of this version in the same mode."""
    for target in (db, other_db):
        target.execute(USER_TABLES)
    commands.install(db.dsn, None, load_settings(None, capture_mode=mode))
    other_db.execute(psycopg.sql.SQL("CREATE EXTENSION bemi_pg VERSION {}").format(version))
    if version == "0.1.0":
        assert other_db.execute("SELECT to_regprocedure('bemi.capture_mode()')") == [(None,)]
    other_db.execute("ALTER EXTENSION bemi_pg UPDATE")
    assert other_db.execute("SELECT extversion FROM pg_extension WHERE extname = 'bemi_pg'") == [(__version__,)]
    installed, updated = catalog(db.dsn), catalog(other_db.dsn)
    assert {row[:2] for row in installed} ^ {row[:2] for row in updated} == set()
    assert installed == updated


def test_bemi_pg_install_switches_an_extension_to_wal_mode(installed_extension, db):
    db.execute(USER_TABLES)
    db.execute("CREATE EXTENSION bemi_pg")
    db.execute("INSERT INTO todo (task) VALUES ('by trigger')")
    db.install(capture_mode="wal")
    db.execute("INSERT INTO todo (task) VALUES ('by wal')")
    db.poll()
    rows = db.execute("SELECT after ->> 'task', commit_position < 0 FROM changes ORDER BY committed_at")
    assert rows == [("by trigger", True), ("by wal", False)]
    with pytest.raises(BemiError, match="DROP EXTENSION bemi_pg CASCADE"):
        commands.uninstall(db.dsn, None, db.settings)
    # 17 and later also record the tables' row types as members: count what every version has
    # (sealing's 7 functions and bemi.seal came with issue 20; tracking periods, key moves and their 9
    # functions with issue 14; bemi.capture_rows with issue 21).
    assert db.execute("SELECT count(*) FROM pg_depend WHERE refobjid = (SELECT oid FROM pg_extension "
                      "WHERE extname = 'bemi_pg') AND deptype = 'e' AND classid <> 'pg_type'::regclass") == [(80,)]
