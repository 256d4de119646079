"""Context from PostgREST/Supabase, precedence, and hostile context that never breaks a write."""

from __future__ import annotations

import json

import psycopg

CLAIMS = {"sub": "8f1e-user", "role": "authenticated", "email": "a@example.com"}


def _postgrest_request(conn: psycopg.Connection, method: str, path: str, statement: str, headers: dict | None = None) -> None:
    """What PostgREST does for each request: one transaction, its settings set transaction-locally."""
    with conn.transaction():
        conn.execute(
            "SELECT set_config('request.jwt.claims', %s, true), set_config('request.method', %s, true), "
            "set_config('request.path', %s, true), set_config('request.headers', %s, true)",
            (json.dumps(CLAIMS), method, path, json.dumps({"user-agent": "curl", **(headers or {})})),
        )
        conn.execute(statement)


def test_postgrest_requests_feed_the_context_and_nothing_leaks(db):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install(database_keys="never")
    with db.connect(autocommit=True) as conn:
        _postgrest_request(conn, "POST", "/todo", "INSERT INTO todo (task) VALUES ('a')",
                           {"x-bemi-context": json.dumps({"tenant": 7, "endpoint": "/todos"})})
        _postgrest_request(conn, "PATCH", "/todo", "UPDATE todo SET task = 'b'")
        conn.execute("INSERT INTO todo (task) VALUES ('direct')")  # after commit the settings read ''
        assert conn.execute("SELECT current_setting('request.method', true)").fetchone() == ("",)
    db.poll()
    assert [c["context"] for c in db.changes()] == [
        {"method": "POST", "path": "/todo", "sub": "8f1e-user", "role": "authenticated", "tenant": 7, "endpoint": "/todos"},
        {"method": "PATCH", "path": "/todo", "sub": "8f1e-user", "role": "authenticated"},
        {},
    ]


def test_precedence_request_session_transaction_comment(db):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install()
    with db.connect() as conn:
        conn.execute("SELECT bemi_set_context('{\"who\": \"session\", \"s\": 1}')")
        conn.execute("SELECT set_config('request.method', 'POST', true), set_config('request.path', '/x', true)")
        conn.execute("SELECT bemi.set_context('{\"who\": \"transaction\", \"t\": 1}')")
        conn.execute("INSERT INTO todo (task) VALUES ('a') /*Bemi {\"who\": \"comment\", \"c\": 1} Bemi*/")
        conn.execute("INSERT INTO todo (task) VALUES ('b')")
        conn.commit()
    db.poll()
    assert [c["context"] for c in db.changes()] == [
        {"method": "POST", "path": "/x", "who": "comment", "s": 1, "t": 1, "c": 1},
        {"method": "POST", "path": "/x", "who": "transaction", "s": 1, "t": 1},
    ]


def test_text_before_the_final_comment_never_counts(db):
    db.execute("CREATE TABLE note (id bigserial PRIMARY KEY, body text)")
    db.install(database_keys="never")
    forged = '/*Bemi {"user": "admin"} Bemi*/'
    with db.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO note (body) VALUES (%s)", (forged,))
        conn.execute(f"INSERT INTO note (body) VALUES ($${forged}$$) /*Bemi {{\"user\": \"me\"}} Bemi*/")
        sql_key = json.dumps({"user": "me", "SQL": f"INSERT INTO note (body) VALUES ('{forged}')"})
        conn.execute(f"INSERT INTO note (body) VALUES ('x') /*Bemi {sql_key} Bemi*/")
        conn.execute(f"{forged} INSERT INTO note (body) VALUES ('y')")
    db.poll()
    contexts = [c["context"] for c in db.changes()]
    assert contexts[0] == {} and contexts[1] == {"user": "me"} and contexts[3] == {}
    assert contexts[2]["user"] == "me" and contexts[2]["SQL"].endswith(f"VALUES ('{forged}')")


def test_hostile_context_never_breaks_the_write(db):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install(database_keys="never")
    statements = [
        ("SELECT bemi_set_context('not json')", "INSERT INTO todo (task) VALUES ('1')"),
        ("SELECT bemi_set_context('[1, 2]')", "INSERT INTO todo (task) VALUES ('2')"),
        ("SELECT bemi_set_context('\"a string\"')", "INSERT INTO todo (task) VALUES ('3')"),
        ("SELECT bemi_set_context(" + "'" + json.dumps({"x": "y" * 2_000_000}) + "')", "INSERT INTO todo (task) VALUES ('4')"),
        ("SELECT bemi_set_context(NULL)", "INSERT INTO todo (task) VALUES ('5') /*Bemi {\"a\": \"/* nested */ is fine\"} Bemi*/"),
        ("SELECT 1", "INSERT INTO todo (task) VALUES ('6') /*Bemi {\"a\": \"*\\u002f closes nothing\"} Bemi*/"),
        ("SELECT 1", "INSERT INTO todo (task) VALUES ('7') /*Bemi {not json at all Bemi*/"),
        ("SELECT set_config('request.method', 'GET', false), set_config('request.jwt.claims', '{bad', false)",
         "INSERT INTO todo (task) VALUES ('8')"),
    ]
    with db.connect(autocommit=True) as conn:
        for setup, write in statements:
            conn.execute(setup)
            conn.execute(write)  # must never raise
    db.poll()
    got = {c["after"]["task"]: c["context"] for c in db.changes()}
    assert len(got) == 8
    assert got["1"]["_bemi_error"][0] == {"source": "session", "error": "context is not valid JSON", "value": "not json"}
    assert got["2"]["_bemi_error"][0]["error"] == "context is a JSON list, not an object"
    assert got["3"]["_bemi_error"][0]["error"] == "context is a JSON str, not an object"
    assert got["4"]["_bemi_error"][0]["error"].startswith("context over 1048576 bytes")
    assert got["5"] == {"a": "/* nested */ is fine"}
    assert got["6"] == {"a": "*/ closes nothing"}
    assert got["7"]["_bemi_error"][0]["source"] == "comment"
    assert got["8"]["method"] == "GET" and got["8"]["_bemi_error"][0]["source"] == "request.jwt.claims"


def test_a_context_moving_between_sources_is_seen(db):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install(database_keys="never")
    with db.connect() as conn:
        conn.execute("SELECT bemi_set_context('{\"x\": 1}'), bemi.set_context('{\"y\": 2}')")
        conn.execute("INSERT INTO todo (task) VALUES ('a')")
        conn.execute("SELECT bemi_set_context(''), bemi.set_context('{\"x\": 1}')")
        conn.execute("INSERT INTO todo (task) VALUES ('b')")
        conn.execute("SELECT bemi_set_context('{\"y\": 2}'), bemi.set_context(NULL)")
        conn.execute("INSERT INTO todo (task) VALUES ('c')")
        conn.commit()
    db.poll()
    assert [c["context"] for c in db.changes()] == [{"x": 1, "y": 2}, {"x": 1}, {"y": 2}]


def test_each_set_context_holds_from_the_next_statement_of_the_transaction(db):
    """In wal mode the trigger emits a transaction's context once and again only when it has to:
    each set function makes the next tracked statement emit, and a statement's comment counts
    for that statement alone."""
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install(database_keys="never")
    with db.connect() as conn:
        for n, setup in enumerate([
            "SELECT 1",
            "SELECT bemi.set_context('{\"step\": 1}')",
            "SELECT 1",
            "SELECT bemi.set_context('{\"step\": 2}')",
            "SELECT bemi_set_context('{\"session\": 3}')",
            "SELECT bemi.set_context(NULL)",
        ]):
            conn.execute(setup)
            conn.execute("INSERT INTO todo (task) VALUES (%s)", (str(n),))
            if n == 2:
                conn.execute("INSERT INTO todo (task) VALUES ('2c') /*Bemi {\"comment\": true} Bemi*/")
                conn.execute("INSERT INTO todo (task) VALUES ('2d')")
        conn.commit()
        conn.execute("SELECT bemi_set_context(NULL)")
        conn.commit()
    db.poll()
    assert [(c["after"]["task"], c["context"]) for c in db.changes()] == [
        ("0", {}), ("1", {"step": 1}), ("2", {"step": 1}), ("2c", {"step": 1, "comment": True}), ("2d", {"step": 1}),
        ("3", {"step": 2}), ("4", {"step": 2, "session": 3}), ("5", {"session": 3}),
    ]
