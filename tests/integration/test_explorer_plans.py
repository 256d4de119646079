"""Every read behind the explorer's pages uses an index on a large trail: no Seq Scan on changes."""

from __future__ import annotations

import json

import psycopg

from bemi_pg import revert, timetravel
from bemi_pg.explorer.trail import Trail, parse_filters

from ..bigtrail import explain_everything, fill_changes

ROWS = 1_000_000


def test_no_page_of_the_explorer_scans_changes(db):
    fill_changes(db.dsn, db.settings, ROWS)
    trail = Trail(db.dsn, db.source, ("public", "changes"))
    filters = [{}, {"table": "t3"}, {"table": "public.t3", "operation": "CREATE"}, {"operation": "CREATE"},
               {"table": "t3", "pk": "1234"}, {"transaction_id": "777777"}, {"context": json.dumps({"request": 17})},
               {"since": "2024-01-05T00:00:00Z", "until": "2024-01-06T00:00:00Z"}, {"context": "request=17", "table": "t17"}]
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        plans = explain_everything(conn)
        counts = []
        for params in filters:
            page = trail.changes(conn, parse_filters(params))
            counts.append(len(page.changes))
            if page.next:  # the second page, through the cursor
                trail.changes(conn, parse_filters({**params, "cursor": page.next}))
        assert all(counts) and counts[5] == 1, counts
        trail.row_extent(conn, "t3", "1234")
        timetravel.history(conn, "t3", "1234", limit=500)
        timetravel.blame(conn, "t3", "1234")
        timetravel.as_of(conn, "t3", "1234", "2024-01-05")
        plan = revert.plan_revert(conn, conn, "public.changes", transaction_id=777777)
        assert len(plan.steps) == 1
        revert.plan_revert(conn, conn, "public.changes", context={"request": 17})
    text = "\n".join(plans)
    assert text.count("changes") >= len(filters) and "Index" in text
    assert "Seq Scan on changes" not in text, text
