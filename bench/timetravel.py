"""Time travel on a large trail: history, as-of and blame of one row on 5 million changes.

    python bench/timetravel.py [--rows 5000000] [--samples 200]

Starts a throwaway cluster, fills a synthetic changes table and prints the median and p95
time of each query over random rows (the plans use the (table, primary_key, committed_at)
index; tests/integration/test_timetravel.py checks that)."""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.bigtrail import BASELINE_KEYS, KEYS, TABLES, big_trail  # noqa: E402

QUERIES = {
    "history": "SELECT count(*) FROM bemi.history(%s, %s, 100)",
    "as-of": "SELECT bemi.as_of(%s, %s, '2024-02-15')",  # the last change before it
    "as-of (next)": "SELECT bemi.as_of(%s, %s, '2024-01-01 00:00:01')",  # no change before: the first after it
    "as-of (baseline)": "SELECT bemi.as_of(%s, (%s::int + {keys})::text, '2024-02-15')",  # no change at all
    "blame": "SELECT count(*) FROM bemi.blame(%s, %s)",
}
# A row an UPDATE moved from another key (bemi.key_move, table t7 of the synthetic trail): as-of
# of the old key after and before the move, history of the new key followed back through it.
MOVED = {
    "as-of (moved away)": "SELECT bemi.as_of('t7', %s, %s + interval '1 second')",
    "as-of (before move)": "SELECT bemi.as_of('t7', %s, %s - interval '1 second')",
    "history (moved)": "SELECT count(*) FROM bemi.history('t7', %s, 100)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    with big_trail(args.rows) as dsn:
        rng = random.Random(1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name, sql in QUERIES.items():
                times = []
                for _ in range(args.samples):
                    key = (f"t{rng.randrange(TABLES)}", str(rng.randrange(BASELINE_KEYS)))
                    t0 = time.perf_counter()
                    conn.execute(sql.format(keys=KEYS), key).fetchall()
                    times.append((time.perf_counter() - t0) * 1000)
                _report(name, times, args)
            moves = conn.execute("SELECT old_key, new_key, committed_at FROM bemi.key_move").fetchall()
            for name, sql in MOVED.items():
                times = []
                for _ in range(args.samples):
                    old_key, new_key, moved_at = rng.choice(moves)
                    t0 = time.perf_counter()
                    conn.execute(sql, (new_key,) if name.startswith("history") else (old_key, moved_at)).fetchall()
                    times.append((time.perf_counter() - t0) * 1000)
                _report(name, times, args)
        return 0


def _report(name: str, times: list[float], args: argparse.Namespace) -> None:
    times.sort()
    print(f"{name:<20} median {statistics.median(times):.2f} ms   p95 {times[int(len(times) * 0.95)]:.2f} ms "
          f"({args.samples} rows of {args.rows:,} changes)")


if __name__ == "__main__":
    sys.exit(main())
