"""Context values that jsonb refuses (NaN, ±Infinity, \\u0000, lone surrogates, numbers beyond
numeric's range): recorded with ``_bemi_error`` in both modes, never a batch the destination refuses."""

from __future__ import annotations

import json

import pytest

from bemi_pg.stitch import context_json

HOSTILE = [
    '{"a": NaN}',
    '{"a": Infinity}',
    '{"a": [-Infinity]}',
    '{"a": "\\u0000"}',
    '{"a": "\\ud800"}',
    '{"\\udc00": 1}',
    '{"a": 1e131072}',
    '{"a": 1e-16384}',
    '{"a": 0.0e-16383}',
]
FINE = [
    '{"a": "\\ud83d\\ude00", "b": "\\\\u0000"}',
    '{"a": 1e4000, "b": 1e-16383, "c": 0e200000}',
]


def _statements() -> list[tuple[str, str]]:
    """(setup, write) pairs: each value as a session context and as a statement's comment."""
    out = []
    for n, value in enumerate(HOSTILE + FINE):
        out.append((f"SELECT bemi_set_context($${value}$$)", f"INSERT INTO t VALUES ({2 * n})"))
        out.append(("SELECT bemi_set_context(NULL)", f"INSERT INTO t VALUES ({2 * n + 1}) /*Bemi {value} Bemi*/"))
    return out


def _record(db, mode: str) -> dict[int, dict]:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.install(capture_mode=mode, database_keys="never")
    with db.connect(autocommit=True) as conn:
        for setup, write in _statements():
            conn.execute(setup)
            conn.execute(write)  # never raises
    db.poll()
    db.poll()  # the slot moved on (the queue is empty): nothing is read twice, nothing is stuck
    return {c["after"]["id"]: c["context"] for c in db.changes()}


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_values_jsonb_refuses_are_errors_in_the_context(db, mode):
    got = _record(db, mode)
    assert sorted(got) == list(range(2 * len(HOSTILE + FINE)))
    for n, value in enumerate(HOSTILE):
        for id_, source in ((2 * n, "session"), (2 * n + 1, "comment")):
            assert got[id_] == {"_bemi_error": [{"source": source, "error": "context is not valid JSON",
                                                 "value": value}]}, value
    fine = len(HOSTILE)
    assert got[2 * fine] == got[2 * fine + 1] == {"a": "\U0001F600", "b": "\\u0000"}
    assert got[2 * fine + 2]["c"] == 0 and got[2 * fine + 2]["a"] == 10**4000


def test_both_modes_agree_on_what_is_an_error(db, other_db):
    assert _record(db, "wal") == _record(other_db, "triggers")


BOUNDS = ['{"a": 1e131071}', '{"a": 0.1e131072}', '{"a": %s}' % ("9" * 131072), '{"a": %s}' % ("9" * 131073),
          '{"a": 0.%s}' % ("0" * 16383), '{"a": 0.%s}' % ("0" * 16384), '{"a": 1.0e-16383}', '{"a": 0e-20000}']
CASES = [[value, None, None, None, None, None] for value in HOSTILE + FINE + BOUNDS] + [
    [None, None, f"SELECT 1 /*Bemi {value} Bemi*/", None, None, False] for value in HOSTILE + FINE] + [
    [None, '{"a": 1}', "SELECT 1 /*Bemi %7B%22a%22%3A%22%00%22%7D Bemi*/", None, None, False],  # a NUL once decoded
    [None, None, "SELECT 1 /*Bemi %7B%22a%22%3A%22%FF%22%7D Bemi*/", None, None, False],  # not UTF-8 once decoded
    [None, '{"n": 0.10000000000000000000001, "big": 123456789012345678901234567890}',
     'SELECT 1 /*Bemi {"m": 1e400} Bemi*/', None, None, False],  # merged: numbers keep their digits
    [None, None, None, ["GET", "/x", '{"sub": "\\u0000"}', '{"x-bemi-context": "{\\"a\\": NaN}"}'], None, None],
]


def test_the_pollers_rules_are_trigger_modes_for_hostile_values(db):
    db.install(capture_mode="triggers", database_keys="never")
    with db.connect(autocommit=True) as conn:
        for parts in CASES:
            text = context_json(json.dumps(parts), 1_048_576, "never")
            # what the poller writes, as the destination's jsonb reads it (compared there: some
            # numbers have more digits than Python's int() takes)
            same = conn.execute("SELECT bemi.context_of(%s, %s, %s, %s::json, NULL, %s) = %s::jsonb",
                                [*parts[:3], json.dumps(parts[3]) if parts[3] is not None else None, parts[5],
                                 text]).fetchone()[0]
            assert same, parts
