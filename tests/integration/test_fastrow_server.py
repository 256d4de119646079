"""The compiled conversion against the pure one on what a real wal2json writes for random values.

tests/unit/test_fastrow_fuzz.py builds wal2json's rows itself; here the server does: random values of
every type there (those the server takes), in tables with REPLICA IDENTITY FULL, a default identity
with key changes, no key, a composite key and a TOASTed column left out of UPDATEs, decoded with the
poller's options in the poller's time zone (UTC) and in zones with odd offsets. Both paths must give
the same COPY fields for each row (Paths.check, strict).
"""

from __future__ import annotations

import json
import random
from typing import Any

import psycopg

from bemi_pg.queries import query
from bemi_pg.stitch import TransactionState
from bemi_pg.wal2json import TypeRegistry, fast_converter, fast_lines
from tests.unit import test_fastrow_fuzz as fuzz

pytestmark = fuzz.pytestmark

OPTIONS = ["format-version", "2", "include-xids", "1", "include-timestamp", "1", "include-lsn", "1", "include-type-oids", "1",
           "include-pk", "1", "include-typmod", "0"]
SETUP = """
CREATE TYPE mood AS ENUM ('happy', 'sad', 'it''s "ok"', '😀 x', '');
CREATE TYPE comp AS (a text, b text, c text);
CREATE DOMAIN dnum AS numeric;
CREATE DOMAIN dtext AS text;
"""
NAMES = {16400: "mood", 16401: "mood[]", 16402: "comp", 16403: "comp[]", 16404: "dnum", 16405: "dtext", 16406: "dnum[]"}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def test_server_rows_convert_alike(db):
    rng = random.Random(1)
    with db.connect(autocommit=True) as conn:
        conn.execute(SETUP)
        conn.execute("SELECT setseed(0.25)")  # the rows the UPDATEs and DELETEs pick (random()) are the same each run
        names = {oid: NAMES.get(oid) or conn.execute("SELECT format_type(%s, NULL)", (oid,)).fetchone()[0] for oid in fuzz.TYPES}
        cols = [(f"c{i}_{fuzz._TO_ESCAPE.sub('', fuzz.rand_text(rng, 4))}", oid) for i, oid in enumerate(fuzz.TYPES)]
        quoted = [_quote(n) for n, _ in cols]
        defs = ", ".join(f"{q} {names[o]}" for q, (_, o) in zip(quoted, cols, strict=True))
        conn.execute(f"CREATE TABLE full_t (id bigint PRIMARY KEY, {defs}); ALTER TABLE full_t REPLICA IDENTITY FULL")
        conn.execute(f"CREATE TABLE dflt_t (id text PRIMARY KEY, {defs})")
        conn.execute(f"CREATE TABLE keyless_t ({defs})")
        conn.execute(f"CREATE TABLE comp_t (a int, b text, {defs}, PRIMARY KEY (b, a))")
        conn.execute('CREATE TABLE "Ünï ""q""" (id int PRIMARY KEY, "日本" text, big text)')
        conn.execute('CREATE TABLE "we""ird\\name" ("a""b" int PRIMARY KEY, "c\\d" text)')
        conn.execute("SELECT pg_create_logical_replication_slot('fuzz', 'wal2json')")

        def valid(oid: int, text: str | None) -> str | None:
            """text if the server takes it as a value of the type, else None (a NULL)."""
            if text is None:
                return None
            try:
                with conn.transaction():
                    conn.execute(f"SELECT %s::{names[oid]}", (text,))
                return text
            except psycopg.Error:
                return None

        def value(oid: int) -> str | None:
            if rng.random() < 0.15:
                return None
            if oid in (700, 701, 1700, 16404) and rng.random() < 0.2:
                return rng.choice(["NaN", "Infinity", "-Infinity"])
            raw = fuzz.rand_value(rng, oid)
            text: Any = json.loads(raw) if raw.startswith('"') else (None if raw == "null" else raw)
            return valid(oid, text)

        casts = ", ".join(f"%s::{names[o]}" for _, o in cols)
        columns = ", ".join(quoted)
        pick = "WHERE ctid = (SELECT ctid FROM {0} ORDER BY random() LIMIT 1)"
        for i in range(40):
            values = [value(o) for _, o in cols]
            conn.execute(f"INSERT INTO full_t (id, {columns}) VALUES (%s, {casts})", [i, *values])
            conn.execute(f"INSERT INTO dflt_t (id, {columns}) VALUES (%s, {casts})", [fuzz.rand_text(rng, 6) + str(i), *values])
            conn.execute(f"INSERT INTO keyless_t ({columns}) VALUES ({casts})", values)
            conn.execute(f"INSERT INTO comp_t (a, b, {columns}) VALUES (%s, %s, {casts})", [i, fuzz.rand_text(rng, 3), *values])
            for table in ("full_t", "dflt_t", "comp_t"):
                k = rng.randrange(len(cols))
                conn.execute(f"UPDATE {table} SET {quoted[k]} = %s::{names[cols[k][1]]} {pick.format(table)}", (value(cols[k][1]),))
            if rng.random() < 0.2:
                conn.execute(f"UPDATE dflt_t SET id = id || 'x' {pick.format('dflt_t')}")
                conn.execute(f"UPDATE comp_t SET a = a + 1000 {pick.format('comp_t')}")
            if rng.random() < 0.3:
                for table in ("full_t", "dflt_t", "comp_t"):
                    conn.execute(f"DELETE FROM {table} {pick.format(table)}")
        big = "".join(chr(rng.randint(0x20, 0x7E)) for _ in range(300_000))  # TOASTed, left out of the UPDATE
        conn.execute('INSERT INTO "Ünï ""q""" VALUES (1, %s, %s)', ("x", big))
        conn.execute('UPDATE "Ünï ""q""" SET "日本" = %s', (fuzz.rand_text(rng, 30),))
        conn.execute('DELETE FROM "Ünï ""q"""')
        conn.execute('INSERT INTO "we""ird\\name" VALUES (1, %s)', (fuzz.rand_text(rng, 10),))

        def loader(oids: list[int]) -> list[tuple[int, str, str, int, str, int]]:
            rows = conn.execute(query("types"), {"oids": oids}).fetchall()
            return [(int(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]), int(r[5])) for r in rows]

        # the poller's zone and options (no type names), and zones with odd offsets, with type names
        for zone, types in (("UTC", "0"), ("Asia/Kolkata", "1"), ("America/St_Johns", "0")):
            conn.execute(f"SET TimeZone = '{zone}'")
            paths = fuzz.Paths()
            pure, compiled = TypeRegistry(loader), TypeRegistry(loader)
            paths.convert = fast_converter(compiled)
            paths.pure_state = TransactionState("1/db", "db", pure, fuzz.BEGIN, 1000, fuzz.key_order)
            paths.compiled_state = TransactionState("1/db", "db", compiled, fuzz.BEGIN, 1000, fuzz.key_order)
            paths.lines = fast_lines(paths.convert)
            paths.runs_state = TransactionState("1/db", "db", compiled, fuzz.BEGIN, 1000, fuzz.key_order)
            rows = conn.execute("SELECT convert_to(data, 'UTF8') FROM pg_logical_slot_peek_changes('fuzz', NULL, NULL, "
                                + ", ".join("%s" for _ in OPTIONS) + ", 'include-types', %s)", [*OPTIONS, types]).fetchall()
            assert len(rows) > 400
            for (data,) in rows:
                paths.check(bytes(data))
            assert paths.taken > 120  # the compiled path takes most rows (the rest: composite keys, names to escape)
