"""History, as-of, blame and revert, checked against snapshots of the real tables."""

from __future__ import annotations

import json
import random
import time
from decimal import Decimal

import psycopg
import pytest

from bemi_pg import commands, revert, timetravel
from bemi_pg.commands import prune
from bemi_pg.errors import ConfigError

from ..conftest import run_cli

TABLES = """
CREATE TABLE account (id int PRIMARY KEY, owner text, balance numeric, tags text[]);
CREATE TABLE entry (account_id int, n int, amount numeric(20, 4), note text, PRIMARY KEY (account_id, n));
"""


def _snapshot(conn: psycopg.Connection) -> dict[str, dict[str, str]]:
    """Every row of both tables as to_jsonb text, by primary key as bemi-pg writes it."""
    return {
        "account": dict(conn.execute("SELECT id::text, to_jsonb(a)::text FROM account a").fetchall()),
        "entry": dict(conn.execute("SELECT jsonb_build_array(account_id, n)::text, to_jsonb(e)::text FROM entry e").fetchall()),
    }


def test_as_of_matches_snapshots_of_a_randomized_workload(db):
    db.execute(TABLES)
    db.install(database_keys="never")
    rng = random.Random(4)
    moments: list[tuple[str, dict[str, dict[str, str]]]] = []
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        for step in range(120):
            with conn.transaction():
                for _ in range(rng.randint(1, 4)):
                    i = rng.randint(1, 12)
                    roll = rng.random()
                    if roll < 0.45:
                        conn.execute("INSERT INTO account VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                                     "balance = account.balance + excluded.balance, tags = excluded.tags",
                                     (i, f"owner {i}", Decimal(rng.randint(-10**6, 10**6)) / 1000,
                                      [f"t{rng.randint(0, 3)}", None]))
                    elif roll < 0.65:
                        conn.execute("DELETE FROM account WHERE id = %s", (i,))
                    elif roll < 0.9:
                        conn.execute("INSERT INTO entry VALUES (%s, %s, %s, %s) ON CONFLICT (account_id, n) DO UPDATE "
                                     "SET amount = excluded.amount, note = NULL",
                                     (i % 3, rng.randint(1, 4), Decimal(rng.randint(1, 10**8)) / 10**4, "n'ote"))
                    else:
                        conn.execute("DELETE FROM entry WHERE account_id = %s", (i % 3,))
            if step % 6 == 5:
                moment = conn.execute("SELECT clock_timestamp()::text").fetchone()[0]
                moments.append((moment, _snapshot(conn)))
                time.sleep(0.002)
        # A last change after the last moment: moments past what the poller has written cannot be answered.
        conn.execute("INSERT INTO account VALUES (1000, 'last', 0, NULL)")
    db.poll()
    with psycopg.connect(db.dsn) as conn:
        checked = 0
        for moment, snapshot in moments:
            for table in ("account", "entry"):
                got = dict(conn.execute("SELECT primary_key, row_data::text FROM bemi.as_of_all(%s, %s)", (table, moment)))
                want = snapshot[table]
                assert got == want, (table, moment)
                for pk in list(want)[:3] + ["999", "[9, 9]"]:  # a few rows, and some that never existed
                    row = conn.execute("SELECT bemi.as_of(%s, %s, %s)::text", (table, pk, moment)).fetchone()[0]
                    assert row == want.get(pk)
                    checked += 1
        # the typed function gives real rows of the table
        moment, snapshot = moments[-1]
        typed = conn.execute("SELECT to_jsonb(a)::text FROM bemi.as_of(NULL::account, %s) a", (moment,)).fetchall()
        assert sorted(t for (t,) in typed) == sorted(snapshot["account"].values())
    assert checked > 100


def test_history_blame_and_the_cli(db):
    db.execute(TABLES)
    db.install(database_keys="never")
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SELECT bemi.set_context('{\"who\": \"ann\"}')")
            conn.execute("INSERT INTO account VALUES (1, 'ann', 10.5, '{a}')")
        with conn.transaction():
            conn.execute("SELECT bemi.set_context('{\"who\": \"bob\"}')")
            conn.execute("UPDATE account SET balance = 99.123456789012345678 WHERE id = 1")
        before_owner_change = conn.execute("SELECT clock_timestamp()::text").fetchone()[0]
        with conn.transaction():
            conn.execute("SELECT bemi.set_context('{\"who\": \"cy\"}')")
            conn.execute("UPDATE account SET owner = 'cyrïl' WHERE id = 1")
    db.poll()
    with psycopg.connect(db.dsn) as conn:
        rows = timetravel.history(conn, "public.account", "1")
        assert [(r["operation"], r["context"]["who"]) for r in rows] == [("UPDATE", "cy"), ("UPDATE", "bob"), ("CREATE", "ann")]
        assert rows[0]["changed"] == {"owner": ["ann", "cyrïl"]}
        assert rows[1]["changed"] == {"balance": [Decimal("10.5"), Decimal("99.123456789012345678")]}
        blame = {r["column"]: r["context"]["who"] for r in timetravel.blame(conn, "account", "1")}
        assert blame == {"id": "ann", "owner": "cy", "balance": "bob", "tags": "ann"}
    env = {"BEMI_DSN": db.dsn}
    history = run_cli("history", "account", "1", env=env)
    assert history.returncode == 0 and "balance: 10.5 → 99.123456789012345678" in history.stdout
    as_of = run_cli("as-of", "account", "1", before_owner_change, env=env)
    assert json.loads(as_of.stdout)["owner"] == "ann" and "99.123456789012345678" in as_of.stdout
    before_tracking = run_cli("as-of", "account", "1", "2000-01-01", env=env)
    assert before_tracking.returncode == 5 and "before tracking of public.account began" in before_tracking.stderr
    all_rows = run_cli("as-of", "account", "--all", before_owner_change, env=env)
    assert [json.loads(line)["owner"] for line in all_rows.stdout.splitlines()] == ["ann"]
    unwritten = run_cli("as-of", "account", "--all", "infinity", env=env)
    assert unwritten.returncode == 5 and "later than what the poller has written" in unwritten.stderr
    blamed = run_cli("blame", "account", "1", env=env).stdout
    assert "owner" in blamed and "\"cyrïl\"" in blamed  # as jsonb writes it, not \u escapes


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_reverting_a_transaction_restores_the_state_before_it(db, mode):
    db.execute(TABLES)
    db.install(database_keys="never", capture_mode=mode)
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO account VALUES (1, 'ann', 10, '{a}'), (2, 'bob', 20, NULL)")
        conn.execute("INSERT INTO entry VALUES (1, 1, 5.5, 'x')")
        before = _snapshot(conn)
        with conn.transaction():
            conn.execute("SELECT bemi.set_context('{\"request\": \"r-42\"}')")
            conn.execute("UPDATE account SET balance = balance * 2, owner = upper(owner)")
            conn.execute("DELETE FROM entry")
            conn.execute("INSERT INTO account VALUES (3, 'new', 0, '{}')")
            conn.execute("UPDATE account SET balance = 7 WHERE id = 3")
            xid = conn.execute("SELECT txid_current() % (2^32)::bigint").fetchone()[0]
    db.poll()
    dry = run_cli("revert", "--transaction", str(xid), env={"BEMI_DSN": db.dsn})
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("-- bemi-pg revert") and "pg_catalog.to_jsonb(t.*) OPERATOR(pg_catalog.=)" in dry.stdout
    with psycopg.connect(db.dsn) as conn:
        assert _snapshot(conn) != before  # printing changed nothing
    applied = run_cli("revert", "--transaction", str(xid), "--apply", env={"BEMI_DSN": db.dsn})
    assert applied.returncode == 0, applied.stderr
    with psycopg.connect(db.dsn) as conn:
        assert _snapshot(conn) == before
    db.poll()  # the revert is itself in the trail, with a context saying what it reverted
    contexts = {json.dumps(c["context"], sort_keys=True) for c in db.changes() if c["context"].get("bemi_revert")}
    assert contexts == {json.dumps({"bemi_revert": {"transaction": xid}, "reverted_changes": 5}, sort_keys=True)}


def test_revert_refuses_a_row_changed_since_and_says_why(db):
    db.execute(TABLES)
    db.install(database_keys="never")
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SELECT bemi.set_context('{\"batch\": 1}')")
            conn.execute("INSERT INTO account VALUES (1, 'a', 1, NULL), (2, 'b', 2, NULL)")
        conn.execute("UPDATE account SET balance = 100 WHERE id = 2")  # a later change to one of them
    db.poll()
    with psycopg.connect(db.dsn, autocommit=True) as src, psycopg.connect(db.dsn, autocommit=True) as dest:
        plan = revert.plan_revert(src, dest, "public.changes", context={"batch": 1})
        revert.apply_revert(src, plan, commit=True)  # all or nothing: one conflict, nothing applied
        outcomes = sorted((s.description.split()[4], s.outcome) for s in plan.steps)
        assert outcomes == [("1", "applied"), ("2", "conflict")] and not plan.committed
        assert "was changed or deleted after change" in next(s.conflict for s in plan.steps if s.outcome == "conflict")
        assert src.execute("SELECT id, balance FROM account ORDER BY id").fetchall() == [(1, 1), (2, 100)]
        revert.apply_revert(src, revert.plan_revert(src, dest, "public.changes", context={"batch": 1}), commit=True,
                            skip_conflicts=True)
        assert src.execute("SELECT id, balance FROM account").fetchall() == [(2, 100)]  # never overwritten
    result = run_cli("revert", "--context", '{"batch": 1}', env={"BEMI_DSN": db.dsn})
    assert result.returncode == 4 and "conflict: change" in result.stderr


def test_column_rules_ignore_and_exclude(db):
    db.execute("CREATE TABLE users (id int PRIMARY KEY, email text, password_hash text, updated_at timestamptz)")
    db.install(ignore_columns=("*.updated_at",), exclude_columns=("public.users.password_hash",))
    db.execute("INSERT INTO users VALUES (1, 'a@x', 'secret', now())")
    db.execute("UPDATE users SET updated_at = now() + interval '1 minute'")  # ignored columns only: no change
    db.execute("UPDATE users SET email = 'b@x', updated_at = now() + interval '2 minutes'")
    db.execute("UPDATE users SET password_hash = 'other'")  # changes an excluded column: recorded, without it
    db.poll()
    changes = db.changes()
    assert [c["operation"] for c in changes] == ["CREATE", "UPDATE", "UPDATE"]
    assert all("password_hash" not in c["before"] and "password_hash" not in c["after"] for c in changes)
    assert changes[1]["after"]["email"] == "b@x" and "updated_at" in changes[1]["after"]
    assert db.execute("SELECT count(*) FROM changes WHERE after::text LIKE '%secret%' OR after::text LIKE '%other%'") == [(0,)]


def test_prune_with_monthly_partitions(db):
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.install(partition_by_month=True)
    db.execute("INSERT INTO t SELECT generate_series(1, 10)")
    db.poll()
    # Old changes, as if written long ago: they land in partitions of their own months.
    db.execute("SELECT bemi.ensure_changes_partition(d::date) FROM generate_series(date '2024-01-01', '2024-03-01', '1 month') d")
    db.execute("""INSERT INTO changes (source, "database", "schema", "table", primary_key, operation, committed_at, queued_at,
                                       transaction_id, position, commit_position, seq)
                  SELECT '1/old', 'old', 'public', 't', g::text, 'CREATE', timestamptz '2024-01-15' + g * interval '1 day', now(),
                         1, g, g, 0 FROM generate_series(1, 60) g""")
    partitions = "SELECT count(*) FROM pg_inherits WHERE inhparent = 'changes'::regclass"
    assert db.execute(partitions)[0][0] >= 4
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        result = prune(conn, db.settings, "365d")
    # Their rows are deleted first (through the seals' record where sealed; these are not), then
    # the months left empty are dropped.
    assert result["deleted"] == 60 and result["partitions_dropped"] == 3
    assert db.execute("SELECT count(*) FROM changes") == [(10,)]
    assert commands.verify(db.dsn, None, db.settings).intact
    with psycopg.connect(db.dsn, autocommit=True) as conn, pytest.raises(ConfigError, match="not understood"):
        prune(conn, db.settings, "ninety days")


def test_history_and_as_of_use_an_index_on_5_million_changes(db):
    from ..bigtrail import explain_everything, fill_changes

    fill_changes(db.dsn, db.settings, 5_000_000)
    assert db.execute("SELECT count(*) FROM changes") == [(5_000_000,)]
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        plans = explain_everything(conn)
        history = conn.execute("SELECT count(*) FROM bemi.history('t7', '1234', 100)").fetchone()[0]
        as_of = conn.execute("SELECT bemi.as_of('public.t7', '1234', '2024-02-15')").fetchone()[0]
        before = conn.execute("SELECT bemi.as_of('t7', '1234', '2024-01-01 00:00:01')").fetchone()[0]  # next: its CREATE
        from_baseline = conn.execute("SELECT bemi.as_of('t7', '50001', '2024-02-15')").fetchone()[0]
        blame = conn.execute("SELECT count(*) FROM bemi.blame('t7', '1234')").fetchone()[0]
        # A row moved from another key (bemi.key_move): the old key after and before the move,
        # history and blame of the new key through it.
        old_key, new_key, moved_at = conn.execute(
            "SELECT old_key, new_key, committed_at FROM bemi.key_move ORDER BY committed_at LIMIT 1 OFFSET 100").fetchone()
        gone = conn.execute("SELECT bemi.as_of('t7', %s, %s + interval '1 second')", (old_key, moved_at)).fetchone()[0]
        there = conn.execute("SELECT bemi.as_of('t7', %s, %s - interval '1 second')", (old_key, moved_at)).fetchone()[0]
        followed = conn.execute("SELECT count(*) FROM bemi.history('t7', %s, 100)", (new_key,)).fetchone()[0]
        conn.execute("SELECT count(*) FROM bemi.blame('t7', %s)", (new_key,)).fetchone()
    assert history == 5 and as_of is not None and blame == 2 and before is None and from_baseline == {"id": 50001}
    assert gone is None and there is not None and followed >= 2
    text = "\n".join(plans)
    assert "changes" in text and "Index" in text
    assert "Seq Scan on changes" not in text, text
