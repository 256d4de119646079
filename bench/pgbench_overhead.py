"""Write overhead: pgbench TPS with bemi-pg installed against the same server with no tracking.

    python bench/pgbench_overhead.py [--seconds 20] [--rounds 3] [--clients 4] [--scale 10]

Databases on one throwaway server: plain; bemi-pg in wal mode (REPLICA IDENTITY FULL, the
statement trigger); bemi-pg in trigger mode (per-row triggers appending to bemi.change_queue);
and a per-row audit trigger writing to_jsonb(OLD)/to_jsonb(NEW) and the transaction's context
into a one-index table, as supa_audit-like tools do. Each round runs pgbench's TPC-B-like script
on every one in turn (wal and trigger mode also with a `bemi.set_context(...)` in every
transaction; wal mode also with `bemi-pg poll --follow` draining the slot meanwhile, since
decoding shares the server, and trigger mode with `poll --follow` moving the queue meanwhile),
and the plain database with one more statement per transaction (a `set_config`, what
`bemi.set_context` costs without bemi-pg: the floor for the set_context rounds, and the audit
trigger's context). Two more
databases give the floor of any capture trigger written in PL/pgSQL: REPLICA IDENTITY FULL
alone, and with a statement trigger whose body only returns. Prints the median TPS of each, its
ratio to no tracking, and the median of its ratios to the same round's run with no tracking."""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

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
AUDIT = """
CREATE TABLE audit_log (id bigserial PRIMARY KEY, table_name text NOT NULL, operation text NOT NULL,
                        old_row jsonb, new_row jsonb, context jsonb, at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit_log (table_name, operation, old_row, new_row, context)
  VALUES (TG_TABLE_NAME, TG_OP, CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
          CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END, nullif(current_setting('app.context', true), '')::jsonb);
  RETURN NULL;
END $$;
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON pgbench_accounts FOR EACH ROW EXECUTE FUNCTION audit_row();
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON pgbench_tellers FOR EACH ROW EXECUTE FUNCTION audit_row();
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON pgbench_branches FOR EACH ROW EXECUTE FUNCTION audit_row();
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON pgbench_history FOR EACH ROW EXECUTE FUNCTION audit_row();
"""
# The floor of any capture trigger written in PL/pgSQL: REPLICA IDENTITY FULL alone, and with a
# statement trigger whose body only returns.
TABLES = ("accounts", "tellers", "branches", "history")
REPLICA_IDENTITY_FULL = "".join(f"ALTER TABLE pgbench_{t} REPLICA IDENTITY FULL;\n" for t in TABLES)
EMPTY_TRIGGER = "CREATE FUNCTION nothing() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$;\n" + "".join(
    f"CREATE TRIGGER nothing BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgbench_{t} "
    "FOR EACH STATEMENT EXECUTE FUNCTION nothing();\n" for t in TABLES)
CONTEXT = "SELECT bemi.set_context(('{\"user_id\": ' || :aid || ', \"endpoint\": \"/transfer\"}')::jsonb);\n"


def pgbench(cluster: LocalCluster, db: str, script: Path, seconds: int, clients: int) -> float:
    inside = script
    if cluster.pg.root is not None:  # pgbench in a Debian root sees only the root's files
        inside = cluster.pg.scratch_dir() / f"bemi-pg-bench-{script.name}"
        shutil.copyfile(script, inside)
    cmd = cluster.pg.argv("pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)),
                          "-T", str(seconds), "-f", cluster.pg.inner_path(inside), "-h", "127.0.0.1",
                          "-p", str(cluster.port), "-U", "postgres", db)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]


# A statement of set_context's cost that needs nothing installed: what one more statement per
# transaction costs by itself, the floor for the set_context rounds.
NOOP = "SELECT set_config('app.context', '{\"user_id\": ' || :aid || ', \"endpoint\": \"/transfer\"}', true);\n"

# name -> (database, script: plain, context or noop, poller following?)
CONFIGS = {
    "no tracking": ("plain", "plain", False),
    "no tracking + 1 statement": ("plain", "noop", False),
    "replica identity full": ("full", "plain", False),
    "  + an empty trigger": ("empty_trigger", "plain", False),
    "wal mode, no context": ("wal", "plain", False),
    "wal mode, set_context": ("wal", "context", False),
    "wal mode + poller": ("wal", "context", True),
    "trigger mode, no context": ("triggers", "plain", False),
    "trigger mode, set_context": ("triggers", "context", False),
    "trigger mode + mover": ("triggers", "context", True),
    "per-row audit trigger": ("audit", "noop", False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--only", help="configurations to run, separated by ';' (default: all; 'no tracking' always runs)")
    args = parser.parse_args()
    databases = ("plain", "full", "empty_trigger", "wal", "triggers", "audit")
    with throwaway_cluster(*databases, settings=("synchronous_commit=off",), prefix="bemi-pg-bench-") as cluster:
        for db in databases:
            subprocess.run(cluster.pg.argv("pgbench", "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1",
                            "-p", str(cluster.port), "-U", "postgres", db), check=True, capture_output=True)
        commands.install(cluster.dsn("wal"), None, load_settings(None))
        commands.install(cluster.dsn("triggers"), None, load_settings(None, capture_mode="triggers"))
        for db, setup in (("audit", AUDIT), ("full", REPLICA_IDENTITY_FULL),
                          ("empty_trigger", REPLICA_IDENTITY_FULL + EMPTY_TRIGGER)):
            with psycopg.connect(cluster.dsn(db), autocommit=True) as conn:
                conn.execute(setup)
        scripts = {name: cluster.datadir.parent / f"tpcb-{name}.sql" for name in ("plain", "context", "noop")}
        scripts["plain"].write_text(TPCB.format(context=""))
        scripts["context"].write_text(TPCB.format(context=CONTEXT))
        scripts["noop"].write_text(TPCB.format(context=NOOP))
        configs = {name: CONFIGS[name] for name in (["no tracking", *args.only.split(";")] if args.only else CONFIGS)}
        results: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name, (db, script, follow) in configs.items():
                poller = None
                if follow:
                    poller = subprocess.Popen([sys.executable, "-m", "bemi_pg", "poll", "--follow", "--dsn", cluster.dsn(db)],
                                              stderr=subprocess.DEVNULL)
                try:
                    results[name].append(pgbench(cluster, db, scripts[script], args.seconds, args.clients))
                finally:
                    if poller is not None:
                        poller.terminate()
                        poller.wait()
                if db in ("wal", "triggers"):  # the next round starts drained
                    commands.poll_once(cluster.dsn(db), None, load_settings(None))
        plain = results["no tracking"]
        base = statistics.median(plain)
        print(f"pgbench TPC-B-like, {args.clients} clients, scale {args.scale}, {args.rounds} alternating rounds of {args.seconds} s")
        for name, tps in results.items():
            median = statistics.median(tps)
            paired = statistics.median(t / p for t, p in zip(tps, plain, strict=True))  # to the same round's plain
            print(f"{name:<26} median {median:8.0f} tps  ratio {median / base:.3f}  paired {paired:.3f}   "
                  f"rounds {', '.join(f'{t:.0f}' for t in tps)}")
        audit = results.get("per-row audit trigger")
        if audit:  # issue 21's target: trigger mode at >= 1.0x the per-row audit trigger
            for name in ("trigger mode, set_context", "trigger mode + mover"):
                if name in results:
                    paired = statistics.median(t / a for t, a in zip(results[name], audit, strict=True))
                    ratio = statistics.median(results[name]) / statistics.median(audit)
                    print(f"{name:<26} to the per-row audit trigger: ratio {ratio:.3f}  paired {paired:.3f}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
