"""The Python helpers: transaction-local context that a pooled connection never carries over."""

from __future__ import annotations

import psycopg
import pytest

import bemi_pg
from bemi_pg.errors import BemiError


def test_two_clients_alternating_through_pgbouncer_are_never_misattributed(db, pgbouncer):
    db.execute("CREATE TABLE item (id bigserial PRIMARY KEY, client text, i int)")
    db.install(database_keys="never")
    dsn = pgbouncer.dsn(db.name)
    # prepare_threshold=None: pgbouncer 1.18 in transaction mode does not keep prepared statements.
    a = psycopg.connect(dsn, autocommit=True, prepare_threshold=None)
    b = psycopg.connect(dsn, autocommit=True, prepare_threshold=None)
    try:
        for i in range(1000):
            for name, conn in (("A", a), ("B", b)):
                if i % 10 == 9:  # now and then a statement in autocommit, context in its comment
                    conn.execute(bemi_pg.annotate("INSERT INTO item (client, i) VALUES (%s, %s)", {"client": name, "i": i}),
                                 (name, i))
                elif i % 10 == 8:  # and one with no context at all: nothing may leak into it
                    conn.execute("INSERT INTO item (client, i) VALUES (%s, %s)", (name, i))
                else:
                    with bemi_pg.transaction(conn, {"client": name, "i": i}):
                        conn.execute("INSERT INTO item (client, i) VALUES (%s, %s)", (name, i))
        backends = {conn.execute("SELECT pg_backend_pid()").fetchone()[0] for conn in (a, b)}
    finally:
        a.close()
        b.close()
    assert len(backends) == 1  # both clients really shared one server connection
    db.poll()
    rows = db.execute("""
        SELECT count(*) FILTER (WHERE context->>'client' IS DISTINCT FROM after->>'client'
                                  AND (after->>'i')::int % 10 <> 8),
               count(*) FILTER (WHERE (after->>'i')::int % 10 = 8 AND context <> '{}'),
               count(*) FILTER (WHERE (context->>'i')::int IS DISTINCT FROM (after->>'i')::int
                                  AND (after->>'i')::int % 10 <> 8),
               count(*)
          FROM changes""")
    assert rows == [(0, 0, 0, 2000)]


def test_set_context_needs_a_transaction(db):
    db.execute("CREATE TABLE item (id bigserial PRIMARY KEY)")
    db.install()
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        with pytest.raises(BemiError, match="needs an open transaction"):
            bemi_pg.set_context(conn, {"a": 1})
    with psycopg.connect(db.dsn) as conn:  # not autocommit: a transaction opens on first use
        bemi_pg.set_context(conn, {"a": 1})
        conn.execute("INSERT INTO item DEFAULT VALUES")
        conn.commit()
    db.poll()
    assert db.changes()[0]["context"] == {"a": 1}


def test_sql_comment_survives_hostile_values(db):
    db.execute("CREATE TABLE item (id bigserial PRIMARY KEY, note text)")
    db.install(database_keys="never")
    hostile = {"note": "*/ DROP TABLE item; /* 100% -- \u00e9 \\ \" '", "nested": {"a": [1, None]}}
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute(bemi_pg.annotate("INSERT INTO item (note) VALUES (%s);", hostile), ("x",))
        conn.execute(bemi_pg.annotate("INSERT INTO item (note) VALUES ('y')", hostile))
    db.poll()
    assert [c["context"] for c in db.changes()] == [hostile, hostile]
    assert db.execute("SELECT count(*) FROM item") == [(2,)]


def test_psycopg2_connections_too(db):
    psycopg2 = pytest.importorskip("psycopg2")
    db.execute("CREATE TABLE item (id bigserial PRIMARY KEY)")
    db.install(database_keys="never")
    conn = psycopg2.connect(db.dsn)
    try:
        with bemi_pg.transaction(conn, {"driver": "psycopg2"}):
            conn.cursor().execute("INSERT INTO item DEFAULT VALUES")
        bemi_pg.set_context(conn, {"driver": "psycopg2", "how": "set_context"})
        conn.cursor().execute("INSERT INTO item DEFAULT VALUES")
        conn.commit()
        conn.cursor().execute("INSERT INTO item DEFAULT VALUES")  # the next transaction: nothing carried over
        conn.commit()
        conn.autocommit = True
        with pytest.raises(BemiError, match="needs an open transaction"):
            bemi_pg.set_context(conn, {"a": 1})
    finally:
        conn.close()
    db.poll()
    assert [c["context"] for c in db.changes()] == [{"driver": "psycopg2"}, {"driver": "psycopg2", "how": "set_context"}, {}]
