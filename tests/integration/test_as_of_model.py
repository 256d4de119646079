"""A randomized model test of as-of on tables that held rows before install (issue 14, "Done
when"): tables of numeric, arrays, jsonb, timestamptz, a composite key and a keyless one; a few
hundred transactions that insert, update (the key too), delete and truncate, a table created
later, one moved into the schema, one moved out and back (a gap); to_jsonb snapshots of every
table at 30 moments, compared with single-row as-of for every key ever seen and with as_of_all,
in both capture modes and with the destination in the same and in another database (there with a
baseline). Moments before a table's tracking began, in a gap and past the poller's position get
exit 5 (CannotSay); so does as-of of the keyless table."""

from __future__ import annotations

import random
import time
from decimal import Decimal

import psycopg
import pytest

from bemi_pg import commands, timetravel
from bemi_pg.config import load_settings
from bemi_pg.errors import CannotSay

TABLES = """
CREATE SCHEMA side;
CREATE TABLE item (id int PRIMARY KEY, price numeric, tags text[], doc jsonb, seen timestamptz);
CREATE TABLE line (order_id int, n int, qty numeric(12, 3), PRIMARY KEY (order_id, n));
CREATE TABLE bag (v int, note text);
CREATE TABLE side.mover (id int PRIMARY KEY, v text);
INSERT INTO item SELECT i, i * 1.25, ARRAY['a' || i], jsonb_build_object('i', i), '2024-01-01 00:00+02'
  FROM generate_series(1, 12) AS i;
INSERT INTO line SELECT i % 3, i, i / 7.0 FROM generate_series(1, 9) AS i;
INSERT INTO bag SELECT i, 'b' || i FROM generate_series(1, 4) AS i;
INSERT INTO side.mover SELECT i, 'm' || i FROM generate_series(1, 5) AS i;
"""

KEYS = {"item": "id::text", "line": "jsonb_build_array(order_id, n)::text", "extra": "id::text", "mover": "id::text"}
STEPS = 210


def _snapshot(conn: psycopg.Connection, tracked: set[str]) -> dict[str, dict[str, str] | None]:
    """Each keyed table's rows by key, as to_jsonb gives them; None for a table not tracked now."""
    snap: dict[str, dict[str, str] | None] = {}
    for table, key in KEYS.items():
        snap[table] = dict(conn.execute(f"SELECT {key}, to_jsonb(x)::text FROM public.{table} x").fetchall()) \
            if table in tracked else None
    return snap


def _step(conn: psycopg.Connection, rng: random.Random, tracked: set[str]) -> None:
    i = rng.randint(1, 16)
    roll = rng.random()
    if roll < 0.2:
        conn.execute("INSERT INTO item VALUES (%s, %s, %s, '{\"x\": [1, 2.50]}', now()) ON CONFLICT (id) DO UPDATE "
                     "SET price = excluded.price, tags = excluded.tags", (i, Decimal(rng.randint(0, 10**9)) / 10**4, [str(i), None]))
    elif roll < 0.3:
        conn.execute("UPDATE item SET doc = jsonb_build_object('n', %s::numeric) WHERE id = %s", (Decimal(rng.randint(0, 999)) / 7, i))
    elif roll < 0.4:  # the key changes: the row moves
        conn.execute("UPDATE item SET id = CASE WHEN id > 100 THEN id - 100 ELSE id + 100 END WHERE id IN (%s, %s) "
                     "AND NOT EXISTS (SELECT FROM item o WHERE o.id = CASE WHEN item.id > 100 THEN item.id - 100 "
                     "ELSE item.id + 100 END)", (i, i + 100))
    elif roll < 0.47:
        conn.execute("DELETE FROM item WHERE id IN (%s, %s)", (i, i + 100))
    elif roll < 0.6:
        conn.execute("INSERT INTO line VALUES (%s, %s, %s) ON CONFLICT (order_id, n) DO UPDATE SET qty = excluded.qty",
                     (i % 3, rng.randint(1, 10), Decimal(rng.randint(0, 10**6)) / 1000))
    elif roll < 0.66:  # a composite key changes
        n = rng.randint(1, 10)
        conn.execute("UPDATE line SET n = %s WHERE order_id = %s AND n = %s "
                     "AND NOT EXISTS (SELECT FROM line o WHERE o.order_id = %s AND o.n = %s)", (n + 20, i % 3, n, i % 3, n + 20))
    elif roll < 0.72:
        conn.execute("DELETE FROM line WHERE order_id = %s AND n > %s", (i % 3, rng.randint(1, 8)))
    elif roll < 0.75:
        conn.execute("INSERT INTO bag VALUES (%s, 'x')", (i,))
    elif roll < 0.78:
        conn.execute("DELETE FROM bag WHERE v = %s", (i,))
    elif roll < 0.88 and "extra" in tracked:
        conn.execute("INSERT INTO extra VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET v = excluded.v", (i % 8, f"e{i}"))
    elif roll < 0.95 and "mover" in tracked:
        conn.execute("UPDATE mover SET v = %s WHERE id = %s", (f"v{i}", i % 7))
    elif roll < 0.97:
        conn.execute(f"TRUNCATE {rng.choice(['item', 'line'])}")


def _schema_change(conn: psycopg.Connection, step: int, tracked: set[str]) -> str | None:
    """The steps at which a table is created, moved in, moved out or back; the table to take a
    baseline of afterwards (a table moved in holds rows no change tells about)."""
    if step == 40:
        conn.execute("CREATE TABLE extra (id int PRIMARY KEY, v text)")  # tracked from creation: begins empty
        tracked.add("extra")
    elif step == 80:
        conn.execute("ALTER TABLE side.mover SET SCHEMA public")
        tracked.add("mover")
        return "public.mover"
    elif step == 120:
        conn.execute("ALTER TABLE extra SET SCHEMA side")  # a gap in extra's trail begins
        tracked.discard("extra")
    elif step == 125:
        conn.execute("UPDATE side.extra SET v = 'unseen'")
    elif step == 130:
        conn.execute("ALTER TABLE side.extra SET SCHEMA public")
        tracked.add("extra")
        return "public.extra"
    return None


@pytest.mark.parametrize("mode,separate", [("wal", False), ("wal", True), ("triggers", False)])
def test_as_of_equals_the_snapshots(db, other_db, mode, separate):
    db.execute(TABLES)
    destination = other_db.dsn if separate else None
    settings = load_settings(None, capture_mode=mode)
    before_install = db.execute("SELECT clock_timestamp()::text")[0][0]
    commands.install(db.dsn, destination, settings)
    rng = random.Random(14)
    tracked = {"item", "line"}
    moments: list[tuple[str, dict[str, dict[str, str] | None]]] = []
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        for step in range(STEPS):
            baseline = _schema_change(conn, step, tracked)
            if baseline is not None:
                commands.snapshot(db.dsn, destination, settings, [baseline])
            with conn.transaction():
                for _ in range(rng.randint(1, 3)):
                    _step(conn, rng, tracked)
            if step % 7 == 6:
                time.sleep(0.002)
                moments.append((conn.execute("SELECT clock_timestamp()::text").fetchone()[0], _snapshot(conn, tracked)))
                time.sleep(0.002)
        conn.execute("INSERT INTO item VALUES (1000, 0, NULL, NULL, NULL)")  # a last change, after every moment
    commands.poll_once(db.dsn, destination, settings)  # (trigger mode: the mover moves the queue)
    assert len(moments) == 30
    seen: dict[str, set[str]] = {t: set() for t in KEYS}
    for _, snap in moments:
        for t in KEYS:
            seen[t] |= set(snap[t] or ())
    checked = unknown = 0
    with psycopg.connect(destination or db.dsn, autocommit=True) as conn:
        for moment, snap in moments:
            for table in KEYS:
                expected = snap[table]
                if expected is None:  # before its tracking began, or in the gap
                    with pytest.raises(CannotSay, match="before tracking|gap"):
                        timetravel.as_of_all(conn, table, moment)
                    with pytest.raises(CannotSay, match="before tracking|gap"):
                        timetravel.as_of(conn, table, "1", moment)
                    unknown += 1
                    continue
                got = dict(conn.execute("SELECT primary_key, row_data::text FROM bemi.as_of_all(%s, %s)", (table, moment)))
                assert got == expected, (table, moment)
                if not separate:  # the typed form, by the same rules (the row type lives in the tracked database)
                    typed = conn.execute(f"SELECT count(*) FROM bemi.as_of(NULL::public.{table}, %s)", (moment,)).fetchone()[0]
                    assert typed == len(expected), (table, moment)
                for pk in sorted(seen[table]):
                    row = conn.execute("SELECT bemi.as_of(%s, %s, %s)::text", (table, pk, moment)).fetchone()[0]
                    assert row == expected.get(pk), (table, pk, moment)
                    checked += 1
            with pytest.raises(CannotSay, match="no primary key"):
                timetravel.as_of_all(conn, "bag", moment)
        for moment in (before_install, "infinity"):
            with pytest.raises(CannotSay):
                timetravel.as_of(conn, "item", "1", moment)
            with pytest.raises(CannotSay):
                timetravel.as_of_all(conn, "line", moment)
        if mode == "wal":  # a change the poller has not written: later moments cannot be known
            db.execute("UPDATE item SET price = -1 WHERE id = 1000")
            with pytest.raises(CannotSay, match="later than what the poller has written"):
                timetravel.as_of(conn, "item", "1000", db.execute("SELECT clock_timestamp()::text")[0][0])
    assert checked > 1500 and unknown >= 8, (checked, unknown)
