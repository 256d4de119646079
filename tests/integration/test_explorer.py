"""The explorer's JSON API and pages (``bemi-pg serve``), over Starlette's test client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psycopg
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from bemi_pg import commands  # noqa: E402
from bemi_pg.explorer.auth import SESSION_COOKIE  # noqa: E402
from bemi_pg.explorer.trail import Trail  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

TOKEN = "s3cret-token"
HOSTILE = {"user": "<script>alert(1)</script>", "note": '"><img src=x onerror=alert(2)>', "url": "javascript:alert(3)"}


def _client(db, *, allow_revert=False, session_seconds=3600, trusted_user_header=None):
    app = commands.explorer_app(db.dsn, None, db.settings, token=TOKEN, allow_revert=allow_revert,
                                session_seconds=session_seconds, trusted_user_header=trusted_user_header)
    return TestClient(app, base_url="http://127.0.0.1", follow_redirects=False)


def _api(client, path, **params):
    response = client.get(path, params=params, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    return response.json()


def _login(client, user="ann"):
    response = client.post("/login", data={"user": user, "token": TOKEN, "next": "/"})
    assert response.status_code == 303 and response.headers["location"] == "/"
    return response


@pytest.fixture
def shop(db):
    db.execute("CREATE TABLE todo (id int PRIMARY KEY, task text, done boolean)")
    db.execute("CREATE TABLE note (id int PRIMARY KEY, body text)")
    db.install(capture_mode="triggers")
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SELECT bemi.set_context('{\"user_id\": 42, \"request_id\": \"r-1\"}')")
            conn.execute("INSERT INTO todo VALUES (1, 'write', false), (2, 'read', false)")
            conn.execute("INSERT INTO note VALUES (1, 'hello')")
        with conn.transaction():
            conn.execute("SELECT bemi.set_context(%s::jsonb)", (json.dumps({"user_id": 7, "request_id": "r-2"}),))
            conn.execute("UPDATE todo SET done = true WHERE id = 1")
            xid = conn.execute("SELECT txid_current() % (2^32)::bigint").fetchone()[0]
        with conn.transaction():
            conn.execute("SELECT bemi.set_context(%s::jsonb)", (json.dumps(HOSTILE),))
            conn.execute("DELETE FROM note WHERE id = 1")
    db.poll()
    db.xid = xid
    return db


def test_the_api_and_the_pages_need_the_token(shop):
    client = _client(shop)
    assert client.get("/api/changes").status_code == 401
    assert client.get("/api/changes", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/changes", headers={"Authorization": TOKEN}).status_code == 401  # no scheme
    body = client.get("/api/changes").text
    assert "todo" not in body and "user_id" not in body
    page = client.get("/?table=todo")
    assert page.status_code == 303 and page.headers["location"].startswith("/login?next=")
    wrong = client.post("/login", data={"user": "ann", "token": "nope"})
    assert wrong.status_code == 401 and SESSION_COOKIE not in wrong.cookies
    response = _login(client)
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/").status_code == 200
    assert client.get("/api/changes").status_code == 200  # a page's "as JSON" link works in a logged-in browser
    # after a login, `next` only leads somewhere on this site
    assert client.post("/login", data={"user": "a", "token": TOKEN, "next": "//evil.example/"}).headers["location"] == "/"


def test_an_expired_session_gets_the_login_page(shop):
    client = _client(shop, session_seconds=1)
    _login(client)
    assert client.get("/").status_code == 200
    time.sleep(2.1)
    response = client.get("/")
    assert response.status_code == 303 and response.headers["location"].startswith("/login")
    client.cookies.set(SESSION_COOKIE, "9999999999.YW5u.forged")  # a far expiry without the server's signature
    assert client.get("/").status_code == 303


def test_a_trusted_proxy_header_is_off_unless_asked_for(shop):
    assert _client(shop).get("/", headers={"X-Forwarded-User": "eve"}).status_code == 303
    proxied = _client(shop, trusted_user_header="X-Forwarded-User")
    assert proxied.get("/", headers={"X-Forwarded-User": "eve"}).status_code == 200
    assert proxied.get("/").status_code == 303


def test_every_filter(shop):
    client = _client(shop)
    everything = _api(client, "/api/changes")
    assert everything["next"] is None
    assert [(c["table"], c["operation"]) for c in everything["changes"]] == [
        ("note", "DELETE"), ("todo", "UPDATE"), ("note", "CREATE"), ("todo", "CREATE"), ("todo", "CREATE")]
    first = everything["changes"][0]
    columns = {"id", "source", "database", "schema", "table", "primary_key", "operation", "before", "after", "context",
               "committed_at", "queued_at", "created_at", "transaction_id", "position", "commit_position", "seq"}
    assert set(first) == columns and first["source"] == shop.source

    def ops(**params):
        return [(c["table"], c["primary_key"], c["operation"]) for c in _api(client, "/api/changes", **params)["changes"]]

    assert ops(table="note") == [("note", "1", "DELETE"), ("note", "1", "CREATE")]
    assert ops(table="public.todo", operation="update") == [("todo", "1", "UPDATE")]
    assert ops(table="other.todo") == []
    assert ops(table="todo", pk="2") == [("todo", "2", "CREATE")]
    assert ops(transaction_id=shop.xid) == [("todo", "1", "UPDATE")]
    assert ops(context='{"user_id": 42}') == [("note", "1", "CREATE"), ("todo", "2", "CREATE"), ("todo", "1", "CREATE")]
    assert ops(context="request_id=r-2") == [("todo", "1", "UPDATE")]
    request = _api(client, "/api/request", context='{"request_id": "r-1"}', limit="2")
    assert len(request["changes"]) == 2 and request["next"]
    rest = _api(client, "/api/request", context='{"request_id": "r-1"}', cursor=request["next"], transaction_id="1")
    assert len(rest["changes"]) == 1 and rest["next"] is None
    assert [c["operation"] for c in _api(client, f"/api/transaction/{shop.xid}", transaction_id="1")["changes"]] == ["UPDATE"]
    update_at = next(c["committed_at"] for c in everything["changes"] if c["operation"] == "UPDATE")
    assert ops(since=update_at) == [("note", "1", "DELETE"), ("todo", "1", "UPDATE")]
    assert ops(until=update_at) == [("note", "1", "CREATE"), ("todo", "2", "CREATE"), ("todo", "1", "CREATE")]
    for params, word in [({"operation": "MERGE"}, "operation"), ({"context": "{not json"}, "context"),
                         ({"since": "yesterday"}, "since"), ({"limit": "0"}, "limit"), ({"cursor": "zzz"}, "cursor"),
                         ({"transaction_id": "x"}, "transaction_id"), ({"table": '"todo'}, "table")]:
        response = client.get("/api/changes", params=params, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 400 and word in response.json()["error"], (params, response.text)


def test_pagination_over_ten_thousand_changes_has_no_gaps_or_repeats(db):
    db.execute("CREATE TABLE item (id int PRIMARY KEY, n int)")
    db.install(capture_mode="triggers")
    db.execute("INSERT INTO item SELECT g, 0 FROM generate_series(1, 4000) g")  # one COPY-like statement: one commit time
    for batch in range(3):
        db.execute("UPDATE item SET n = n + 1 WHERE id %% 2 = %s", (batch % 2,))
    db.execute("UPDATE item SET n = n + 1 WHERE id <= 2000")
    db.poll()
    [(total,)] = db.execute("SELECT count(*) FROM changes")
    assert total == 12_000
    client = _client(db)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": "500", "table": "item"} | ({"cursor": cursor} if cursor else {})
        body = _api(client, "/api/changes", **params)
        seen.extend((c["commit_position"], c["seq"], c["id"]) for c in body["changes"])
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert pages == 24 and len(seen) == total == len(set(seen))
    [(ids,)] = db.execute("SELECT array_agg(id::text) FROM changes")
    assert {s[2] for s in seen} == set(ids)


def test_hostile_contexts_render_as_text_under_a_strict_csp(shop):
    client = _client(shop)
    _login(client)
    for path in ["/", "/?table=note", "/row?table=note&pk=1", f"/transaction/{shop.xid}", "/overview",
                 "/request?" + "context=" + json.dumps({"note": HOSTILE["note"]})]:
        response = client.get(path)
        assert response.status_code == 200, (path, response.text)
        html = response.text
        assert "<script>alert" not in html and "<img src=x" not in html and 'href="javascript:' not in html, path
        assert not re.search(r"<script(?![^>]*\bsrc=\"/static/)", html), path  # only the package's own script
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in client.get("/?table=note").text


def test_a_row_page_shows_the_timeline_blame_and_as_of(shop):
    client = _client(shop)
    _login(client)
    todo = _api(client, "/api/changes", table="todo", pk="1")["changes"]
    created_at, updated_at = todo[1]["committed_at"], todo[0]["committed_at"]
    html = client.get("/row", params={"table": "todo", "pk": "1", "at": created_at}).text
    assert "Timeline" in html and "Blame" in html and "2 change(s) recorded" in html
    as_of = _api(client, "/api/row", table="todo", pk="1", at=created_at)
    assert as_of["as_of"] == {"id": 1, "task": "write", "done": False}
    assert [h["operation"] for h in as_of["history"]] == ["UPDATE", "CREATE"]
    assert {b["column"]: b["operation"] for b in as_of["blame"]}["done"] == "UPDATE"
    deleted_at = _api(client, "/api/changes", table="note", operation="DELETE")["changes"][0]["committed_at"]
    gone = _api(client, "/api/row", table="note", pk="1", at=deleted_at)
    assert gone["as_of"] is None and "did not exist" in gone["as_of_note"]
    unknown = _api(client, "/api/row", table="todo", pk="99", at=updated_at)
    assert unknown["as_of"] is None and "cannot say" in unknown["as_of_note"]


def test_a_request_reverts_only_with_allow_revert_a_csrf_token_and_a_confirmation(shop):
    client = _client(shop)
    _login(client)
    page = client.get("/request", params={"context": "request_id=r-1"}).text
    assert "BEGIN;" in page and "Revert…" not in page
    plan = client.get("/revert", params={"context": "request_id=r-1"})  # the plan, to read, without a form
    assert plan.status_code == 200 and "BEGIN;" in plan.text and 'name="csrf"' not in plan.text
    assert client.post("/revert", data={"context": "request_id=r-1", "confirm": "yes"}).status_code == 403
    client = _client(shop, allow_revert=True)
    _login(client, user="support-ann")
    confirm = client.get("/revert", params={"context": '{"request_id": "r-1"}'})
    assert confirm.status_code == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', confirm.text).group(1)
    form = {"context": '{"request_id": "r-1"}', "confirm": "yes"}
    assert client.post("/revert", data=form | {"csrf": "forged"}).status_code == 403
    assert client.post("/revert", data={"context": form["context"], "csrf": csrf}).status_code == 400  # not confirmed
    # todo 1 was updated since r-1 created it: a conflict, and nothing is applied (all or nothing)
    refused = client.post("/revert", data=form | {"csrf": csrf})
    assert refused.status_code == 200 and "Refused" in refused.text and "was changed or deleted after" in refused.text
    assert shop.execute("SELECT id FROM todo ORDER BY id") == [(1,), (2,)]
    applied = client.post("/revert", data={"context": '{"request_id": "r-2"}', "confirm": "yes", "csrf": csrf})
    assert "Applied: 1 change(s) reverted" in applied.text
    assert shop.execute("SELECT done FROM todo WHERE id = 1") == [(False,)]
    shop.poll()
    [(ctx,)] = shop.execute("SELECT context FROM changes WHERE context ? 'bemi_revert'")
    assert ctx["bemi_revert_by"] == {"user": "support-ann", "via": "bemi-pg serve"}


def test_reads_are_read_only_and_filtered_by_source(shop):
    client = _client(shop)
    # another source's changes in the same table are not this explorer's
    shop.execute("INSERT INTO changes (source, \"database\", \"schema\", \"table\", primary_key, operation, committed_at, "
                 "queued_at, transaction_id, \"position\", commit_position, seq) "
                 "VALUES ('other/db', 'db', 'public', 'todo', '1', 'CREATE', now(), now(), 1, 1, 1, 0)")
    assert all(c["source"] == shop.source for c in _api(client, "/api/changes")["changes"])
    trail = Trail(shop.dsn, shop.source, ("public", "changes"))
    with trail.read() as conn, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        conn.execute("DELETE FROM changes")
    with trail.read() as again:  # the session is kept for the next read, which is read-only again
        assert again is conn and again.execute("SHOW transaction_read_only").fetchone() == ("on",)
        again.execute("SET LOCAL work_mem = '77MB'")
    shop.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'bemi-pg' "
                 "AND datname = current_database() AND pid <> pg_backend_pid()")
    with trail.read() as fresh:  # a kept session the server ended is replaced
        assert fresh is not conn and fresh.execute("SHOW work_mem").fetchone() != ("77MB",)
        assert fresh.execute("SHOW transaction_read_only").fetchone() == ("on",)
    with Trail(shop.dsn, shop.source, ("public", "changes"), statement_timeout_ms=50).read() as conn, \
            pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute("SELECT pg_sleep(1)")


def test_serve_refuses_a_public_address_without_a_token(db):
    result = run_cli("serve", "--host", "0.0.0.0", env={"BEMI_DSN": db.dsn})
    assert result.returncode == 2 and "without a token" in result.stderr and "Traceback" not in result.stderr


def test_serve_answers_the_api_until_stopped(shop):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEMI_", "PG")) and k != "DATABASE_URL"}
    env.update(BEMI_DSN=shop.dsn, BEMI_UI_TOKEN=TOKEN)
    server = subprocess.Popen([sys.executable, "-m", "bemi_pg", "serve", "--port", str(port)], env=env,
                              stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/api/changes?table=todo"
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
            except urllib.error.HTTPError as exc:
                assert exc.code == 401
                break
            except OSError:
                time.sleep(0.1)
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        body = json.load(urllib.request.urlopen(request, timeout=5))
        assert [c["operation"] for c in body["changes"]] == ["UPDATE", "CREATE", "CREATE"]
    finally:
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=20)
    assert TOKEN not in stderr and "Traceback" not in stderr, stderr


def test_a_context_key_with_a_btree_of_its_own_answers_as_containment_does(db):
    db.execute("CREATE TABLE item (id int PRIMARY KEY, n int)")
    db.install(capture_mode="triggers", context_indexes=("user_id",))
    [(definition,)] = db.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'changes_context_user_id_idx'")
    assert "(((context -> 'user_id'::text)), committed_at)" in definition and "IS NOT NULL" in definition
    contexts = [{"user_id": 42}, {"user_id": 42.0}, {"user_id": "42"}, {"user_id": None}, {"user_id": [42, 7]},
                {"user_id": {"id": 42, "name": "x"}}, {"user_id": 42, "tenant": "a"}, {"tenant": "a"}, {}]
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        for n, context in enumerate(contexts):
            with conn.transaction():
                conn.execute("SELECT bemi.set_context(%s::jsonb)", (json.dumps(context),))
                conn.execute("INSERT INTO item VALUES (%s, 0)", (n,))
    db.poll()  # (trigger mode: the mover moves the queue)
    client = _client(db)
    for wanted in [{"user_id": 42}, {"user_id": "42"}, {"user_id": None}, {"user_id": [42]}, {"user_id": {"id": 42}},
                   {"user_id": 42, "tenant": "a"}, {"tenant": "a"}, {"user_id": 7}]:
        got = [c["primary_key"] for c in _api(client, "/api/changes", context=json.dumps(wanted))["changes"]]
        expected = [str(n) for n in reversed(range(len(contexts)))
                    if db.execute("SELECT %s::jsonb @> %s::jsonb", (json.dumps(contexts[n]), json.dumps(wanted)))[0][0]]
        assert got == expected, wanted
    assert [c["primary_key"] for c in _api(client, "/api/changes", context="user_id=42")["changes"]] == ["6", "1", "0"]


def test_the_overview_shows_each_tables_tracking_periods_and_a_real_gap(db):
    db.execute("CREATE SCHEMA side; CREATE TABLE todo (id int PRIMARY KEY, task text); CREATE TABLE note (id int PRIMARY KEY)")
    db.install(capture_mode="triggers")
    db.execute("INSERT INTO todo VALUES (1, 'write')")
    db.execute("ALTER TABLE todo SET SCHEMA side")  # leaves tracking: what happens now is not in the trail
    db.execute("UPDATE side.todo SET task = 'unseen'")
    db.execute("ALTER TABLE side.todo SET SCHEMA public")  # back: a new period, after a gap
    db.poll()  # (trigger mode: the mover moves the queue)
    client = _client(db)
    tracking = {t["table"]: t for t in _api(client, "/api/overview")["tracking"]}
    todo, note = tracking["public.todo"], tracking["public.note"]
    assert [(p["began_reason"], p["ended_reason"]) for p in todo["periods"]] == [
        ("install", "moved, renamed or detached out"), ("moved, renamed or attached in", None)]
    [gap] = todo["gaps"]
    assert (gap["from"], gap["to"]) == (todo["periods"][0]["ended_at"], todo["periods"][1]["began_at"]) and gap["from"] < gap["to"]
    assert note["gaps"] == [] and note["periods"][0]["ended_at"] is None
    _login(client)
    html = client.get("/overview").text
    assert "<dt>Gaps in the trail</dt><dd>1 (per table under Tracking below)</dd>" in html
    assert f'<li class="gap">gap from {gap["from"]} (moved, renamed or detached out) to {gap["to"]}' in html
