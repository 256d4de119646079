"""The explorer's pages on a large trail: each changes filter, a row page, a transaction page and
request pages, timed through the whole app (HTTP routing, auth, SQL, templates) on 5 million
changes; then what the context key's btree (destination.context_indexes) costs a write.

    python bench/explorer.py [--rows 5000000] [--samples 50] [--write-rows 50000] [--write-rounds 10]

Starts a throwaway cluster, fills a synthetic changes table (tests/bigtrail.py: 20 tables of
50,000 keys; a context {"request": n, "user": m} with 1,000 requests and 997 users, so about
5,000 changes each at 5M; installed with `context_indexes = ["request"]`, so "request" has a btree
and "user" only the GIN index) and prints p50 and p95 per page, and each p50 as a ratio of the
200 ms target. tests/integration/test_explorer_plans.py checks that none of these reads scans
`changes`."""

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
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from bemi_pg import commands  # noqa: E402
from bemi_pg.config import load_settings  # noqa: E402
from tests.bigtrail import CONTEXT_SETTINGS, KEYS, REQUESTS, TABLES, USERS, big_trail  # noqa: E402

TARGET_MS = 200.0
START = datetime(2024, 1, 1, tzinfo=UTC)  # bigtrail: change g commits at START + g seconds


def pages(rows: int, rng: random.Random) -> dict[str, Callable[[], str] | None]:
    def moment() -> str:
        return (START + timedelta(seconds=rng.randrange(rows))).isoformat()

    def table() -> str:
        return f"t{rng.randrange(TABLES)}"

    def ctx(**value: object) -> str:
        return json.dumps(value)

    return {
        "changes (no filter)": lambda: "/",
        "changes ?table": lambda: "/?" + urlencode({"table": table()}),
        "changes ?operation": lambda: "/?" + urlencode({"operation": "UPDATE"}),
        "changes ?since&until": lambda: "/?" + urlencode({"since": moment(), "until": (START + timedelta(seconds=rows)).isoformat()}),
        "changes ?table&pk": lambda: "/?" + urlencode({"table": table(), "pk": rng.randrange(KEYS)}),
        "changes ?transaction_id": lambda: "/?" + urlencode({"transaction_id": rng.randrange(rows)}),
        "changes ?context key=value (btree key)": lambda: "/?" + urlencode({"context": f"request={rng.randrange(REQUESTS)}"}),
        "changes ?context {request} (btree key)": lambda: "/?" + urlencode({"context": ctx(request=rng.randrange(REQUESTS))}),
        "changes ?context {user} (GIN only)": lambda: "/?" + urlencode({"context": ctx(user=rng.randrange(USERS))}),
        "changes ?context {request, user} (~5 hits)": lambda: "/?" + urlencode(
            {"context": ctx(request=rng.randrange(REQUESTS), user=rng.randrange(USERS))}),
        "changes, page 2 (cursor)": None,
        "row page (timeline, blame, as-of)": lambda: "/row?" + urlencode({"table": table(), "pk": rng.randrange(KEYS), "at": moment()}),
        "transaction page": lambda: f"/transaction/{rng.randrange(rows)}",
        "request page {request} (btree key)": lambda: "/request?" + urlencode({"context": ctx(request=rng.randrange(REQUESTS))}),
        "request page {user} (GIN only)": lambda: "/request?" + urlencode({"context": ctx(user=rng.randrange(USERS))}),
        "overview": lambda: "/overview",
    }


def time_pages(dsn: str, rows: int, samples: int) -> None:
    client = TestClient(commands.explorer_app(dsn, None, load_settings(None), token="bench"), base_url="http://127.0.0.1")
    client.post("/login", data={"user": "bench", "token": "bench"})
    rng = random.Random(1)
    print("| page | p50 | p95 | p50 / 200 ms |\n|---|---|---|---|", flush=True)
    for name, make in pages(rows, rng).items():
        times = []
        for _ in range(samples):
            if make is None:  # the page after a filtered first page
                first = client.get("/api/changes", params={"table": f"t{rng.randrange(TABLES)}"}).json()
                path = "/?" + urlencode({"table": first["changes"][0]["table"], "cursor": first["next"]})
            else:
                path = make()
            t0 = time.perf_counter()
            response = client.get(path)
            times.append((time.perf_counter() - t0) * 1000)
            if response.status_code != 200:
                raise SystemExit(f"{path}: {response.status_code} {response.text[:300]}")
        times.sort()
        p50, p95 = statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.95))]
        print(f"| {name} | {p50:.1f} ms | {p95:.1f} ms | {p50 / TARGET_MS:.2f} |", flush=True)


def time_writes(dsn: str, rows: int, rounds: int) -> None:
    """Inserts of the same changes into two tables with the changes table's indexes, one without
    the "request" btree, alternating which goes first; every row has the key (the worst case)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in ("bench_with", "bench_without"):
            conn.execute(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (LIKE changes INCLUDING ALL)")
        [(index,)] = conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'bench_without' "
                                  "AND indexdef LIKE '%context -> ''request''%'").fetchall()
        conn.execute(f'DROP INDEX "{index}"')
        spent: dict[str, list[float]] = {"bench_with": [], "bench_without": []}
        for r in range(rounds):
            low, high = START + timedelta(seconds=r * rows), START + timedelta(seconds=(r + 1) * rows)
            conn.execute("DROP TABLE IF EXISTS bench_batch")  # the round's rows, read once for both tables
            conn.execute("CREATE TEMP TABLE bench_batch AS SELECT * FROM changes WHERE committed_at >= %s AND committed_at < %s",
                         (low, high))
            for name in (("bench_with", "bench_without") if r % 2 == 0 else ("bench_without", "bench_with")):
                t0 = time.perf_counter()
                conn.execute(f"INSERT INTO {name} SELECT * FROM bench_batch")
                spent[name].append((time.perf_counter() - t0) * 1e6 / rows)
        with_, without = statistics.median(spent["bench_with"]), statistics.median(spent["bench_without"])
        paired = statistics.median(a / b for a, b in zip(spent["bench_with"], spent["bench_without"], strict=True))
        [(size,)] = conn.execute("SELECT pg_relation_size(indexrelid) FROM pg_index "
                                 "WHERE indrelid = 'bench_with'::regclass AND pg_get_indexdef(indexrelid) "
                                 "LIKE '%context -> ''request''%'").fetchall()
        print(f"\nINSERT of {rows:,} changes a round, {rounds} rounds: {with_:.1f} µs a change with the request btree, "
              f"{without:.1f} without: +{with_ - without:.1f} µs, ratio of the medians {with_ / without:.3f}, "
              f"median of the paired ratios {paired:.3f}; the btree holds {size / (rows * rounds):.0f} bytes a change", flush=True)
        for name in spent:
            conn.execute(f"DROP TABLE {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--write-rows", type=int, default=50_000)
    parser.add_argument("--write-rounds", type=int, default=10)
    args = parser.parse_args()
    with big_trail(args.rows, load_settings(None, **CONTEXT_SETTINGS)) as dsn:
        time_pages(dsn, args.rows, args.samples)
        if args.write_rounds:
            time_writes(dsn, min(args.write_rows, args.rows // args.write_rounds), args.write_rounds)
        return 0


if __name__ == "__main__":
    sys.exit(main())
