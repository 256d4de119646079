"""Trigger mode against wal mode: the same rows for the same workload, the same context rules,
and a switch from one mode to the other that neither loses nor duplicates a change."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psycopg
import pytest

from bemi_pg import commands
from bemi_pg.config import load_settings
from bemi_pg.errors import BemiError, SlotBusy
from bemi_pg.poller import Poller
from bemi_pg.stitch import context_json, final_comment

from ..faults import EXCLUDE, SCHEMA, Ledger, Writer, compare
from .test_fidelity import MATRIX, ROWS

TABLES = """
CREATE TABLE account (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric NOT NULL, secret text,
                      updated_at timestamptz NOT NULL DEFAULT '2026-01-01');
CREATE TABLE line_item (order_id int, sku text, qty int, PRIMARY KEY (sku, order_id));
CREATE TABLE event_log (at int, message text);
"""
COLUMN_RULES = {"exclude_columns": ("account.secret",), "ignore_columns": ("*.updated_at",)}


def workload(dsn: str) -> None:
    """Transactions of several statements under different contexts, COPY, TRUNCATE, deletes,
    savepoints, a rollback, hostile contexts, and the fidelity matrix of types."""
    with psycopg.connect(dsn, application_name="parity") as conn:
        conn.execute("SELECT bemi.set_context(%s)", ('{"user": "alice", "amount": 1.10, "big": 12345678901234567890}',))
        conn.execute("INSERT INTO account (id, owner, balance, secret) SELECT g, 'o' || g, g * 1.5, 's' FROM generate_series(1, 20) g")
        conn.execute("UPDATE account SET balance = balance + 1 WHERE id <= 5 /*Bemi {\"endpoint\": \"/pay\", \"user\": \"bob\"} Bemi*/")
        conn.execute("INSERT INTO line_item VALUES (1, 'a', 2), (1, 'b', 3), (2, 'a', 1)")
        conn.execute("UPDATE account SET updated_at = '2026-02-02' WHERE id = 6")  # ignored columns only: no change
        conn.execute("UPDATE account SET updated_at = '2026-02-03', owner = 'x' WHERE id = 7")
        conn.commit()
        conn.execute("SELECT bemi_set_context(%s)", ('{"job": "nightly"}',))
        with conn.cursor().copy("COPY account (id, owner, balance) FROM STDIN") as copy:
            for i in range(100, 400):
                copy.write_row((i, f"copy {i}", i / 7))
        conn.execute("DELETE FROM account WHERE id BETWEEN 100 AND 150")
        conn.execute("SAVEPOINT s")
        conn.execute("UPDATE account SET owner = 'rolled back' WHERE id = 200")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute("UPDATE account SET owner = 'kept' WHERE id = 201")
        conn.commit()
        conn.execute("SELECT bemi_set_context(NULL)")
        conn.execute("INSERT INTO account (id, owner, balance) VALUES (999, 'never', 0)")
        conn.rollback()
        conn.execute("TRUNCATE line_item")
        conn.execute("INSERT INTO event_log VALUES (1, 'no key'), (1, 'no key')")
        conn.execute("UPDATE event_log SET message = 'still no key'")
        conn.commit()
        # Hostile contexts, each in its own transaction.
        for statement in (
            "SELECT bemi.set_context('[1, 2]')",
            "SELECT set_config('bemi.context', '{\"unterminated', true)",
            "SELECT set_config('bemi.context', '  {\"padded\": true}  ', true)",
            "SELECT bemi_set_context('\"a string\"')",
        ):
            conn.execute(statement)
            conn.execute("INSERT INTO event_log VALUES (2, %s)", (statement,))
            conn.commit()
            conn.execute("SELECT bemi_set_context(NULL)")
        conn.execute("INSERT INTO event_log VALUES (3, '/*Bemi {\"forged\": true} Bemi*/')")
        conn.execute("INSERT INTO event_log VALUES (4, 'x') -- /*Bemi {\"forged\": true} Bemi*/")
        conn.execute("INSERT INTO event_log VALUES (5, 'django') /*Bemi %7B%22path%22%3A%20%22/a%2%25b%22%7D Bemi*/;")
        conn.commit()
        conn.execute(ROWS)
        conn.execute("UPDATE matrix SET c_integer = coalesce(c_integer, 0) - 1, c_numeric_nan = 'Infinity' WHERE id IN (1, 3)")
        conn.execute("DELETE FROM matrix WHERE id = 2")
        conn.commit()


def _rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            'SELECT "schema", "table", primary_key, operation, before, after, context FROM changes '
            "ORDER BY committed_at, commit_position, seq").fetchall()


def test_trigger_mode_writes_the_rows_wal_mode_writes(db, other_db):
    for target in (db, other_db):
        target.execute(MATRIX + TABLES)
    db.install(exclude_tables=("snapshots.snap",), **COLUMN_RULES)
    other_db.install(capture_mode="triggers", exclude_tables=("snapshots.snap",), **COLUMN_RULES)
    workload(db.dsn)
    workload(other_db.dsn)
    assert other_db.execute("SELECT count(*) FROM changes") == [(0,)]  # queued, off the write path
    db.poll()
    other_db.poll()  # trigger mode: moves the queue

    wal, triggers = _rows(db.dsn), _rows(other_db.dsn)
    assert len(wal) > 350
    assert triggers == wal
    assert other_db.execute("SELECT count(*) FROM bemi.change_queue") == [(0,)]
    # Time travel answers the same, up to the last change of each trail.
    as_of = "SELECT * FROM bemi.as_of_all('account', (SELECT max(committed_at) FROM changes))"
    assert other_db.execute(as_of) == db.execute(as_of)
    assert len(db.execute(as_of)) > 200
    ops = {row[3] for row in triggers}
    assert ops == {"CREATE", "UPDATE", "DELETE", "TRUNCATE"}
    # The pieces the workload is there for, so that both modes cannot be wrong the same way.
    assert all("secret" not in row[5] for row in triggers if row[1] == "account")
    assert not [r for r in triggers if r[1] == "account" and r[2] == "6" and r[3] == "UPDATE"]
    assert {"user": "bob", "endpoint": "/pay", "amount": 1.10, "big": 12345678901234567890} in [r[6] for r in triggers]
    assert ("line_item", '["a", 1]') in [(r[1], r[2]) for r in triggers]
    assert [r[6] for r in triggers if r[1] == "event_log" and r[5].get("at") == 5] == [{"path": "/a%2%b"}]
    errors = [r[6]["_bemi_error"][0]["error"] for r in triggers if "_bemi_error" in r[6]]
    assert errors == ["context is a JSON list, not an object", "context is not valid JSON", "context is a JSON str, not an object"]


def test_trigger_mode_positions_keep_the_key_unique_and_the_order(db):
    db.execute(TABLES)
    db.install(capture_mode="triggers")
    with db.connect() as first, db.connect() as second:
        second.execute("INSERT INTO account (id, owner, balance) VALUES (2, 'b', 2)")  # second takes the older id
        first.execute("INSERT INTO account (id, owner, balance) VALUES (1, 'a', 1)")
        first.execute("UPDATE account SET balance = 10 WHERE id = 1")
        first.commit()
        second.execute("UPDATE account SET balance = 11 WHERE id = 1")  # after first's commit
        second.commit()
    db.poll()
    rows = db.execute("SELECT primary_key, operation, after ->> 'balance', transaction_id, commit_position, seq, position "
                      "FROM changes ORDER BY committed_at, commit_position, seq")
    assert [(r[0], r[1], r[2]) for r in rows] == [("2", "CREATE", "2"), ("1", "CREATE", "1"), ("1", "UPDATE", "10"),
                                                  ("1", "UPDATE", "11")]
    assert rows[0][3] < rows[1][3]  # the later change of row 1 comes from the older transaction
    assert all(r[4] == -r[3] for r in rows)  # xids stay below 2^32 here
    assert [r[5] for r in rows] == [0, 0, 1, 1]
    last = "(SELECT max(committed_at) FROM changes)"
    assert db.execute(f"SELECT bemi.as_of('account', '1', {last})") == [({"id": 1, "owner": "a", "balance": 11, "secret": None,
                                                                        "updated_at": "2026-01-01T00:00:00+00:00"},)]
    assert all(r[6] > 0 for r in rows)


CONTEXT_CASES: list[list[Any]] = [
    [None, None, None, None, ["app", "psql", "10.0.0.1"], None],
    [None, None, None, None, ["app", "", None], None],
    ['{"a": 1}', None, None, None, ["app", "psql", None], None],
    ['{"a": 1}', '{"a": 2, "b": [1, {"c": null}]}', None, None, None, None],
    ['{}', None, None, None, ["app", "psql", None], None],
    ['not json', '{"ok": true}', None, None, ["app", "psql", None], None],
    ['[1]', '3.5', 'SELECT 1 /*Bemi 7 Bemi*/', None, ["app", "x", None], False],
    [None, '"s"', 'SELECT 1 /*Bemi {"c": 1} Bemi*/;  ;', None, None, False],
    [None, None, "SELECT '/*Bemi {\"forged\": 1} Bemi*/'", None, ["app", "x", None], False],
    [None, None, 'SELECT 1 -- /*Bemi {"forged": 1} Bemi*/', None, None, False],
    [None, None, 'SELECT E\'it\\\'s\' /*Bemi {"e": 1} Bemi*/', None, None, False],
    [None, None, 'SELECT "a""b" /*Bemi {"q": 1} Bemi*/ /* another */', None, None, False],
    [None, None, "SELECT 'a'' /*Bemi {\"inside\": 1} Bemi*/ b'", None, None, False],
    [None, None, 'SELECT /* one */ 1 /*Bemi {"two": 2} Bemi*/', None, None, False],
    [None, None, 'SELECT 1 /*Bemi*/', None, None, False],
    [None, None, 'x"} Bemi*/ ... /*Bemi {"tail": 1} Bemi*/ ;', None, None, True],
    [None, None, 'SELECT 1 /*Bemi %7B%22u%22%3A%20%22%C3%A9%25%22%7D Bemi*/', None, None, False],
    [None, '{"t": 1}', None, ["POST", "/rpc/x", '{"sub": "u1", "role": "authenticated", "email": "e"}',
                              '{"x-bemi-context": "{\\"h\\": 1}"}'], None, None],
    [None, None, None, ["GET", "/items", "not json", '{"x-bemi-context": "[1]"}'], ["app", "x", None], None],
    [None, None, None, ["GET", "", None, '{"x-bemi-context": 5}'], ["app", "x", None], None],
    ['{"big": ' + "1" * 30 + "}", None, None, None, None, None],
    ['{"x": "' + "é" * 600 + '"}', None, None, None, None, None],
]


@pytest.mark.parametrize("database_keys", ["no_context", "always", "never"])
def test_the_context_rules_are_the_pollers(db, database_keys):
    """bemi.context_of (trigger mode) gives what the poller gives for wal mode's message."""
    db.install(capture_mode="triggers", database_keys=database_keys, max_context_bytes=1000)
    with db.connect(autocommit=True) as conn:
        for parts in CONTEXT_CASES:
            if database_keys == "never":
                parts = [*parts[:4], None, parts[5]]
            got = conn.execute("SELECT bemi.context_of(%s, %s, %s, %s::json, %s::json, %s)",
                               [*parts[:3], json.dumps(parts[3]) if parts[3] is not None else None,
                                json.dumps(parts[4]) if parts[4] is not None else None, parts[5]]).fetchone()[0]
            want = json.loads(context_json(json.dumps(parts), 1000, database_keys))
            assert got == want, parts
        for parts in CONTEXT_CASES:
            if isinstance(parts[2], str):
                got = conn.execute("SELECT bemi.final_comment(%s, %s)", (parts[2], bool(parts[5]))).fetchone()[0]
                assert got == final_comment(parts[2], bool(parts[5])), parts[2]


def test_a_context_that_breaks_the_rules_never_fails_the_write(db):
    db.execute(TABLES)
    db.install(capture_mode="triggers", max_context_bytes=100)
    with db.connect(autocommit=True) as conn:
        conn.execute("SELECT bemi_set_context(%s)", ('{"a": "' + "x" * 500 + '"}',))
        conn.execute("INSERT INTO event_log VALUES (1, 'big') /*Bemi {\"unterminated Bemi*/")
        conn.execute("SELECT bemi_set_context(%s)", ('\\u0000 {',))
        conn.execute("INSERT INTO event_log VALUES (2, 'nul') /*Bemi %ZZ%%41 Bemi*/")
    db.poll()
    contexts = [r[0] for r in db.execute("SELECT context FROM changes ORDER BY committed_at")]
    assert [[e["source"] for e in c["_bemi_error"]] for c in contexts] == [["session", "comment"], ["session", "comment"]]


def test_writers_need_no_right_on_the_changes_table(db):
    db.execute(TABLES + "CREATE ROLE app_writer LOGIN; GRANT INSERT, UPDATE, SELECT ON account TO app_writer;")
    try:
        db.install(capture_mode="triggers")
        with psycopg.connect(db.dsn.replace("user=postgres", "user=app_writer"), autocommit=True) as conn:
            conn.execute("INSERT INTO account (id, owner, balance) VALUES (1, 'a', 1)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("INSERT INTO changes (source, \"database\", \"schema\", \"table\", operation, committed_at, "
                             "queued_at, transaction_id, \"position\", commit_position, seq) "
                             "VALUES ('1/d', 'd', 's', 't', 'CREATE', now(), now(), 1, 1, 1, 1)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # nor on the queue the mover reads
                conn.execute("INSERT INTO bemi.change_queue (schema_name, table_name, key_columns, operation) "
                             "VALUES ('public', 'account', '{id}', 'INSERT')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT bemi.move_changes()")
        db.poll()
        assert db.execute("SELECT primary_key, context ->> 'session_user' FROM changes") == [("1", "app_writer")]
    finally:
        db.execute("DROP OWNED BY app_writer; DROP ROLE app_writer")


def test_trigger_mode_follows_new_tables_and_altered_keys(db):
    db.install(capture_mode="triggers")
    with db.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE later (id int, name text)")
        conn.execute("INSERT INTO later VALUES (1, 'a')")
        conn.execute("ALTER TABLE later ADD PRIMARY KEY (id)")
        conn.execute("ALTER TABLE later RENAME COLUMN name TO label")
        conn.execute("UPDATE later SET label = 'b'")
    db.poll()
    rows = db.execute("SELECT primary_key, operation, after FROM changes ORDER BY committed_at, seq")
    assert rows == [(None, "CREATE", {"id": 1, "name": "a"}), ("1", "UPDATE", {"id": 1, "label": "b"})]


def test_trigger_mode_refuses_another_destination_and_the_poller_moves_the_queue(db, other_db):
    with pytest.raises(BemiError, match="leave out --destination-dsn"):
        commands.install(db.dsn, other_db.dsn, load_settings(None, capture_mode="triggers"))
    db.execute(TABLES)
    db.install(capture_mode="triggers")
    with pytest.raises(BemiError, match="installed to write its trail into this database"):
        db.poll(other_db.dsn)
    with db.connect(autocommit=True) as conn:
        for i in range(1, 16):  # fifteen transactions of one change, then one of ten
            conn.execute("INSERT INTO account (id, owner, balance) VALUES (%s, 'o', 1)", (i,))
        conn.execute("INSERT INTO account (id, owner, balance) SELECT g, 'o', 1 FROM generate_series(16, 25) g")
    status = commands.status(db.dsn, None, db.settings)
    assert status["capture_mode"] == "triggers" and status["slot_exists"] is False
    assert status["queue"]["rows"] == 25 and status["queue"]["oldest_age_seconds"] >= 0
    assert status["change_count"] == 0
    stats = db.poll(batch_size=10)
    assert stats.changes == 25 and stats.batches == 2  # whole transactions: 10 rows, then 5 and the last one's 10
    status = commands.status(db.dsn, None, db.settings)
    assert status["queue"]["rows"] == 0 and status["change_count"] == 25 and status["queue"]["moved_until"] is not None


def test_auto_chooses_triggers_without_logical_decoding_and_says_why(db, caplog):
    db.execute("ALTER DATABASE " + db.name + " SET bemi.unused = 'x'")  # any database: wal_level is server-wide
    settings = load_settings(None, capture_mode="auto", slot_name="bemi_auto_test")
    # Make the wal checks fail the way a server without free slots does: take every slot.
    with psycopg.connect(db.server_dsn, autocommit=True) as conn:
        free = conn.execute("SELECT current_setting('max_replication_slots')::int - count(*) FROM pg_replication_slots").fetchone()[0]
        names = [f"bemi_fill_{i}" for i in range(free)]
        for name in names:
            conn.execute("SELECT pg_create_physical_replication_slot(%s)", (name,))
        try:
            caplog.set_level("INFO", logger="bemi_pg")
            rendered = commands.install(db.dsn, None, settings)
        finally:
            for name in names:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
    assert rendered.capture_mode == "triggers"
    assert "capture mode triggers (capture.mode auto, and logical decoding is not available (replication slots" in caplog.text
    assert db.execute("SELECT bemi.capture_mode()") == [("triggers",)]


def _switch_under_load(db, first: str, second: str) -> dict[str, int]:
    db.execute(SCHEMA)
    db.install(capture_mode=first, exclude_tables=EXCLUDE)
    ledger, stop = Ledger(), threading.Event()
    writers = [Writer(db.dsn, w, ledger, stop, copy_rows=3000 if w == 0 else 0, pause=0.005) for w in range(3)]
    for writer in writers:
        writer.start()
    time.sleep(2)
    if first == "wal":
        db.poll()
    else:  # changes wait in the queue as the switch starts; it moves them
        assert db.execute("SELECT count(*) FROM bemi.change_queue")[0][0] > 0
    commands.install(db.dsn, None, load_settings(None, capture_mode=second, exclude_tables=EXCLUDE))
    time.sleep(2)
    stop.set()
    for writer in writers:
        writer.join()
    db.poll()
    result = compare(db.dsn, db.dsn, ledger)
    modes = db.execute("SELECT commit_position < 0, count(*) FROM changes GROUP BY 1 ORDER BY 1")
    print(f"\nswitch {first} -> {second}: {result}; rows by wal/trigger mode: {modes}")
    assert [m[0] for m in modes] == [False, True]  # both modes wrote
    assert sum(w.committed for w in writers) > 50
    return result


def test_switching_from_triggers_to_wal_loses_and_duplicates_nothing(db):
    result = _switch_under_load(db, "triggers", "wal")
    assert result["expected"] > 1000
    assert {k: result[k] for k in ("lost", "duplicated", "misattributed", "phantom")} == \
        {"lost": 0, "duplicated": 0, "misattributed": 0, "phantom": 0}
    assert db.execute("SELECT bemi.capture_mode()") == [("wal",)]


def test_switching_from_wal_to_triggers_loses_and_duplicates_nothing(db):
    result = _switch_under_load(db, "wal", "triggers")
    assert result["expected"] > 1000
    assert {k: result[k] for k in ("lost", "duplicated", "misattributed", "phantom")} == \
        {"lost": 0, "duplicated": 0, "misattributed": 0, "phantom": 0}
    assert db.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()") == [(0,)]


def test_switching_to_triggers_drains_into_the_other_database_wal_mode_wrote_to(db, other_db):
    db.execute(TABLES)
    settings = load_settings(None)
    commands.install(db.dsn, other_db.dsn, settings)
    db.execute("INSERT INTO account (id, owner, balance) VALUES (1, 'before the switch', 1)")
    commands.install(db.dsn, other_db.dsn, load_settings(None, capture_mode="triggers"))
    db.execute("INSERT INTO account (id, owner, balance) VALUES (2, 'after the switch', 2)")
    db.poll()
    assert other_db.execute("SELECT after ->> 'owner' FROM changes") == [("before the switch",)]
    assert db.execute("SELECT after ->> 'owner' FROM changes") == [("after the switch",)]
    assert db.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()") == [(0,)]


@pytest.mark.parametrize("first, second", [("triggers", "wal"), ("wal", "triggers")])
def test_a_switch_cut_short_after_its_commit_is_finished_by_the_poller(db, monkeypatch, first, second):
    """install dies between the switching transaction's commit and the slot work: the next
    poller (or install) finishes it, so nothing is lost or written twice."""
    db.execute(TABLES)
    db.install(capture_mode=first)
    db.execute("INSERT INTO account (id, owner, balance) VALUES (1, 'before', 1)")
    finish = Poller.finish_switch

    def dies(self):
        raise RuntimeError("killed after the switch committed")

    monkeypatch.setattr(Poller, "finish_switch", dies)
    with pytest.raises(RuntimeError):
        commands.install(db.dsn, None, load_settings(None, capture_mode=second))
    monkeypatch.setattr(Poller, "finish_switch", finish)
    assert db.execute("SELECT from_mode, to_mode FROM bemi.capture_switch") == [(first, second)]
    db.execute("INSERT INTO account (id, owner, balance) VALUES (2, 'after', 2)")
    if second == "wal":
        db.poll()
    else:  # installing again finishes it too
        commands.install(db.dsn, None, load_settings(None, capture_mode=second))
        db.poll()
    rows = db.execute("SELECT after ->> 'owner', commit_position < 0 FROM changes ORDER BY committed_at")
    assert rows == [("before", first == "triggers"), ("after", second == "triggers")]
    assert db.execute("SELECT count(*) FROM bemi.capture_switch") == [(0,)]
    slots = db.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()")
    assert slots == [(1 if second == "wal" else 0,)]


def test_a_running_poller_blocks_the_switch(db):
    db.execute(TABLES)
    db.install()
    with Poller(db.dsn, None, db.settings) as running:
        running.lock()
        with pytest.raises(SlotBusy, match="stop it, then switch the capture mode"):
            commands.install(db.dsn, None, load_settings(None, capture_mode="triggers"))
    assert db.execute("SELECT bemi.capture_mode()") == [("wal",)]
