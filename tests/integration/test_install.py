"""Install, reinstall, uninstall; the catalog before and after."""

from __future__ import annotations

import json

import pytest

from bemi_pg import commands
from bemi_pg.errors import PreflightError

from ..conftest import run_cli

CATALOG = """
SELECT 'function', p.oid::regprocedure::text, md5(pg_get_functiondef(p.oid)) FROM pg_proc p
 WHERE p.pronamespace = 'bemi'::regnamespace OR p.proname = 'bemi_set_context'
UNION ALL SELECT 'relation', c.oid::regclass::text, c.relkind::text || c.relreplident::text FROM pg_class c
 WHERE c.relnamespace IN ('bemi'::regnamespace, 'public'::regnamespace)
UNION ALL SELECT 'trigger', tgrelid::regclass::text || '.' || tgname, md5(pg_get_triggerdef(t.oid)) FROM pg_trigger t
 WHERE tgname LIKE 'bemi%%'
UNION ALL SELECT 'event trigger', evtname, evtevent FROM pg_event_trigger
UNION ALL SELECT 'publication', pubname, (SELECT string_agg(prrelid::regclass::text, ',' ORDER BY prrelid::regclass::text)
 FROM pg_publication_rel WHERE prpubid = p.oid) FROM pg_publication p
UNION ALL SELECT 'slot', slot_name, plugin FROM pg_replication_slots WHERE database = current_database()
UNION ALL SELECT 'installation', version, settings::text FROM bemi.installation
ORDER BY 1, 2
"""

NO_BEMI_LEFT = """
SELECT 'schema' FROM pg_namespace WHERE nspname = 'bemi'
UNION ALL SELECT 'function ' || proname FROM pg_proc WHERE proname LIKE 'bemi%%' OR proname IN ('capture_context', 'track_tables')
UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgname LIKE 'bemi%%'
UNION ALL SELECT 'event trigger ' || evtname FROM pg_event_trigger
UNION ALL SELECT 'publication ' || pubname FROM pg_publication
UNION ALL SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE database = current_database()
"""


def test_install_twice_equals_install_once(db):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text); CREATE TABLE nopk (a int)")
    db.install()
    first = db.execute(CATALOG)
    db.install()
    assert db.execute(CATALOG) == first
    kinds = {row[0] for row in first}
    assert kinds == {"function", "relation", "trigger", "event trigger", "publication", "slot", "installation"}
    assert ("relation", "todo", "rf") in first  # REPLICA IDENTITY FULL


def test_uninstall_leaves_no_bemi_object_and_writes_still_work(db):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install()
    db.execute("INSERT INTO todo (task) VALUES ('a')")
    db.poll()
    commands.uninstall(db.dsn, None, db.settings)
    assert db.execute(NO_BEMI_LEFT) == []
    assert db.execute("SELECT relreplident FROM pg_class WHERE relname = 'todo'") == [("d",)]
    db.execute("INSERT INTO todo (task) VALUES ('b'); UPDATE todo SET task = 'c'; DELETE FROM todo; TRUNCATE todo")
    assert db.execute("SELECT count(*) FROM changes") == [(1,)]  # the audit data stays
    commands.uninstall(db.dsn, None, db.settings, drop_changes=True)
    assert db.execute("SELECT to_regclass('public.changes')") == [(None,)]


def test_new_tables_are_tracked_by_the_event_trigger(db):
    db.install()
    db.execute("CREATE TABLE later (id int PRIMARY KEY, v text); INSERT INTO later VALUES (1, 'x')")
    db.execute("CREATE SCHEMA other; CREATE TABLE other.ignored (id int PRIMARY KEY); INSERT INTO other.ignored VALUES (1)")
    db.poll()
    assert [(c["table"], c["operation"]) for c in db.changes()] == [("later", "CREATE")]


def test_install_refuses_a_database_without_logical_decoding_rights(db):
    db.execute("CREATE ROLE plain LOGIN")
    dsn = db.dsn.replace("user=postgres", "user=plain")
    with pytest.raises(PreflightError, match="replication privilege"):
        commands.install(dsn, None, db.settings)


def test_cli_render_install_status_doctor(db):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text); CREATE TABLE nopk (a int)")
    env = {"DATABASE_URL": db.dsn}
    render = run_cli("render")
    assert render.returncode == 0 and render.stdout.startswith("-- bemi-pg") and render.stderr == ""
    dry = run_cli("install", "--dry-run", env=env)
    assert dry.returncode == 0 and "CREATE TABLE IF NOT EXISTS public.changes" in dry.stdout
    assert db.execute("SELECT to_regclass('public.changes')") == [(None,)]
    doctor = run_cli("doctor", env=env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "WARN primary keys: no primary key on public.nopk" in doctor.stdout
    assert all(line.split()[0] in ("OK", "WARN") for line in doctor.stdout.splitlines())
    assert run_cli("install", env=env).returncode == 0
    db.execute("INSERT INTO todo (task) VALUES ('a'); INSERT INTO nopk VALUES (1)")
    once = run_cli("poll", "--once", env=env)
    assert once.returncode == 0 and "wrote 2 changes from 1 transaction " in once.stderr
    status = run_cli("status", "--json", env=env)
    data = json.loads(status.stdout)
    assert data["change_count"] == 2 and data["tracked_tables"] == ["public.nopk", "public.todo"]
    assert data["wal_status"] == "reserved" and data["installed_version"] and data["capture_mode"] == "wal"
    assert [c["primary_key"] for c in db.changes()] == ["1", None]


@pytest.mark.parametrize("args, env, message", [
    (["status"], {"DATABASE_URL": "postgresql://u:hunter2@127.0.0.1:notaport/db"}, "malformed DSN"),
    (["status", "--dsn", "host=127.0.0.1 port=1 dbname=x connect_timeout=2"], {}, "cannot connect to the source database"),
    (["render", "--config", "/nonexistent/bemi.toml"], {}, "not found"),
])
def test_bad_input_is_one_clear_line(args, env, message):
    result = run_cli(*args, env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "hunter2" not in result.stderr


def test_malformed_bemi_toml_is_one_clear_line(tmp_path):
    config = tmp_path / "bemi.toml"
    config.write_text("[source]\nschemas = 'public'\n")
    result = run_cli("render", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr == f"error: {config}: source.schemas must be a list, not 'public'\n"


def test_poll_without_a_slot_says_so(db):
    result = run_cli("poll", "--once", env={"DATABASE_URL": db.dsn})
    assert result.returncode == 3
    assert "replication slot bemi_" in result.stderr and "does not exist" in result.stderr
