"""The sealed trail (issue 20): every change sealed by a hash chain, `verify` naming what was
altered, removed, inserted or reordered, a rewritten chain caught by a head kept elsewhere,
prune recorded in the chain, an upgrade sealing the changes already there. Both capture modes,
each with a destination that a second (wal-mode) source shares."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bemi_pg import commands
from bemi_pg.sealing import Verdict

from ..conftest import Database, own_database, run_cli

DOCS_SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "verify_trail.py"


@pytest.fixture
def second_source(server_dsn: str) -> Iterator[Database]:
    yield from own_database(server_dsn, "second")


class Trail:
    """Source A (the mode under test) and source B (wal mode) sharing A's destination."""

    def __init__(self, mode: str, a: Database, b: Database, dest: Database) -> None:
        self.mode, self.a, self.b = mode, a, b
        self.dest = a if mode == "triggers" else dest
        for source in (a, b):
            source.execute("CREATE TABLE t (id int PRIMARY KEY, v text, n jsonb)")
        a.install(None if mode == "triggers" else dest.dsn, capture_mode=mode)
        b.install(self.dest.dsn)

    def write(self, first: int, count: int) -> None:
        for source in (self.a, self.b):
            source.execute("INSERT INTO t SELECT g, 'v' || g, jsonb_build_object('g', g) FROM generate_series(%s::int, %s::int) g",
                           (first, first + count - 1))
            source.execute("UPDATE t SET v = v || '!' WHERE id = %s::int", (first,))
        self.catch_up()

    def catch_up(self) -> None:
        if self.mode == "triggers":  # the mover moves the queue and seals what it moved
            self.a.poll()
        else:
            self.a.poll(self.dest.dsn)
        self.b.poll(self.dest.dsn)

    def verify(self, source: Database | None = None, **kwargs: str) -> Verdict:
        source = source or self.a
        return commands.verify(source.dsn, None if source is self.a and self.mode == "triggers" else self.dest.dsn,
                               source.settings, **kwargs)

    def sql(self, statement: str, params: object = None) -> list[tuple[object, ...]]:
        return self.dest.execute(statement, params)

    def change(self, n: int) -> tuple[str, int, int]:
        """Source A's n-th change in trail order: (id, commit_position, seq)."""
        rows = self.sql("SELECT id::text, commit_position, seq FROM changes WHERE source = %s ORDER BY commit_position, seq",
                        (self.a.source,))
        return rows[n]  # type: ignore[return-value]


@pytest.fixture(params=["wal", "triggers"])
def trail(request: pytest.FixtureRequest, db: Database, second_source: Database, other_db: Database) -> Trail:
    t = Trail(request.param, db, second_source, other_db)
    t.write(1, 5)
    return t


def _only(verdict: Verdict, *words: str) -> str:
    """The one problem found; it names every one of ``words``."""
    assert not verdict.intact and len(verdict.problems) >= 1, verdict.lines()
    text = "\n".join(verdict.problems)
    for word in words:
        assert word in text, (word, verdict.lines())
    return text


def test_a_sealed_trail_verifies_and_each_tampering_is_named(trail: Trail):
    a_source = trail.a.source
    verdict = trail.verify()
    assert verdict.intact, verdict.lines()
    assert verdict.changes == 6 and verdict.head is not None and not verdict.unsealed
    assert trail.verify(trail.b).intact and trail.verify(trail.b).changes == 6
    status = commands.status(trail.a.dsn, None if trail.mode == "triggers" else trail.dest.dsn, trail.a.settings)
    assert status["trail_head"] == verdict.head

    # An altered `after`, then put back.
    id_, position, seq = trail.change(2)
    [(after,)] = trail.sql("SELECT after::text FROM changes WHERE id = %s", (id_,))
    trail.sql("UPDATE changes SET after = after || '{\"v\": \"forged\"}' WHERE id = %s", (id_,))
    _only(trail.verify(), id_, f"commit position {position}, seq {seq}", "altered")
    assert trail.verify(trail.b).intact  # the other source's trail is not touched
    trail.sql("UPDATE changes SET after = %s::jsonb WHERE id = %s", (after, id_))
    assert trail.verify().intact

    # An altered `context`.
    [(context,)] = trail.sql("SELECT context::text FROM changes WHERE id = %s", (id_,))
    trail.sql("UPDATE changes SET context = '{\"user\": \"someone else\"}' WHERE id = %s", (id_,))
    _only(trail.verify(), id_, "altered")
    trail.sql("UPDATE changes SET context = %s::jsonb WHERE id = %s", (context, id_))
    assert trail.verify().intact

    # A deleted change, then put back as it was.
    id_, position, seq = trail.change(3)
    trail.sql("DELETE FROM changes WHERE id = %s", (id_,))
    verdict = trail.verify()
    _only(verdict, id_, "removed")
    assert not trail.verify(trail.b).problems

    # An inserted forged change, in the removed one's place (a sealed stretch).
    [(forged_id,)] = trail.sql("INSERT INTO changes (source, \"database\", \"schema\", \"table\", primary_key, operation, "
                               "after, committed_at, queued_at, transaction_id, \"position\", commit_position, seq) "
                               "VALUES (%s, 'x', 'public', 't', '99', 'CREATE', '{\"id\": 99}', now(), now(), 1, 1, %s, %s) "
                               "RETURNING id::text", (a_source, position, seq))
    _only(trail.verify(), forged_id, "inserted", id_, "removed")
    trail.sql("DELETE FROM changes WHERE id = %s", (forged_id,))

    # Two changes with their positions swapped.
    [first, second] = [tuple(r) for r in trail.sql(
        "SELECT id::text, commit_position, seq FROM changes WHERE source = %s AND commit_position = "
        "(SELECT commit_position FROM changes WHERE source = %s GROUP BY 1 HAVING count(*) > 1 LIMIT 1) "
        "ORDER BY seq LIMIT 2", (a_source, a_source))]  # of one transaction: swap their seq
    trail.sql("UPDATE changes SET seq = -1 WHERE id = %s", (first[0],))
    trail.sql("UPDATE changes SET seq = %s WHERE id = %s", (first[2], second[0]))
    trail.sql("UPDATE changes SET seq = %s WHERE id = %s", (second[2], first[0]))
    _only(trail.verify(), first[0], second[0], "out of their sealed order")

    # An altered seal.
    trail.sql("UPDATE bemi.seal SET change_count = change_count + 1 WHERE source = %s AND seal_no = 1", (a_source,))
    _only(trail.verify(), "seal 1 altered")


def test_a_rewritten_chain_is_caught_by_a_head_kept_elsewhere(trail: Trail):
    kept = trail.verify().head
    assert kept is not None
    trail.write(100, 3)
    later = trail.verify(head=kept)
    assert later.intact, later.lines()  # an earlier head is in the chain
    # Alter a change and seal the whole trail afresh: the chain holds together, the head kept does not.
    id_ = trail.change(1)[0]
    trail.sql("UPDATE changes SET after = '{}' WHERE id = %s", (id_,))
    trail.sql("DELETE FROM bemi.seal WHERE source = %s", (trail.a.source,))
    trail.sql("SELECT bemi.seal(%s, NULL, 2147483647)", (trail.a.source,))  # every transaction below the horizon
    assert trail.verify().intact
    _only(trail.verify(head=kept), kept, "not in the chain")
    result = run_cli("verify", "--head", kept, env={"BEMI_DSN": trail.a.dsn}
                     | ({} if trail.mode == "triggers" else {"BEMI_DESTINATION_DSN": trail.dest.dsn}))
    assert result.returncode == 6 and "NOT intact" in result.stdout, result


def test_prune_then_verify_passes_and_reports_the_prune(trail: Trail):
    assert commands.prune(psycopg.connect(trail.dest.dsn, autocommit=True), trail.a.settings, "0s")["deleted"] == 12
    trail.write(200, 2)
    for source in (trail.a, trail.b):
        verdict = trail.verify(source)
        assert verdict.intact and verdict.changes == 3, verdict.lines()
        assert verdict.pruned and "6 changes committed before" in verdict.pruned[0], verdict.lines()
    # A second prune removes the first one's record with the seals after it.
    commands.prune(psycopg.connect(trail.dest.dsn, autocommit=True), trail.a.settings, "0s")
    verdict = trail.verify()
    assert verdict.intact and verdict.changes == 0 and verdict.pruned, verdict.lines()
    # Removing seals is noticed even so.
    trail.write(300, 1)
    trail.write(400, 1)
    trail.sql("DELETE FROM bemi.seal WHERE source = %s AND seal_no = (SELECT min(seal_no) FROM bemi.seal "
              "WHERE source = %s AND kind = 'changes')", (trail.a.source, trail.a.source))
    assert not trail.verify().intact


def test_the_auditors_script_agrees_with_verify(trail: Trail):
    head = trail.verify().head
    out = subprocess.run([sys.executable, str(DOCS_SCRIPT), trail.dest.dsn, trail.a.source],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["intact", "6", head]
    trail.sql("UPDATE changes SET before = '{\"x\": 1}' WHERE id = %s", (trail.change(4)[0],))
    out = subprocess.run([sys.executable, str(DOCS_SCRIPT), trail.dest.dsn, trail.a.source],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 6 and trail.change(4)[0] in out.stdout, out


def test_trigger_mode_moves_and_seals_a_late_older_transaction_once_it_ends(db: Database):
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.install(capture_mode="triggers")
    with db.connect() as older:  # takes its xid first, commits last
        older.execute("INSERT INTO t VALUES (1)")
        db.execute("INSERT INTO t VALUES (2)")
        db.poll()
        commands.seal(db.dsn, None, db.settings)
        verdict = commands.verify(db.dsn, None, db.settings)
        assert verdict.intact and verdict.changes == 0, verdict.lines()  # the open one holds the horizon back
        older.commit()
    db.poll()  # moves both and seals them
    verdict = commands.verify(db.dsn, None, db.settings)
    assert verdict.intact and verdict.changes == 2 and not verdict.unsealed, verdict.lines()


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_an_installation_without_seals_upgrades_and_seals_its_changes(db: Database, mode: str):
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.install(capture_mode=mode)
    db.execute("INSERT INTO t SELECT generate_series(1, 30)")
    db.poll()
    # As 0.3.0 left it: the changes, and no seal or trigger of sealing's.
    db.execute("DROP TABLE bemi.seal; DROP TRIGGER bemi_append_only ON changes; "
               "DROP TRIGGER bemi_append_only_truncate ON changes")
    assert db.execute("SELECT count(*) FROM changes") == [(30,)]
    db.install(capture_mode=mode)
    verdict = commands.verify(db.dsn, None, db.settings)
    assert verdict.intact and verdict.changes == 30 and not verdict.unsealed, verdict.lines()


def test_a_partitioned_trail_seals_refuses_and_prunes_alike(db: Database):
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.install(partition_by_month=True)
    db.execute("INSERT INTO t SELECT generate_series(1, 20)")
    db.poll()
    verdict = commands.verify(db.dsn, None, db.settings)
    assert verdict.intact and verdict.changes == 20, verdict.lines()
    [(id_,)] = db.execute("SELECT id::text FROM changes ORDER BY commit_position, seq LIMIT 1 OFFSET 7")
    db.execute("UPDATE changes SET after = '{\"id\": 0}' WHERE id = %s", (id_,))  # the owner may; verify sees it
    _only(commands.verify(db.dsn, None, db.settings), id_, "altered")
    db.execute("UPDATE changes SET after = '{\"id\": 8}' WHERE id = %s", (id_,))
    db.execute("CREATE ROLE sealing_reader LOGIN; GRANT SELECT, UPDATE, DELETE ON changes TO sealing_reader")
    try:
        with psycopg.connect(db.dsn.replace("user=postgres", "user=sealing_reader"), autocommit=True) as conn:
            for statement in ("UPDATE changes SET context = '{}'", "DELETE FROM changes"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                    conn.execute(statement)
    finally:
        db.execute("DROP OWNED BY sealing_reader; DROP ROLE sealing_reader")
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        assert commands.prune(conn, db.settings, "0s")["deleted"] == 20
    db.execute("INSERT INTO t VALUES (21)")
    db.poll()
    verdict = commands.verify(db.dsn, None, db.settings)
    assert verdict.intact and verdict.changes == 1 and verdict.pruned, verdict.lines()


def test_a_mover_run_in_a_latin1_session_seals_what_verify_recomputes(db: Database):
    """record_send writes text in the session's client encoding: a pg_cron job or a session of
    another encoding that moves (and so seals) trigger-mode changes seals their UTF-8 all the same."""
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text, n jsonb)")
    db.install(capture_mode="triggers")
    db.execute("INSERT INTO t VALUES (1, 'é ü 東', jsonb_build_object('k', 'é 東')), (2, 'plain', NULL)")
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SET client_encoding = 'LATIN1'")  # 東 has no LATIN1 form: a seal in LATIN1 could not even be made
        assert conn.execute("SELECT bemi.move_changes(10000)").fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM bemi.seal").fetchone() == (1,)
    verdict = commands.verify(db.dsn, None, db.settings)
    assert verdict.intact and verdict.changes == 2 and not verdict.unsealed, verdict.lines()
    docs = subprocess.run([sys.executable, str(DOCS_SCRIPT), db.dsn, db.source], capture_output=True, text=True)
    assert docs.returncode == 0 and docs.stdout.startswith("intact 2 "), docs.stdout + docs.stderr
