"""As-of on a database that already had rows (issue 14, item 3): changes, then the baseline,
then the live row; exit 5 where the trail cannot say."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import psycopg
import pytest

from bemi_pg import commands, timetravel
from bemi_pg.config import load_settings
from bemi_pg.errors import CannotSay

from ..conftest import run_cli

PRODUCTS = """
CREATE TABLE products (id int PRIMARY KEY, name text, price numeric, tags text[]);
INSERT INTO products SELECT i, 'p' || i, i * 1.5, ARRAY['t' || i] FROM generate_series(1, 5) AS i;
"""


def _now(db) -> str:
    time.sleep(0.01)
    [(moment,)] = db.execute("SELECT clock_timestamp()::text")
    time.sleep(0.01)
    return str(moment)


def _rows(db) -> dict[str, str]:
    return dict(db.execute("SELECT id::text, to_jsonb(p)::text FROM products p"))


def _as_of_all(conn, at):
    return timetravel.as_of_all(conn, "products", at)


def _norm(rows: dict[str, str]) -> dict[str, dict]:
    return {k: json.loads(v, parse_float=Decimal) for k, v in rows.items()}


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_rows_from_before_tracking_answer_from_the_baseline(db, mode):
    db.execute(PRODUCTS)
    before_install = _now(db)
    db.install(capture_mode=mode)
    m1 = _now(db)
    at_m1 = _rows(db)
    db.execute("UPDATE products SET price = 99 WHERE id = 1")
    db.execute("DELETE FROM products WHERE id = 4")
    m2 = _now(db)
    at_m2 = _rows(db)
    db.execute("INSERT INTO products VALUES (6, 'new', 1, '{}')")  # the last change: m1 and m2 are before it
    db.poll()
    env = {"BEMI_DSN": db.dsn}
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        assert _as_of_all(conn, m1) == _norm(at_m1)
        assert _as_of_all(conn, m2) == _norm(at_m2)
        for pk in ("1", "2", "4", "6"):
            assert timetravel.as_of(conn, "products", pk, m1) == _norm(at_m1).get(pk)
        typed = conn.execute("SELECT count(*) FROM bemi.as_of(NULL::products, %s)", (m2,)).fetchone()[0]
        assert typed == 4
        with pytest.raises(CannotSay, match="before tracking"):
            timetravel.as_of(conn, "products", "2", before_install)
    result = run_cli("as-of", "products", "2", m1, env=env)
    assert result.returncode == 0 and json.loads(result.stdout)["name"] == "p2", result.stderr
    result = run_cli("as-of", "products", "--all", m1, env=env)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 5
    result = run_cli("as-of", "products", "4", m2, env=env)
    assert result.returncode == 3 and "did not exist" in result.stderr
    result = run_cli("as-of", "products", "2", before_install, env=env)
    assert result.returncode == 5 and "before tracking of public.products began" in result.stderr, result.stderr
    # A change the poller has not written (trigger mode: moved) yet: moments after the last written one cannot be known.
    db.execute("UPDATE products SET price = 0 WHERE id = 2")
    result = run_cli("as-of", "products", "2", _now(db), env=env)
    assert result.returncode == 5 and "later than what the poller has written" in result.stderr


def test_a_separate_destination_needs_the_baseline_and_honours_truncate(db, other_db):
    db.execute(PRODUCTS)
    settings = load_settings(None)
    commands.install(db.dsn, other_db.dsn, settings, snapshot=False)
    m0 = _now(db)
    db.execute("UPDATE products SET name = 'x' WHERE id = 1")
    commands.poll_once(db.dsn, other_db.dsn, settings)
    with psycopg.connect(other_db.dsn, autocommit=True) as conn:
        # The destination knows when tracking began (the poller wrote the install's tracking
        # periods): the UPDATE's before answers for row 1, and nothing for the unchanged row 2.
        assert timetravel.as_of(conn, "products", "1", m0)["name"] == "p1"
        with pytest.raises(CannotSay, match="no baseline"):
            timetravel.as_of(conn, "products", "2", m0)
        with pytest.raises(CannotSay, match="no baseline"):
            timetravel.as_of_all(conn, "products", m0)
    commands.snapshot(db.dsn, other_db.dsn, settings)
    m1 = _now(db)
    at_m1 = _rows(db)
    db.execute("TRUNCATE products")
    m2 = _now(db)
    db.execute("INSERT INTO products VALUES (3, 'again', 0, NULL)")
    commands.poll_once(db.dsn, other_db.dsn, settings)
    with psycopg.connect(other_db.dsn, autocommit=True) as conn:
        assert _as_of_all(conn, m1) == _norm(at_m1)
        assert timetravel.as_of(conn, "products", "3", m1)["name"] == "p3"  # before the TRUNCATE, from the baseline
        assert timetravel.as_of(conn, "products", "2", m2) is None  # truncated
        assert timetravel.as_of_all(conn, "products", m2) == {}
        assert timetravel.as_of(conn, "products", "1", m0)["name"] == "p1"  # before the baseline, from the UPDATE
    result = run_cli("as-of", "products", "3", m1, "--destination-dsn", other_db.dsn, env={"BEMI_DSN": db.dsn})
    assert result.returncode == 0 and json.loads(result.stdout)["name"] == "p3", result.stderr


def test_trigger_mode_without_a_baseline_answers_from_the_live_row(db):
    db.execute(PRODUCTS)
    db.settings = load_settings(None, capture_mode="triggers")
    commands.install(db.dsn, None, db.settings, snapshot=False)
    m1 = _now(db)
    at_m1 = _rows(db)
    db.execute("UPDATE products SET price = 7 WHERE id = 5")
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        with pytest.raises(CannotSay, match="later than what the poller has written"):
            timetravel.as_of(conn, "products", "5", m1)  # the UPDATE waits in the queue
    db.poll()
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        assert _as_of_all(conn, m1) == _norm(at_m1)
        assert timetravel.as_of(conn, "products", "2", m1)["name"] == "p2"
        assert timetravel.as_of(conn, "products", "5", m1)["price"] == Decimal("7.5")
        assert timetravel.as_of(conn, "products", "9", m1) is None


def test_blame_of_a_row_that_predates_tracking(db):
    db.execute(PRODUCTS)
    db.install()
    db.execute("UPDATE products SET price = 2 WHERE id = 1")
    db.poll()
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        blame = {r["column"]: (r["operation"], r["value"]) for r in timetravel.blame(conn, "products", "1")}
        assert blame == {"id": ("BEFORE TRACKING", 1), "name": ("BEFORE TRACKING", "p1"), "price": ("UPDATE", 2),
                         "tags": ("BEFORE TRACKING", ["t1"])}
        untouched = {r["column"]: (r["operation"], r["id"]) for r in timetravel.blame(conn, "products", "2")}
        assert untouched == {c: ("BEFORE TRACKING", None) for c in ("id", "name", "price", "tags")}
    result = run_cli("blame", "products", "2", env={"BEMI_DSN": db.dsn})
    assert result.returncode == 0 and result.stdout.count("from before tracking began") == 4, result.stderr
