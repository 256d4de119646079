"""One documented function per command. The CLI and the tests call these."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo, sql
from psycopg.rows import dict_row

from . import __version__
from . import metrics as metrics_module
from .baseline import SnapshotResult, take_snapshot
from .config import Settings
from .db import (
    check_destination,
    connect,
    fetch_dict,
    installation,
    installed_capture_mode,
    installed_source,
    pending_capture_switch,
    queue_backlog,
    replication_command,
    source_identity,
)
from .errors import BemiError, ConfigError, ConnectionError, PreflightError, SlotBusy
from .poller import Poller, PollStats
from .progress import Progress
from .queries import query
from .render import Rendered, quote_ident, render_extension, render_install, render_uninstall
from .sealing import Verdict
from .sealing import seal as seal_trail
from .sealing import verify as verify_trail
from .service import Health, Monitor, Notifier
from .wal2json import format_lsn

__all__ = ["Check", "MetricsEndpoint", "doctor", "install", "installed_settings", "uninstall", "poll_once", "poll_follow",
           "prune", "seal", "status", "render", "snapshot", "verify", "with_installation", "serve", "explorer_app", "ui_token"]

log = logging.getLogger("bemi_pg")

MIN_SERVER_VERSION = 140000  # CREATE OR REPLACE TRIGGER, split_part with a negative index
TESTED_MAJORS = (15, 17, 18)  # the versions CI runs the whole suite on (README: Supported PostgreSQL versions)
# The output plugins bemi-pg loads: wal2json for the poller, test_decoding for doctor's own probe.
NEEDED_PLUGINS = ("test_decoding", "wal2json")


def _server_check(version_num: int) -> Check:
    """The server's version against the ones bemi-pg supports and tests."""
    major, minor = version_num // 10000, version_num % 10000
    tested = ", ".join(map(str, TESTED_MAJORS[:-1])) + f" and {TESTED_MAJORS[-1]}"
    text = f"PostgreSQL {major}.{minor}"
    if version_num < MIN_SERVER_VERSION:
        return Check("FAIL", "server", f"{text} is not supported (bemi-pg needs 14 or later; tested: {tested})",
                     f"upgrade to PostgreSQL {TESTED_MAJORS[-1]}")
    if major not in TESTED_MAJORS:
        return Check("WARN", "server", f"{text} should work but is not tested (tested: {tested})",
                     f"to run what is tested, use PostgreSQL {tested.replace(' and ', ' or ')}")
    return Check("OK", "server", text)


def _output_plugin_libraries_fix(conn: psycopg.Connection[Any]) -> str:
    """The ALTER SYSTEM that adds the plugins bemi-pg needs to Debian's output_plugin_libraries,
    keeping what it lists; the setting is a list: one quoted element per plugin. Only roles with
    pg_read_all_settings see its value; for the others, Debian's default ('pgoutput') is assumed."""
    row = conn.execute("SELECT setting FROM pg_catalog.pg_settings WHERE name = 'output_plugin_libraries'").fetchone()
    current = row[0] if row else "pgoutput"
    listed = [quoted.replace('""', '"') if quoted else bare.strip()
              for quoted, bare in re.findall(r'\s*(?:"((?:[^"]|"")*)"|([^,]+))\s*(?:,|$)', str(current))
              if quoted or bare.strip()]
    wanted = listed + [p for p in NEEDED_PLUGINS if p not in listed]
    values = ", ".join(sql.Literal(name).as_string(conn) for name in wanted)
    return f"ALTER SYSTEM SET output_plugin_libraries = {values}; SELECT pg_reload_conf()"


def render(settings: Settings, *, uninstall: bool = False, drop_changes: bool = False) -> str:
    """The install (or uninstall) SQL as one script; needs no database."""
    if settings.capture_mode == "auto" and not uninstall:
        raise ConfigError("capture.mode auto is decided by `bemi-pg install` against the database: "
                          "render with --capture-mode wal or --capture-mode triggers")
    rendered = render_uninstall(settings, drop_changes=drop_changes) if uninstall else render_install(settings)
    return rendered.combined()


def write_extension(directory: str, *, check: bool = False) -> list[str]:
    """Write the extension's generated files into ``directory``; return the paths that
    changed. With ``check``, write nothing and return the paths that are stale."""
    changed = []
    for name, text in render_extension().items():
        path = Path(directory) / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            changed.append(str(path))
            if not check:
                path.write_text(text, encoding="utf-8")
    return changed


@dataclass(frozen=True)
class Check:
    """One line of ``doctor``: status is OK, WARN or FAIL."""

    status: str
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4} {self.name}: {self.detail}"
        return f"{text} (fix: {self.fix})" if self.fix and self.status != "OK" else text


# The checks only wal mode needs: trigger mode works without logical decoding.
WAL_CHECKS = frozenset({"wal_level", "replication privilege", "replication slots", "replication slot",
                        "wal2json", "test_decoding", "failover slots", "synchronized_standby_slots"})


def _plugin_check(conn: psycopg.Connection[Any], plugin: str, slot: str, slot_exists: bool) -> Check:
    """Whether the server may load ``plugin`` as an output plugin."""
    try:
        with conn.transaction():
            conn.execute("SET LOCAL statement_timeout = '15s'")
            if slot_exists and plugin == "wal2json":
                conn.execute(
                    "SELECT count(*) FROM pg_logical_slot_peek_changes(%s, pg_current_wal_lsn(), 1, 'format-version', '2')",
                    (slot,),
                )
            else:
                temp = f"bemi_doctor_{plugin}_{conn.info.backend_pid}"
                conn.execute("SELECT pg_create_logical_replication_slot(%s, %s, true)", (temp, plugin))
                conn.execute("SELECT pg_drop_replication_slot(%s)", (temp,))
    except psycopg.Error as exc:
        msg = exc.diag.message_primary or " ".join(str(exc).split())
        if "output_plugin_libraries" in f"{msg} {exc.diag.message_hint or ''}":
            return Check("FAIL", plugin, f"the server refuses it ({msg}; Debian's PostgreSQL 15.20, 17, 18 and later "
                         "load only the output plugins listed)", _output_plugin_libraries_fix(conn))
        if "could not access file" in msg:
            major = conn.info.server_version // 10000
            pkg = f"postgresql-{major}-wal2json" if plugin == "wal2json" else "postgresql-contrib"
            return Check("FAIL", plugin, "not installed on the server", f"apt-get install -y {pkg}, or your platform's {plugin}")
        return Check("FAIL", plugin, f"cannot be loaded: {msg}", "see the message; bemi-pg doctor -v shows more")
    return Check("OK", plugin, "loadable as an output plugin")


def doctor(source_dsn: str, destination_dsn: str | None, settings: Settings, *,
           standby_dsns: tuple[str, ...] = ()) -> list[Check]:
    """Check that the databases are ready for bemi-pg; one Check per line. With a failover slot
    (``slot.failover``, or a slot that has it), the standbys are checked too: ``standby_dsns``
    and the other servers of a multi-host source DSN."""
    checks: list[Check] = []
    with connect(source_dsn, role="source database") as conn:
        info = fetch_dict(conn, query("role_info"))
        assert info is not None
        slot = settings.slot_for(info["database"])
        version = info["version_num"]
        checks.append(_server_check(version))
        checks.append(Check("OK" if info["wal_level"] == "logical" else "FAIL", "wal_level", info["wal_level"],
                            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"))
        can_slot = info["rolsuper"] or info["rolreplication"]
        checks.append(Check("OK" if can_slot else "FAIL", "replication privilege",
                            "superuser" if info["rolsuper"] else ("REPLICATION" if can_slot else "missing"),
                            "ALTER ROLE <role> REPLICATION (or use the database owner on managed services)"))
        slot_row = conn.execute(query("slot_info"), {"slot": slot}).fetchone()
        free = info["max_slots"] - info["used_slots"]
        if slot_row is not None:
            checks.append(Check("OK", "replication slot", f"{slot} exists"))
        else:
            checks.append(Check("OK" if free > 0 else "FAIL", "replication slots",
                                f"{free} of {info['max_slots']} free", "raise max_replication_slots and restart, or drop an unused slot"))
        if settings.slot_failover or (slot_row is not None and version >= FAILOVER_VERSION
                                      and conn.execute(query("slot_failover"), {"slot": slot}).fetchone()[0]):  # type: ignore[index]
            checks += _failover_checks(conn, source_dsn, standby_dsns, slot, version,
                                       slot_row is not None, settings.slot_failover)
        if info["wal_level"] == "logical" and can_slot and (slot_row is not None or free > 0):
            checks.append(_plugin_check(conn, "wal2json", slot, slot_row is not None))
            if free > 0:
                checks.append(_plugin_check(conn, "test_decoding", slot, False))
        checks.append(Check("OK" if info["can_create"] else "FAIL", "create privilege",
                            "may create schema bemi" if info["can_create"] else "cannot create schemas in this database",
                            f"GRANT CREATE ON DATABASE {info['database']} TO <role>"))
        untracked = [f"{s}.{t}" for s, t in settings.excluded()] + [".".join(settings.destination)]
        params = {"schemas": list(settings.schemas), "untracked": untracked}
        if not info["rolsuper"]:
            not_owned = [f"{s}.{t}" for s, t in conn.execute(query("tables_not_owned"), params)]
            checks.append(Check("FAIL" if not_owned else "OK", "table ownership",
                                f"not owner of {_few(not_owned)}" if not_owned
                                else "owner of every tracked table", "install as the tables' owner"))
            checks.append(Check("WARN", "event trigger", "only superusers may create one, so new tables are not tracked automatically",
                                "run CALL bemi.track_tables() after creating tables"))
        if settings.capture_mode != "triggers":
            unlogged = [f"{s}.{t}" for s, t in conn.execute(query("tables_unlogged"), params)]
            checks.append(Check("WARN" if unlogged else "OK", "unlogged tables",
                                f"{_few(unlogged)}: UNLOGGED, so logical decoding cannot see their changes and wal mode "
                                "does not track them" if unlogged else "none in the tracked schemas",
                                "ALTER TABLE ... SET LOGGED, or capture.mode = \"triggers\" (which tracks them)"))
        if destination_dsn is None:
            checks.append(_changes_table_check(conn, settings))
        if installed_capture_mode(conn) == "triggers":
            checks.append(_mover_check(queue_backlog(conn)))
        no_pk = [f"{s}.{t}" for s, t in conn.execute(query("tables_without_pk"), params)]
        checks.append(Check("WARN" if no_pk else "OK", "primary keys",
                            f"no primary key on {_few(no_pk)}: "
                            "their changes are recorded with primary_key null" if no_pk else "every tracked table has one",
                            "add a primary key to each of them"))
    if settings.capture_mode != "wal":
        # Trigger mode needs none of logical decoding; auto falls back to it.
        note = "trigger mode does not need it" if settings.capture_mode == "triggers" else "auto will choose trigger mode"
        checks = [Check("WARN", c.name, f"{c.detail}; {note}", c.fix) if c.status == "FAIL" and c.name in WAL_CHECKS else c
                  for c in checks]
    if destination_dsn:
        with connect(destination_dsn, role="destination database") as dconn:
            row = dconn.execute("SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()
            ok = bool(row and row[0])
            checks.append(Check("OK" if ok else "FAIL", "destination", "reachable and writable" if ok else "cannot create schemas",
                                "GRANT CREATE ON DATABASE <destination> TO <role>"))
            checks.append(_changes_table_check(dconn, settings))
    return checks


FAILOVER_VERSION = 170000  # failover slots, sync_replication_slots, synchronized_standby_slots


def _failover_checks(conn: psycopg.Connection[Any], source_dsn: str, standby_dsns: tuple[str, ...], slot: str,
                     version: int, slot_exists: bool, wanted: bool) -> list[Check]:
    """What a slot that survives a failover needs of the primary and of each standby (README: Failover)."""
    if version < FAILOVER_VERSION:
        return [Check("FAIL", "failover slots", f"slot.failover = true needs PostgreSQL 17 or later; this server is "
                      f"{version // 10000}.{version % 10000}", "upgrade to PostgreSQL 17 or 18, or remove slot.failover "
                      "from bemi.toml (after a failover the slot would stay behind and the trail have a hole)")]
    checks: list[Check] = []
    if slot_exists:
        flagged = conn.execute(query("slot_failover"), {"slot": slot}).fetchone()[0]  # type: ignore[index]
        checks.append(Check("OK" if flagged or not wanted else "WARN", "failover slots",
                            f"slot {slot} {'has' if flagged else 'does not have'} failover enabled",
                            "run `bemi-pg install` with slot.failover = true: it enables it"))
    else:
        checks.append(Check("OK", "failover slots", f"install creates slot {slot} with failover enabled"))
    primary = fetch_dict(conn, query("failover_primary"))
    assert primary is not None
    named = [n.strip().strip('"') for n in primary["standby_slots"].split(",") if n.strip()]
    absent = [n for n in named if n not in primary["physical_slots"]]
    physical = ", ".join(primary["physical_slots"]) or "<the standby's physical slot>"
    if not named or absent:
        checks.append(Check("FAIL", "synchronized_standby_slots",
                            f"names {', '.join(absent)}, which is not a physical slot here" if absent else
                            "is empty, so the slot may get ahead of the standby and the trail hold changes a promoted "
                            "standby never had", f"ALTER SYSTEM SET synchronized_standby_slots = '{physical}'; "
                            "SELECT pg_reload_conf()"))
    else:
        checks.append(Check("OK", "synchronized_standby_slots", f"{', '.join(named)}: decoding waits for the standby"))
    waits = primary["sync_names"].strip() != "" and primary["sync_commit"] in ("on", "remote_write", "remote_apply")
    checks.append(Check("OK" if waits else "WARN", "synchronous_standby_names",
                        f"{primary['sync_names']!r}, synchronous_commit {primary['sync_commit']}: a commit returns once "
                        "a standby has it" if waits else "commits do not wait for a standby: one committed just before a "
                        "failover may be missing on the promoted standby, and so from the trail",
                        "ALTER SYSTEM SET synchronous_standby_names = '*' (synchronous_commit on); SELECT pg_reload_conf()"))
    for dsn in (*standby_dsns, *_other_hosts(source_dsn, conn)):
        checks += _standby_checks(dsn, slot, named)
    if not standby_dsns and not _other_hosts(source_dsn, conn):
        checks.append(Check("WARN", "standby", "none to check", "pass --standby-dsn, or list the standby in the DSN "
                            "(host=primary,standby port=5432,5432 target_session_attrs=read-write)"))
    return checks


def _other_hosts(source_dsn: str, conn: psycopg.Connection[Any]) -> list[str]:
    """The DSNs of a multi-host DSN's servers other than the one ``conn`` reached."""
    params = conninfo.conninfo_to_dict(source_dsn)
    hosts = str(params.get("host") or "").split(",")
    ports = str(params.get("port") or "").split(",")
    if len(hosts) < 2:
        return []
    ports = ports if len(ports) == len(hosts) else [ports[0]] * len(hosts)
    others = []
    for host, port in zip(hosts, ports, strict=True):
        if (host, port or "5432") == (conn.info.host, str(conn.info.port)):
            continue
        params.update(host=host, port=port, target_session_attrs="any", connect_timeout=params.get("connect_timeout") or "5")
        others.append(conninfo.make_conninfo("", **params))
    return others


def _standby_checks(dsn: str, slot: str, standby_slots: list[str]) -> list[Check]:
    """One line per setting slot synchronization needs on the standby at ``dsn``."""
    params = conninfo.conninfo_to_dict(dsn)
    where = f"standby {params.get('host') or 'localhost'}:{params.get('port') or 5432}"
    try:
        with connect(dsn, role=where) as conn:
            version = conn.info.server_version
            info = fetch_dict(conn, query("failover_standby"), {"slot": slot}) if version >= FAILOVER_VERSION else None
    except BemiError as exc:
        return [Check("WARN", where, f"unreachable ({str(exc)[:200]})", "start it, or check the DSN; its settings are not checked")]
    if info is None:
        return [Check("FAIL", where, f"is PostgreSQL {version // 10000}: slot synchronization needs 17 or later",
                      "upgrade the standby")]
    if not info["in_recovery"]:
        return [Check("WARN", where, "is not a standby (not in recovery)", "point --standby-dsn at the standby")]
    conninfo_text = info["primary_conninfo"]
    has_dbname = None if conninfo_text is None else bool(conninfo.conninfo_to_dict(conninfo_text).get("dbname"))
    primary_slot = info["primary_slot_name"]
    rows = [
        ("wal_level", info["wal_level"] == "logical", info["wal_level"],
         "ALTER SYSTEM SET wal_level = logical on the standby; then restart it"),
        ("sync_replication_slots", info["sync_replication_slots"] == "on", info["sync_replication_slots"],
         "ALTER SYSTEM SET sync_replication_slots = on on the standby; SELECT pg_reload_conf()"),
        ("hot_standby_feedback", info["hot_standby_feedback"] == "on", info["hot_standby_feedback"],
         "ALTER SYSTEM SET hot_standby_feedback = on on the standby; SELECT pg_reload_conf()"),
        ("primary_slot_name", bool(primary_slot) and primary_slot in standby_slots,
         f"{primary_slot or 'empty'}{'' if primary_slot in standby_slots else ', not in the primary synchronized_standby_slots'}",
         "create a physical slot on the primary (SELECT pg_create_physical_replication_slot('standby1')), set "
         "primary_slot_name to it on the standby and list it in the primary's synchronized_standby_slots"),
    ]
    checks = [Check("OK" if ok else "FAIL", f"{where} {name}", detail, fix) for name, ok, detail, fix in rows]
    if has_dbname is None:
        checks.append(Check("WARN", f"{where} primary_conninfo", "cannot be read by this role",
                            "check as a superuser that it names a dbname (slot synchronization connects to it)"))
    else:
        checks.append(Check("OK" if has_dbname else "FAIL", f"{where} primary_conninfo",
                            "names a dbname" if has_dbname else "names no dbname, so slot synchronization cannot connect",
                            "add dbname=postgres to primary_conninfo on the standby; SELECT pg_reload_conf()"))
    ready = info["slot_ready"]
    checks.append(Check("OK" if ready else "WARN", f"{where} slot",
                        f"{slot} is synchronized and ready for failover" if ready else
                        f"{slot} is {'not there' if ready is None else 'not synchronized yet (temporary)'}: "
                        "a failover now would leave the trail behind",
                        "wait: the standby keeps it once the poller has advanced the slot past what the standby has"))
    return checks


# Columns every version's changes table has: a relation of the destination's name without them is
# the application's, not a changes table.
CHANGES_COLUMNS = ("id", "database", "schema", "table", "primary_key", "operation", "before", "after", "context",
                   "committed_at", "transaction_id", "commit_position", "seq")


def _few(names: list[str]) -> str:
    """Up to five names, for a check's line."""
    return f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"


# A queued change older than this with no move since warns: nothing is moving them.
MOVER_STALL_SECONDS = 300


def _mover_check(backlog: dict[str, Any] | None) -> Check:
    """Trigger mode: whether the queued changes are being moved into the changes table."""
    fix = "run `bemi-pg poll --follow` beside the server, or schedule SELECT bemi.move_changes() with pg_cron"
    if backlog is None or not backlog["rows"]:
        return Check("OK", "change mover", "no change waits to be moved")
    age = backlog["oldest_age_seconds"] or 0.0
    waiting = f"{backlog['rows']} change{'s' * (backlog['rows'] != 1)} waiting, the oldest for {age:.0f}s"
    if age > MOVER_STALL_SECONDS:
        last = backlog["mover_moved_at"]
        return Check("WARN", "change mover", f"{waiting}; nothing is moving them (last move: "
                     f"{last.isoformat() if last else 'never'})", fix)
    return Check("OK", "change mover", waiting)


def _changes_table_check(conn: psycopg.Connection[Any], settings: Settings) -> Check:
    """Whether the destination table's name is free, or already a changes table."""
    name = quote_ident(*settings.destination)
    clash = fetch_dict(conn, query("changes_table_clash"), {"table": name, "columns": list(CHANGES_COLUMNS)})
    if clash is None:
        return Check("OK", "changes table", f"{name} will be created")
    if clash["relkind"] not in ("r", "p") or clash["missing"]:
        what = "is not a table" if clash["relkind"] not in ("r", "p") else f"has no column {', '.join(clash['missing'][:3])}"
        return Check("FAIL", "changes table", f"{name} already exists and is not a bemi-pg changes table ({what})",
                     "set [destination] table = \"public.bemi_changes\" (or another free name) in bemi.toml")
    return Check("OK", "changes table", f"{name} exists")


def _notices(conn: psycopg.Connection[Any]) -> None:
    """Show the server's notices, except the "already exists, skipping" of idempotent DDL."""

    def show(diag: psycopg.errors.Diagnostic) -> None:
        message = diag.message_primary or ""
        if not message.endswith(", skipping"):
            hint = f" ({diag.message_hint})" if diag.message_hint else ""
            print(f"{(diag.severity or 'NOTICE').lower()}: {message}{hint}", file=sys.stderr)

    conn.add_notice_handler(show)


def choose_capture_mode(settings: Settings, checks: list[Check]) -> tuple[str, str]:
    """The capture mode to install, and why: ``auto`` takes wal when its checks pass."""
    if settings.capture_mode != "auto":
        return settings.capture_mode, "capture.mode"
    failed = [c for c in checks if c.status == "FAIL" and c.name in WAL_CHECKS]
    if failed:
        return "triggers", f"capture.mode auto, and logical decoding is not available ({failed[0].name}: {failed[0].detail})"
    return "wal", "capture.mode auto, and logical decoding is available"


def install(source_dsn: str, destination_dsn: str | None, settings: Settings, *, dry_run: bool = False,
            preflight: bool = True, snapshot: bool = True) -> Rendered:
    """Preflight, apply the install SQL in one transaction per database, create the slot.

    Idempotent: a second run changes nothing. With ``dry_run`` nothing is changed. Installing
    with another capture mode than the installed one switches the database over, neither
    losing nor duplicating a change (see README, "Capture modes"). With ``snapshot``, each
    tracked table without a baseline gets one (see :mod:`bemi_pg.baseline`)."""
    # Every check as wal mode sees it; trigger mode then ignores the ones it does not need.
    checks = (doctor(source_dsn, destination_dsn, replace(settings, capture_mode="wal"))
              if preflight or settings.capture_mode == "auto" else [])
    mode, why = choose_capture_mode(settings, checks)
    failed = [c for c in checks if c.status == "FAIL" and (mode == "wal" or c.name not in WAL_CHECKS)]
    if preflight and failed:
        raise PreflightError(f"{failed[0].line()}; run `bemi-pg doctor` for every check")
    settings = replace(settings, capture_mode=mode)
    rendered = render_install(settings)
    if dry_run:
        return rendered
    with connect(source_dsn, role="source database") as src:
        _notices(src)
        if settings.slot_failover and mode == "wal" and src.info.server_version < FAILOVER_VERSION:
            raise ConfigError(f"slot.failover = true needs PostgreSQL 17 or later; this server is "
                              f"{src.info.server_version // 10000}: remove slot.failover from "
                              f"{settings.source_file or 'the settings'}, or upgrade")
        database = src.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        source = source_identity(src)
        adopt = {"source": source, "database": database}
        slot = settings.slot_for(database)
        previous = installed_capture_mode(src)
        slot_row = src.execute(query("slot_info"), {"slot": slot}).fetchone()
        draining = previous == "wal" and mode == "triggers" and slot_row is not None
        if mode == "triggers" and destination_dsn is not None and not draining:
            # (Switching from wal mode, the destination is where the last wal-mode changes go.)
            raise ConfigError("trigger mode writes the changes table inside the tracked database: "
                              "leave out --destination-dsn (BEMI_DESTINATION_DSN), or use capture.mode = \"wal\"")
        if draining and slot_row[3] is not None:  # type: ignore[index]
            raise BemiError(f"replication slot {slot} is in use by pid {slot_row[3]}: stop the poller, "  # type: ignore[index]
                            "then switch to trigger mode")
        log.info("bemi-pg: capture mode %s (%s)", mode, why)
        pending = pending_capture_switch(src) is not None
        # Installed in wal mode and the slot is gone: the changes made meanwhile are lost, so the
        # trail has a gap. Its tracking periods end where it stops, and new ones begin here.
        gap = previous == "wal" and slot_row is None
        switching = previous is not None and previous != mode and (mode == "wal" or draining)
        # A switch holds the poller's lock from before its transaction until the slot work is
        # done: a poller running now exits (75) instead of reading past the switch.
        with (_poller_locked(source_dsn, destination_dsn, settings, "switch the capture mode") if switching or pending
              else nullcontext()) as poller:
            if poller is not None and pending:  # an earlier switch whose slot work was cut short
                poller.finish_switch()
            created = False
            if mode == "wal" and slot_row is None:
                # The slot comes first, so that no change made during installation is missed.
                src.execute(query("create_failover_slot" if settings.slot_failover else "create_slot"), {"slot": slot})
                created = True
            elif mode == "wal":
                _set_slot_failover(src, source_dsn, slot, settings.slot_failover)
            try:
                trail_in = source  # where the trail is written, by its identity
                if mode == "wal" and destination_dsn is not None:
                    with connect(destination_dsn, role="destination database") as dst:
                        _notices(dst)
                        trail_in = source_identity(dst)
                        with dst.transaction():
                            dst.execute(rendered.destination)
                            dst.execute(query("adopt_source"), adopt)
                            _register(dst, source, database, slot, gap)
                            dst.execute(query("seal"), {"source": source, "wal_upto": None})  # an upgrade seals the earlier changes
                with src.transaction():
                    if mode == "wal" and destination_dsn is not None:
                        src.execute(rendered.source)
                    else:
                        src.execute(rendered.combined())
                        src.execute(query("adopt_source"), adopt)
                        _register(src, source, database, slot, gap)
                        src.execute(query("seal"), {"source": source, "wal_upto": None})
                    if gap:
                        src.execute(query("begin_periods"), {"reason": "new slot"})
                    src.execute(query("record_destination"), {"destination": trail_in})
                    if switching:  # recorded with the switch itself, so that a poller finishes it if we cannot
                        src.execute(query("record_capture_switch"), {"from_mode": previous, "to_mode": mode})
            except BaseException:
                if created:
                    src.execute(query("drop_slot"), {"slot": slot})
                raise
            if poller is not None:
                poller.finish_switch()
    if snapshot:  # (after a gap, every baseline is taken again: the old ones are from before it)
        take_snapshot(source_dsn, None if mode == "triggers" else destination_dsn, settings, missing_only=not gap)
    return rendered


def _register(dst: psycopg.Connection[Any], source: str, database: str, slot: str, gap: bool) -> None:
    """Make the source known to its destination at once (a checkpoint that skips nothing); after a
    lost slot, end its tracking periods where its trail stops."""
    dst.execute(query("register_source"), {"source": source, "database": database, "slot": slot})
    if gap:
        ended = dst.execute(query("end_periods"), {"source": source, "reason": "slot lost"}).fetchone()[0]  # type: ignore[index]
        log.warning("bemi-pg: replication slot %s was missing: the changes made meanwhile are lost, so the trail of "
                    "%d table%s has a gap, and their baselines are taken again", slot, ended, "s" * (ended != 1))


def _set_slot_failover(src: psycopg.Connection[Any], source_dsn: str, slot: str, failover: bool) -> None:
    """Give an existing slot the failover flag the settings ask for (PostgreSQL 17+): the slot and
    its position stay, only whether standbys synchronize it changes. ALTER_REPLICATION_SLOT is a
    replication protocol command, so it goes over a replication connection."""
    if src.info.server_version < FAILOVER_VERSION:
        return
    row = src.execute(query("slot_failover"), {"slot": slot}).fetchone()
    if row is None or bool(row[0]) == failover:
        return
    replication_command(source_dsn, f"ALTER_REPLICATION_SLOT {quote_ident(slot)} (FAILOVER {str(failover).lower()})")
    log.info("bemi-pg: slot %s: failover %s", slot, "enabled" if failover else "disabled")


def snapshot(source_dsn: str, destination_dsn: str | None, settings: Settings, tables: list[str] | None = None) -> list[SnapshotResult]:
    """Take or refresh the baseline of the named tracked tables (every one without names)."""
    return take_snapshot(source_dsn, destination_dsn, settings, tables or ())


@contextmanager
def _poller_locked(source_dsn: str, destination_dsn: str | None, settings: Settings, doing: str) -> Iterator[Poller]:
    """A poller holding the one-poller-per-slot lock, for a command that must not run while a
    poller reads (a capture-mode switch, uninstall): SlotBusy if one is running."""
    poller = Poller(source_dsn, destination_dsn, settings, from_installation=False)
    try:
        try:
            poller.lock()
        except SlotBusy:
            raise SlotBusy(f"a bemi-pg poller is running for slot {poller.slot}: stop it, then {doing}") from None
        yield poller
    finally:
        poller.close()


def uninstall(source_dsn: str, destination_dsn: str | None, settings: Settings, *, drop_changes: bool = False) -> None:
    """Remove triggers, functions, publication and slot; the audit data stays unless ``drop_changes``."""
    with connect(source_dsn, role="source database") as src:
        settings, source = with_installation(src, settings)
        rendered = render_uninstall(settings, drop_changes=drop_changes)
        leaving = "SELECT pg_catalog.set_config('bemi.uninstalling_source', %s, true)"  # for a destination others share
        _notices(src)
        database = src.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        slot = settings.slot_for(database)
        if src.execute("SELECT count(*) FROM pg_catalog.pg_extension WHERE extname = 'bemi_pg'").fetchone()[0]:  # type: ignore[index]
            raise BemiError("bemi-pg was installed here with CREATE EXTENSION bemi_pg: remove it with "
                            "DROP EXTENSION bemi_pg CASCADE (which drops the changes table too; dump it first)")
        # Held until the slot is gone: a poller running now, even between reads, is told to stop
        # first, and one starting meanwhile exits instead of reading what is being removed.
        with _poller_locked(source_dsn, destination_dsn, settings, "uninstall"):
            row = src.execute(query("slot_info"), {"slot": slot}).fetchone()
            if row is not None and row[3] is not None:
                raise BemiError(f"replication slot {slot} is in use by pid {row[3]}: stop the poller first")
            if destination_dsn is None:
                with src.transaction():
                    src.execute(leaving, (source,))
                    src.execute(rendered.combined())
            else:
                with connect(destination_dsn, role="destination database") as dst, dst.transaction():
                    _notices(dst)
                    dst.execute(leaving, (source,))
                    dst.execute(rendered.destination + rendered.trailer)
                with src.transaction():
                    src.execute(rendered.source + rendered.trailer)
            src.execute(query("drop_slot"), {"slot": slot})


def poll_once(source_dsn: str, destination_dsn: str | None, settings: Settings, *, batch_size: int | None = None) -> PollStats:
    """Drain every change committed before the call; return what was written. On a terminal, a
    progress bar shows the WAL bytes to go."""
    with Poller(source_dsn, destination_dsn, settings, batch_size=batch_size) as poller, \
            Progress(f"draining {poller.slot}", unit="bytes") as bar:
        poller.observer = Monitor(progress=bar)
        stats = poller.run_once()
        bar.close()
        log.info(stats.summary(poller.slot), extra=_stats_fields(poller, stats))
        return stats


def _stats_fields(poller: Poller, stats: PollStats) -> dict[str, Any]:
    """The fields of a JSON log line about what a poll wrote."""
    return {"source": poller.source_id, "slot": poller.slot, "changes": stats.changes, "transactions": stats.transactions,
            "batches": stats.batches, "position": format_lsn(stats.end_lsn) if stats.end_lsn else None, "head": stats.head}


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where ``poll --follow`` serves /metrics, /healthz and /readyz."""

    host: str = "127.0.0.1"
    port: int = 0


def poll_follow(source_dsn: str, destination_dsn: str | None, settings: Settings, *, interval: float,
                stop: threading.Event, batch_size: int | None = None,
                on_batch: Callable[[PollStats], None] | None = None,
                metrics: MetricsEndpoint | None = None) -> PollStats:
    """Poll every ``interval`` seconds until ``stop`` is set. Under systemd (``$NOTIFY_SOCKET``)
    it reports READY=1 after the first poll and pings the watchdog; with ``metrics``, it serves
    Prometheus metrics and health checks there (the ``metrics`` extra). A database that cannot
    be reached at the start (a service started before its server) is waited for, as later."""
    if metrics is not None:
        metrics_module.require()
    poller = _first_poller(source_dsn, destination_dsn, settings, stop, batch_size=batch_size)
    if poller is None:
        return PollStats()
    with poller, ExitStack() as stack:
        health, notifier = Health(interval), Notifier()
        monitor = Monitor(health=health, notifier=notifier)
        poller.observer = monitor
        if metrics is not None:
            mode = installed_capture_mode(poller.source) or "wal"
            monitor.metrics = metrics_module.PollerMetrics(poller.source_id, poller.slot, version=__version__, capture_mode=mode)
            stack.enter_context(metrics_module.serve(metrics.host, metrics.port, monitor.metrics, health, source_dsn=source_dsn,
                                                     slot=poller.slot, probe_every=max(interval, 1.0), capture_mode=mode))
        stack.callback(notifier.stopping)
        return poller.run_follow(interval, stop, on_batch)


def _first_poller(source_dsn: str, destination_dsn: str | None, settings: Settings, stop: threading.Event, *,
                  batch_size: int | None) -> Poller | None:
    """A connected Poller, retried with backoff while a database is unreachable; None if stopped."""
    backoff = 1.0
    while True:
        try:
            poller = Poller(source_dsn, destination_dsn, settings, batch_size=batch_size)
        except ConnectionError as exc:
            log.warning("bemi-pg: the %s is unreachable (%s); retrying in %.0fs", exc.role, exc.reason[:300], backoff)
            if stop.wait(backoff):
                return None
            backoff = min(backoff * 2, 60.0)
            continue
        if backoff > 1.0:
            log.info("bemi-pg: reconnected; catching up")
        return poller


_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12w``, ``36h``, ``30m``, ``45s`` -> timedelta."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"duration {text!r} not understood: write a number and a unit, e.g. 90d, 12w, 36h")
    try:
        return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:
        raise ConfigError(f"duration {text!r} is too long: write at most 999999999 days (about 2.7 million years)") from None


def prune(dest: psycopg.Connection[Any], settings: Settings, older_than: str, *, batch: int = 10_000) -> dict[str, Any]:
    """Delete the changes committed before now - ``older_than``. A sealed source's changes go a
    seal at a time, oldest seal first, while all of a seal's changes are older than the cutoff,
    and each transaction of about ``batch`` changes appends a prune seal recording what it removed
    (README, "A sealed trail"); a source without seals (an older poller's) loses its old changes in
    batches of ``batch`` rows. With monthly partitions, the months before the cutoff left empty
    are then dropped."""
    age = parse_duration(older_than)
    schema, name = settings.destination
    table = sql.Identifier(schema, name)
    try:
        with dest.transaction():
            cutoff = dest.execute("SELECT now() - %s::interval", (age,)).fetchone()[0]  # type: ignore[index]
    except (psycopg.errors.DatetimeFieldOverflow, psycopg.errors.IntervalFieldOverflow):
        raise ConfigError(f"duration {older_than!r} reaches before the earliest timestamp PostgreSQL has: "
                          "write a shorter one") from None
    deleted = 0
    sealed = [str(r[0]) for r in dest.execute(query("sealed_sources"))]
    for source in sealed:
        while True:
            with dest.transaction():
                count = dest.execute(query("prune_sealed"), {"source": source, "cutoff": cutoff, "batch": batch}).fetchone()[0]  # type: ignore[index]
            deleted += count
            if not count:
                break
    delete = sql.SQL(
        "DELETE FROM {t} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {t} WHERE committed_at < %s "
        "AND NOT source = ANY (%s) LIMIT %s))"
    ).format(t=table)
    if settings.partition_by_month:  # ctid is per partition: delete by key instead
        delete = sql.SQL(
            "DELETE FROM {t} WHERE (id, committed_at) IN (SELECT id, committed_at FROM {t} WHERE committed_at < %s "
            "AND NOT source = ANY (%s) LIMIT %s)"
        ).format(t=table)
    while True:
        with dest.transaction():
            count = dest.execute(delete, (cutoff, sealed, batch)).rowcount
        deleted += count
        if count < batch:
            break
    dropped = 0
    if settings.partition_by_month:
        parts = dest.execute(query("changes_partitions"), {"table": f"{quote_ident(schema, name)}"}).fetchall()
        for part_schema, part_name, upper in parts:
            part = sql.Identifier(part_schema, part_name)
            if upper is not None and upper <= cutoff:
                with dest.transaction():
                    if dest.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(part)).fetchone()[0]:  # type: ignore[index]
                        continue  # sealed changes whose seal holds newer ones: a later prune takes them
                    dest.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(table, part))
                    dest.execute(sql.SQL("DROP TABLE {}").format(part))
                dropped += 1
    return {"cutoff": cutoff.isoformat(), "deleted": deleted, "partitions_dropped": dropped}


def seal(source_dsn: str, destination_dsn: str | None, settings: Settings) -> str | None:
    """Seal the changes of this source that no seal covers (trigger mode's, for cron; wal mode's
    poller seals each batch itself); return the head hash, hex (None: nothing sealed yet)."""
    with connect(source_dsn, role="source database") as src:
        inst = installation(src)
        _, source = with_installation(src, settings)
    with connect(destination_dsn or source_dsn, role="destination database") as dst:
        check_destination(inst, dst)
        return seal_trail(dst, source)


def verify(source_dsn: str, destination_dsn: str | None, settings: Settings, *, since: str | None = None,
           head: str | None = None) -> Verdict:
    """Recompute this source's sealed trail (README, "A sealed trail"): ``since`` (a duration,
    e.g. 7d, or an ISO time) limits the changes compared to the seals made since; ``head`` is a
    head hash kept elsewhere, which the chain must hold."""
    moment = None
    if since is not None:
        try:
            moment = datetime.now(UTC) - parse_duration(since)
        except ConfigError:
            try:
                moment = datetime.fromisoformat(since)
            except ValueError:
                raise ConfigError(f"--since {since!r} is neither a duration (7d, 36h) nor an ISO time "
                                  "(2026-01-31T00:00:00+00:00)") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    if head is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", head.strip()):
        raise ConfigError(f"--head {head!r} is not a head hash: give the 64 hex digits `status` or `poll` printed")
    with connect(source_dsn, role="source database") as src:
        inst = installation(src)
        settings, source = with_installation(src, settings)
    with connect(destination_dsn or source_dsn, role="destination database") as dst:
        check_destination(inst, dst)
        if dst.execute("SELECT pg_catalog.to_regclass('bemi.seal') IS NULL").fetchone()[0]:  # type: ignore[index]
            raise BemiError("the destination has no seals (installed before bemi-pg 0.4.0): run `bemi-pg install` "
                            "again to upgrade it, which seals the changes it holds")
        return verify_trail(dst, sql.Identifier(*settings.destination), source, since=moment, head=head)


def with_installation(src: psycopg.Connection[Any], settings: Settings) -> tuple[Settings, str]:
    """The settings to act with on this source (the installation's capture settings, this
    process's running ones; ConfigError on a contradiction) and the source's identity."""
    inst = installation(src)
    if inst is None:
        return settings, source_identity(src)
    return settings.with_installed(inst.settings), installed_source(src, inst) if inst.source else source_identity(src)


def installed_settings(source_dsn: str, settings: Settings) -> Settings:
    """:func:`with_installation`'s settings, for a command that otherwise only reads the destination."""
    with connect(source_dsn, role="source database") as src:
        return with_installation(src, settings)[0]


def status(source_dsn: str, destination_dsn: str | None, settings: Settings, *, exact_count: bool = True) -> dict[str, Any]:
    """Slot lag and state, last position written, tracked tables, change count, baselines.
    Without ``exact_count`` (the explorer's overview), ``change_estimate`` from the planner's
    statistics of the whole table replaces ``change_count``, which reads every change (unless
    the table was never analyzed, so far small)."""
    result: dict[str, Any] = {}
    with connect(source_dsn, role="source database") as src:
        settings, source = with_installation(src, settings)
        inst = installation(src)
        database = src.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        slot = settings.slot_for(database)
        result["database"] = database
        result["source"] = source
        result["capture_mode"] = installed_capture_mode(src)
        result["slot"] = slot
        info = fetch_dict(src, query("slot_info"), {"slot": slot})
        if info is None:
            result["slot_exists"] = False
        else:
            result.update(slot_exists=True, wal_status=info["wal_status"], lag_bytes=info["lag_bytes"],
                          confirmed_flush_lsn=info["confirmed_flush_lsn"], current_lsn=info["current_lsn"],
                          active_pid=info["active_pid"])
            if src.info.server_version >= FAILOVER_VERSION:  # whether standbys keep a copy (README: Failover)
                result["slot_failover"] = bool(src.execute(query("slot_failover"), {"slot": slot}).fetchone()[0])  # type: ignore[index]
        # Logical decoding cannot move past the start of a transaction still open anywhere
        # in the cluster: the oldest one is what holds the slot back.
        result["oldest_open_transaction"] = fetch_dict(src, query("oldest_transaction"))
        with src.cursor(row_factory=dict_row) as cur:
            result["prepared_transactions"] = cur.execute(query("prepared_transactions")).fetchall()
        try:
            version = src.execute(query("installed_version")).fetchone()
        except psycopg.errors.UndefinedTable:
            version = None
        result["installed_version"] = version[0] if version else None
        result["tracked_tables"] = [f"{s}.{t}" for s, t in src.execute(query("tracked_tables"))]
        if result["capture_mode"] == "triggers":
            result["queue"] = queue_backlog(src)  # changes waiting for the mover
    with connect(destination_dsn or source_dsn, role="destination database") as dst:
        check_destination(inst, dst)
        schema, table = settings.destination
        try:
            row = dst.execute(query("checkpoint"), {"source": source, "slot": slot}).fetchone()
            written = row if row is not None and row[0] >= 0 else None  # -1: a refusal saved before any batch
            result["last_commit_position"] = written[0] if written else None
            result["last_written_at"] = written[3].isoformat() if written else None
            result["refused_batch"] = row[4] if row else None
            estimate = None if exact_count else dst.execute(
                query("changes_estimate"), {"table": quote_ident(schema, table)}).fetchone()[0]  # type: ignore[index]
            if estimate is None:
                result["change_count"] = dst.execute(
                    sql.SQL("SELECT count(*) FROM {} WHERE source = %s").format(sql.Identifier(schema, table)), (source,)
                ).fetchone()[0]  # type: ignore[index]
            else:
                result["change_estimate"] = estimate
            head = (dst.execute(query("seal_head"), {"source": source}).fetchone()
                    if dst.execute("SELECT pg_catalog.to_regclass('bemi.seal') IS NOT NULL").fetchone()[0] else None)  # type: ignore[index]
            result["trail_head"] = head[1] if head else None
            result["baselines"] = [f"{name} ({rows} rows as of {taken_at.isoformat()})"
                                   for name, rows, taken_at in dst.execute(query("baselines"), {"source": source})]
            result["tracking"], result["gaps"] = tracking_periods(dst, source)
        except psycopg.errors.UndefinedTable:
            result["last_commit_position"] = None
            result["change_count"] = None
    return result


def tracking_periods(dst: psycopg.Connection[Any], source: str) -> tuple[list[str], list[str]]:
    """Per table, when its tracking began (and ended), and the gaps between its periods, as
    status shows them (the destination's bemi.trail_periods)."""
    periods: list[str] = []
    gaps: list[str] = []
    previous: tuple[str, Any, str] | None = None
    for name, began, why, ended, end_why in dst.execute(query("trail_periods"), {"source": source}):
        since = f"{began.isoformat()} ({why})"
        periods.append(f"{name} {since} to {ended.isoformat()} ({end_why})" if ended else f"{name} since {since}")
        if previous is not None and previous[0] == name and previous[1] is not None:
            gaps.append(f"{name} from {previous[1].isoformat()} ({previous[2]}) to {since}")
        previous = (name, ended, end_why)
    return periods, gaps


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ui_token(token_file: str | None, env: dict[str, str] | None = None) -> str | None:
    """The explorer's token: ``--token-file`` > ``BEMI_UI_TOKEN``; None when neither is given."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {token_file}: {exc.strerror}; give a readable file holding the token") from None
        if not token:
            raise ConfigError(f"--token-file {token_file} is empty: put the token in it")
        return token
    return (os.environ if env is None else env).get("BEMI_UI_TOKEN") or None


def explorer_app(source_dsn: str, destination_dsn: str | None, settings: Settings, *, token: str,
                 allow_revert: bool = False, trusted_user_header: str | None = None,
                 statement_timeout_ms: int = 5000, session_seconds: int = 8 * 3600) -> Any:
    """The explorer's ASGI app for this source, read with the installation's settings."""
    try:
        from .explorer.app import Explorer, create_app
        from .explorer.auth import Auth
    except ImportError as exc:
        raise ConfigError(f"the explorer needs the ui extra ({exc.name} is missing): pip install 'bemi-pg[ui]'") from None
    with connect(source_dsn, role="source database") as src:
        if installation(src) is None:
            raise BemiError("bemi-pg is not installed in this database: run `bemi-pg install` first")
        settings, source = with_installation(src, settings)
    explorer = Explorer(source_dsn, destination_dsn, settings, source,
                        Auth(token, trusted_user_header=trusted_user_header, session_seconds=session_seconds),
                        allow_revert=allow_revert, statement_timeout_ms=statement_timeout_ms)
    return create_app(explorer)


def serve(source_dsn: str, destination_dsn: str | None, settings: Settings, *, host: str = "127.0.0.1", port: int = 8321,
          token: str | None = None, allow_revert: bool = False, trusted_user_header: str | None = None) -> None:
    """Serve the explorer until interrupted. Without a token it only binds a loopback address,
    with a token made up for this run and printed once to stderr."""
    if token is None:
        if not _loopback(host):
            raise ConfigError(f"refusing to serve the trail on {host} without a token: set BEMI_UI_TOKEN or pass --token-file")
        token = secrets.token_urlsafe(24)
        print(f"bemi-pg serve: no BEMI_UI_TOKEN given; this run's token is {token}", file=sys.stderr)
    app = explorer_app(source_dsn, destination_dsn, settings, token=token, allow_revert=allow_revert,
                       trusted_user_header=trusted_user_header)
    import uvicorn

    log.info("bemi-pg serve: http://%s:%d/ (revert %s)", host, port, "allowed" if allow_revert else "off")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
