"""Ingest: `poll --once` draining a backlog, against the raw decode rate of the same slot.

    python bench/ingest.py [--inserts 200000] [--updates 100000] [--rounds 3] [--chart bench/batch-size.png]

On a throwaway server: a 5-column table with REPLICA IDENTITY FULL, a backlog of inserts and
updates, then alternately (1) the server decoding the slot by itself
(`SELECT count(*) FROM pg_logical_slot_peek_changes(...)` with the poller's options) and
(2) bemi-pg draining it into `changes`, in the same database and in another one. Prints the
rates, the medians and the ratio; with --chart, also throughput against batch size (PNG).

It also measures the floor the destination sets: the same number of finished change rows
copied by the server itself (`INSERT … SELECT` from `changes`, no decoding, no Python) into a
table with the changes table's columns and indexes, and prints the ratio any poller could
reach at best, decoding and writing one after the other (as a peek does) or fully
overlapped."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bemi_pg import commands  # noqa: E402
from bemi_pg._localpg import throwaway_cluster  # noqa: E402
from bemi_pg.config import load_settings  # noqa: E402
from bemi_pg.poller import wal2json_options  # noqa: E402

TABLE = "CREATE TABLE item (id bigint PRIMARY KEY, name text, qty integer, price numeric(12, 2), updated_at timestamptz)"


def backlog(dsn: str, start: int, inserts: int, updates: int) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO item SELECT g, md5(g::text), g %% 1000, g / 100.0, now() "
                     "FROM generate_series(%s::bigint, %s::bigint) g", (start, start + inserts - 1))
        conn.execute("UPDATE item SET qty = qty + 1 WHERE id BETWEEN %s::bigint AND %s::bigint", (start, start + updates - 1))
    return inserts + updates


def raw_decode(dsn: str, slot: str, options: list[str]) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        conn.execute("SELECT count(*) FROM pg_logical_slot_peek_changes(%s, NULL, NULL, VARIADIC %s::text[])", (slot, options))
        return time.perf_counter() - t0


def destination_floor(dsn: str, rows: int, rounds: int) -> list[float]:
    """Rows per second the server writes finished change rows into a changes-shaped table."""
    result = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(rounds):
            conn.execute("DROP TABLE IF EXISTS changes_floor")
            conn.execute("CREATE TABLE changes_floor (LIKE changes INCLUDING ALL)")
            t0 = time.perf_counter()
            conn.execute("INSERT INTO changes_floor SELECT * FROM changes LIMIT %s", (rows,))
            result.append(rows / (time.perf_counter() - t0))
        conn.execute("DROP TABLE changes_floor")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inserts", type=int, default=200_000)
    parser.add_argument("--updates", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chart", help="write throughput against batch size to this PNG")
    args = parser.parse_args()
    with throwaway_cluster("src", "dst", settings=(), prefix="bemi-pg-bench-") as cluster:
        src, dst = cluster.dsn("src"), cluster.dsn("dst")
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute(TABLE)
        settings = load_settings(None)
        commands.install(src, None, settings)
        commands.install(src, dst, settings)  # the destination objects in the other database too
        slot, options = settings.slot_for("src"), wal2json_options(settings)
        next_id = 1
        rates: dict[str, list[float]] = {"raw decode": [], "same database": [], "other database": []}
        for _ in range(args.rounds):
            for where, dest in (("same database", None), ("other database", dst)):
                n = backlog(src, next_id, args.inserts, args.updates)
                next_id += args.inserts
                rates["raw decode"].append(n / raw_decode(src, slot, options))
                stats = commands.poll_once(src, dest, settings)
                rates[where].append(stats.changes / stats.seconds)
        raw = statistics.median(rates["raw decode"])
        rates["write only"] = destination_floor(src, args.inserts + args.updates, args.rounds)
        print(f"backlog: {args.inserts:,} inserts + {args.updates:,} updates per round, {args.rounds} rounds")
        for name, values in rates.items():
            median = statistics.median(values)
            print(f"{name:<15} median {median:9,.0f} changes/s  ratio to raw decode {median / raw:.2f}   "
                  f"rounds {', '.join(f'{v:,.0f}' for v in values)}")
        write = statistics.median(rates["write only"])
        print(f"ceiling with this destination: {1 / (1 / raw + 1 / write) / raw:.2f}x decoding then writing, "
              f"{min(raw, write) / raw:.2f}x fully overlapped (no conversion cost at all)")
        if args.chart:
            sizes = [500, 2_000, 10_000, 50_000]
            throughput = []
            for size in sizes:
                n = backlog(src, next_id, args.inserts // 2, args.updates // 2)
                next_id += args.inserts // 2
                stats = commands.poll_once(src, None, settings, batch_size=size)
                throughput.append(stats.changes / stats.seconds)
                print(f"batch size {size:>6,}: {throughput[-1]:,.0f} changes/s")
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(sizes, throughput, marker="o", label="bemi-pg poll --once")
            ax.axhline(raw, color="grey", linestyle="--", label="raw decode (server only)")
            ax.set_xscale("log")
            ax.set_xlabel("batch size (rows per peek)")
            ax.set_ylabel("changes per second")
            ax.set_title("Ingest throughput against batch size")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.chart, dpi=120)
            print(f"chart: {args.chart}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
