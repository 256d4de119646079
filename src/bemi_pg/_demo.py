"""``make demo``: Bemi's supabase-js README example, replayed against a throwaway server.

Starts a local PostgreSQL in DIR/data, (re)creates the database ``demo`` with Bemi's
``todo`` table, installs bemi-pg, replays the requests the way Bemi's supabase-js client
makes them (an RPC ``bemi_set_context`` in its own transaction, then the write), polls once
and prints the ``changes`` table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psycopg

from . import commands
from ._localpg import LocalCluster
from .config import load_settings

REQUESTS = [
    ("POST", "/todos", {"task": "Sleep", "isCompleted": False},
     "INSERT INTO todo (task, \"isCompleted\") VALUES (%(task)s, %(isCompleted)s)"),
    ("POST", "/todos", {"task": "Eat", "isCompleted": False},
     "INSERT INTO todo (task, \"isCompleted\") VALUES (%(task)s, %(isCompleted)s)"),
    ("POST", "/todos", {"task": "Repeat", "isCompleted": False},
     "INSERT INTO todo (task, \"isCompleted\") VALUES (%(task)s, %(isCompleted)s)"),
    ("PUT", "/todos/1/complete", {}, "UPDATE todo SET \"isCompleted\" = true WHERE id = 1"),
    ("DELETE", "/todos/2", {}, "DELETE FROM todo WHERE id = 2"),
]

COLUMNS = ["primary_key", "table", "operation", "before", "after", "context", "committed_at"]


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]

    def line(cells: tuple[str, ...] | list[str]) -> str:
        return " " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(COLUMNS), "-" + "-+-".join("-" * w for w in widths) + "-"]
    out += [line(r) for r in rows]
    out.append(f"({len(rows)} rows)")
    return "\n".join(out)


def main(directory: str) -> int:
    cluster = LocalCluster(Path(directory) / "data")
    admin = cluster.start()
    print(f"PostgreSQL running in {cluster.datadir} ({admin}); stop it with `make demo-stop`", file=sys.stderr)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = 'demo'")
        conn.execute("DROP DATABASE IF EXISTS demo WITH (FORCE)")
        conn.execute("CREATE DATABASE demo")
    dsn = cluster.dsn("demo")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE TABLE todo (id bigserial PRIMARY KEY, task text, "isCompleted" boolean)')
    settings = load_settings(None)
    commands.install(dsn, None, settings)
    with psycopg.connect(dsn, autocommit=True) as conn:  # autocommit: each call its own transaction, as PostgREST
        for method, endpoint, payload, statement in REQUESTS:
            context = {"method": method, "endpoint": endpoint, "payload": payload}
            conn.execute("SELECT bemi_set_context(%s)", (json.dumps(context),))
            conn.execute(statement, payload)
    commands.poll_once(dsn, None, settings)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            'SELECT primary_key, "table", operation, before::text, after::text, context::text, '
            "to_char(committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00' "
            "FROM changes ORDER BY commit_position, seq"
        ).fetchall()
    columns = ", ".join(f'"{c}"' for c in COLUMNS)
    print(f"\n$ psql {dsn} -c 'SELECT {columns} FROM changes;'\n")
    print(_table([tuple("" if v is None else str(v) for v in r) for r in rows]))
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".demo"))
