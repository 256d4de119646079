"""Latency: with `poll --follow` running, how long after its commit a change is in `changes`.

    python bench/latency.py [--tps 500] [--seconds 30] [--interval 0.2]

A load generator commits single-row transactions at the given rate; afterwards the script
reads, for each change, created_at (the destination transaction that wrote it) minus
committed_at, and prints p50, p99 and the share within 1 s."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bemi_pg import commands  # noqa: E402
from bemi_pg._localpg import throwaway_cluster  # noqa: E402
from bemi_pg.config import load_settings  # noqa: E402


def load(dsn: str, tps: float, seconds: float, workers: int = 4) -> int:
    done = [0] * workers

    def work(i: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            period = workers / tps
            next_at = time.monotonic()
            end = next_at + seconds
            while next_at < end:
                conn.execute("INSERT INTO event (kind) VALUES ('tick')")
                done[i] += 1
                next_at += period
                time.sleep(max(0.0, next_at - time.monotonic()))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tps", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args()
    with throwaway_cluster("src", settings=(), prefix="bemi-pg-bench-") as cluster:
        dsn = cluster.dsn("src")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE event (id bigserial PRIMARY KEY, kind text, at timestamptz DEFAULT now())")
        commands.install(dsn, None, load_settings(None))
        poller = subprocess.Popen([sys.executable, "-m", "bemi_pg", "poll", "--follow", "--interval", str(args.interval)],
                                  env={"BEMI_DSN": dsn, "PATH": "/usr/bin:/bin"}, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        t0 = time.monotonic()
        committed = load(dsn, args.tps, args.seconds)
        rate = committed / (time.monotonic() - t0)
        time.sleep(3.0)
        poller.send_signal(signal.SIGTERM)
        poller.wait(timeout=60)
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.99) WITHIN GROUP (ORDER BY d), "
                "avg((d <= 1)::int), count(*) FROM (SELECT extract(epoch FROM created_at - committed_at) AS d "
                "FROM changes) s").fetchone()
        assert row is not None
        p50, p99, within, count = row
        print(f"{committed:,} transactions at {rate:.0f}/s, poll interval {args.interval}s: {count:,} changes; "
              f"latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, {within * 100:.1f}% within 1 s")
        return 0


if __name__ == "__main__":
    sys.exit(main())
