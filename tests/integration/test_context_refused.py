"""A batch the destination refuses for a reason the poller cannot fix: the error line and
``status`` name the transaction and its position; once fixed, the next poll writes it all."""

from __future__ import annotations

import re

import psycopg
import pytest

from bemi_pg.errors import DecodingFailed
from bemi_pg.poller import Poller
from bemi_pg.wal2json import format_lsn

from ..conftest import run_cli


def test_a_refused_batch_is_named_by_the_error_and_status(db):
    db.execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
    db.install(database_keys="never")
    # What the poller cannot fix: a rule the user added to the changes table.
    db.execute("ALTER TABLE changes ADD CONSTRAINT no_forbidden CHECK (after ->> 'note' IS DISTINCT FROM 'forbidden')")
    xids = []
    with db.connect(autocommit=True) as conn:
        for n, note in enumerate(["fine", "forbidden", "fine too"]):
            with conn.transaction():
                conn.execute("INSERT INTO t VALUES (%s, %s)", (n, note))
                xids.append(conn.execute("SELECT txid_current()").fetchone()[0])
    poll = run_cli("poll", "--once", env={"BEMI_DSN": db.dsn})
    assert poll.returncode == 1 and "Traceback" not in poll.stderr
    [line] = [x for x in poll.stderr.splitlines() if x.startswith("error:")]
    assert f"transaction {xids[1]} (commit position " in line and "no_forbidden" in line
    assert "When the destination refuses a batch" in line
    assert db.changes() == []  # the batch is written whole or not at all
    status = run_cli("status", "--json", env={"BEMI_DSN": db.dsn})
    assert status.returncode == 0, status.stderr
    assert f"transaction {xids[1]}" in status.stdout and '"last_commit_position": null' in status.stdout

    db.execute("ALTER TABLE changes DROP CONSTRAINT no_forbidden")
    assert run_cli("poll", "--once", env={"BEMI_DSN": db.dsn}).returncode == 0
    changes = db.changes()
    assert [c["transaction_id"] for c in changes] == xids
    assert f"(commit position {format_lsn(changes[1]['commit_position'])})" in line
    status = run_cli("status", "--json", env={"BEMI_DSN": db.dsn})
    assert '"refused_batch": null' in status.stdout


def test_a_change_the_source_cannot_decode_is_named_as_the_sources(db):
    """wal2json failing at a change is the source's error, not a refusal by the destination."""
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v int2vector)")
    db.install()
    db.execute("INSERT INTO t VALUES (1, '1 2')")
    with Poller(db.dsn, None, db.settings) as poller:  # a wal2json option it does not know: refused in its startup callback
        poller.options = [*poller.options, "no-such-option", "1"]
        with pytest.raises(DecodingFailed, match=r"could not read the slot's changes: .*no-such-option.*output plugin \"wal2json\""):
            poller.poll(upto_lsn=None)
    assert db.changes() == []
    try:  # an int2vector no server can print; PostgreSQL 15 refuses to build it, 17 and 18 store it
        db.execute("""INSERT INTO t SELECT * FROM jsonb_populate_record(NULL::t, '{"id": 2, "v": []}')""")
    except psycopg.errors.DatatypeMismatch:
        return
    poll = run_cli("poll", "--once", env={"BEMI_DSN": db.dsn})
    assert poll.returncode == 1 and "Traceback" not in poll.stderr, poll.stderr
    [line] = [x for x in poll.stderr.splitlines() if x.startswith("error:")]
    assert re.search(r"the source could not read the slot's changes at [0-9A-F]+/[0-9A-F]+: .*int2vector.*change callback", line), line
    assert "destination refused" not in line and "When the source cannot decode a change" in line
    assert db.changes() == []  # nothing of the read: the first row waits with the slot
    status = run_cli("status", "--json", env={"BEMI_DSN": db.dsn})
    assert "could not read the slot's changes" in status.stdout
