"""The poller: peek a bounded batch, stitch, write with the checkpoint, commit, then advance.

The slot only ever advances to the end of a transaction whose changes the destination has
committed; a restart re-reads from the slot and skips transactions at or before the
checkpoint, and the unique key ``(source, commit_position, seq)`` absorbs anything else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.types.string import ByteaBinaryLoader

from .config import Settings
from .db import (
    check_destination,
    connect,
    fetch_dict,
    installation,
    installed_capture_mode,
    installed_source,
    pending_capture_switch,
    source_identity,
)
from .errors import BatchRefused, BemiError, DecodingFailed, SlotBusy, SlotLost
from .errors import ConnectionError as Unreachable
from .queries import query
from .specials import SPECIALS, parse_change
from .stitch import (
    COLUMNS,
    CONTEXT_PREFIX,
    UNSURE,
    ChangeRow,
    ColumnRules,
    ConvertedRow,
    TransactionState,
    seal_entry,
    timestamp_us,
    tracked_filter,
)
from .wal2json import Begin, Change, Commit, Converted, Message, TypeRegistry, fast_converter, fast_lines, format_lsn, parse_lsn, parse_row

__all__ = ["Observer", "Poller", "PollStats", "wal2json_options"]

log = logging.getLogger("bemi_pg")

READ_BATCHES = 50  # batches per peek (see Poller.poll)
LOCK_WAIT = 5  # seconds a poller waits for the slot's lock before it says another one is running
SEND_ROWS = 1_000  # rows per COPY message
# bemi.record_period's messages: a table began or ended being tracked (written to bemi.trail_event).
PERIOD_PREFIX = "_bemi_period"
SAVE_PERIOD = sql.SQL(
    'INSERT INTO bemi.trail_event (source, "schema", "table", event, reason, at, "position") '
    "VALUES (%s, %s, %s, %s, %s, %s::timestamptz, %s) ON CONFLICT DO NOTHING"
)
# An UPDATE of the key: the key the row left (bemi.key_move), under the change's unique key.
SAVE_KEY_MOVE = sql.SQL(
    'INSERT INTO bemi.key_move (source, "schema", "table", old_key, new_key, committed_at, commit_position, seq) '
    "VALUES (%s, %s, %s, %s, %s, %s::timestamptz, %s, %s) ON CONFLICT DO NOTHING"
)
SEND_BYTES = 4 * 1024 * 1024
FETCH_ROWS = 2_000


def _escape_filter(name: str) -> str:
    """Escape a schema or table name for wal2json's add-tables/filter-tables lists."""
    return "".join("\\" + ch if ch in " ',.*" else ch for ch in name)


def wal2json_options(settings: Settings) -> list[str]:
    """The wal2json options the poller decodes with, as a flat name/value list."""
    dest_schema, dest_table = settings.destination
    filtered = [f"{_escape_filter(s)}.{_escape_filter(t)}" for s, t in settings.excluded()]
    filtered += [f"{_escape_filter(dest_schema)}.{_escape_filter(dest_table)}", "bemi.*"]
    # No add-tables: a partition of a tracked table may live in any schema. The poller keeps
    # the changes of tables whose recorded name (the partition tree's root) is tracked.
    return [
        "format-version", "2",
        "include-xids", "1",
        "include-timestamp", "1",
        "include-lsn", "1",
        "include-type-oids", "1",
        "include-types", "0",  # the OID says it all: type names cost the server a format_type per value
        "include-pk", "1",
        "include-typmod", "0",
        "add-msg-prefixes", f"{CONTEXT_PREFIX},{PERIOD_PREFIX}",
        "filter-tables", ",".join(filtered),
    ]


@dataclass
class PollStats:
    """What a poll did."""

    batches: int = 0
    rows: int = 0  # rows read from the slot (the batch limit counts these)
    transactions: int = 0
    changes: int = 0  # rows inserted into the destination (duplicates not counted)
    sent: int = 0  # rows sent to the destination (duplicates counted)
    skipped: int = 0  # transactions already at or before the checkpoint
    end_lsn: int | None = None
    committed_at: str | None = None  # commit time of the newest transaction written (wal2json's text)
    head: str | None = None  # the trail's head hash after the newest batch (hex; README "A sealed trail")
    hashed: int = 0  # changes sealed with the hash the poller computed (the server hashed the others)
    seconds: float = 0.0
    moved: bool = False  # trigger mode: the changes were moved from the queue (no slot, no transactions counted)

    def add(self, other: PollStats) -> None:
        self.batches += other.batches
        self.rows += other.rows
        self.transactions += other.transactions
        self.changes += other.changes
        self.sent += other.sent
        self.skipped += other.skipped
        self.end_lsn = other.end_lsn or self.end_lsn
        self.committed_at = other.committed_at or self.committed_at
        self.head = other.head or self.head
        self.hashed += other.hashed
        self.moved = self.moved or other.moved

    def summary(self, slot: str) -> str:
        if self.moved:
            return (f"bemi-pg: moved {self.changes} queued change{'s' * (self.changes != 1)} into the changes table "
                    f"in {self.batches} batch{'es' * (self.batches != 1)} ({self.seconds:.1f}s)")
        where = f", slot {slot} at {format_lsn(self.end_lsn)}" if self.end_lsn else f", slot {slot}"
        return (
            f"bemi-pg: wrote {self.changes} change{'s' * (self.changes != 1)} from "
            f"{self.transactions} transaction{'s' * (self.transactions != 1)} in {self.batches} "
            f"batch{'es' * (self.batches != 1)}{where} ({self.seconds:.1f}s)"
            + (f"; trail head {self.head}" if self.head else "")
        )


class Observer(Protocol):
    """What a running poller tells whoever watches it (metrics, health, progress, systemd)."""

    def batch_written(self, stats: PollStats, seconds: float) -> None:
        """A destination transaction committed (``stats`` is that batch's, its ``end_lsn`` the last commit read)."""

    def backlog(self, start_lsn: int, target_lsn: int) -> None:
        """``run_once`` drains the slot from ``start_lsn`` to ``target_lsn``."""

    def polled(self) -> None:
        """A poll finished without an error."""

    def failed(self, kind: str, reason: str) -> None:
        """A poll failed: ``kind`` is ``source``, ``destination`` or ``other``."""


class _Unobserved:
    def batch_written(self, stats: PollStats, seconds: float) -> None:
        pass

    def backlog(self, start_lsn: int, target_lsn: int) -> None:
        pass

    def polled(self) -> None:
        pass

    def failed(self, kind: str, reason: str) -> None:
        pass


class _Rows:
    """The peek's rows, a page (``fetchmany``'s list of 1-tuples) at a time: ``page[at]`` is the next."""

    __slots__ = ("_cursor", "page", "at")

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor
        self.page: list[Any] = []
        self.at = 0

    def more(self) -> bool:
        """Whether a row is left (fetching the next page when this one is done)."""
        if self.at < len(self.page):
            return True
        with decoding_errors():
            self.page, self.at = self._cursor.fetchmany(FETCH_ROWS), 0  # a page at a time: cheaper than the cursor's own iteration
        return bool(self.page)


@contextmanager
def decoding_errors() -> Iterator[None]:
    """A source error in reading the slot (not its connection's loss) as DecodingFailed, which
    names the source and the position, not the destination (a _Writer calls a psycopg error in
    its batch the destination's refusal)."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.QueryCanceled):
        raise
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())
        context = " ".join((exc.diag.context or "").split())
        lsn = re.search(r"associated LSN ([0-9A-F]+/[0-9A-F]+)", context)
        at = f" at {lsn.group(1)}" if lsn else ""
        where = f" ({context})" if context else ""
        raise DecodingFailed(
            f"the source could not read the slot's changes{at}: {reason}{where}; nothing of the read was written and "
            "the slot stays before it: no poll gets past that change until the source decodes it "
            "(README: \"When the source cannot decode a change\")") from exc


class _Writer:
    """Streams one batch's change rows into the destination with COPY while the batch is read,
    so that the server writes them while the poller converts the next ones.

    Rows go straight into the changes table: the checkpoint already skips every transaction
    the destination holds, so duplicates are rare, and the unique key refuses any (the batch
    then fails with UniqueViolation and the poller writes it again with ``dedupe``). With
    ``dedupe`` they go into a staging table, and ``INSERT … ON CONFLICT (the unique key) DO
    NOTHING`` moves them into the changes table at the end, skipping the ones it already holds."""

    def __init__(self, conn: psycopg.Connection[Any], changes: sql.Composable, *,
                 dedupe: bool = False, partitioned: bool = False) -> None:
        self.conn = conn
        self.dedupe = dedupe
        self.partitioned = partitioned
        self.months: set[str] = set()
        self.buffer = bytearray()  # COPY lines not sent yet
        self.pending = 0  # how many
        self.sent = 0  # rows sent to the destination
        self.inserted = 0  # rows the changes table gained
        self._copy: psycopg.Copy | None = None
        self._open_copy = ExitStack()  # holds the COPY while it is open
        # Where each transaction's rows start among the open COPY's lines, to name the one a
        # refused line belongs to: (0-based line, transaction id, commit position).
        self._copy_rows = 0
        self._starts: list[tuple[int, int, int]] = []
        self._cursor = conn.cursor()
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS)
        self._copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier("bemi_staging") if dedupe else changes, cols)
        # The unique key's columns (with the partition key when partitioned): a change the table
        # holds is skipped, while an id met without it (stitch.change_id) stays an error.
        key = ["source", "commit_position", "seq"] + (["committed_at"] if partitioned else [])
        self._insert = sql.SQL(
            "INSERT INTO {} ({cols}) SELECT {cols} FROM bemi_staging ON CONFLICT ({key}) DO NOTHING"
        ).format(changes, cols=cols, key=sql.SQL(", ").join(map(sql.Identifier, key)))
        if dedupe:
            conn.execute(sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS bemi_staging (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            ).format(changes))

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._copy = None
        try:
            self._open_copy.__exit__(*exc)  # an error mid-batch ends the COPY with it (the server rolls back)
        finally:
            self._cursor.close()
        error = exc[1]
        if isinstance(error, psycopg.Error) and not isinstance(
                error, (psycopg.errors.UniqueViolation, psycopg.OperationalError, psycopg.InterfaceError)):
            raise BatchRefused(self._refusal(error)) from error

    def _refusal(self, error: psycopg.Error) -> str:
        """The refusal in one line, naming the transaction of the refused line when COPY says which."""
        reason = " ".join(str(error).split())
        line = re.search(r"\bCOPY \S+, line (\d+)", error.diag.context or "")
        index = int(line.group(1)) - 1 if line else -1
        at = bisect_right(self._starts, (index, float("inf"))) - 1
        if line is None or at < 0:
            where = "a batch"
        else:
            _, xid, commit_position = self._starts[at]
            where = f"the batch holding transaction {xid} (commit position {format_lsn(commit_position)})"
        return (f"the destination refused {where}: {reason}; nothing of the batch was written and the slot "
                "stays before it: fix the destination and poll again (README: \"When the destination refuses a batch\")")

    def add(self, row: ChangeRow | ConvertedRow, tail: bytes) -> None:
        """Queue a row; ``tail``: its transaction's shared fields (TransactionState.copy_tail)."""
        self.starting(row.committed_at, row.transaction_id, row.commit_position)
        self.buffer += row.copy_line(tail)
        self.added(1)

    def starting(self, committed_at: str, transaction_id: int, commit_position: int) -> None:
        """Before lines of this transaction are queued (by add, or straight into ``buffer``)."""
        if self.partitioned:  # committed_at is text in UTC: 'YYYY-MM-...'
            month = committed_at[:7]
            if month not in self.months:
                self._end_copy()
                self.conn.execute("SELECT bemi.ensure_changes_partition(%s::date)", (month + "-01",))
                self.months.add(month)
        if not self._starts or self._starts[-1][1] != transaction_id:
            if self._starts and self._starts[-1][0] == self._copy_rows:  # a transaction that queued no line
                self._starts.pop()
            self._starts.append((self._copy_rows, transaction_id, commit_position))

    def added(self, count: int) -> None:
        """``count`` lines were queued in ``buffer`` (after :meth:`starting`)."""
        self._copy_rows += count
        self.pending += count
        if self.pending >= SEND_ROWS or len(self.buffer) >= SEND_BYTES:
            self._send()

    def _send(self) -> None:
        if not self.pending:
            return
        if self._copy is None:
            self._copy = self._open_copy.enter_context(self._cursor.copy(self._copy_sql))
        self._copy.write(self.buffer)
        self.sent += self.pending
        self.buffer = bytearray()  # a new one: the COPY may hold on to the one it was given
        self.pending = 0

    def _end_copy(self) -> None:
        self._send()
        if self._copy is not None:
            self._copy = None
            self._open_copy.close()  # where the server's refusal of a line surfaces
            if not self.dedupe:
                self.inserted += max(self._cursor.rowcount, 0)
        self._copy_rows = 0
        self._starts.clear()

    def finish(self) -> int:
        """Write what is left; return how many rows the changes table gained."""
        self._end_copy()
        if self.dedupe and self.sent:
            self._cursor.execute(self._insert)
            self.inserted += max(self._cursor.rowcount, 0)
            self._cursor.execute("TRUNCATE bemi_staging")
        return self.inserted


class Poller:
    """Moves changes from a source database's slot into the destination's changes table."""

    def __init__(
        self,
        source_dsn: str,
        destination_dsn: str | None,
        settings: Settings,
        *,
        batch_size: int | None = None,
        fault: Callable[[str], None] | None = None,
        from_installation: bool = True,
        observer: Observer | None = None,
    ) -> None:
        self._source_dsn = source_dsn
        self._destination_dsn = destination_dsn
        self.source = connect(source_dsn, role="source database")
        # What is captured and where it goes is the installation's (``from_installation``; install
        # itself passes the settings it is installing); this process only chooses how it runs.
        try:
            inst = installation(self.source)
            if from_installation and inst is not None:
                settings = settings.with_installed(inst.settings)
            self.source_id = (installed_source(self.source, inst) if from_installation and inst is not None
                              else (inst.source if inst is not None and inst.source else source_identity(self.source)))
            self.destination = connect(destination_dsn or source_dsn, role="destination database")
        except BaseException:
            self.source.close()
            raise
        try:
            if from_installation:
                check_destination(inst, self.destination)
        except BaseException:
            self.close()
            raise
        self.settings = settings
        self.batch_size = batch_size or settings.batch_size
        self.read_size = self.batch_size * READ_BATCHES
        self.database: str = self.source.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        self.slot = settings.slot_for(self.database)
        schema, table = settings.destination
        self.changes = sql.Identifier(schema, table)
        self.options = wal2json_options(settings)
        untracked = set(settings.excluded()) | {settings.destination}
        self.is_tracked = tracked_filter(settings.schemas, untracked)
        self.types = TypeRegistry(self._load_types)
        self.column_rules = ColumnRules(settings.ignore_columns, settings.exclude_columns)
        # The compiled conversion of change rows, unless BEMI_PG_CONVERSION=pure, it is not built,
        # or column rules apply (the pure path keeps those).
        self._convert = None if self.column_rules else fast_converter(self.types)
        self._lines = fast_lines(self._convert) if self._convert is not None else None
        self._fault = fault or _fault_from_env()
        self.observer: Observer = observer or _Unobserved()
        self._keys: dict[tuple[str, str], list[str]] = {}
        self._recorded_names: dict[tuple[str, str], tuple[str, str] | None] = {}  # for one read
        self._dedupe = False  # write through the staging table (set after a batch met duplicates)
        self._stop = threading.Event()  # run_follow's: a read stops after the batch in hand
        self.mode = "wal"  # the installation's capture mode, read again by start()
        self.seal = True  # seal each batch (bench/ingest.py turns it off to measure what it costs)
        # Compute the batch's hashes here where the compiled path can (README "A sealed trail"):
        # start() checks that the destination allows it.
        self.supply_hashes = True
        self._supplied = False
        self.seals_supplied: list[bytes] | None = None  # given a list, each batch's supplied entries go in it (tests)

    # -- lifecycle -------------------------------------------------------------------
    def _reconnect(self) -> None:
        """Open both connections again; take the lock again (it went with the old session)."""
        self.close()
        self.source = connect(self._source_dsn, role="source database")
        self.destination = connect(self._destination_dsn or self._source_dsn, role="destination database")
        self.start()

    def close(self) -> None:
        for conn in (self.source, self.destination):
            try:
                conn.close()
            except Exception:  # pragma: no cover - closing is best effort
                pass

    def __enter__(self) -> Poller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lock(self) -> None:
        """Take the one-poller-per-slot advisory lock, or raise SlotBusy.

        It waits a few seconds first: the session of a poller killed a moment ago holds the lock
        until its server process notices (client_connection_check_interval, see session_setup)."""
        key = self.source.execute(query("lock_key"), {"slot": self.slot}).fetchone()[0]  # type: ignore[index]
        try:
            with self.source.transaction():
                self.source.execute(query("lock"), {"key": key, "timeout": f"{LOCK_WAIT}s"})
            return
        except psycopg.errors.LockNotAvailable:
            pass
        hi, lo = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
        row = self.source.execute(query("lock_holder"), {"hi": hi, "lo": lo}).fetchone()
        holder = f" (pid {row[0]})" if row else ""
        raise SlotBusy(f"another bemi-pg poller is running for slot {self.slot}{holder}; this one exits without touching anything")

    def start(self) -> None:
        """Take the lock, finish a capture-mode switch that an install left half done, check the
        slot (wal mode; trigger mode has none: its poll moves the queued changes)."""
        self.lock()
        self.finish_switch()
        self.mode = installed_capture_mode(self.source) or "wal"
        if self.mode == "wal":
            self.check_slot()
            row = self.destination.execute(query("seal_supplied"), {
                "schema": self.settings.destination[0], "table": self.settings.destination[1]}).fetchone()
            self._supplied = bool(row and row[0])

    def finish_switch(self) -> PollStats:
        """Hand the changes over at a capture-mode switch recorded in ``bemi.capture_switch``.

        The switching transaction replaced every tracked table's triggers, waiting for their
        writers, so every tracked write before its commit went through the old mode's triggers
        and every one after it through the new ones. Triggers -> wal: the slot is advanced to
        its commit (the triggers wrote what came before). Wal -> triggers: the slot is drained
        up to it into this poller's destination (where wal mode wrote), then dropped. Either
        way the record goes, in the same transaction as the last write."""
        stats = PollStats()
        switch = pending_capture_switch(self.source)
        if switch is None:
            return stats
        xid, from_mode, to_mode = switch
        found = None
        if self.source.execute(query("slot_info"), {"slot": self.slot}).fetchone() is not None:
            found = self.source.execute(query("transaction_commit"), {"slot": self.slot, "xid": xid}).fetchone()
        if found is not None:  # else the slot is gone or already past the switch: nothing left to do
            commit_lsn, end_lsn = found
            if to_mode == "wal":
                self.source.execute(query("advance_slot"), {"slot": self.slot, "lsn": end_lsn}).fetchall()
            else:
                while True:
                    batch = self.poll(upto_lsn=commit_lsn)
                    if batch.batches == 0:
                        break
                    stats.add(batch)
                self.source.execute(query("drop_slot"), {"slot": self.slot})
            log.info("bemi-pg: switched from %s mode to %s mode at %s%s", from_mode, to_mode, commit_lsn,
                     "; the slot starts there" if to_mode == "wal"
                     else f"; wrote the last {stats.changes} wal-mode changes and dropped slot {self.slot}")
        self.source.execute(query("clear_capture_switch"))
        return stats

    def check_slot(self) -> dict[str, Any]:
        """The slot's state; raise SlotLost if it is missing or invalidated (never recreated)."""
        info = fetch_dict(self.source, query("slot_info"), {"slot": self.slot})
        if info is None:
            raise SlotLost(
                f"replication slot {self.slot} does not exist: run `bemi-pg install` to create it "
                "(changes made while it was missing were not captured)"
            )
        if info["wal_status"] == "lost":
            raise SlotLost(
                f"replication slot {self.slot} is invalidated (wal_status lost, max_slot_wal_keep_size exceeded): "
                "changes were lost; run `bemi-pg uninstall` then `bemi-pg install` to start a new trail"
            )
        if info["plugin"] != "wal2json":
            raise BemiError(f"replication slot {self.slot} uses plugin {info['plugin']}, not wal2json: drop it or set slot.name")
        return info

    # -- loops -----------------------------------------------------------------------
    def run_once(self, upto_lsn: str | None = None) -> PollStats:
        """Drain every transaction committed before this call (or before ``upto_lsn``), then return."""
        started = time.monotonic()
        self.start()
        if self.mode == "triggers":
            total = self.move_all()
            total.seconds = time.monotonic() - started
            return total
        self.heartbeat()
        target = upto_lsn or self.source.execute(query("current_lsn")).fetchone()[0]  # type: ignore[index]
        slot = fetch_dict(self.source, query("slot_info"), {"slot": self.slot})
        if slot is not None:
            self.observer.backlog(parse_lsn(slot["confirmed_flush_lsn"]), parse_lsn(target))
        total = PollStats()
        while True:
            stats = self.poll(upto_lsn=target)
            if stats.batches == 0:
                break
            total.add(stats)
        total.seconds = time.monotonic() - started
        return total

    def run_follow(self, interval: float, stop: threading.Event, on_batch: Callable[[PollStats], None] | None = None,
                   *, max_backoff: float = 60.0) -> PollStats:
        """Poll every ``interval`` seconds until ``stop`` is set; the batch in hand is finished first.

        When a database cannot be reached, retry with exponential backoff (1 s doubling to
        ``max_backoff``) and catch up when it returns: nothing was advanced past what was written."""
        started = time.monotonic()
        self._stop = stop
        self.start()
        total = PollStats()
        last_heartbeat = 0.0
        backoff = 1.0
        while not stop.is_set():
            try:
                if self.source.closed or self.destination.closed:
                    self._reconnect()
                stats = self.move() if self.mode == "triggers" else self.poll(upto_lsn=None)
                now = time.monotonic()
                if self.mode == "wal" and stats.rows < self.read_size and now - last_heartbeat >= self.settings.heartbeat_interval:
                    self.heartbeat()
                    last_heartbeat = now
            except (psycopg.OperationalError, psycopg.InterfaceError, Unreachable) as exc:
                which = "destination" if self.destination.closed or self.destination.broken else "source"
                reason = " ".join(str(exc).split())[:300]
                log.warning("bemi-pg: the %s database is unreachable (%s); retrying in %.0fs", which, reason, backoff,
                            extra={"error_kind": which, "slot": self.slot, "source": self.source_id})
                self.observer.failed(which, f"the {which} database is unreachable: {reason}")
                self.close()
                stop.wait(backoff)
                backoff = min(backoff * 2, max_backoff)
                continue
            except Exception as exc:
                self.observer.failed("other", " ".join(str(exc).split())[:300] or type(exc).__name__)
                raise
            self.observer.polled()
            if backoff > 1.0:
                log.info("bemi-pg: reconnected; catching up", extra={"slot": self.slot, "source": self.source_id})
                backoff = 1.0
            total.add(stats)
            if stats.changes and on_batch:  # an idle poller says nothing
                on_batch(stats)
            if stats.rows >= (self.batch_size if self.mode == "triggers" else self.read_size):
                continue  # a backlog: no pause
            stop.wait(interval)
        total.seconds = time.monotonic() - started
        return total

    # -- trigger mode ----------------------------------------------------------------
    def move(self) -> PollStats:
        """Trigger mode: move one batch (``batch_size`` rows) of queued changes into the changes
        table, in one transaction of the server's (bemi.move_changes)."""
        began = time.monotonic()
        moved = int(self.source.execute(query("move_changes"), {"max_rows": self.batch_size}).fetchone()[0])  # type: ignore[index]
        stats = PollStats(batches=int(moved > 0), rows=moved, changes=moved, moved=True)
        if moved:
            self.observer.batch_written(stats, time.monotonic() - began)
        self._fault("after_move")
        return stats

    def move_all(self) -> PollStats:
        """Trigger mode: move every change queued by a transaction that no snapshot still sees
        running, batch by batch; then once more, so that the trail's known extent
        (bemi.moved_until) reaches the start of this call when nothing older is still running."""
        total = PollStats(moved=True)
        while True:
            stats = self.move()
            total.add(stats)
            if stats.rows < self.batch_size:
                break
        total.add(self.move())
        return total

    def heartbeat(self) -> None:
        """Commit a tiny transaction in the source, so that the slot can advance past
        WAL written by other databases or untracked tables while this one is quiet."""
        self.source.execute(query("heartbeat"))

    # -- one batch -------------------------------------------------------------------
    @contextmanager
    def _peek(self, upto_lsn: str | None) -> Iterator[_Rows]:
        """The slot's rows, a page at a time."""
        # Binary results: a text value is its UTF-8 bytes, which psycopg's bytea loader (in C) hands over as they are.
        with self.source.cursor(name="bemi_peek", binary=True) as cur:
            cur.adapters.register_loader("text", ByteaBinaryLoader)
            with decoding_errors():
                cur.execute(query("peek"), {
                    "slot": self.slot, "upto_lsn": upto_lsn, "upto_nchanges": self.read_size, "options": self.options,
                })
            yield _Rows(cur)

    def poll(self, upto_lsn: str | None) -> PollStats:
        """One read: peek up to ``read_size`` rows, write them in batches of about ``batch_size``
        rows, each committed with the checkpoint at a transaction's end, then advance the slot.

        Every peek decodes from the slot's restart point, which only moves at the server's
        running-transactions records (every 15 s, and at checkpoints): a backlog read in many
        small peeks is decoded again and again. So a read spans many batches, and the slot is
        advanced once per read; a restart in between skips the committed batches by the checkpoint."""
        try:
            try:
                return self._read(upto_lsn)
            except psycopg.errors.UniqueViolation:
                if self._dedupe:
                    raise
                log.info("bemi-pg: the destination already holds some changes of this batch; writing it again without those")
                self._dedupe = True
                return self._read(upto_lsn)
        except (BatchRefused, DecodingFailed) as exc:
            with self.destination.transaction():  # for `status`, once the batch is rolled back
                self.destination.execute(query("save_refusal"), {
                    "source": self.source_id, "database": self.database, "slot": self.slot, "refused": str(exc)})
            raise

    def _read(self, upto_lsn: str | None) -> PollStats:
        total = PollStats()
        self._recorded_names.clear()  # partitions may have been attached or detached since
        queued_at = datetime.now(UTC).isoformat()
        last: Commit | None = None
        with self.source.transaction(), self._peek(upto_lsn) as rows:
            while True:
                began = time.monotonic()
                stats, commit = self._write_batch(rows, queued_at)
                if commit is not None:
                    stats.end_lsn = commit.end_lsn
                    self.observer.batch_written(stats, time.monotonic() - began)
                total.add(stats)
                last = commit or last
                if commit is None or self._stop.is_set():  # the read is over, or the poller is asked to stop
                    break
        if last is None:
            return total
        self._advance(last.end_lsn)
        self._fault("after_advance")
        total.end_lsn = last.end_lsn
        return total

    def _write_batch(self, rows: _Rows, queued_at: str) -> tuple[PollStats, Commit | None]:
        """Write the next transactions of ``rows`` until about ``batch_size`` rows are read,
        with the checkpoint, in one destination transaction; return its figures and the
        last commit it read (None when ``rows`` ran out before any).

        Rows are parsed one at a time (:func:`parse_row`, or the compiled ``convert``), except
        that on the compiled path, once a change of a table is converted, the changes of that
        table that follow in the transaction go to COPY lines in runs (TransactionState.take_lines)."""
        stats = PollStats()
        dedupe = self._dedupe
        convert, lines = self._convert, self._lines
        run: tuple[tuple[str, str], tuple[str, str]] | None = None  # the table (and its recorded name) of the last change converted
        with self.destination.transaction(), _Writer(self.destination, self.changes, dedupe=dedupe,
                                                      partitioned=self.settings.partition_by_month) as writer:
            row = self.destination.execute(query("checkpoint"), {"source": self.source_id, "slot": self.slot}).fetchone()
            done_until = row[1] if row else -1
            # The batch's seal entries (stitch.seal_entry), in trail order, when this computes hashes.
            seal = bytearray() if self.seal and self._supplied and self.supply_hashes and lines is not None and not dedupe else None
            sealing = None
            if seal is not None:
                created_at = self.destination.execute(query("batch_started")).fetchone()[0]  # type: ignore[index]
                sealing = (hashlib.sha256, (timestamp_us(queued_at), timestamp_us(created_at)), seal)
            taken_alone = -1  # the row that take_lines did not take after all (see below)
            tx_seal = 0  # where the seal entries of the transaction being read start
            # Transactions holding a float/numeric null that may be NaN or ±Infinity: xid -> commit position.
            ambiguous: dict[int, int] = {}
            last: Commit | None = None
            last_written: Commit | None = None
            committed_at: str | None = None
            state: TransactionState | None = None
            truncated: tuple[tuple[str, str], str] | None = None  # (table, position) of a TRUNCATE just recorded
            periods: list[tuple[str, str, str, str, str, str, int]] = []  # tracking periods' events, written with the batch
            moves: list[tuple[str, str, str, str, str | None, str, int, int]] = []  # UPDATEs of the key
            while rows.more():
                if run is not None and state is not None and lines is not None:
                    start = rows.at
                    writer.starting(state.committed_at, state.xid, state.commit_lsn)
                    rows.at, ambiguous_run = state.take_lines(lines, rows.page, start, run[0], run[1], state.copy_tail(queued_at),
                                                              writer.buffer, SEND_ROWS - writer.pending, SEND_BYTES - len(writer.buffer),
                                                              sealing)
                    if rows.at > start:
                        stats.rows += rows.at - start
                        truncated = None
                        if ambiguous_run:
                            ambiguous[state.xid] = state.commit_lsn
                        writer.added(rows.at - start)
                        continue
                data = rows.page[rows.at][0]
                rows.at += 1
                event = (convert and convert(data)) or parse_row(data)
                stats.rows += 1
                if isinstance(event, (Change, Converted)):
                    recorded = self._recorded(event.schema, event.table) if state is not None else None
                    if recorded is not None and state is not None:
                        if isinstance(event, Change) and event.action == "T":
                            # TRUNCATE of a partitioned table: one record for it and one for each
                            # partition, at one position; recorded once, as the statement's trigger does.
                            if truncated == (recorded, event.lsn):
                                continue
                            truncated = (recorded, event.lsn)
                        else:
                            truncated = None
                        if isinstance(event, Converted) and seal is not None and rows.at - 1 != taken_alone:
                            # The run starts here: its first row goes through take_lines too, which hashes it.
                            run = ((event.schema, event.table), recorded)
                            rows.at -= 1
                            stats.rows -= 1
                            taken_alone = rows.at  # unless take_lines does not take it: then it is taken alone
                            continue
                        change = state.on_change(event, recorded)
                        if isinstance(event, Converted):
                            run = ((event.schema, event.table), recorded)
                        if change is None:  # an UPDATE of ignored columns only
                            continue
                        if change.ambiguous:
                            ambiguous[state.xid] = state.commit_lsn
                        # (A compiled row never moved its key: _fastrow hands those to the pure path.)
                        if isinstance(change, ChangeRow) and change.moved_from is not None:
                            moves.append((self.source_id, change.schema, change.table, change.moved_from, change.primary_key,
                                          state.committed_at, state.commit_lsn, change.seq))
                        writer.add(change, state.copy_tail(queued_at))
                        if seal is not None:
                            seal += seal_entry(change.id)
                elif isinstance(event, Message):
                    if state is not None and event.prefix == CONTEXT_PREFIX:
                        state.on_message(event.content)
                    elif state is not None and event.prefix == PERIOD_PREFIX:
                        period = json.loads(event.content)
                        periods.append((self.source_id, period["schema"], period["table"], period["event"], period["reason"],
                                        state.committed_at, state.commit_lsn))
                elif isinstance(event, Begin):
                    truncated = None
                    if event.end_lsn <= done_until:
                        state = None
                        stats.skipped += 1
                    else:
                        committed_at = event.timestamp
                        tx_seal = len(seal) if seal is not None else 0
                        state = TransactionState(self.source_id, self.database, self.types, event, self.settings.max_context_bytes,
                                                 self._key_order, self.settings.database_keys, self.column_rules,
                                                 self.settings.sqlcommenter)
                elif isinstance(event, Commit):
                    if seal is not None and state is not None and state.xid in ambiguous:
                        # Its NaN and Infinity are patched after its hashes were computed: the server hashes it.
                        for at in range(tx_seal + 16, len(seal), 48):
                            seal[at:at + 32] = UNSURE
                    if state is not None and state.seq > 0:  # a transaction without changes (the
                        stats.transactions += 1               # checkpoint's own write) needs no checkpoint
                        last_written = event
                        stats.committed_at = committed_at if state.seq > 0 else stats.committed_at
                    last = event
                    state = None
                    if stats.rows >= self.batch_size:
                        break
            if last is None:
                return stats, None
            stats.changes = writer.finish()
            stats.sent = writer.sent
            with self.destination.cursor() as cur:
                if periods:
                    cur.executemany(SAVE_PERIOD, periods)
                if moves:
                    cur.executemany(SAVE_KEY_MOVE, moves)
            if ambiguous:
                self._resolve_ambiguous(ambiguous, format_lsn(last.end_lsn))
            stats.batches = 1
            if last_written is not None:
                if self.seal:  # in the batch's transaction: a kill leaves the batch and its seal, or neither
                    supplied = bytes(seal) if seal is not None else None
                    if supplied is not None:
                        stats.hashed = sum(1 for at in range(16, len(supplied), 48) if supplied[at:at + 32] != UNSURE)
                        if self.seals_supplied is not None:
                            self.seals_supplied.append(supplied)
                    stats.head = self.destination.execute(query("seal" if supplied is None else "seal_batch"), {
                        "source": self.source_id, "wal_upto": last_written.commit_lsn,
                        "supplied": supplied}).fetchone()[0]  # type: ignore[index]
                self.destination.execute(query("save_checkpoint"), {
                    "source": self.source_id, "database": self.database, "slot": self.slot,
                    "commit_position": last_written.commit_lsn,
                    "end_position": last_written.end_lsn, "written": stats.changes,
                })
            self._fault("before_commit")
        self._fault("after_commit")
        if dedupe and stats.sent and stats.changes == stats.sent:
            self._dedupe = False  # a batch that wrote rows, none of them duplicates: back to COPY straight into the table
        return stats, last

    def _advance(self, lsn: int) -> None:
        try:
            self.source.execute(query("advance_slot"), {"slot": self.slot, "lsn": format_lsn(lsn)})
        except psycopg.errors.ObjectNotInPrerequisiteState as exc:
            if "minimum is" not in str(exc):  # already further on: nothing to do
                raise

    def _recorded(self, schema: str, table: str) -> tuple[str, str] | None:
        """The (schema, table) a table's changes are recorded under (a partition's is its tree's
        root), or None when that table is not tracked."""
        key = (schema, table)
        if key not in self._recorded_names:
            row = self.source.execute(query("recorded_name"), {"schema": schema, "table": table}).fetchone()
            name = (str(row[0]), str(row[1])) if row else key  # gone since: its own name
            self._recorded_names[key] = name if self.is_tracked(*name) else None
        return self._recorded_names[key]

    def _key_order(self, schema: str, table: str, columns: list[str]) -> list[str]:
        key = (schema, table)
        order = self._keys.get(key)
        if order is None:
            rows = self.source.execute(query("primary_key_order"), {"schema": schema, "table": table}).fetchall()
            order = [r[0] for r in rows]
            self._keys[key] = order
        return order if sorted(order) == sorted(columns) else columns

    def _load_types(self, oids: list[int]) -> list[tuple[int, str, str, int, str, int]]:
        rows = self.source.execute(query("types"), {"oids": oids}).fetchall()
        missing = set(oids) - {int(r[0]) for r in rows}
        if missing and self.source.execute("SELECT pg_catalog.to_regclass('bemi.column_type') IS NOT NULL").fetchone()[0]:  # type: ignore[index]
            rows += self.source.execute(query("recorded_types"), {"oids": sorted(missing)}).fetchall()
        return [(int(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]), int(r[5])) for r in rows]

    # -- NaN and Infinity ------------------------------------------------------------
    def _resolve_ambiguous(self, ambiguous: dict[int, int], upto_lsn: str | None) -> None:
        """Decode the batch again with test_decoding and patch NaN/±Infinity values
        that wal2json wrote as null (only in transactions that had such a null)."""
        copy = f"{self.slot[:48]}_specials_{os.getpid()}"
        self.source.execute(query("copy_slot_test_decoding"), {"slot": self.slot, "copy": copy})
        patch = sql.SQL(
            "UPDATE {} SET before = before || %(before)s::jsonb, after = after || %(after)s::jsonb "
            "WHERE source = %(source)s AND commit_position = %(commit)s AND seq = %(seq)s"
        ).format(self.changes)
        try:
            seq: dict[int, int] = {}
            with self.source.cursor(name="bemi_specials") as cur:
                cur.itersize = FETCH_ROWS
                cur.execute(query("peek_test_decoding"), {"slot": copy, "upto_lsn": upto_lsn})
                updates = []
                for xid, data in cur:
                    commit = ambiguous.get(xid)
                    if commit is None:
                        continue
                    change = parse_change(data)
                    if change is None:
                        continue
                    seen = set()  # a TRUNCATE lists a partitioned table and its partitions: one change
                    for leaf in change.relations:
                        relation = self._recorded(*leaf)
                        if relation is None or relation in seen:
                            continue
                        seen.add(relation)
                        n = seq.get(xid, 0)
                        seq[xid] = n + 1
                        excluded = self.column_rules.excluded(*relation, change.old.keys() | change.new.keys())
                        before = {k: v for k, v in change.old.items() if v in SPECIALS and k not in excluded}
                        after = {k: v for k, v in change.new.items() if v in SPECIALS and k not in excluded}
                        if change.action == "UPDATE":
                            after = {**{k: v for k, v in before.items() if k not in change.new}, **after}
                        if before or after:
                            updates.append({
                                "before": json.dumps(before), "after": json.dumps(after),
                                "source": self.source_id, "commit": commit, "seq": n,
                            })
            if updates:
                with self.destination.cursor() as dcur:
                    dcur.executemany(patch, updates)
        finally:
            self.source.execute(query("drop_slot"), {"slot": copy})


def _fault_from_env() -> Callable[[str], None]:
    """A test hook: BEMI_FAULT=<point> makes the poller exit abruptly at that point."""
    point = os.environ.get("BEMI_FAULT")

    def fault(here: str) -> None:
        if point and point == here:
            os._exit(99)

    return fault
