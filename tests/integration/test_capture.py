"""Capture: contexts per statement, COPY, TRUNCATE, keys, and bad context that never fails a write."""

from __future__ import annotations

import json

SCHEMA = """
CREATE TABLE todo (id bigserial PRIMARY KEY, task text, "isCompleted" boolean);
CREATE TABLE pair (a int, b text, v int, PRIMARY KEY (b, a));
CREATE TABLE log (line text);
"""


def test_each_change_carries_the_context_of_its_statement(db):
    db.execute(SCHEMA)
    db.install()
    with db.connect() as conn:
        conn.execute("SELECT bemi.set_context('{\"step\": 1}')")
        conn.execute("INSERT INTO todo (task) VALUES ('a'), ('b')")
        conn.execute("SELECT bemi.set_context('{\"step\": 2}')")
        conn.execute("UPDATE todo SET task = 'c' WHERE id = 1")
        conn.execute("INSERT INTO todo (task) VALUES ('d') /*Bemi {\"step\": 3} Bemi*/")
        conn.execute("DELETE FROM todo WHERE id = 2")  # back to the transaction's context
        conn.commit()
        conn.execute("INSERT INTO todo (task) VALUES ('e')")  # a new transaction: nothing leaks
        conn.commit()
    db.poll()
    got = [(c["operation"], c["primary_key"], c["context"], c["seq"]) for c in db.changes()]
    assert got == [
        ("CREATE", "1", {"step": 1}, 0), ("CREATE", "2", {"step": 1}, 1),
        ("UPDATE", "1", {"step": 2}, 2), ("CREATE", "3", {"step": 3}, 3),
        ("DELETE", "2", {"step": 2}, 4),
        # No application context: what the database knows of the session is recorded instead.
        ("CREATE", "4", {"session_user": "postgres", "client_addr": "127.0.0.1"}, 0),
    ]


def test_bemi_supabase_rpc_then_write(db):
    db.execute(SCHEMA)
    db.install()
    with db.connect(autocommit=True) as conn:  # PostgREST: the RPC in its own transaction, then the write
        conn.execute("SELECT bemi_set_context(%s)", (json.dumps({"method": "POST", "endpoint": "/todos"}),))
        conn.execute("INSERT INTO todo (task, \"isCompleted\") VALUES ('Sleep', false)")
    db.poll()
    assert db.changes()[0]["context"] == {"method": "POST", "endpoint": "/todos"}


def test_bad_context_never_fails_the_write(db):
    db.execute(SCHEMA)
    db.install()
    with db.connect(autocommit=True) as conn:
        conn.execute("SELECT bemi_set_context('not json')")
        conn.execute("INSERT INTO todo (task) VALUES ('1')")
        conn.execute("SELECT bemi_set_context('')")
        conn.execute("INSERT INTO todo (task) VALUES ('2') /*Bemi [1, 2] Bemi*/")
        conn.execute("INSERT INTO todo (task) VALUES ('3') /*Bemi {broken Bemi*/")
        conn.execute("INSERT INTO todo (task) VALUES ('4') /*Bemi " + json.dumps({"x": "y" * 2_000_000}) + " Bemi*/")
    db.poll()
    errors = [c["context"]["_bemi_error"][0]["error"] for c in db.changes()]
    assert errors[0] == "context is not valid JSON"
    assert errors[1] == "context is a JSON list, not an object"
    assert errors[2] == "context is not valid JSON"
    assert errors[3].startswith("context over 1048576 bytes")


def test_copy_of_1000_rows_gives_1000_changes(db):
    db.execute(SCHEMA)
    db.install()
    with db.connect() as conn:
        conn.execute("SELECT bemi.set_context('{\"job\": \"import\"}')")
        with conn.cursor().copy("COPY todo (task) FROM STDIN") as copy:
            for i in range(1000):
                copy.write_row((f"task {i}",))
        conn.commit()
    db.poll()
    rows = db.execute("SELECT count(*), count(DISTINCT seq), min(context::text), max(context::text) FROM changes")
    assert rows == [(1000, 1000, '{"job": "import"}', '{"job": "import"}')]
    # COPY writes its rows in multi-insert records: many rows share one WAL position.
    assert db.execute("SELECT count(DISTINCT position) < 100 FROM changes") == [(True,)]


def test_truncate_and_composite_and_missing_keys(db):
    db.execute(SCHEMA)
    db.install()
    db.execute("INSERT INTO pair VALUES (1, 'x', 0); INSERT INTO log VALUES ('hello')")
    db.execute("UPDATE log SET line = 'bye'; DELETE FROM log")
    db.execute("TRUNCATE pair, todo")
    db.poll()
    got = [(c["table"], c["operation"], c["primary_key"], c["before"], c["after"]) for c in db.changes()]
    assert got == [
        ("pair", "CREATE", '["x", 1]', {}, {"a": 1, "b": "x", "v": 0}),
        ("log", "CREATE", None, {}, {"line": "hello"}),
        ("log", "UPDATE", None, {"line": "hello"}, {"line": "bye"}),
        ("log", "DELETE", None, {"line": "bye"}, {}),
        ("pair", "TRUNCATE", None, {}, {}),
        ("todo", "TRUNCATE", None, {}, {}),
    ]


def test_destination_table_and_excluded_tables_are_not_tracked(db):
    db.execute(SCHEMA)
    db.install(exclude_tables=("public.log",))
    db.execute("INSERT INTO log VALUES ('secret'); INSERT INTO todo (task) VALUES ('x')")
    db.poll()
    db.poll()  # the first poll's own writes into changes must not come back as changes
    assert [(c["table"], c["operation"]) for c in db.changes()] == [("todo", "CREATE")]
    triggers = "SELECT count(*) FROM pg_trigger WHERE tgname = 'bemi_capture' AND tgrelid IN ('log'::regclass, 'changes'::regclass)"
    assert db.execute(triggers) == [(0,)]


def test_changes_committed_after_poll_once_started_wait_for_the_next_run(db):
    db.execute(SCHEMA)
    db.install()
    db.execute("INSERT INTO todo (task) SELECT 'x' FROM generate_series(1, 50)")
    stats = db.poll(batch_size=7)
    assert stats.changes == 50 and stats.batches >= 2
    assert db.execute("SELECT count(*) FROM changes") == [(50,)]
