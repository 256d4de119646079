"""Memory: the poller's peak RSS draining a 1,000,000-change backlog that holds one
transaction of 500,000 rows.

    python bench/memory.py [--big 500000] [--small-transactions 5000] [--rows-each 100]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bemi_pg import commands  # noqa: E402
from bemi_pg._localpg import throwaway_cluster  # noqa: E402
from bemi_pg.config import load_settings  # noqa: E402

POLL = ("import re, sys\nfrom bemi_pg.cli import main\nrc = main(['poll', '--once'])\n"
        "print('peak_kb', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\nsys.exit(rc)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", type=int, default=500_000)
    parser.add_argument("--small-transactions", type=int, default=5_000)
    parser.add_argument("--rows-each", type=int, default=100)
    args = parser.parse_args()
    with throwaway_cluster("src", settings=(), prefix="bemi-pg-bench-") as cluster:
        dsn = cluster.dsn("src")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE item (id bigint PRIMARY KEY, name text, qty int, price numeric, at timestamptz)")
        commands.install(dsn, None, load_settings(None))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO item SELECT g, md5(g::text), g, g / 3.0, now() FROM generate_series(1, %s::bigint) g", (args.big,))
            start = args.big + 1
            for _ in range(args.small_transactions):
                conn.execute("INSERT INTO item SELECT g, md5(g::text), g, g / 3.0, now() FROM generate_series(%s::bigint, %s::bigint) g",
                             (start, start + args.rows_each - 1))
                start += args.rows_each
        total = start - 1
        env = {"BEMI_DSN": dsn, "PATH": "/usr/bin:/bin"}
        t0 = time.monotonic()
        result = subprocess.run([sys.executable, "-c", POLL], env=env, capture_output=True, text=True, check=True)
        seconds = time.monotonic() - t0
        peak_mb = int(re.search(r"peak_kb (\d+)", result.stdout).group(1)) / 1024  # type: ignore[union-attr]
        print(f"backlog {total:,} changes (one transaction of {args.big:,}): poller peak RSS {peak_mb:.0f} MB, "
              f"drained in {seconds:.0f}s")
        return 0


if __name__ == "__main__":
    sys.exit(main())
