"""A randomized model test of as-of on tables that held rows before install (issue 14, part of
"Done when"): inserts, updates, deletes and truncates, to_jsonb snapshots of every table at 30
moments, compared with single-row as-of for every key ever seen and with as_of_all, in both
capture modes and with the destination in the same and in another database.

Not covered yet: UPDATEs of the key, tables added or moved into the schema later, keyless tables."""

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
CREATE TABLE item (id int PRIMARY KEY, price numeric, tags text[], doc jsonb, seen timestamptz);
CREATE TABLE line (order_id int, n int, qty numeric(12, 3), PRIMARY KEY (order_id, n));
INSERT INTO item SELECT i, i * 1.25, ARRAY['a' || i], jsonb_build_object('i', i), '2024-01-01 00:00+02'
  FROM generate_series(1, 12) AS i;
INSERT INTO line SELECT i % 3, i, i / 7.0 FROM generate_series(1, 9) AS i;
"""

KEYS = {"item": "id::text", "line": "jsonb_build_array(order_id, n)::text"}


def _snapshot(conn: psycopg.Connection) -> dict[str, dict[str, str]]:
    return {t: dict(conn.execute(f"SELECT {k}, to_jsonb(x)::text FROM {t} x").fetchall()) for t, k in KEYS.items()}


def _step(conn: psycopg.Connection, rng: random.Random) -> None:
    i = rng.randint(1, 16)
    roll = rng.random()
    if roll < 0.3:
        conn.execute("INSERT INTO item VALUES (%s, %s, %s, '{\"x\": [1, 2.50]}', now()) ON CONFLICT (id) DO UPDATE "
                     "SET price = excluded.price, tags = excluded.tags", (i, Decimal(rng.randint(0, 10**9)) / 10**4, [str(i), None]))
    elif roll < 0.5:
        conn.execute("UPDATE item SET doc = jsonb_build_object('n', %s::numeric) WHERE id = %s", (Decimal(rng.randint(0, 999)) / 7, i))
    elif roll < 0.62:
        conn.execute("DELETE FROM item WHERE id = %s", (i,))
    elif roll < 0.8:
        conn.execute("INSERT INTO line VALUES (%s, %s, %s) ON CONFLICT (order_id, n) DO UPDATE SET qty = excluded.qty",
                     (i % 3, rng.randint(1, 10), Decimal(rng.randint(0, 10**6)) / 1000))
    elif roll < 0.95:
        conn.execute("DELETE FROM line WHERE order_id = %s AND n > %s", (i % 3, rng.randint(1, 8)))
    else:
        conn.execute(f"TRUNCATE {rng.choice(list(KEYS))}")


@pytest.mark.parametrize("mode,separate", [("wal", False), ("wal", True), ("triggers", False)])
def test_as_of_equals_the_snapshots(db, other_db, mode, separate):
    db.execute(TABLES)
    destination = other_db.dsn if separate else None
    settings = load_settings(None, capture_mode=mode)
    before_install = db.execute("SELECT clock_timestamp()::text")[0][0]
    commands.install(db.dsn, destination, settings)
    rng = random.Random(14)
    moments: list[tuple[str, dict[str, dict[str, str]]]] = []
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        for step in range(150):
            with conn.transaction():
                for _ in range(rng.randint(1, 3)):
                    _step(conn, rng)
            if step % 5 == 4:
                time.sleep(0.002)
                moments.append((conn.execute("SELECT clock_timestamp()::text").fetchone()[0], _snapshot(conn)))
                time.sleep(0.002)
        conn.execute("INSERT INTO item VALUES (100, 0, NULL, NULL, NULL)")  # a last change, after every moment
    commands.poll_once(db.dsn, destination, settings)
    seen: dict[str, set[str]] = {t: set() for t in KEYS}
    for _, snap in moments:
        for t in KEYS:
            seen[t] |= set(snap[t])
    checked = 0
    with psycopg.connect(destination or db.dsn, autocommit=True) as conn:
        for moment, snap in moments:
            for table in KEYS:
                got = dict(conn.execute("SELECT primary_key, row_data::text FROM bemi.as_of_all(%s, %s)", (table, moment)))
                assert got == snap[table], (table, moment)
                for pk in sorted(seen[table]):
                    row = conn.execute("SELECT bemi.as_of(%s, %s, %s)::text", (table, pk, moment)).fetchone()[0]
                    assert row == snap[table].get(pk), (table, pk, moment)
                    checked += 1
        for moment in (before_install, "infinity"):
            with pytest.raises(CannotSay):
                timetravel.as_of(conn, "item", "1", moment)
            with pytest.raises(CannotSay):
                timetravel.as_of_all(conn, "line", moment)
    assert checked > 500
