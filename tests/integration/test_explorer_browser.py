"""The explorer in a real browser: Debian's chromium, headless, driven by Playwright (no browser
download). Takes the README's screenshots into docs/."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

playwright_sync = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")

from bemi_pg import commands  # noqa: E402

CHROMIUM = os.environ.get("BEMI_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
DOCS = Path(__file__).resolve().parents[2] / "docs"
TOKEN = "browser-token"
HOSTILE = {"user": "<script>alert(1)</script>", "note": '"><img src=x onerror=alert(2)>', "url": "javascript:alert(3)"}

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no chromium at {CHROMIUM}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def explorer(db) -> Iterator[str]:
    db.execute("CREATE TABLE todo (id int PRIMARY KEY, task text, done boolean)")
    db.execute("CREATE TABLE invoice (id int PRIMARY KEY, customer text, total numeric)")
    db.install(capture_mode="triggers")
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        for request, user, statements in [
            ("r-1", 42, ["INSERT INTO todo VALUES (1, 'write the report', false), (2, 'read mail', false)",
                         "INSERT INTO invoice VALUES (1, 'ACME', 120.50)"]),
            ("r-2", 7, ["UPDATE todo SET done = true, task = 'write the annual report' WHERE id = 1"]),
            ("r-3", 7, ["UPDATE invoice SET total = 99.90 WHERE id = 1"]),
        ]:
            with conn.transaction():
                conn.execute("SELECT bemi.set_context(%s::jsonb)", (json.dumps({"request_id": request, "user_id": user}),))
                for statement in statements:
                    conn.execute(statement)
            time.sleep(0.05)
        with conn.transaction():
            conn.execute("SELECT bemi.set_context(%s::jsonb)", (json.dumps(HOSTILE),))
            conn.execute("INSERT INTO todo VALUES (3, 'hostile context', false)")
    db.poll()
    db.mid = db.execute("SELECT max(committed_at) FROM changes WHERE context->>'request_id' = 'r-1'")[0][0]
    app = commands.explorer_app(db.dsn, None, db.settings, token=TOKEN, allow_revert=True)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def page():
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        pg = context.new_page()
        pg.dialogs = []
        pg.on("dialog", lambda dialog: (pg.dialogs.append(dialog.message), dialog.dismiss()))
        try:
            yield pg
        finally:
            browser.close()


def _shot(page, name: str) -> None:
    DOCS.mkdir(exist_ok=True)
    target = DOCS / f"explorer-{name}.png"
    partial = target.with_name(f".{target.name}.{os.getpid()}")  # whole files only: .ci/run's lanes take them too
    partial.write_bytes(page.screenshot(full_page=True))
    os.replace(partial, target)


def test_a_support_engineer_finds_reads_and_reverts_a_request(explorer, db, page):
    page.goto(explorer + "/?table=todo")
    assert "/login" in page.url
    page.fill("input[name=user]", "support-ann")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(explorer + "/?table=todo")
    tables = page.locator("table#changes > tbody > tr > td:nth-child(2)").all_inner_texts()
    assert tables and set(tables) == {"public.todo"}

    # filter by a context value, through the form
    page.fill("input[name=table]", "")
    page.fill("input[name=context]", "user_id=7")
    page.click("form.filters button[type=submit]")
    rows = page.locator("table#changes > tbody > tr")
    assert rows.count() == 2 and set(rows.locator("td.op").all_inner_texts()) == {"UPDATE"}
    # unchanged fields are collapsed until "Expand all"
    details = page.locator("table#changes details")
    assert details.count() == 2 and not details.first.evaluate("d => d.open")
    page.click("button.expand-all")
    assert all(d.evaluate("d => d.open") for d in details.all())
    _shot(page, "changes")

    # open a row: its diff, and the row as of a moment
    page.goto(explorer + "/?table=todo&pk=1")
    page.click("table#changes a:text-is('1')")
    page.wait_for_url("**/row?**")
    timeline = page.locator("#timeline").inner_text()
    assert "write the report" in timeline and "write the annual report" in timeline and "UPDATE" in timeline
    page.fill("input[name=at]", db.mid.isoformat())
    page.click("section.as-of button[type=submit]")
    as_of = page.locator("table.as-of-row").inner_text()
    assert "write the report" in as_of and "annual" not in as_of and "false" in as_of
    _shot(page, "row")

    # a request: its changes and revert plan; r-1 conflicts (todo 1 changed since), r-3 reverts
    page.goto(explorer + "/request?context=" + json.dumps({"request_id": "r-1"}))
    assert page.locator("table#changes > tbody > tr").count() == 3 and "BEGIN;" in page.locator("#revert-sql").inner_text()
    _shot(page, "request")
    page.click("text=Revert…")
    page.check("input[name=confirm]")
    page.click("form.confirm button[type=submit]")
    assert "Refused" in page.locator("p.refused").inner_text()
    assert "was changed or deleted after" in page.locator("main").inner_text()
    assert db.execute("SELECT count(*) FROM todo") == [(3,)]  # nothing applied
    page.goto(explorer + "/request?context=" + json.dumps({"request_id": "r-3"}))
    page.click("text=Revert…")
    page.check("input[name=confirm]")
    page.click("form.confirm button[type=submit]")
    assert "Applied: 1 change(s) reverted" in page.locator("p.applied").inner_text()
    _shot(page, "revert")
    assert db.execute("SELECT total::text FROM invoice") == [("120.50",)]
    page.goto(explorer + "/?table=invoice&operation=CREATE")
    assert "120.50" in page.locator("table#changes").inner_text()  # numeric digits as stored, not via a float
    db.poll()  # (trigger mode: the revert's own changes are in the trail once moved)
    [(by,)] = db.execute("SELECT context->'bemi_revert_by' FROM changes WHERE context ? 'bemi_revert'")
    assert by == {"user": "support-ann", "via": "bemi-pg serve"}

    page.goto(explorer + "/overview")
    assert page.locator("svg.chart rect").count() > 0
    assert "install" in page.locator("table#tracking").inner_text()  # each table's tracking period, since install
    _shot(page, "overview")


def test_hostile_contexts_render_as_text(explorer, page):
    page.goto(explorer + "/login")
    page.fill("input[name=user]", "<b>eve</b>")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.goto(explorer + "/?pk=3")
    context = page.locator("table#changes code.context").first.inner_text()
    assert HOSTILE["user"] in json.loads(context)["user"] and "onerror" in context
    assert page.locator("main img").count() == 0 and page.locator("main script").count() == 0
    assert page.locator("a[href^='javascript:']").count() == 0
    assert page.locator("header .who").inner_text() == "<b>eve</b>"
    page.goto(explorer + "/row?table=todo&pk=3")
    page.goto(explorer + "/overview")
    assert page.dialogs == []
