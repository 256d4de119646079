"""Every read behind the explorer's pages and API uses an index on a large trail: no Seq Scan on
changes. The app itself is driven (Starlette's test client), and auto_explain, loaded into every
session of the database, hands each statement's plan (nested ones too) to the connection."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from bemi_pg import commands  # noqa: E402
from bemi_pg.config import load_settings  # noqa: E402

from ..bigtrail import CONTEXT_SETTINGS, fill_changes  # noqa: E402

ROWS = 1_000_000
TOKEN = "plans"

FILTERS: list[dict[str, str]] = [
    {}, {"table": "t3"}, {"table": "public.t3", "operation": "CREATE"}, {"operation": "CREATE"},
    {"table": "t3", "pk": "1234"}, {"transaction_id": "777777"},
    {"since": "2024-01-05T00:00:00Z", "until": "2024-01-06T00:00:00Z"},
    {"context": "request=17"},  # the key with a btree (context_indexes)
    {"context": json.dumps({"request": 17})},
    {"context": json.dumps({"user": 17})},  # GIN only
    {"context": json.dumps({"request": 17, "user": 18})},  # one change in 997,000: the btree's worst case
    {"context": "request=17", "table": "t17"},
]


def _plans_of_every_connection(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    plans: list[str] = []
    connect = psycopg.connect

    def with_plans(*args: Any, **kwargs: Any) -> Any:
        conn = connect(*args, **kwargs)
        conn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
        return conn

    monkeypatch.setattr(psycopg, "connect", with_plans)
    return plans


def test_no_page_or_api_read_of_the_explorer_scans_changes(db, monkeypatch):
    settings = load_settings(None, **CONTEXT_SETTINGS)
    fill_changes(db.dsn, settings, ROWS)
    for setting in ("session_preload_libraries = 'auto_explain'", "auto_explain.log_min_duration = 0",
                    "auto_explain.log_nested_statements = on", "auto_explain.log_level = notice"):
        db.execute(f'ALTER DATABASE "{db.name}" SET {setting}')
    plans = _plans_of_every_connection(monkeypatch)
    client = TestClient(commands.explorer_app(db.dsn, None, settings, token=TOKEN), base_url="http://127.0.0.1")
    client.post("/login", data={"user": "plans", "token": TOKEN})
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    def get(path: str, **params: str) -> Any:
        response = client.get(path + ("?" + urlencode(params) if params else ""), headers=bearer)
        assert response.status_code == 200, (path, params, response.text[:500])
        return response

    counts = []
    for params in FILTERS:
        get("/", **params)
        page = get("/api/changes", **params).json()
        counts.append(len(page["changes"]))
        if page["next"]:  # the second page, through the cursor
            get("/", **params, cursor=page["next"])
            get("/api/changes", **params, cursor=page["next"])
    assert all(counts) and counts[5] == 1 and counts[10] <= 2, counts
    for params in [{"context": json.dumps({"request": 17})}, {"context": json.dumps({"user": 17})}]:
        get("/request", **params)
        get("/api/request", **params)
        get("/revert", **params)
    row = {"table": "t3", "pk": "1234", "at": "2024-01-05T00:00:00Z"}
    get("/row", **row)
    get("/api/row", **row)
    get("/transaction/777777")
    get("/api/transaction/777777")
    get("/revert", transaction="777777")
    get("/overview")
    get("/api/overview")

    text = "\n".join(plans)
    assert text.count("on changes") >= len(FILTERS) and "changes_context_request_idx" in text, text[:3000]
    assert "Seq Scan on changes" not in text, [p for p in plans if "Seq Scan on changes" in p]
