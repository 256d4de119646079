"""`make soak`: the fault-injection suite with soak-sized numbers, on a throwaway cluster.

    python scripts/soak.py [--kills 500] [--crashes 20] [--writers 4] [--copy-rows 20000]

Prints the figures (kills, faults, crashes survived; rows checked; lost, duplicated,
misattributed) and exits non-zero if anything was lost, duplicated or misattributed."""

from __future__ import annotations

import argparse
import json
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
from tests.faults import EXCLUDE, SCHEMA, Ledger, Writer, compare, kill_pollers, poller_env  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=500)
    parser.add_argument("--crashes", type=int, default=20)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--copy-rows", type=int, default=20_000)
    parser.add_argument("--pause", type=float, default=0.05, help="at most this long between a writer's transactions")
    args = parser.parse_args()

    with throwaway_cluster("soak", prefix="bemi-pg-soak-") as cluster:
        dsn = cluster.dsn("soak")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
        settings = load_settings(None, exclude_tables=EXCLUDE)
        commands.install(dsn, None, settings)
        config = cluster.datadir.parent / "bemi.toml"
        config.write_text('[source]\nexclude_tables = ["public.ledger_tx"]\n')

        ledger, stop = Ledger(), threading.Event()
        writers = [Writer(dsn, w, ledger, stop, copy_rows=args.copy_rows if w == 0 else 0, seed=7, pause=args.pause)
                   for w in range(args.writers)]
        for writer in writers:
            writer.start()
        started = time.monotonic()
        # Every sixth round is a fault point instead of a kill: enough rounds for --kills kills.
        figures = kill_pollers(dsn, -(-args.kills * 6 // 5), seed=7, config=str(config), fault_every=6)
        print(f"kills done after {time.monotonic() - started:.0f}s: {figures}", flush=True)
        # Crashes: a --follow poller keeps running (it reconnects by itself) while the server dies.
        env = poller_env(dsn, config=str(config))
        poller = subprocess.Popen([sys.executable, "-m", "bemi_pg", "poll", "--follow", "--interval", "0.05"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        crashes = 0
        for _ in range(args.crashes):
            time.sleep(3.0)
            cluster.stop("immediate")
            cluster.start()
            crashes += 1
        poller.send_signal(signal.SIGTERM)
        poller.wait(timeout=600)
        stop.set()
        for writer in writers:
            writer.join()
        commands.poll_once(dsn, None, settings)
        result = compare(dsn, dsn, ledger)
        figures.update(crashes=crashes, seconds=round(time.monotonic() - started), **result)
        print(json.dumps(figures, indent=2))
        bad = result["lost"] + result["duplicated"] + result["misattributed"] + result["phantom"]
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
