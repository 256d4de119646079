"""The hashes the poller computes for its seals (README "A sealed trail", "Who computes the
hashes"): for every change where it supplies one, the hash equals bemi.change_hash of the row the
destination holds; where it cannot be sure of the canonical text (a number jsonb prints otherwise,
a NaN patched afterwards, a context it cannot canonicalize, the pure path) it supplies none and
the server hashes; the trail verifies either way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from bemi_pg import commands
from bemi_pg.poller import Poller
from bemi_pg.stitch import UNSURE
from bemi_pg.wal2json import CONVERSION_ENV, compiled_available

from ..conftest import Database
from .test_fidelity import MATRIX, _write_matrix

DOCS_SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "verify_trail.py"

pytestmark = pytest.mark.skipif(not compiled_available(), reason="bemi_pg._fastrow is not built")

# Every value the compiled path converts, without a NULL that may be NaN (those transactions are
# the server's to hash); each row says in `expect` whether the poller can hash it.
HASHED = r"""
CREATE TABLE hashed (
  id integer PRIMARY KEY, expect text, t text, j json, jb jsonb, n numeric DEFAULT 0, f double precision DEFAULT 0, r real DEFAULT 0,
  ts timestamptz, tsz timestamp, d date, tm time, tmz timetz, iv interval, arr text[], narr numeric[], iarr int[],
  b bytea, u uuid, e mood, big text, "Weird Key" text, "é" integer, bo boolean, i8 bigint
);
CREATE TABLE quoted (id integer PRIMARY KEY, expect text DEFAULT 'no: a column name with an escape (the pure path)', "k""q" text);
"""

HASHED_ROWS = r"""
INSERT INTO hashed VALUES
 (0, 'yes', 'first (the one-row path)', '{}', '{}', 0, 0, 0, now(), now(), now(), now(), now(), '1 day', '{}', '{}', '{}',
  '\x', gen_random_uuid(), 'sad', 'x', 'w', 1, true, 1),
 (1, 'yes', E'quote " backslash \\ tab \t newline \n cr \r ctl \x01 del \x7f é 😀', '{"b": [1, 2.50, "x"], "a": null}',
  '{"nested": {"deep": [true, {"k": 1e3}]}, "": "", "aa": 1, "b": -1.5}', 1.50, 1.5, 0.25,
  '1999-12-31 23:59:59.5+02', '2024-01-02 03:04:05.678901', '2024-02-29', '23:59:59.999999', '10:00:00+05:30',
  '1 year 2 mons 3 days 04:05:06.7', ARRAY['a', NULL, 'b"c', 'd,e', '', 'NULL', E'\\'], '{1.10,-2,0.000}', '{{1,2},{3,4}}',
  '\xdeadbeef00', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'it''s "ok"',
  (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i), E'v\tw', -7, false, 9223372036854775807),
 (2, 'yes', '', E'{"k": "\\u00e9\\n\\"", "k": "last wins", "z": {"y": [], "x": {}}, "aa": 1.50, "b": "\\/"}',
  E'"just a string"', -0.000, 0.1, -3.5, '0044-03-15 10:00 BC', '0044-03-15 10:00 BC', '0044-03-15 BC', '00:00', '00:00-12',
  '-1 day', '{}', '{}', '{}', '\x', '00000000-0000-0000-0000-000000000000', 'happy', '', '', 0, NULL, -9223372036854775808),
 (3, 'yes', NULL, E'[\n\t1,\r\n 2, {"b": 1, "a": [true, false, null]}]', '[1, "two", {"three": 3}]', 0, 0, 0,
  'infinity', '-infinity', 'infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (4, 'no: a json number with an exponent', 't', '{"e": 1e5}', '{}', 1, 1, 1, now(), now(), now(), now(), now(), '1 day',
  '{}', '{}', '{}', '\x', gen_random_uuid(), 'sad', 'x', 'w', 1, true, 1),
 (5, 'no: a negative zero', 't', '{"z": -0}', '{}', 1, 1, 1, now(), now(), now(), now(), now(), '1 day',
  '{}', '{}', '{}', '\x', gen_random_uuid(), 'sad', 'x', 'w', 1, true, 1),
 (6, 'no: a float printed with an exponent', 't', '{}', '{}', 1, 1e300, 1, now(), now(), now(), now(), now(), '1 day',
  '{}', '{}', '{}', '\x', gen_random_uuid(), 'sad', 'x', 'w', 1, true, 1),
 (7, 'no: a surrogate pair escaped', 't', E'{"s": "\\ud83d\\ude00"}', '{}', 1, 1, 1, now(), now(), now(), now(), now(),
  '1 day', '{}', '{}', '{}', '\x', gen_random_uuid(), 'sad', 'x', 'w', 1, true, 1),
 (8, 'no: a double''s negative zero', 't', '{}', '{}', 1, '-0', 1, now(), now(), now(), now(), now(), '1 day',
  '{}', '{}', '{}', '\x', gen_random_uuid(), 'sad', 'x', 'w', 1, true, 1)
"""

# Contexts a client may send, in Bemi comments and through bemi.set_context; "no" where the
# canonical text of the context is not the poller's to be sure of.
CONTEXTS = [
    ("yes", 'INSERT INTO hashed (id, expect, t) VALUES (%s, %s, \'c\') /*Bemi {"user": "é\\n\\"\\\\", "b": 1, "b": 2, '
            '"n": 1.50, "deep": {"z": [1, {"y": null}], "a": "\\u00e9"}} Bemi*/'),
    ("yes", "INSERT INTO hashed (id, expect, t) SELECT %s, %s, 'c' FROM bemi.set_context("
            "'{\"request_id\": \"r-1\", \"user\": {\"id\": 7, \"roles\": [\"a\", \"b\"]}}')"),
    ("no: a context number with an exponent",
     'INSERT INTO hashed (id, expect, t) VALUES (%s, %s, \'c\') /*Bemi {"n": 1e5} Bemi*/'),
    ("no: a context's negative zero", 'INSERT INTO hashed (id, expect, t) VALUES (%s, %s, \'c\') /*Bemi {"n": -0} Bemi*/'),
    ("yes", 'INSERT INTO hashed (id, expect, t) VALUES (%s, %s, \'c\') /*Bemi not json at all Bemi*/'),
    ("yes", 'INSERT INTO hashed (id, expect, t) VALUES (%s, %s, \'c\') /*Bemi {"\\u0000": "nul"} Bemi*/'),
]


def _write(db: Database) -> None:
    db.execute(MATRIX)
    db.execute(HASHED)
    db.install()
    with db.connect(autocommit=True) as conn:
        conn.execute("SET TimeZone = 'Asia/Kolkata'")
        conn.execute(HASHED_ROWS)
        conn.execute("INSERT INTO quoted (id, \"k\"\"q\") VALUES (1, 'a'), (2, 'b'), (3, 'c')")
        with conn.transaction():
            conn.execute("SET LOCAL TimeZone = 'America/St_Johns'")
            conn.execute("UPDATE hashed SET t = coalesce(t, '') || E' \\u00e9dit\\t', i8 = i8 / 2 WHERE id <= 3")
            conn.execute("UPDATE hashed SET id = id + 100 WHERE id = 0")  # a moved key: the pure path's
            conn.execute("DELETE FROM hashed WHERE id = 2")
        for n, (expect, statement) in enumerate(CONTEXTS):
            with conn.transaction():
                # The run of the table's changes reaches these rows through the compiled path's runs.
                conn.execute("UPDATE hashed SET bo = NOT coalesce(bo, false) WHERE id = 1")
                conn.execute(statement, (200 + n, expect))
    _write_matrix(db)  # floats' and numerics' NULLs that may be NaN: the server hashes those transactions


def _poll(db: Database, batch_size: int) -> list[bytes]:
    poller = Poller(db.dsn, None, db.settings, batch_size=batch_size)
    poller.seals_supplied = []
    try:
        poller.start()
        poller.run_once()
    finally:
        poller.close()
    return poller.seals_supplied


def _supplied(seals: list[bytes]) -> dict[str, bytes | None]:
    entries: dict[str, bytes | None] = {}
    for seal in seals:
        for at in range(0, len(seal), 48):
            digest = seal[at + 16:at + 48]
            entries[seal[at:at + 16].hex()] = None if digest == UNSURE else digest
    return entries


def _server_hashes(db: Database) -> dict[str, tuple[object, ...]]:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SET client_encoding = 'UTF8'")
        rows = conn.execute("""
            SELECT replace(c.id::text, '-', ''), bemi.change_hash(c), c."table",
                   coalesce(c.after ->> 'expect', c.before ->> 'expect', ''), c.operation, c.primary_key, c.seq
              FROM changes c""").fetchall()
    return {r[0]: (bytes(r[1]), *r[2:]) for r in rows}


@pytest.mark.parametrize("batch_size", [1, 10_000])
def test_the_poller_supplies_exactly_the_servers_hashes(db: Database, monkeypatch: pytest.MonkeyPatch, batch_size: int) -> None:
    monkeypatch.setenv(CONVERSION_ENV, "compiled")
    _write(db)
    supplied = _supplied(_poll(db, batch_size))
    server = _server_hashes(db)
    assert supplied and set(supplied) <= set(server)
    wrong = [(i, server[i][1:]) for i, h in supplied.items() if h is not None and h != server[i][0]]
    assert wrong == []
    hashed = {i for i, h in supplied.items() if h is not None}
    # Each expected "no" fell back, and so did the matrix's transactions (NaN and Infinity are
    # patched after they are written); every "yes" was hashed here but the moved key's UPDATE
    # (the pure path's: it records where the key went).
    assert not [server[i] for i in hashed if str(server[i][2]).startswith("no")]
    assert not [i for i in hashed if server[i][1] == "matrix"]
    yes = [i for i, row in server.items() if row[1] == "hashed" and row[2] == "yes"]
    assert [server[i][1:] for i in yes if i not in hashed] == [("hashed", "yes", "UPDATE", "100", 4)]
    verdict = commands.verify(db.dsn, None, db.settings)
    assert verdict.intact, verdict.lines()
    source = db.execute("SELECT system_identifier::text || '/' || current_database() FROM pg_control_system()")[0][0]
    out = subprocess.run([sys.executable, str(DOCS_SCRIPT), db.dsn, source], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("intact"), out.stdout + out.stderr


def test_no_supplied_hashes_when_the_server_must_hash(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pure conversion supplies nothing; neither does a destination whose changes table has a
    trigger of another's (it could alter a row on its way in); the trail is sealed all the same."""
    monkeypatch.setenv(CONVERSION_ENV, "pure")
    _write(db)
    assert _supplied(_poll(db, 1)) == {}
    monkeypatch.setenv(CONVERSION_ENV, "compiled")
    db.execute("CREATE FUNCTION keep() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$")
    db.execute("CREATE TRIGGER keep BEFORE INSERT ON changes FOR EACH ROW EXECUTE FUNCTION keep()")
    db.execute("INSERT INTO hashed (id, expect) VALUES (1000, 'yes'), (1001, 'yes'), (1002, 'yes')")
    assert _supplied(_poll(db, 1)) == {}
    assert db.execute("SELECT count(*) FROM changes WHERE after ->> 'id' = '1002'") == [(1,)]
    verdict = commands.verify(db.dsn, None, db.settings)
    assert verdict.intact, verdict.lines()


def test_a_supplied_hash_for_a_change_the_table_does_not_hold_there_is_not_taken(db: Database) -> None:
    """bemi.seal_batch takes the n-th supplied hash only for the change the n-th entry names: a
    wrong or misplaced entry leaves the change to the server's hashing, never in the seal; a
    forged hash for the right change is sealed as given, and verify names the change."""
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.install()
    poller = Poller(db.dsn, None, db.settings)
    poller.seal = False  # the changes go in unsealed; the seals below are made by hand
    try:
        poller.start()
        db.execute("INSERT INTO t SELECT generate_series(1, 3)")
        db.execute("INSERT INTO t SELECT generate_series(4, 6)")
        poller.run_once()
    finally:
        poller.close()
    rows = db.execute("SELECT id, bemi.change_hash(c), commit_position FROM changes c ORDER BY commit_position, seq")
    ids, right = [r[0].bytes for r in rows], [bytes(r[1]) for r in rows]
    forged = b"\x01" * 32
    # The first transaction: entry 1 right (id, place), with a forged hash; entry 2 the third
    # change's id in the second place; entry 3 an id the table lacks.
    first = ids[0] + forged + ids[2] + right[2] + b"\x02" * 16 + right[2]
    # The second: every entry right but the last's hash, forged (the table is read for the ids alone).
    second = ids[3] + right[3] + ids[4] + right[4] + ids[5] + forged
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SELECT bemi.seal_batch(%s, %s, NULL, %s)", (db.source, rows[0][2], first))
        conn.execute("SELECT bemi.seal_batch(%s, %s, NULL, %s)", (db.source, rows[3][2], second))
        sealed = conn.execute("SELECT change_hashes FROM bemi.seal ORDER BY seal_no").fetchall()
    assert [[bytes(h) for h in s] for (s,) in sealed] == [[forged, right[1], right[2]], [right[3], right[4], forged]]
    verdict = commands.verify(db.dsn, None, db.settings)
    problems = "\n".join(verdict.problems)
    assert not verdict.intact and str(rows[0][0]) in problems and str(rows[5][0]) in problems, problems
