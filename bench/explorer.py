"""The explorer's pages on a large trail: each changes filter, a row page, a transaction page and
a request page, timed through the whole app (HTTP routing, auth, SQL, templates) on 5 million changes.

    python bench/explorer.py [--rows 5000000] [--samples 50]

Starts a throwaway cluster, fills a synthetic changes table (tests/bigtrail.py: 20 tables of
50,000 keys; a `request` context with 1,000 values, so 5,000 changes per request at 5M) and
prints p50 and p95 per page, and each p50 as a ratio of the 200 ms target.
tests/integration/test_explorer_plans.py checks that none of these reads scans `changes`."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starlette.testclient import TestClient  # noqa: E402

from bemi_pg import commands  # noqa: E402
from bemi_pg.config import load_settings  # noqa: E402
from tests.bigtrail import KEYS, TABLES, big_trail  # noqa: E402

TARGET_MS = 200.0
START = datetime(2024, 1, 1, tzinfo=UTC)  # bigtrail: change g commits at START + g seconds


def pages(rows: int, rng: random.Random) -> dict[str, Callable[[], str]]:
    def moment() -> str:
        return (START + timedelta(seconds=rng.randrange(rows))).isoformat()

    def table() -> str:
        return f"t{rng.randrange(TABLES)}"

    def q(**params: object) -> str:
        from urllib.parse import urlencode
        return urlencode(params)

    return {
        "changes (no filter)": lambda: "/",
        "changes ?table": lambda: "/?" + q(table=table()),
        "changes ?operation": lambda: "/?" + q(operation="UPDATE"),
        "changes ?table&pk": lambda: "/?" + q(table=table(), pk=rng.randrange(KEYS)),
        "changes ?transaction_id": lambda: "/?" + q(transaction_id=rng.randrange(rows)),
        "changes ?context": lambda: "/?" + q(context=json.dumps({"request": rng.randrange(1000)})),
        "changes ?since&until": lambda: "/?" + q(since=moment(), until=(START + timedelta(seconds=rows)).isoformat()),
        "changes, page 2 (cursor)": None,  # type: ignore[dict-item]
        "row page (timeline, blame, as-of)": lambda: "/row?" + q(table=table(), pk=rng.randrange(KEYS), at=moment()),
        "transaction page": lambda: f"/transaction/{rng.randrange(rows)}",
        "request page (5,000 changes/request at 5M)": lambda: "/request?" + q(context=json.dumps({"request": rng.randrange(1000)})),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    with big_trail(args.rows) as dsn:
        client = TestClient(commands.explorer_app(dsn, None, load_settings(None), token="bench"), base_url="http://127.0.0.1")
        client.post("/login", data={"user": "bench", "token": "bench"})
        rng = random.Random(1)
        for name, make in pages(args.rows, rng).items():
            times = []
            for _ in range(args.samples):
                if make is None:  # the page after a filtered first page
                    first = client.get("/api/changes", params={"table": f"t{rng.randrange(TABLES)}"}).json()
                    path = "/?" + "table=" + first["changes"][0]["table"] + "&cursor=" + first["next"]
                else:
                    path = make()
                t0 = time.perf_counter()
                response = client.get(path)
                times.append((time.perf_counter() - t0) * 1000)
                if response.status_code != 200:
                    raise SystemExit(f"{path}: {response.status_code} {response.text[:300]}")
            times.sort()
            p50, p95 = statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.95))]
            print(f"{name:<44} p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  p50/target {p50 / TARGET_MS:.2f}", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
