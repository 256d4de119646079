"""Write overhead: pgbench TPS with bemi-pg installed against the same server with no tracking.

    python bench/pgbench_overhead.py [--seconds 20] [--rounds 3] [--clients 4] [--scale 10]

Two databases on one throwaway server, one plain and one with bemi-pg installed (wal mode,
REPLICA IDENTITY FULL, the statement trigger); rounds alternate between them, each running
pgbench's TPC-B-like script, and, on the tracked database, the same script with a
`bemi.set_context(...)` in every transaction. Prints the median TPS of each and the ratios."""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bemi_pg import commands  # noqa: E402
from bemi_pg._localpg import LocalCluster, throwaway_cluster  # noqa: E402
from bemi_pg.config import load_settings  # noqa: E402

TPCB = """\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
BEGIN;
{context}UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""
CONTEXT = "SELECT bemi.set_context(('{\"user_id\": ' || :aid || ', \"endpoint\": \"/transfer\"}')::jsonb);\n"


def pgbench(cluster: LocalCluster, db: str, script: Path, seconds: int, clients: int) -> float:
    cmd = [str(cluster.bindir / "pgbench"), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)),
           "-T", str(seconds), "-f", str(script), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", db]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--scale", type=int, default=10)
    args = parser.parse_args()
    with throwaway_cluster("plain", "tracked", settings=("synchronous_commit=off",), prefix="bemi-pg-bench-") as cluster:
        for db in ("plain", "tracked"):
            subprocess.run([str(cluster.bindir / "pgbench"), "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1",
                            "-p", str(cluster.port), "-U", "postgres", db], check=True, capture_output=True)
        commands.install(cluster.dsn("tracked"), None, load_settings(None))
        plain_script, context_script = cluster.datadir.parent / "tpcb.sql", cluster.datadir.parent / "tpcb-context.sql"
        plain_script.write_text(TPCB.format(context=""))
        context_script.write_text(TPCB.format(context=CONTEXT))
        results: dict[str, list[float]] = {"no tracking": [], "bemi-pg, no context": [], "bemi-pg, set_context": []}
        for _ in range(args.rounds):
            results["no tracking"].append(pgbench(cluster, "plain", plain_script, args.seconds, args.clients))
            results["bemi-pg, no context"].append(pgbench(cluster, "tracked", plain_script, args.seconds, args.clients))
            results["bemi-pg, set_context"].append(pgbench(cluster, "tracked", context_script, args.seconds, args.clients))
        base = statistics.median(results["no tracking"])
        for name, tps in results.items():
            median = statistics.median(tps)
            print(f"{name:<22} median {median:8.0f} tps  ratio {median / base:.3f}   rounds {', '.join(f'{t:.0f}' for t in tps)}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
