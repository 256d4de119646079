"""Fault-injection tools shared by the CI tests (tests/integration/test_faults.py) and the
soak script (scripts/soak.py): a mixed workload whose writers keep a ledger, pollers killed at
random moments, and the comparison of the changes table with the ledger."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

SCHEMA = """
CREATE TABLE item (id bigserial PRIMARY KEY, w int NOT NULL, n int NOT NULL, k int NOT NULL, v int NOT NULL DEFAULT 0,
                   payload text, amount numeric);
CREATE TABLE ledger_tx (w int, n int, PRIMARY KEY (w, n));
"""
EXCLUDE = ("public.ledger_tx",)

# BEMI_TEST_FAULT_SCALE shrinks (or grows) the fault suite's kills and rows: `.ci/run` runs it at
# full size on 15 and at 0.5 on 17 and 18, to keep three versions within the CI budget.
FAULT_SCALE = float(os.environ.get("BEMI_TEST_FAULT_SCALE") or 1)


def scaled(n: int) -> int:
    """``n`` at the fault suite's scale (at least 1)."""
    return max(1, round(n * FAULT_SCALE))

Key = tuple[str, str | None, str, str, str]  # table, primary_key, operation, after (jsonb text), context (canonical)


def canonical(context: dict[str, Any] | str) -> str:
    value = json.loads(context) if isinstance(context, str) else context
    return json.dumps(value, sort_keys=True)


@dataclass
class Ledger:
    """What each writer's transactions did; only those whose marker row committed count.
    ``confirmed``: the transactions whose COMMIT returned to the writer (what the application saw
    committed); a commit cut off by a crash is neither confirmed nor, by itself, lost."""

    attempted: dict[tuple[int, int], list[Key]] = field(default_factory=dict)
    confirmed: set[tuple[int, int]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, w: int, n: int, changes: list[Key]) -> None:
        with self.lock:
            self.attempted[(w, n)] = changes

    def confirm(self, w: int, n: int) -> None:
        with self.lock:
            self.confirmed.add((w, n))

    def expected(self, committed: set[tuple[int, int]]) -> Counter[Key]:
        out: Counter[Key] = Counter()
        for key, changes in self.attempted.items():
            if key in committed:
                out.update(changes)
        return out


class Writer(threading.Thread):
    """Commits numbered transactions of 1-50 rows (inserts, updates, deletes, savepoints,
    10% rollbacks, a context per transaction and another for its updates); one writer also
    commits a large COPY. With ``hold``, every third transaction waits that long before its
    commit, so that later transactions (newer ids) commit before it. Survives the server
    restarting under it."""

    def __init__(self, dsn: str, w: int, ledger: Ledger, stop: threading.Event, *, copy_rows: int = 0, seed: int = 0,
                 pause: float = 0.01, hold: float = 0.0):
        super().__init__(daemon=True)
        self.pause, self.hold = pause, hold
        self.dsn, self.w, self.ledger, self.stop, self.copy_rows = dsn, w, ledger, stop, copy_rows
        self.rng = random.Random(seed * 1000 + w)
        self.committed = 0
        self.errors = 0

    def run(self) -> None:
        n = 0
        conn: psycopg.Connection[Any] | None = None
        mine: list[int] = []
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn)
                n += 1
                mine = self._transaction(conn, n, mine)
                time.sleep(self.rng.uniform(0, self.pause))
            except psycopg.OperationalError:
                self.errors += 1
                conn = None
                time.sleep(0.2)
            except psycopg.Error:
                self.errors += 1
                if conn is not None and not conn.closed:
                    conn.rollback()
        if conn is not None:
            conn.close()

    def _transaction(self, conn: psycopg.Connection[Any], n: int, mine: list[int]) -> list[int]:
        rng, w = self.rng, self.w
        context = {"w": w, "n": n, "who": f"writer-{w}"}
        changes: list[Key] = []
        deleted: set[int] = set()
        after_commit = mine
        ctx = canonical(context)
        conn.execute("SELECT bemi.set_context(%s)", (json.dumps(context),))
        if self.copy_rows and n == 3:
            with conn.cursor().copy("COPY item (w, n, k, payload) FROM STDIN") as copy:
                for k in range(self.copy_rows):
                    copy.write_row((w, n, k, f"copy {k}"))
            rows = conn.execute("SELECT id, to_jsonb(item)::text FROM item WHERE w = %s AND n = %s ORDER BY id", (w, n)).fetchall()
            changes += [("item", str(i), "CREATE", after, ctx) for i, after in rows]
        else:
            count = rng.randint(1, 50)
            rows = conn.execute(
                "INSERT INTO item (w, n, k, payload, amount) SELECT %s, %s, g, md5(g::text), g / 3.0 "
                "FROM generate_series(1, %s) g RETURNING id, to_jsonb(item)::text", (w, n, count)).fetchall()
            changes += [("item", str(i), "CREATE", after, ctx) for i, after in rows]
            new_ids = [i for i, _ in rows]
            if rng.random() < 0.3:  # work in a savepoint, rolled back half the time
                conn.execute("SAVEPOINT s")
                sp = conn.execute("INSERT INTO item (w, n, k) VALUES (%s, %s, -1) RETURNING id, to_jsonb(item)::text", (w, n)).fetchall()
                if rng.random() < 0.5:
                    conn.execute("ROLLBACK TO SAVEPOINT s")
                else:
                    conn.execute("RELEASE SAVEPOINT s")
                    changes += [("item", str(i), "CREATE", after, ctx) for i, after in sp]
                    new_ids += [i for i, _ in sp]
            if mine and rng.random() < 0.5:
                update_context = {**context, "step": "update"}
                conn.execute("SELECT bemi.set_context(%s)", (json.dumps(update_context),))
                picked = rng.sample(mine, min(len(mine), rng.randint(1, 5)))
                rows = conn.execute("UPDATE item SET v = v + 1 WHERE id = ANY(%s) RETURNING id, to_jsonb(item)::text", (picked,)).fetchall()
                changes += [("item", str(i), "UPDATE", after, canonical(update_context)) for i, after in rows]
                if rng.random() < 0.3:
                    gone = conn.execute("DELETE FROM item WHERE id = %s RETURNING id", (picked[0],)).fetchall()
                    changes += [("item", str(i), "DELETE", "{}", canonical(update_context)) for (i,) in gone]
                    deleted = {i for (i,) in gone}
            after_commit = ([i for i in mine if i not in deleted] + new_ids)[-200:]
        conn.execute("INSERT INTO ledger_tx VALUES (%s, %s)", (w, n))
        self.ledger.record(w, n, changes)
        if rng.random() < 0.1:
            conn.rollback()
            return mine
        if self.hold and n % 3 == 0:
            time.sleep(self.hold)
        conn.commit()
        self.ledger.confirm(w, n)
        self.committed += 1
        return after_commit


def stop_workload(stop: threading.Event, writers: list[Writer], poller: subprocess.Popen[str], *,
                  settle: float = 0.0) -> str:
    """Stop the writers, give the poller ``settle`` seconds to catch up, stop it (SIGTERM); its stderr."""
    stop.set()
    for writer in writers:
        writer.join()
    time.sleep(settle)
    poller.send_signal(signal.SIGTERM)
    return poller.communicate(timeout=120)[1]


def excluding_config() -> str:
    """A bemi.toml (its path) that excludes the ledger table, as the workload's installation does."""
    config = Path(tempfile.mkdtemp(prefix="bemi-pg-conf-")) / "bemi.toml"
    config.write_text('[source]\nexclude_tables = ["public.ledger_tx"]\n')
    return str(config)


def poller_env(dsn: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if (not k.startswith(("BEMI_", "PG")) and k != "DATABASE_URL") or k == "BEMI_PG_CONVERSION"}  # the path under test
    env["BEMI_DSN"] = dsn
    env["BEMI_CONFIG"] = extra.pop("config", "")
    if not env["BEMI_CONFIG"]:
        del env["BEMI_CONFIG"]
    env.update(extra)
    return env


WAL_FAULTS = ("before_commit", "after_commit", "after_advance")


def kill_pollers(dsn: str, kills: int, *, seed: int = 0, config: str = "", fault_every: int = 5,
                 destination: str | None = None, points: tuple[str, ...] = WAL_FAULTS) -> dict[str, int]:
    """Start `poll --follow` and SIGKILL it at a random moment, ``kills`` times; every
    ``fault_every``-th round instead runs `poll --once` with a fault point (the process dies
    just before or after the destination commit, or after the slot advance; in trigger mode,
    after a move)."""
    rng = random.Random(seed)
    figures = {"kills": 0, "faults": 0}
    extra = {"BEMI_DESTINATION_DSN": destination} if destination else {}
    for round_ in range(kills):
        if fault_every and round_ % fault_every == fault_every - 1:
            point = points[round_ // fault_every % len(points)]
            subprocess.run([sys.executable, "-m", "bemi_pg", "poll", "--once", "--batch-size", str(rng.choice([50, 500]))],
                           env=poller_env(dsn, config=config, BEMI_FAULT=point, **extra), capture_output=True, timeout=120)
            figures["faults"] += 1
            continue
        args = ["poll", "--follow", "--interval", "0.02", "--batch-size", str(rng.choice([20, 200, 2000, 10000]))]
        proc = subprocess.Popen([sys.executable, "-m", "bemi_pg", *args], env=poller_env(dsn, config=config, **extra),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        figures["kills"] += 1
    return figures


def compare(source_dsn: str, destination_dsn: str, ledger: Ledger, *, source: str | None = None) -> dict[str, int]:
    """Figures: rows expected, found, lost, duplicated, misattributed (right row, wrong context);
    with ``source``, of that source's rows in a shared destination (another source's are phantoms).
    ``unconfirmed``: transactions confirmed to a writer whose marker row the source lacks (a
    commit lost by the server, e.g. at a failover without synchronous replication)."""
    with psycopg.connect(source_dsn) as conn:
        committed = {(w, n) for w, n in conn.execute("SELECT w, n FROM ledger_tx")}
    expected = ledger.expected(committed)
    with psycopg.connect(destination_dsn) as conn:
        rows = conn.execute("SELECT \"table\", primary_key, operation, after::text, context::text FROM changes "
                            "WHERE \"table\" = 'item' AND source = coalesce(%s, source)", (source,)).fetchall()
    found: Counter[Key] = Counter((t, pk, op, after, canonical(ctx)) for t, pk, op, after, ctx in rows)
    lost = expected - found
    extra = found - expected
    lost_rows = {k[:4] for k in lost}
    duplicated = sum(v for k, v in extra.items() if expected[k] >= 1)
    misattributed = sum(v for k, v in extra.items() if expected[k] == 0 and k[:4] in lost_rows)
    return {
        "transactions": len(committed),
        "unconfirmed": len(ledger.confirmed - committed),
        "expected": sum(expected.values()),
        "found": sum(found.values()),
        "lost": sum(lost.values()),
        "duplicated": duplicated,
        "misattributed": misattributed,
        "phantom": sum(extra.values()) - duplicated - misattributed,
    }


def order_violations(dsn: str) -> list[str]:
    """The items whose changes, in the trail's order (committed_at, commit_position, seq), are not
    in the order they were made: a CREATE of v 0 first, then each UPDATE one more v than the last
    (the writers' updates add 1 to v), a DELETE last."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT primary_key, operation, (after ->> 'v')::int FROM changes WHERE \"table\" = 'item' "
                            "ORDER BY primary_key, committed_at, commit_position, seq").fetchall()
    bad = []
    for pk, group in itertools.groupby(rows, key=lambda r: r[0]):
        ops = [(op, v) for _, op, v in group]
        made = [("CREATE", 0)] + [("UPDATE", i) for i in range(1, len(ops))]
        if ops[-1][0] == "DELETE":
            made[-1] = ("DELETE", None)
        if ops != made:
            bad.append(f"item {pk}: {ops}")
    return bad
