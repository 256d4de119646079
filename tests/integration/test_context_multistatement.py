"""A ``/*Bemi … Bemi*/`` comment that ends a string of several statements (the simple query
protocol: psql -c, a migration file sent whole) applies to every statement of the string, in both
capture modes; one that ends an earlier statement of the string applies to none."""

from __future__ import annotations

import pytest

STRINGS = [
    # (the string, the context each of its changes is recorded with)
    ("INSERT INTO t VALUES (1); UPDATE t SET n = 2 WHERE id = 1 /*Bemi {\"job\": \"all\"} Bemi*/",
     [{"job": "all"}, {"job": "all"}]),
    ("INSERT INTO t VALUES (3); INSERT INTO t VALUES (4); /*Bemi {\"job\": \"after the last ;\"} Bemi*/ ;",
     [{"job": "after the last ;"}, {"job": "after the last ;"}]),
    ("INSERT INTO t VALUES (5) /*Bemi {\"job\": \"first only?\"} Bemi*/; INSERT INTO t VALUES (6)", [{}, {}]),
    ("INSERT INTO t VALUES (7); SELECT '/*Bemi {\"forged\": 1} Bemi*/'", [{}]),
    ("SELECT bemi.set_context('{\"tx\": 1}'); INSERT INTO t VALUES (8) /*Bemi {\"job\": \"both\"} Bemi*/",
     [{"tx": 1, "job": "both"}]),
]


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_a_comment_ending_a_multi_statement_string_applies_to_each_statement(db, mode):
    db.execute("CREATE TABLE t (id int PRIMARY KEY, n int)")
    db.install(capture_mode=mode, database_keys="never")
    with db.connect(autocommit=True) as conn:
        for text, _ in STRINGS:
            conn.execute(text)  # no parameters: psycopg sends it with the simple query protocol, as one string
    db.poll()
    got = [r[0] for r in db.execute("SELECT context FROM changes ORDER BY committed_at, seq")]
    assert got == [ctx for _, contexts in STRINGS for ctx in contexts]
