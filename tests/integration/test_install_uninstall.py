"""Install and uninstall on real deployments: what uninstall puts back, what it leaves to others,
what it waits for, what status names, and the one clear line each bad input gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psycopg
import pytest

from bemi_pg import commands
from bemi_pg._localpg import throwaway_cluster
from bemi_pg.config import load_settings
from bemi_pg.errors import SlotBusy
from bemi_pg.render import render_roles

from ..conftest import Database, create_database, drop_database, run_cli


def _one_clear_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# -- item 9: uninstall puts REPLICA IDENTITY USING INDEX back ------------------------------

def _replica_identity(db, table: str) -> tuple[str, str | None]:
    [(ident, index)] = db.execute(
        "SELECT c.relreplident::text, (SELECT i.indexrelid::regclass::text FROM pg_index i "
        "WHERE i.indrelid = c.oid AND i.indisreplident) FROM pg_class c WHERE c.oid = %s::regclass", (table,))
    return ident, index


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_uninstall_restores_replica_identity_using_index(db, mode):
    db.execute("CREATE TABLE keyed (code text NOT NULL, other text NOT NULL, note text);"
               "CREATE UNIQUE INDEX keyed_code ON keyed (code); CREATE UNIQUE INDEX keyed_other ON keyed (other);"
               "ALTER TABLE keyed REPLICA IDENTITY USING INDEX keyed_code;"
               "CREATE TABLE plain (id int PRIMARY KEY)")
    db.install(capture_mode=mode)
    if mode == "wal":  # no primary key: wal mode needs FULL while it tracks the table
        assert _replica_identity(db, "keyed") == ("f", None)
    commands.uninstall(db.dsn, None, db.settings)
    assert _replica_identity(db, "keyed") == ("i", "keyed_code")
    assert _replica_identity(db, "plain") == ("d", None)


def test_a_table_leaving_tracking_gets_its_replica_identity_index_back(db):
    db.execute("CREATE TABLE keyed (code text NOT NULL, note text); CREATE UNIQUE INDEX keyed_code ON keyed (code);"
               "ALTER TABLE keyed REPLICA IDENTITY USING INDEX keyed_code; CREATE SCHEMA elsewhere")
    db.install()
    assert _replica_identity(db, "keyed") == ("f", None)
    db.execute("ALTER TABLE keyed SET SCHEMA elsewhere")
    assert _replica_identity(db, "elsewhere.keyed") == ("i", "elsewhere.keyed_code")


def test_uninstall_says_so_when_the_replica_identity_index_is_gone(db):
    db.execute("CREATE TABLE keyed (code text NOT NULL, note text); CREATE UNIQUE INDEX keyed_code ON keyed (code);"
               "ALTER TABLE keyed REPLICA IDENTITY USING INDEX keyed_code; CREATE SCHEMA elsewhere")
    db.install()
    db.execute("DROP INDEX keyed_code")
    result = run_cli("uninstall", env={"BEMI_DSN": db.dsn})
    assert result.returncode == 0, result.stderr
    # Nothing to put back, and no guess: the table keeps what it has, and the user is told.
    assert "keyed had REPLICA IDENTITY USING INDEX, and that index is gone" in result.stderr
    assert _replica_identity(db, "keyed") == ("f", None)


# -- item 11: uninstall takes the poller's lock ------------------------------------------

def _wait_for_changes(db, count: int) -> None:
    for _ in range(100):
        if db.execute("SELECT count(*) FROM changes") == [(count,)]:
            return
        time.sleep(0.1)
    assert db.execute("SELECT count(*) FROM changes") == [(count,)]


def test_uninstall_refuses_while_a_follower_runs_and_the_follower_keeps_going(db):
    db.execute("CREATE TABLE todo (id int PRIMARY KEY)")
    db.install()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("BEMI_", "PG"))}, "BEMI_DSN": db.dsn}
    proc = subprocess.Popen([sys.executable, "-m", "bemi_pg", "poll", "--follow", "--interval", "0.2"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        db.execute("INSERT INTO todo VALUES (1)")
        _wait_for_changes(db, 1)
        # Between two reads the slot is not active: only the poller's lock shows it runs.
        with pytest.raises(SlotBusy, match="a bemi-pg poller is running for slot .*: stop it, then uninstall"):
            commands.uninstall(db.dsn, None, db.settings)
        assert db.execute("SELECT count(*) FROM pg_class WHERE oid = to_regclass('bemi.checkpoint')") == [(1,)]
        db.execute("INSERT INTO todo VALUES (2)")
        _wait_for_changes(db, 2)
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    commands.uninstall(db.dsn, None, db.settings)  # once it stopped
    assert db.execute("SELECT to_regclass('bemi.checkpoint')") == [(None,)]


# -- item 16: status names prepared transactions -----------------------------------------

def test_status_names_a_prepared_transaction_pinning_the_slot():
    with throwaway_cluster("app", settings=("max_prepared_transactions=5",), prefix="bemi-pg-2pc-") as cluster:
        dsn = cluster.dsn("app")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE todo (id int PRIMARY KEY)")
        settings = load_settings(None)
        commands.install(dsn, None, settings)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("BEGIN; INSERT INTO todo VALUES (1); PREPARE TRANSACTION 'forgotten'")
        try:
            result = run_cli("status", "--json", env={"BEMI_DSN": dsn})
            assert result.returncode == 0, result.stderr
            status = json.loads(result.stdout)
            assert status["oldest_open_transaction"] is None  # no session holds it: it is prepared
            [prepared] = status["prepared_transactions"]
            assert prepared["gid"] == "forgotten" and prepared["database"] == "app"
            assert int(prepared["transaction_id"]) > 0
            text = run_cli("status", env={"BEMI_DSN": dsn})
            assert "prepared_transactions:" in text.stdout and "forgotten" in text.stdout
        finally:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("ROLLBACK PREPARED 'forgotten'")
        status = json.loads(run_cli("status", "--json", env={"BEMI_DSN": dsn}).stdout)
        assert status["prepared_transactions"] == []


# -- item 17: one clear line for bad input -----------------------------------------------

def test_bemi_config_naming_a_directory_is_one_clear_line(db, tmp_path):
    result = run_cli("status", env={"BEMI_DSN": db.dsn, "BEMI_CONFIG": str(tmp_path)})
    _one_clear_line(result, str(tmp_path), "is a directory")


def test_a_settings_file_that_is_not_utf8_is_one_clear_line(db, tmp_path):
    (tmp_path / "bemi.toml").write_bytes(b'[destination]\ntable = "caf\xe9"\n')
    result = run_cli("status", env={"BEMI_DSN": db.dsn}, cwd=tmp_path)
    _one_clear_line(result, "bemi.toml is not UTF-8", "save the file as UTF-8")


@pytest.mark.parametrize("duration", ["1000000000d", "999999999d", "99999999999999999999s"])
def test_prune_with_a_duration_too_long_is_one_clear_line(db, duration):
    db.execute("CREATE TABLE todo (id int PRIMARY KEY)")
    db.install()
    result = run_cli("prune", "--older-than", duration, env={"BEMI_DSN": db.dsn})
    _one_clear_line(result, duration, "shorter" if duration == "999999999d" else "too long")


def test_revert_with_a_change_id_that_is_not_a_uuid_is_one_clear_line(db):
    db.execute("CREATE TABLE todo (id int PRIMARY KEY)")
    db.install()
    result = run_cli("revert", "--change", "not-a-uuid", env={"BEMI_DSN": db.dsn})
    line = _one_clear_line(result, "'not-a-uuid' is not a change id")
    assert "database error" not in line


@pytest.mark.parametrize("context", ["[1]", "42", '"text"', "null"])
def test_revert_with_a_context_that_is_not_an_object_is_one_clear_line(db, context):
    db.execute("CREATE TABLE todo (id int PRIMARY KEY)")
    db.install()
    result = run_cli("revert", "--context", context, env={"BEMI_DSN": db.dsn})
    _one_clear_line(result, "is not a JSON object")


def test_history_json_carries_no_internal_key(db):
    db.execute("CREATE TABLE todo (id int PRIMARY KEY, task text)")
    db.install()
    db.execute("INSERT INTO todo VALUES (1, 'a'); UPDATE todo SET task = 'b'")
    db.poll()
    result = run_cli("history", "public.todo", "1", "--json", env={"BEMI_DSN": db.dsn})
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["operation"] for r in rows] and all("ordinality" not in r for r in rows)


# -- item 8: what install would trip on, doctor says first -------------------------------

def test_wal_mode_skips_an_unlogged_table_with_a_note_and_tracks_it_once_logged(db):
    db.execute("CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY); CREATE TABLE todo (id int PRIMARY KEY)")
    doctor = run_cli("doctor", env={"BEMI_DSN": db.dsn})
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert ("WARN unlogged tables: public.scratch: UNLOGGED, so logical decoding cannot see their changes "
            "and wal mode does not track them") in doctor.stdout
    installed = run_cli("install", "--capture-mode", "wal", env={"BEMI_DSN": db.dsn})
    assert installed.returncode == 0, installed.stderr
    assert "scratch is UNLOGGED, so logical decoding cannot see its changes: wal mode does not track it" in installed.stderr
    status = json.loads(run_cli("status", "--json", env={"BEMI_DSN": db.dsn}).stdout)
    assert status["tracked_tables"] == ["public.todo"]
    db.execute("INSERT INTO scratch VALUES (1); INSERT INTO todo VALUES (1)")
    db.poll()
    assert [(c["table"], c["after"]) for c in db.changes()] == [("todo", {"id": 1})]
    db.execute("ALTER TABLE scratch SET LOGGED")
    db.execute("INSERT INTO scratch VALUES (2)")
    db.poll()
    assert [(c["table"], c["after"]) for c in db.changes()] == [("todo", {"id": 1}), ("scratch", {"id": 2})]
    created = run_cli("status", env={"BEMI_DSN": db.dsn})
    assert "public.scratch" in created.stdout


def test_trigger_mode_tracks_an_unlogged_table(db):
    db.execute("CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY)")
    checks = commands.doctor(db.dsn, None, load_settings(None, capture_mode="triggers"))
    assert "unlogged tables" not in [c.name for c in checks]
    db.install(capture_mode="triggers")
    db.execute("INSERT INTO scratch VALUES (1)")
    db.poll()
    assert [(c["table"], c["after"]) for c in db.changes()] == [("scratch", {"id": 1})]


def test_an_application_table_named_like_the_changes_table_is_one_clear_line(db, tmp_path):
    db.execute("CREATE TABLE public.changes (id int PRIMARY KEY, note text); INSERT INTO public.changes VALUES (1, 'mine')")
    doctor = run_cli("doctor", env={"BEMI_DSN": db.dsn})
    assert doctor.returncode == 1
    assert ('FAIL changes table: public.changes already exists and is not a bemi-pg changes table (has no column database'
            in doctor.stdout), doctor.stdout
    assert 'set [destination] table = "public.bemi_changes"' in doctor.stdout
    installed = run_cli("install", env={"BEMI_DSN": db.dsn})
    _one_clear_line(installed, "public.changes already exists and is not a bemi-pg changes table")
    assert db.execute("SELECT to_regnamespace('bemi')") == [(None,)]
    assert db.execute("SELECT * FROM public.changes") == [(1, "mine")]
    # With a destination of its own, the application's table is tracked like any other.
    (tmp_path / "bemi.toml").write_text('[destination]\ntable = "public.bemi_changes"\n')
    installed = run_cli("install", env={"BEMI_DSN": db.dsn}, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    db.execute("UPDATE public.changes SET note = 'still mine'")
    assert run_cli("poll", "--once", env={"BEMI_DSN": db.dsn}).returncode == 0
    assert db.execute('SELECT "table", after FROM bemi_changes') == [("changes", {"id": 1, "note": "still mine"})]


def test_doctor_names_a_clash_in_a_separate_destination(db, other_db):
    other_db.execute("CREATE VIEW changes AS SELECT 1 AS id")
    doctor = run_cli("doctor", env={"BEMI_DSN": db.dsn, "BEMI_DESTINATION_DSN": other_db.dsn})
    assert "FAIL changes table: public.changes already exists and is not a bemi-pg changes table (is not a table)" in doctor.stdout


# -- item 10: a destination shared by several sources ------------------------------------

@pytest.fixture
def third_db(server_dsn):
    name = create_database(server_dsn, "third")
    try:
        yield Database(server_dsn, name)
    finally:
        drop_database(server_dsn, name)


def _bemi_objects(dest) -> list[str]:
    return [name for (name,) in dest.execute(
        "SELECT 'table ' || relname FROM pg_class WHERE relnamespace = to_regnamespace('bemi') AND relkind IN ('r', 'p') "
        "UNION SELECT 'function ' || proname FROM pg_proc WHERE pronamespace = to_regnamespace('bemi') ORDER BY 1")]


@pytest.mark.parametrize("drop_changes", [False, True])
def test_one_source_leaving_a_shared_destination_leaves_the_others_working(db, third_db, other_db, drop_changes):
    for key, source in enumerate((db, third_db), 1):  # (keys apart: bemi.history does not filter by source yet)
        source.execute("CREATE TABLE todo (id int PRIMARY KEY, task text)")
        source.install(other_db.dsn)
        source.execute("INSERT INTO todo VALUES (%s, %s)", (key, source.name))
        source.poll(other_db.dsn)
    before = _bemi_objects(other_db)
    assert "table checkpoint" in before and "function history" in before
    result = run_cli("uninstall", *(["--drop-changes"] if drop_changes else []),
                     env={"BEMI_DSN": db.dsn, "BEMI_DESTINATION_DSN": other_db.dsn})
    assert result.returncode == 0, result.stderr
    assert "other sources poll into this destination" in result.stderr
    assert _bemi_objects(other_db) == before
    assert other_db.execute("SELECT source FROM bemi.checkpoint") == [(third_db.source,)]
    kept = [(db.source,)] if not drop_changes else []
    assert other_db.execute("SELECT source FROM changes ORDER BY source") == sorted(kept + [(third_db.source,)])
    # The other source's poller and its time travel go on.
    third_db.execute("UPDATE todo SET task = 'later'")
    assert third_db.poll(other_db.dsn).changes == 1
    history = run_cli("history", "public.todo", "2", "--json",
                      env={"BEMI_DSN": third_db.dsn, "BEMI_DESTINATION_DSN": other_db.dsn})
    assert history.returncode == 0, history.stderr
    assert [r["operation"] for r in json.loads(history.stdout)] == ["UPDATE", "CREATE"]
    # The last source to leave takes the bookkeeping with it.
    commands.uninstall(third_db.dsn, other_db.dsn, third_db.settings, drop_changes=drop_changes)
    assert _bemi_objects(other_db) == []
    assert other_db.execute("SELECT to_regclass('public.changes') IS NOT NULL") == [(not drop_changes,)]
    if not drop_changes:
        assert other_db.execute("SELECT count(*) FROM changes") == [(3,)]


def test_uninstall_by_hand_from_a_shared_destination_will_not_guess_which_source_leaves(db, third_db, other_db):
    for source in (db, third_db):
        source.execute("CREATE TABLE todo (id int PRIMARY KEY)")
        source.install(other_db.dsn)
        source.execute("INSERT INTO todo VALUES (1)")
        source.poll(other_db.dsn)
    script = commands.render(db.settings, uninstall=True, drop_changes=True)
    destination_part = script[script.index("-- Part 2"):]
    with pytest.raises(psycopg.errors.RaiseException, match="poll into this destination, and which one leaves is not known"):
        other_db.execute(destination_part)
    assert other_db.execute("SELECT count(*) FROM changes") == [(2,)]


# -- item 12: the least-privilege role polls into monthly partitions ---------------------

def test_the_least_privilege_role_polls_into_monthly_partitions_it_may_not_create_itself(db):
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.install(partition_by_month=True)
    parts = db.execute("SELECT c.oid::regclass::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                       "WHERE i.inhparent = 'public.changes'::regclass ORDER BY 1")
    assert len(parts) == 2 and all(p.startswith("bemi.changes_p") for (p,) in parts), parts
    # This month's partition gone: the poller must make it, with no CREATE right of its own.
    [(this_month,)] = db.execute("SELECT 'bemi.changes_p' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMM')")
    db.execute(f"ALTER TABLE changes DETACH PARTITION {this_month}; DROP TABLE {this_month}")
    db.execute("DROP ROLE IF EXISTS bemi_poller")
    db.execute(render_roles(db.settings))
    poller = db.dsn.replace("user=postgres", "user=bemi_poller")
    try:
        assert db.execute("SELECT has_schema_privilege('bemi_poller', 'public', 'CREATE'), "
                          "has_schema_privilege('bemi_poller', 'bemi', 'CREATE')") == [(False, False)]
        db.execute("INSERT INTO t VALUES (1)")
        result = run_cli("poll", "--once", env={"BEMI_DSN": poller})
        assert result.returncode == 0, result.stderr
        assert db.execute("SELECT tableoid::regclass::text, after FROM changes") == [(this_month, {"id": 1})]
        # The partition is bemi-pg's: never tracked, so polling again writes nothing new.
        assert run_cli("poll", "--once", env={"BEMI_DSN": poller}).returncode == 0
        assert db.execute("SELECT count(*) FROM changes") == [(1,)]
        status = json.loads(run_cli("status", "--json", env={"BEMI_DSN": poller}).stdout)
        assert status["tracked_tables"] == ["public.t"]
        # Only the poller's role may make partitions with the installer's rights.
        assert db.execute("SELECT has_function_privilege('public', 'bemi.ensure_changes_partition(date)', 'EXECUTE')") == [(False,)]
    finally:
        db.execute("DROP OWNED BY bemi_poller; DROP ROLE bemi_poller")


# -- item 14: the poller converts values as to_jsonb gave them, types dropped or odd ----

def test_values_of_types_dropped_before_the_poller_caught_up_and_of_oid_are_what_to_jsonb_gave(db):
    db.execute("CREATE DOMAIN doc AS jsonb; CREATE TYPE color AS ENUM ('red', 'blue'); CREATE DOMAIN small_oid AS oid;"
               "CREATE DOMAIN docs AS doc[];"
               "CREATE TABLE t (id int PRIMARY KEY, d doc, colors color[], o oid, os oid[], so small_oid, ds docs);"
               "CREATE TABLE kept (id int PRIMARY KEY, o oid, os oid[])")
    db.install()
    db.execute("""INSERT INTO t VALUES (1, '{"a": [1, 2]}', '{red,blue}', 4294967295, '{1,NULL,26}', 7,
                                        ARRAY['{"b": null}'::doc, '[3]'::doc]::docs);
                  INSERT INTO kept VALUES (1, 12, '{12,13}')""")
    [(expected,)] = db.execute("SELECT to_jsonb(t) FROM t")
    [(expected_kept,)] = db.execute("SELECT to_jsonb(kept) FROM kept")
    assert expected["d"] == {"a": [1, 2]} and expected["colors"] == ["red", "blue"] and expected["o"] == "4294967295"
    db.execute("DROP TABLE t; DROP DOMAIN docs; DROP DOMAIN doc; DROP TYPE color; DROP DOMAIN small_oid")
    db.poll()
    assert [(c["table"], c["after"]) for c in db.changes()] == [("t", expected), ("kept", expected_kept)]


# -- adversarial, item 10's sibling: revert picks only its own source's changes ----------

def test_revert_on_a_shared_destination_picks_only_its_own_sources_changes(other_db):
    settings = load_settings(None)
    with throwaway_cluster("app", prefix="bemi-pg-ra-") as a, throwaway_cluster("app", prefix="bemi-pg-rb-") as b:
        for cluster in (a, b):
            dsn = cluster.dsn("app")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE todo (id int PRIMARY KEY, task text)")
            commands.install(dsn, other_db.dsn, settings)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT bemi.set_context('{\"job\": 7}'); INSERT INTO todo VALUES (1, 'x')")
            commands.poll_once(dsn, other_db.dsn, settings)
        assert other_db.execute("SELECT count(DISTINCT source) FROM changes WHERE context @> '{\"job\": 7}'") == [(2,)]
        result = run_cli("revert", "--context", '{"job": 7}', "--apply",
                         env={"BEMI_DSN": a.dsn("app"), "BEMI_DESTINATION_DSN": other_db.dsn})
        assert result.returncode == 0, result.stderr
        assert "reverted 1 of 1 change(s)" in result.stderr
        for cluster, rows in ((a, []), (b, [(1, "x")])):
            with psycopg.connect(cluster.dsn("app"), autocommit=True) as conn:
                assert conn.execute("SELECT * FROM todo").fetchall() == rows
