"""Where the trail's knowledge starts and stops (issue 14, items 2 and 3): tracking periods per
source and table, recorded at install, when a table is created in or moved into a tracked schema,
when it leaves, at uninstall and when a lost slot is replaced; as-of in a gap says it cannot (5)."""

from __future__ import annotations

import time

import psycopg
import pytest

from bemi_pg import commands, timetravel
from bemi_pg.config import load_settings
from bemi_pg.errors import BemiError, CannotSay

from ..conftest import Database, create_database, drop_database, run_cli

TABLES = """
CREATE SCHEMA side;
CREATE TABLE a (id int PRIMARY KEY, v text);
INSERT INTO a SELECT i, 'a' || i FROM generate_series(1, 3) AS i;
"""


def _now(db: Database) -> str:
    time.sleep(0.01)
    [(moment,)] = db.execute("SELECT clock_timestamp()::text")
    time.sleep(0.01)
    return str(moment)


def _periods(conn: psycopg.Connection, source: str) -> list[tuple[str, str, str | None]]:
    return [(f"{s}.{t}", began, ended) for s, t, _, began, _, ended in
            conn.execute("SELECT * FROM bemi.trail_periods(%s)", (source,))]


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_periods_and_gaps(db, mode):
    db.execute(TABLES)
    db.install(capture_mode=mode)
    m_tracked = _now(db)
    db.execute("UPDATE a SET v = 'x' WHERE id = 1")
    db.execute("CREATE TABLE c (id int PRIMARY KEY, v text)")  # created in the schema: begins empty
    db.execute("INSERT INTO c VALUES (1, 'c1')")
    m_c = _now(db)
    db.execute("ALTER TABLE a SET SCHEMA side")  # leaves tracking
    m_gap = _now(db)
    db.execute("UPDATE side.a SET v = 'unseen' WHERE id = 2")
    db.execute("ALTER TABLE side.a SET SCHEMA public")  # back: a new period, after a gap
    m_back = _now(db)
    db.execute("UPDATE a SET v = 'y' WHERE id = 1")
    db.execute("INSERT INTO c VALUES (2, 'c2')")  # a last change, after every moment
    db.poll()  # (trigger mode: the mover moves the queue)
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        assert _periods(conn, db.source) == [
            ("public.a", "install", "moved, renamed or detached out"),
            ("public.a", "moved, renamed or attached in", None),
            ("public.c", "created", None),
        ]
        assert timetravel.as_of(conn, "a", "1", m_tracked) == {"id": 1, "v": "a1"}
        with pytest.raises(CannotSay, match="falls in a gap in the trail of public.a"):
            timetravel.as_of(conn, "a", "2", m_gap)
        with pytest.raises(CannotSay, match="gap"):
            timetravel.as_of_all(conn, "a", m_gap)
        with pytest.raises(psycopg.Error, match="gap") as typed:
            conn.execute("SELECT * FROM bemi.as_of(NULL::public.a, %s)", (m_gap,))
        assert typed.value.sqlstate == "BEM05"
        with pytest.raises(CannotSay, match="before tracking of public.c began"):
            timetravel.as_of(conn, "c", "1", m_tracked)
        # A table created in a tracked schema began empty: no baseline needed.
        assert timetravel.as_of_all(conn, "c", m_c) == {"1": {"id": 1, "v": "c1"}}
        assert timetravel.as_of(conn, "c", "2", m_c) is None
        if mode == "triggers":  # the live row answers for what no change of the new period tells
            assert timetravel.as_of(conn, "a", "2", m_back) == {"id": 2, "v": "unseen"}
        else:  # the install's baseline is from before the gap: it no longer answers
            with pytest.raises(CannotSay, match="no baseline"):
                timetravel.as_of(conn, "a", "2", m_back)
    if mode == "wal":
        commands.snapshot(db.dsn, None, db.settings, ["public.a"])
        db.execute("INSERT INTO c VALUES (3, 'c3')")  # the poller writes past the new baseline
        db.poll()
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            assert timetravel.as_of(conn, "a", "2", m_back) == {"id": 2, "v": "unseen"}
    status = commands.status(db.dsn, None, db.settings)
    assert [g.split(" from ")[0] for g in status["gaps"]] == ["public.a"], status
    assert "(moved, renamed or detached out) to" in status["gaps"][0]
    assert len(status["tracking"]) == 3 and status["tracking"][2].startswith("public.c since ")
    result = run_cli("as-of", "a", "2", m_gap, env={"BEMI_DSN": db.dsn})
    assert result.returncode == 5 and "falls in a gap" in result.stderr, result.stderr
    # revert --since a moment before the gap cannot bring the table back (the gap's change is unseen).
    result = run_cli("revert", "--since", m_tracked, "--table", "a", env={"BEMI_DSN": db.dsn})
    assert result.returncode == 5 and "has a gap after" in result.stderr, result.stderr
    result = run_cli("revert", "--since", m_gap, "--table", "a", env={"BEMI_DSN": db.dsn})
    assert result.returncode == 5 and "falls in a gap" in result.stderr, result.stderr
    result = run_cli("revert", "--since", m_back, "--table", "a", env={"BEMI_DSN": db.dsn})
    assert result.returncode == 0 and "UPDATE" in result.stdout, (result.stdout, result.stderr)
    result = run_cli("history", "a", "1", env={"BEMI_DSN": db.dsn})  # its changes: one before the gap, one after
    lines = result.stdout.splitlines()
    gap = [i for i, line in enumerate(lines) if line.startswith("-- gap in the trail: tracking ended")]
    assert result.returncode == 0 and len(gap) == 1 and "(moved, renamed or detached out)" in lines[gap[0]], result.stdout
    assert "UPDATE" in lines[gap[0] - 2] and "UPDATE" in lines[gap[0] + 1]  # (each change's line, then its column)
    result = run_cli("status", env={"BEMI_DSN": db.dsn})
    assert result.returncode == 0 and "gaps: 1: public.a from " in result.stdout, result.stdout


def test_a_lost_slot_leaves_a_gap(db, other_db):
    db.execute(TABLES)
    settings = load_settings(None)
    commands.install(db.dsn, other_db.dsn, settings)
    # Registered at once: the destination knows the source before any poll.
    assert other_db.execute("SELECT source, commit_position FROM bemi.checkpoint") == [(db.source, -1)]
    assert commands.status(db.dsn, other_db.dsn, settings)["last_commit_position"] is None
    db.execute("UPDATE a SET v = 'x' WHERE id = 1")
    commands.poll_once(db.dsn, other_db.dsn, settings)
    db.execute("SELECT pg_drop_replication_slot(%s)", (settings.slot_for(db.name),))
    db.execute("UPDATE a SET v = 'lost' WHERE id = 2")
    m_lost = _now(db)
    commands.install(db.dsn, other_db.dsn, settings)  # a new slot, and new baselines
    m_new = _now(db)
    db.execute("UPDATE a SET v = 'y' WHERE id = 3")
    commands.poll_once(db.dsn, other_db.dsn, settings)
    with psycopg.connect(other_db.dsn, autocommit=True) as conn:
        assert _periods(conn, db.source) == [("public.a", "install", "slot lost"), ("public.a", "new slot", None)]
        with pytest.raises(CannotSay, match="gap"):
            timetravel.as_of(conn, "a", "2", m_lost)
        assert timetravel.as_of_all(conn, "a", m_new) == {"1": {"id": 1, "v": "x"}, "2": {"id": 2, "v": "lost"},
                                                        "3": {"id": 3, "v": "a3"}}


def test_uninstall_ends_the_periods_of_the_leaving_source_only(db, other_db, server_dsn):
    db.execute(TABLES)
    second = Database(server_dsn, create_database(server_dsn))
    try:
        second.execute(TABLES)
        settings = load_settings(None)
        commands.install(db.dsn, other_db.dsn, settings, snapshot=False)
        commands.install(second.dsn, other_db.dsn, settings, snapshot=False)
        commands.poll_once(db.dsn, other_db.dsn, settings)
        # The second source never polled: its registration keeps the shared bookkeeping.
        commands.uninstall(db.dsn, other_db.dsn, settings)
        with psycopg.connect(other_db.dsn, autocommit=True) as conn:
            assert _periods(conn, db.source) == [("public.a", "install", "uninstall")]
            assert conn.execute("SELECT source FROM bemi.checkpoint").fetchall() == [(second.source,)]
        commands.poll_once(second.dsn, other_db.dsn, settings)
        with psycopg.connect(other_db.dsn, autocommit=True) as conn:
            assert _periods(conn, second.source) == [("public.a", "install", None)]
    finally:
        drop_database(server_dsn, second.name)


def test_answers_are_scoped_to_one_source_and_one_schema(db, other_db, server_dsn):
    both = "CREATE SCHEMA sales; CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE sales.a (id int PRIMARY KEY, v text);"
    db.execute(both)
    second = Database(server_dsn, create_database(server_dsn))
    try:
        second.execute(both)
        settings = load_settings(None, schemas=["public", "sales"])
        for source in (db, second):
            commands.install(source.dsn, other_db.dsn, settings)
            source.execute("INSERT INTO a VALUES (1, %s)", (source.name,))
            source.execute("INSERT INTO sales.a VALUES (1, 'sales')")
            source.execute("UPDATE a SET v = v || '!' WHERE id = 1")
            commands.poll_once(source.dsn, other_db.dsn, settings)
        with psycopg.connect(other_db.dsn, autocommit=True) as conn:
            for call in (lambda: timetravel.history(conn, "a", "1", source=db.source),
                         lambda: timetravel.blame(conn, "a", "1", source=db.source),
                         lambda: timetravel.as_of(conn, "a", "1", "infinity", source=db.source)):
                with pytest.raises(BemiError, match="a is ambiguous .in schemas public, sales.: name it as schema.table"):
                    call()
            mine = timetravel.history(conn, "public.a", "1", source=db.source)
            assert [h["after"]["v"] for h in mine] == [f"{db.name}!", db.name]  # never the other database's
            assert [h["after"]["v"] for h in timetravel.history(conn, "sales.a", "1", source=second.source)] == ["sales"]
            with pytest.raises(BemiError, match="holds the trails of 2 sources"):
                timetravel.history(conn, "public.a", "1")  # which source: the destination cannot guess
        env = {"BEMI_DSN": second.dsn, "BEMI_DESTINATION_DSN": other_db.dsn}
        result = run_cli("history", "public.a", "1", "--json", env=env)
        assert result.returncode == 0 and db.name not in result.stdout and second.name in result.stdout, result.stderr
        result = run_cli("blame", "a", "1", env=env)
        assert result.returncode == 1 and "name it as schema.table" in result.stderr, result.stderr
    finally:
        drop_database(server_dsn, second.name)


def test_excluding_and_including_again_by_settings(db):
    db.execute(TABLES)
    db.install(capture_mode="triggers")
    db.install(capture_mode="triggers", exclude_tables=["public.a"])
    m_out = _now(db)
    db.install(capture_mode="triggers")
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        assert _periods(conn, db.source) == [("public.a", "install", "excluded"), ("public.a", "track_tables", None)]
        with pytest.raises(CannotSay, match="gap"):
            timetravel.as_of(conn, "a", "1", m_out)
