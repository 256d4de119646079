"""An UPDATE that changes the primary key moves the row (issue 14, item 3): its change is filed
under the new key with the old row in before, bemi.key_move records the key it left; as-of of
the old key after the move and of the new key before it say the row did not exist, as_of_all
holds the current key only, history and blame of the new key follow the row back."""

from __future__ import annotations

import time

import psycopg
import pytest

from bemi_pg import timetravel

from ..conftest import Database, run_cli

TABLES = """
CREATE TABLE k (id int PRIMARY KEY, v text);
CREATE TABLE kc (a int, b int, v text, PRIMARY KEY (a, b));
INSERT INTO k VALUES (1, 'a'), (2, 'b');
INSERT INTO kc VALUES (1, 1, 'x');
"""


def _now(db: Database) -> str:
    time.sleep(0.01)
    [(moment,)] = db.execute("SELECT clock_timestamp()::text")
    time.sleep(0.01)
    return str(moment)


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_a_key_change_moves_the_row(db, mode):
    db.execute(TABLES)
    db.install(capture_mode=mode)
    db.execute("INSERT INTO k VALUES (5, 'e')")
    m0 = _now(db)
    db.execute("UPDATE k SET id = 10 WHERE id = 1")
    db.execute("UPDATE k SET id = 50 WHERE id = 5")
    db.execute("UPDATE kc SET b = 2 WHERE a = 1")
    m1 = _now(db)
    db.execute("UPDATE k SET v = 'e2' WHERE id = 50")
    db.execute("INSERT INTO k VALUES (3, 'c')")  # a last change, after every moment
    db.poll()  # (trigger mode: the mover moves the queue)
    [(pk, before_id)] = db.execute("SELECT primary_key, before ->> 'id' FROM changes WHERE \"table\" = 'k' AND "
                                   "operation = 'UPDATE' AND before ->> 'id' = '1'")
    assert (pk, before_id) == ("10", "1")  # filed under the new key, the old one in before
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT old_key, new_key FROM bemi.key_move ORDER BY committed_at, seq").fetchall() == [
            ("1", "10"), ("5", "50"), ("[1, 1]", "[1, 2]")]
        assert timetravel.as_of(conn, "k", "1", m0) == {"id": 1, "v": "a"}
        assert timetravel.as_of(conn, "k", "1", m1) is None  # moved away
        assert timetravel.as_of(conn, "k", "10", m0) is None  # not there yet
        assert timetravel.as_of(conn, "k", "10", m1) == {"id": 10, "v": "a"}
        assert timetravel.as_of(conn, "k", "50", m0) is None
        assert timetravel.as_of(conn, "k", "5", m0) == {"id": 5, "v": "e"}
        assert timetravel.as_of(conn, "kc", "[1, 1]", m1) is None
        assert timetravel.as_of(conn, "kc", "[1, 2]", m1) == {"a": 1, "b": 2, "v": "x"}
        assert timetravel.as_of(conn, "kc", "[1, 2]", m0) is None
        assert timetravel.as_of_all(conn, "k", m0) == {"1": {"id": 1, "v": "a"}, "2": {"id": 2, "v": "b"}, "5": {"id": 5, "v": "e"}}
        assert timetravel.as_of_all(conn, "k", m1) == {"10": {"id": 10, "v": "a"}, "2": {"id": 2, "v": "b"},
                                                       "50": {"id": 50, "v": "e"}}
        assert timetravel.as_of_all(conn, "kc", m1) == {"[1, 2]": {"a": 1, "b": 2, "v": "x"}}
        history = timetravel.history(conn, "k", "50")
        assert [(h["operation"], h["row_key"]) for h in history] == [("UPDATE", "50"), ("UPDATE", "50"), ("CREATE", "5")]
        blame = {r["column"]: (r["operation"], r["value"]) for r in timetravel.blame(conn, "k", "50")}
        assert blame == {"id": ("UPDATE", 50), "v": ("UPDATE", "e2")}
        blame = {r["column"]: (r["operation"], r["value"]) for r in timetravel.blame(conn, "k", "10")}
        assert blame == {"id": ("UPDATE", 10), "v": ("BEFORE TRACKING", "a")}
        assert timetravel.blame(conn, "k", "5") == []  # the row left that key
    result = run_cli("history", "k", "50", env={"BEMI_DSN": db.dsn})
    assert result.returncode == 0 and "(as k 5, before the row's key changed)" in result.stdout, result.stdout + result.stderr
