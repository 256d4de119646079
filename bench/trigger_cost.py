"""What wal mode's capture trigger costs a transaction, measured inside the server.

    python bench/trigger_cost.py [--blocks 20] [--block 500] [--repeat 3] [--body NAME=FILE ...]

pgbench's figures move by ±15% between rounds on this machine, more than the trigger's own cost.
This script takes the client and the network out: one procedure runs transactions of TPC-B's
shape (3 single-row UPDATEs and 1 INSERT) against identical tables that differ only in their
statement trigger, alternating between the tables every --block transactions, so that a slow
moment of the machine falls on all of them alike. Tables: no trigger; a PL/pgSQL trigger whose
body only returns (the floor of any PL/pgSQL trigger); bemi-pg's `bemi.capture_context()`; and
any --body given (a PL/pgSQL body, DECLARE ... END, to try a change before making it). Every
table has REPLICA IDENTITY FULL. Runs without and with `bemi.set_context` in every
transaction, and prints µs per transaction and what each trigger adds to none."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from bemi_pg import commands  # noqa: E402
from bemi_pg._localpg import throwaway_cluster  # noqa: E402
from bemi_pg.config import load_settings  # noqa: E402

RUN = """
CREATE PROCEDURE run(names text[], blocks int, block int, with_context boolean, INOUT seconds float8[])
LANGUAGE plpgsql AS $$
DECLARE
  t0 timestamptz;
  r int;
BEGIN
  seconds := array_fill(0::float8, ARRAY[array_length(names, 1)]);
  FOR b IN 1..blocks LOOP
    FOR k IN 1..array_length(names, 1) LOOP
      t0 := clock_timestamp();
      FOR i IN 1..block LOOP
        r := (b * block + i) * 7919 % 10000 + 1;
        IF with_context THEN
          PERFORM bemi.set_context(('{"user_id": ' || r || ', "endpoint": "/transfer"}')::jsonb);
        END IF;
        EXECUTE format('UPDATE %I SET v = v + 1 WHERE id = $1', 'account_' || names[k]) USING r;
        EXECUTE format('UPDATE %I SET v = v + 1 WHERE id = $1', 'account_' || names[k]) USING r % 100 + 1;
        EXECUTE format('UPDATE %I SET v = v + 1 WHERE id = $1', 'account_' || names[k]) USING r % 10 + 1;
        EXECUTE format('INSERT INTO %I (v, at) VALUES ($1, now())', 'history_' || names[k]) USING r;
        COMMIT;
      END LOOP;
      seconds[k] := seconds[k] + extract(epoch FROM clock_timestamp() - t0);
    END LOOP;
  END LOOP;
END $$
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--block", type=int, default=500, help="transactions on one table before the next")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--body", action="append", default=[], metavar="NAME=FILE", help="another trigger body to time")
    args = parser.parse_args()
    with throwaway_cluster("bench", settings=("synchronous_commit=off",), prefix="bemi-pg-bench-") as cluster:
        dsn = cluster.dsn("bench")
        commands.install(dsn, None, load_settings(None))
        with psycopg.connect(dsn, autocommit=True) as conn:
            bodies: dict[str, str | None] = {"none": None, "empty": "BEGIN RETURN NULL; END", "bemi": None}
            for item in args.body:
                name, _, path = item.partition("=")
                bodies[name] = Path(path).read_text()
            for name, body in bodies.items():
                account, history = sql.Identifier(f"account_{name}"), sql.Identifier(f"history_{name}")
                conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v int, filler text) WITH (fillfactor = 50)")
                             .format(account))
                conn.execute(sql.SQL("INSERT INTO {} SELECT g, 0, repeat('x', 80) FROM generate_series(1, 10000) g")
                             .format(account))
                conn.execute(sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, v int, at timestamptz)").format(history))
                function = sql.Identifier(f"trigger_{name}")
                if body is not None:
                    conn.execute(sql.SQL("CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}")
                                 .format(function, sql.Literal(body)))
                for table in (account, history):
                    # The install tracked every table of public: keep bemi-pg's trigger on its own tables only.
                    conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(table))
                    if name != "bemi":
                        conn.execute(sql.SQL("DROP TRIGGER bemi_capture ON {}").format(table))
                    if body is not None:
                        conn.execute(sql.SQL("CREATE TRIGGER capture BEFORE INSERT OR UPDATE OR DELETE ON {} "
                                             "FOR EACH STATEMENT EXECUTE FUNCTION {}()").format(table, function))
            conn.execute(RUN)
            names = list(bodies)
            transactions = args.blocks * args.block
            print(f"µs per transaction (3 UPDATEs + 1 INSERT, REPLICA IDENTITY FULL), {args.repeat} runs of "
                  f"{transactions:,} per table, alternating every {args.block}")
            for with_context in (False, True):
                runs: dict[str, list[float]] = {name: [] for name in names}
                for _ in range(args.repeat):
                    [seconds] = conn.execute("CALL run(%s, %s, %s, %s, NULL)",
                                             (names, args.blocks, args.block, with_context)).fetchone()  # type: ignore[misc]
                    for name, s in zip(names, seconds, strict=True):
                        runs[name].append(s / transactions * 1e6)
                base = statistics.median(runs["none"])
                label = "bemi.set_context in each" if with_context else "no context"
                for name in names:
                    median = statistics.median(runs[name])
                    added = statistics.median(r - n for r, n in zip(runs[name], runs["none"], strict=True))
                    print(f"{label:<26} {name:<8} median {median:6.1f} µs   adds {added:+5.1f} µs to no trigger "
                          f"(median of the runs' differences)   base {base:.1f}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
