"""Baseline: rows/s and the snapshot process's peak RSS on a table of 1,000,000 rows, with the
destination in the same database and in another one.

    python bench/snapshot.py [--rows 1000000] [--batch 5000]
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

SNAPSHOT = ("import re, sys\nfrom bemi_pg import baseline\nfrom bemi_pg.config import load_settings\n"
            "baseline.take_snapshot(sys.argv[1], sys.argv[2] or None, load_settings(None), batch_rows=int(sys.argv[3]), "
            "show_progress=False)\n"
            "print('peak_kb', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5_000)
    args = parser.parse_args()
    with throwaway_cluster("src", "dst", settings=(), prefix="bemi-pg-bench-") as cluster:
        dsn, dst = cluster.dsn("src"), cluster.dsn("dst")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE item (id bigint PRIMARY KEY, name text, qty int, price numeric, at timestamptz, "
                         "tags text[], doc jsonb)")
            conn.execute("INSERT INTO item SELECT g, md5(g::text), g, g / 3.0, now(), ARRAY['a', 'b'], "
                         "jsonb_build_object('g', g) FROM generate_series(1, %s::bigint) g", (args.rows,))
            conn.execute("VACUUM ANALYZE item")
        figures = []
        for where, destination in (("same database", ""), ("another database", dst)):
            commands.install(dsn, destination or None, load_settings(None), snapshot=False)
            t0 = time.monotonic()
            result = subprocess.run([sys.executable, "-c", SNAPSHOT, dsn, destination, str(args.batch)],
                                    capture_output=True, text=True, check=True)
            seconds = time.monotonic() - t0
            peak_mb = int(re.search(r"peak_kb (\d+)", result.stdout).group(1)) / 1024  # type: ignore[union-attr]
            figures.append(f"{where}: {args.rows / seconds:,.0f} rows/s ({seconds:.1f} s), peak RSS {peak_mb:.0f} MB")
            commands.uninstall(dsn, destination or None, load_settings(None))
        print(f"baseline of {args.rows:,} rows, batches of {args.batch:,}:")
        for line in figures:
            print("  " + line)
        return 0


if __name__ == "__main__":
    sys.exit(main())
