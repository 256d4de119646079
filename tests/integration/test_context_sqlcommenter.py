"""sqlcommenter tags (``/*key='value',…*/``) feed the context in both capture modes, as the
weakest source; the poller's Python and trigger mode's SQL read them alike."""

from __future__ import annotations

import json

import pytest

from bemi_pg.stitch import context_json, trailing_comments

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

# (query, the context it alone gives)
QUERIES = [
    # Rails 7.1 ActiveRecord::QueryLogs, sqlcommenter format
    ("SELECT 1 /*application='Blog',controller='posts',action='index'*/",
     {"application": "Blog", "controller": "posts", "action": "index"}),
    # Rails' older marginalia / QueryLogs legacy format
    ("SELECT 1 /*application:Blog,controller:posts,action:index*/",
     {"application": "Blog", "controller": "posts", "action": "index"}),
    # Django's / OpenTelemetry's: URL-encoded values, a traceparent
    (f"UPDATE t SET n = 1 /*controller='todos',framework='django%3A4.2',route='%2Ftodos%2F%3Cint%3Aid%3E',"
     f"traceparent='{TRACE}'*/",
     {"controller": "todos", "framework": "django:4.2", "route": "/todos/<int:id>", "traceparent": TRACE,
      "trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331"}),
    ("SELECT 1 /*db_driver='psycopg%3A3.2.1',dbapi_level='2.0'*/;", {"db_driver": "psycopg:3.2.1", "dbapi_level": "2.0"}),
    # escapes, unquoted values, spaces, a key URL-encoded
    ("SELECT 1 /* a='it\\'s', b = plain value , c%20d='%C3%A9' */", {"a": "it's", "b": "plain value", "c d": "é"}),
    # Bemi's and sqlcommenter's comments together, in either order; the Bemi comment wins a clash
    ("SELECT 1 /*Bemi {\"user\": 1, \"route\": \"bemi\"} Bemi*/ /*route='%2Fx',tenant='t'*/",
     {"route": "bemi", "tenant": "t", "user": 1}),
    ("SELECT 1 /*route='%2Fx',tenant='t'*/ /*Bemi {\"user\": 1} Bemi*/", {"route": "/x", "tenant": "t", "user": 1}),
    # someone else's comments: ignored
    ("SELECT /*+ SeqScan(t) */ 1 /* TODO: fix */", {}),
    ("SELECT 1 /* just words */", {}),
    ("SELECT 1 /*route='%2Fx'*/ -- trailing line comment", {}),
    # never counts: inside a literal, before the last token
    ("SELECT '/*route=''x''*/'", {}),
    ("SELECT /*route='x'*/ 1", {}),
    ("SELECT 1 /*route='x'*/; SELECT 2", {}),
]
# malformed: recorded with _bemi_error, never a failed write: (query, the keys kept, the error)
MALFORMED = [
    ("SELECT 1 /*traceparent='not-a-trace',a='1'*/", {"traceparent": "not-a-trace", "a": "1"}, "traceparent is not"),
    ("SELECT 1 /*traceparent='00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01'*/",
     {"traceparent": "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"}, "traceparent is not"),
    ("SELECT 1 /*a='%FF',b='2'*/", {"b": "2"}, "not UTF-8 once URL-decoded"),
    ("SELECT 1 /*a='%00'*/", {}, "not UTF-8 once URL-decoded"),
]
HOSTILE = [
    "SELECT 1 /*a='unterminated*/", "SELECT 1 /*a=''''*/", "SELECT 1 /*=''*/", "SELECT 1 /*a='x',*/",
    "SELECT 1 /*a='\\*/", "SELECT 1 /*a=',b='*/", "SELECT 1 /**/", "SELECT 1 /*a='x' b='y'*/",
    "SELECT 1 /*a='x'\n,\tb='y\nz'*/", "SELECT 1 /*a:*/", "SELECT 1 /*a:b:c,d:'e'*/", "SELECT 1 /*a=b=c*/",
    "SELECT 1 /*Bemi*/ /*a='1'*/", "SELECT 1 /*a='%'*/", "SELECT 1 /*a='%4'*/", "SELECT 1 /*%ZZ='1'*/",
    "SELECT 1 /*\\u0000='1'*/", "SELECT 1 /*a=\"double\"*/", "SELECT 1 /*a='x'*/ /*a='y'*/",
]


def _context(conn, query: str, truncated: bool = False) -> tuple[bool, str]:
    text = context_json(json.dumps([None, None, query, None, None, truncated]), 1000, "never")
    same = conn.execute("SELECT bemi.context_of(NULL, NULL, %s, NULL, NULL, %s) = %s::jsonb",
                        (query, truncated, text)).fetchone()[0]
    return same, text


def test_the_pollers_python_and_trigger_modes_sql_read_tags_alike(db):
    db.install(capture_mode="triggers", database_keys="never", max_context_bytes=1000)
    with db.connect(autocommit=True) as conn:
        for query, want in QUERIES:
            same, text = _context(conn, query)
            assert same and json.loads(text) == want, query
        for query, kept, error in MALFORMED:
            same, text = _context(conn, query)
            got = json.loads(text)
            assert same and got.pop("_bemi_error")[0]["error"].startswith(error) and got == kept, query
        for query in HOSTILE + [q for q, _ in QUERIES] + [q for q, _, _ in MALFORMED]:
            for truncated in (False, True):
                assert _context(conn, query, truncated)[0], (query, truncated)
                got = conn.execute("SELECT bemi.trailing_comments(%s, %s)", (query, truncated)).fetchone()[0]
                assert got == trailing_comments(query, truncated), (query, truncated)
        big = "SELECT 1 /*a='" + "x" * 2000 + "'*/"
        same, text = _context(conn, big)
        assert same and json.loads(text)["_bemi_error"][0]["error"] == "context over 1000 bytes"


STATEMENTS = [
    ("SELECT 1", f"INSERT INTO t VALUES (1) /*route='%2Ftodos',traceparent='{TRACE}'*/"),
    ("SELECT bemi_set_context('{\"route\": \"session\"}')",
     "INSERT INTO t VALUES (2) /*route='%2Ftodos',tenant='t2'*/"),
    ("SELECT bemi_set_context(NULL), set_config('request.method', 'POST', false), set_config('request.path', '/rpc', false)",
     "INSERT INTO t VALUES (3) /*path='tag',method='tag',x='3'*/"),
    ("SELECT set_config('request.method', '', false), set_config('request.path', '', false)",
     "INSERT INTO t VALUES (4) /*x='tag'*/ /*Bemi {\"x\": \"bemi\"} Bemi*/"),
    ("SELECT 1", "INSERT INTO t VALUES (5) /*traceparent='bad'*/"),
    ("SELECT 1", "INSERT INTO t VALUES (6) /* TODO: not tags */"),
]
WANT = [
    {"route": "/todos", "traceparent": TRACE, "trace_id": TRACE[3:35], "span_id": TRACE[36:52]},
    {"route": "session", "tenant": "t2"},
    {"method": "POST", "path": "/rpc", "x": "3"},
    {"x": "bemi"},
    {"traceparent": "bad", "_bemi_error": [{"source": "sqlcommenter", "error": "traceparent is not 00-<32 hex>-<16 hex>-<2 hex>",
                                            "value": "bad"}]},
    {},
]


def _record(db, mode: str, **settings) -> list[dict]:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.install(capture_mode=mode, database_keys="never", **settings)
    with db.connect(autocommit=True) as conn:
        for setup, write in STATEMENTS:
            conn.execute(setup)
            conn.execute(write)
        with conn.transaction():  # the transaction context outranks the tags
            conn.execute("SELECT bemi.set_context('{\"x\": \"transaction\"}')")
            conn.execute("INSERT INTO t VALUES (7) /*x='tag',y='tag'*/")
    db.poll()
    return [r[0] for r in db.execute("SELECT context FROM changes ORDER BY (after ->> 'id')::int")]


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_tags_are_the_weakest_source_in_both_modes(db, mode):
    assert _record(db, mode) == [*WANT, {"x": "transaction", "y": "tag"}]


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_a_setting_turns_tags_off(db, mode):
    got = _record(db, mode, sqlcommenter=False)
    assert got == [{}, {"route": "session"}, {"method": "POST", "path": "/rpc"}, {"x": "bemi"}, {}, {},
                   {"x": "transaction"}]
