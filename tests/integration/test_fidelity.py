"""before/after equal to_jsonb(row) of the row as committed, for every type in the matrix."""

from __future__ import annotations

import pytest

from bemi_pg.poller import Poller
from bemi_pg.stitch import CONTEXT_PREFIX, TransactionState
from bemi_pg.wal2json import CONVERSION_ENV, Begin, Change, Converted, Message, compiled_available, fast_converter, fast_lines, parse_row

PATHS = ["compiled", "pure"] if compiled_available() else ["pure"]


@pytest.fixture(params=PATHS)
def conversion(request, monkeypatch):
    """Each test runs on the compiled conversion and on the pure-Python one."""
    monkeypatch.setenv(CONVERSION_ENV, request.param)
    return request.param

MATRIX = """
CREATE TYPE mood AS ENUM ('happy', 'sad', 'it''s "ok"');
CREATE TABLE matrix (
  id integer PRIMARY KEY,
  c_smallint smallint, c_integer integer, c_bigint bigint,
  c_numeric numeric, c_numeric_nan numeric, c_numeric_inf numeric, c_real real, c_double double precision,
  c_double_inf double precision, c_double_ninf double precision, c_boolean boolean,
  c_text text, c_varchar varchar(20), c_char char(5), c_uuid uuid,
  c_date date, c_date_inf date, c_time time, c_timetz timetz, c_timestamp timestamp(6), c_timestamptz timestamptz,
  c_interval interval, c_json json, c_jsonb jsonb, c_text_arr text[], c_int_arr int[], c_2d int[][],
  c_bytea bytea, c_enum mood, c_numeric_arr numeric[], c_ts_arr timestamptz[], c_big_text text,
  c_int2vector int2vector, c_oidvector oidvector, c_vector_arr int2vector[], c_bounds int[], c_range_arr int4range[],
  c_box_arr box[]
);
CREATE SCHEMA snapshots;
CREATE TABLE snapshots.snap (id integer, phase text, doc jsonb);
"""

ROWS = """
INSERT INTO matrix VALUES
 (1, -32768, 2147483647, 9007199254740993,
  123456789012345678901234567890.123456789012, 'NaN', 'Infinity', 3.14159, 1.0000000000000002e-300,
  'Infinity', '-Infinity', true,
  E'quote " backslash \\\\ tab \\t newline \\n unicode \u00e9', 'varchar', 'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '2024-02-29', 'infinity', '23:59:59.999999', '10:00:00+05:30', '2024-01-02 03:04:05.678901', '1999-12-31 23:59:59.5+02',
  '1 year 2 mons 3 days 04:05:06.7', '{"b": [1, 2.50, "x"], "a": null}', '{"nested": {"deep": [true, {"k": 1e3}]}}',
  ARRAY['a', NULL, 'b"c', 'd,e', '', 'NULL'], '{1,2,3}', '{{1,2},{3,4}}',
  '\\xdeadbeef00', 'it''s "ok"', '{NaN,1.10,-Infinity}', ARRAY['2020-01-01 00:00+00'::timestamptz, NULL],
  (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i),
  '1 -2 3', '4 5', ARRAY['1 2'::int2vector, '3'], '[2:3][0:0]={{1},{NULL}}', ARRAY['[1,3)'::int4range, 'empty', NULL],
  ARRAY[box '((1,2),(3,4))', box '((0,0),(1,1))']),
 (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (3, 0, 0, -9223372036854775808, -0.000000000000000000000000000001, 1, '-Infinity', 'NaN', 'NaN', 0, -0.0, false,
  '', '', '', '00000000-0000-0000-0000-000000000000', '0044-03-15 BC', '-infinity', '00:00', '00:00-12',
  '0044-03-15 10:00 BC', 'infinity', '-1 day', E'[\\n\\t1,\\r\\n 2]', '"just a string"', '{}', '{}', '{}', '\\x', 'happy',
  '{}', '{}', 'short', '', '', '{}', '[5:5]={7}', '{}', '{}');
"""


def _snapshot(conn, phase):
    conn.execute("SET TimeZone = 'UTC'")
    conn.execute("INSERT INTO snapshots.snap SELECT id, %s, to_jsonb(m) FROM matrix m", (phase,))


def _write_matrix(db):
    with db.connect(autocommit=True) as conn:
        conn.execute(ROWS)
        _snapshot(conn, "inserted")
        # An UPDATE that leaves the TOASTed column untouched: it must still be in `after`.
        conn.execute("UPDATE matrix SET c_integer = coalesce(c_integer, 0) - 1, c_numeric_nan = 'Infinity' WHERE id IN (1, 3)")
        conn.execute("UPDATE matrix SET c_text = 'was null' WHERE id = 2")
        _snapshot(conn, "updated")
        conn.execute("DELETE FROM matrix")


def test_before_and_after_equal_to_jsonb_of_the_row(db, conversion):
    db.execute(MATRIX)
    db.install()
    _write_matrix(db)
    # (jsonb_populate_record does not take int2vector's JSON back: the value is read as text.)
    toast = db.execute("SELECT octet_length(s.doc ->> 'c_big_text') FROM snapshots.snap s WHERE s.id = 1 AND phase = 'inserted'")
    assert toast[0][0] == 12800
    db.poll()

    ops = db.execute("SELECT operation, count(*) FROM changes GROUP BY 1 ORDER BY 1")
    assert ops == [("CREATE", 3), ("DELETE", 3), ("UPDATE", 3)]
    mismatches = db.execute("""
        SELECT c.operation, c.primary_key, k.key, c.after -> k.key AS got, s.doc -> k.key AS want
          FROM changes c
          JOIN snapshots.snap s ON s.id = c.primary_key::int
           AND s.phase = CASE c.operation WHEN 'CREATE' THEN 'inserted' ELSE 'updated' END
          CROSS JOIN LATERAL jsonb_object_keys(s.doc) k(key)
         WHERE c.operation IN ('CREATE', 'UPDATE') AND (c.after -> k.key) IS DISTINCT FROM (s.doc -> k.key)
        UNION ALL
        SELECT c.operation, c.primary_key, k.key, c.before -> k.key, s.doc -> k.key
          FROM changes c
          JOIN snapshots.snap s ON s.id = c.primary_key::int
           AND s.phase = CASE c.operation WHEN 'UPDATE' THEN 'inserted' ELSE 'updated' END
          CROSS JOIN LATERAL jsonb_object_keys(s.doc) k(key)
         WHERE c.operation IN ('UPDATE', 'DELETE') AND (c.before -> k.key) IS DISTINCT FROM (s.doc -> k.key)
    """)
    assert mismatches == []
    whole = db.execute("""
        SELECT count(*) FROM changes c JOIN snapshots.snap s ON s.id = c.primary_key::int
         WHERE (c.operation = 'CREATE' AND s.phase = 'inserted' AND c.after = s.doc)
            OR (c.operation = 'UPDATE' AND s.phase = 'updated' AND c.after = s.doc)
            OR (c.operation = 'DELETE' AND s.phase = 'updated' AND c.before = s.doc AND c.after = '{}')
    """)
    assert whole == [(9,)]
    # Spot checks of the values most easily got wrong.
    row = db.execute("SELECT after FROM changes WHERE operation = 'CREATE' AND primary_key = '1'")[0][0]
    assert row["c_numeric_nan"] == "NaN" and row["c_double_ninf"] == "-Infinity"
    assert row["c_bytea"] == "\\xdeadbeef00" and row["c_text_arr"][1] is None
    assert row["c_int2vector"] == [1, -2, 3] and row["c_oidvector"] == ["4", "5"] and row["c_vector_arr"] == [[1, 2], [3]]
    assert row["c_bounds"] == [[1], [None]]
    text = db.execute("SELECT after->>'c_bigint', after->>'c_numeric' FROM changes WHERE operation = 'CREATE' AND primary_key = '1'")
    assert text == [("9007199254740993", "123456789012345678901234567890.123456789012")]


def _copy_lines(poller, rows, path):
    """The COPY text the poller would send for these slot rows, on one conversion path: ``pure``,
    ``compiled`` one row at a time, or ``runs`` as the poller's batch loop takes them (a table's
    changes after its first in whole lines, TransactionState.take_lines); and how many rows the
    compiled conversion took."""
    convert = fast_converter(poller.types) if path != "pure" else None
    lines = fast_lines(convert) if path == "runs" else None
    text, state, converted, run, at = bytearray(), None, 0, None, 0
    tail = "2026-12-03T00:00:00+00:00"
    while at < len(rows):
        if lines is not None and state is not None and run is not None:
            start = at
            at, _ = state.take_lines(lines, rows, at, run, run, state.copy_tail(tail), text, 2, 1 << 20)  # 2: runs cut short too
            converted += at - start
            if at > start:
                continue
        event = (convert and convert(rows[at])) or parse_row(rows[at])
        at += 1
        if isinstance(event, (Change, Converted)) and state is not None:
            converted += isinstance(event, Converted)
            text += state.on_change(event).copy_line(state.copy_tail(tail))
            run = (event.schema, event.table) if isinstance(event, Converted) else run
        elif isinstance(event, Begin):
            state = TransactionState(poller.source_id, poller.database, poller.types, event, 1 << 20)
        elif isinstance(event, Message) and state is not None and event.prefix == CONTEXT_PREFIX:
            state.on_message(event.content)
    return bytes(text).splitlines(keepends=True), converted


@pytest.mark.skipif(not compiled_available(), reason="bemi_pg._fastrow is not built")
def test_compiled_and_pure_conversion_give_byte_equal_copy_lines(db):
    db.execute(MATRIX)
    db.execute("""CREATE TABLE odd (id text PRIMARY KEY, note text, doc jsonb, tags varchar[], f real[], b boolean[],
                  t timestamptz, ts timestamp[], n numeric)""")
    db.execute('CREATE TABLE "we""ird" ("col ""x""" text PRIMARY KEY)')  # names with escapes: the pure path
    db.install()
    _write_matrix(db)
    with db.connect(autocommit=True) as conn:
        conn.execute("""INSERT INTO odd VALUES
            (E'k\\"1', E'a\tb', '{"k": "\\u00e9 \\"q\\"", "n": [1.50, null]}', ARRAY['x y', NULL, '', E'q\\"', 'NULL', E'\u00e9'],
             '{1.5,NaN,-Infinity}', '{t,f,NULL}', '2024-01-01 10:00+05:30', ARRAY['2024-01-01 00:00'::timestamp], 'NaN'),
            ('k2', NULL, NULL, '{}', NULL, '{{t},{f}}', '0044-03-15 10:00+00 BC', NULL, 1e-20)""")
        conn.execute("UPDATE odd SET n = n + 1")
        conn.execute("DELETE FROM odd WHERE id = 'k2'")
        conn.execute("""INSERT INTO "we""ird" VALUES ('w')""")
        with conn.transaction():  # runs of a table cut by another table's change, a context and a moved key
            conn.execute("INSERT INTO odd (id, note) SELECT 'r' || g, 'n' FROM generate_series(1, 5) g")
            conn.execute("SELECT bemi.set_context('{\"user\": 1}')")
            conn.execute("INSERT INTO odd (id, note) VALUES ('r6', E'x\\ty')")
            conn.execute("INSERT INTO snapshots.snap VALUES (9, 'p', '{}')")
            conn.execute("UPDATE odd SET note = 'm' WHERE id IN ('r1', 'r2')")
            conn.execute("UPDATE odd SET id = 'moved' WHERE id = 'r3'")
            conn.execute("DELETE FROM odd WHERE id LIKE 'r%'")
    with Poller(db.dsn, None, db.settings) as poller:
        with poller.source.transaction():
            rows = [bytes(r[0], "utf-8") for r in poller.source.execute(
                "SELECT data FROM pg_logical_slot_peek_changes(%s, NULL, NULL, VARIADIC %s::text[])",
                (poller.slot, poller.options))]
        pure, _ = _copy_lines(poller, rows, "pure")
        compiled, converted = _copy_lines(poller, rows, "compiled")
        runs, converted_in_runs = _copy_lines(poller, rows, "runs")
    # the matrix's 9 changes, 6 of snapshots.snap, 5 of odd, 1 of "we""ird", then 6 + 1 + 2 + 1 + 5 in one transaction
    assert len(pure) == 21 + 15
    assert converted == converted_in_runs == 20 + 14  # all but the row of "we""ird" and the UPDATE that moved a key
    assert compiled == pure
    assert runs == pure
    assert b'{"user": 1}' in pure[-1] and b'{"user": 1}' not in pure[-15]  # the context set inside the transaction
