"""Command line: argument parsing and exit codes only; the work is in commands.py."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

import psycopg

from . import __version__, commands, logs, migrations, revert, timetravel
from .config import load_settings
from .db import connect, resolve_destination_dsn, resolve_dsn
from .errors import BemiError, ConfigError
from .render import quote_ident, render_roles
from .wal2json import format_lsn


def _json(value: Any, indent: int | None = None) -> str:
    """JSON for the terminal: characters as they are (jsonb's text does the same), not \\u escapes."""
    return json.dumps(value, default=str, indent=indent, ensure_ascii=False)


log = logging.getLogger("bemi_pg")

TAMPERED = 6  # `verify`: the trail is not what its seals say


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dsn", help="source database (default: BEMI_DSN, DATABASE_URL, then libpq PG* variables)")
    common.add_argument("--destination-dsn", help="where the changes table lives (default: BEMI_DESTINATION_DSN, then the source)")
    common.add_argument("--config", help="settings file (default: BEMI_CONFIG, then ./bemi.toml if present)")
    common.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug messages")
    common.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text (default) or json: one object a line with time, level, message and fields")

    parser = argparse.ArgumentParser(prog="bemi-pg", description="Postgres-native audit trail (Bemi-compatible).")
    parser.add_argument("--version", action="version", version=f"bemi-pg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("render", parents=[common], help="print the install (or uninstall) SQL; needs no database")
    p.add_argument("--uninstall", action="store_true")
    p.add_argument("--drop-changes", action="store_true", help="with --uninstall: also drop the changes table")
    p.add_argument("--roles", action="store_true", help="print the GRANTs for a least-privilege poller role instead")
    p.add_argument("--role", default="bemi_poller", help="with --roles: the role's name (default bemi_poller)")
    p.add_argument("--capture-mode", choices=("wal", "triggers"), help="render this capture mode (default capture.mode)")
    p.add_argument("--extension", metavar="DIR", help="write the PGXS extension's generated files into DIR instead")
    p.add_argument("--check", action="store_true", help="with --extension: change nothing, exit 1 if a file is stale")

    p = sub.add_parser("install", parents=[common], help="preflight, install, create the slot (idempotent)")
    p.add_argument("--dry-run", action="store_true", help="run the checks and print the SQL; change nothing")
    p.add_argument("--capture-mode", choices=("wal", "triggers", "auto"),
                   help="wal (logical decoding and a poller), triggers (written as they commit), or auto (default capture.mode)")
    p.add_argument("--no-snapshot", action="store_true", help="take no baseline of the tables' current rows (see `snapshot`)")

    p = sub.add_parser("snapshot", parents=[common], help="take or refresh the baseline of tracked tables' current rows")
    p.add_argument("tables", nargs="*", metavar="TABLE", help="table or schema.table (default: every tracked table)")

    p = sub.add_parser("uninstall", parents=[common], help="remove triggers, functions, publication and slot")
    p.add_argument("--drop-changes", action="store_true", help="also drop the changes table (the audit data)")

    p = sub.add_parser("poll", parents=[common], help="move changes from the slot into the changes table")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="drain what was committed before starting, then exit (default)")
    mode.add_argument("--follow", action="store_true", help="keep polling until SIGTERM or SIGINT")
    p.add_argument("--batch-size", type=int, help="rows per destination transaction (default 10000, poll.batch_size)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --follow (default 1)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="with --follow: serve Prometheus /metrics, /healthz and /readyz on PORT (the metrics extra)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="with --metrics-port: the address to bind (default 127.0.0.1)")

    p = sub.add_parser("status", parents=[common], help="slot lag, last position written, tracked tables")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("doctor", parents=[common], help="check the database is ready; one line per check")
    p.add_argument("--standby-dsn", action="append", default=[], metavar="DSN",
                   help="with slot.failover: a standby to check too (repeatable; a multi-host --dsn's other hosts are checked anyway)")

    p = sub.add_parser("history", parents=[common], help="a row's changes, newest first, with what each changed")
    p.add_argument("table", help="table or schema.table")
    p.add_argument("primary_key", help="its primary key (composite keys as JSON array text)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=100)

    p = sub.add_parser("as-of", parents=[common], help="the row (or, with --all, the table) as it was at a moment")
    p.add_argument("table")
    p.add_argument("args", nargs="+", metavar="PK TIMESTAMP", help="PK TIMESTAMP, or with --all just TIMESTAMP")
    p.add_argument("--all", action="store_true", help="every row of the table at TIMESTAMP, one JSON object a line")

    p = sub.add_parser("blame", parents=[common], help="for each column, the change that last set its value")
    p.add_argument("table")
    p.add_argument("primary_key")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("revert", parents=[common], help="SQL that undoes changes (run it with --apply)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--change", metavar="ID", help="one change, by its id")
    which.add_argument("--transaction", metavar="XID", type=int, help="every change of a transaction")
    which.add_argument("--context", metavar="JSON", help="every change whose context contains this JSON")
    which.add_argument("--since", metavar="TIMESTAMP", help="every change after this moment: the tables as they were then")
    p.add_argument("--table", action="append", metavar="TABLE", dest="tables",
                   help="with --since: only this table (table or schema.table; repeat for more)")
    p.add_argument("--apply", action="store_true", help="run it, in one transaction, instead of printing it")
    p.add_argument("--skip-conflicts", action="store_true",
                   help="apply what can be applied and list the rest (default: any conflict, nothing applied)")

    p = sub.add_parser("serve", parents=[common], help="the audit-trail explorer in the browser (needs bemi-pg[ui])")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a token)")
    p.add_argument("--port", type=int, default=8321, help="port (default 8321)")
    p.add_argument("--token-file", help="file holding the token (default: BEMI_UI_TOKEN)")
    p.add_argument("--allow-revert", action="store_true", help="let users revert a transaction or request (confirmed, guarded)")
    p.add_argument("--trusted-user-header", metavar="HEADER",
                   help="trust this header from a reverse proxy as the user (e.g. X-Forwarded-User); off by default")
    p = sub.add_parser("prune", parents=[common], help="delete changes older than a duration (drops whole partitions)")
    p.add_argument("--older-than", required=True, metavar="DURATION", help="e.g. 90d, 12w, 36h")
    p = sub.add_parser("verify", parents=[common], help="recompute the sealed trail's hashes; exit 6 if anything was altered")
    p.add_argument("--since", metavar="WHEN", help="compare only the changes sealed since then (a duration, 7d, or an ISO time)")
    p.add_argument("--head", metavar="HASH", help="a head hash kept elsewhere (from `status` or `poll`): the chain must hold it")
    sub.add_parser("seal", parents=[common], help="seal the changes no seal covers yet (trigger mode; run it from cron)")

    p = sub.add_parser("migration", parents=[common], help="write a migration for your framework that installs bemi-pg")
    msub = p.add_subparsers(dest="migration_command", required=True, metavar="new")
    new = msub.add_parser("new", parents=[common], help="write the migration file; needs no database")
    kind = new.add_mutually_exclusive_group(required=True)
    kind.add_argument("--supabase", nargs="?", const="supabase/migrations", metavar="DIR",
                      help="write DIR/<timestamp>_bemi.sql (default DIR: supabase/migrations)")
    kind.add_argument("--alembic", metavar="DIR", help="write an Alembic revision into the versions directory DIR")
    kind.add_argument("--django", metavar="APP", help="write a migration into the Django app directory APP")
    return parser


def _follow(args: argparse.Namespace, dsn: str, dest: str | None, settings: Any) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("bemi-pg: %s received, finishing the batch in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def on_batch(stats: Any) -> None:
        if stats.moved:  # trigger mode
            log.info("bemi-pg: moved %d queued changes into the changes table", stats.changes, extra={"changes": stats.changes})
            return
        position = format_lsn(stats.end_lsn) if stats.end_lsn else None
        log.info("bemi-pg: wrote %d changes from %d transactions (slot at %s; trail head %s)", stats.changes, stats.transactions,
                 position or "-", stats.head or "-",
                 extra={"changes": stats.changes, "transactions": stats.transactions, "position": position, "head": stats.head})

    metrics = None if args.metrics_port is None else commands.MetricsEndpoint(args.metrics_host, args.metrics_port)
    total = commands.poll_follow(dsn, dest, settings, interval=args.interval, stop=stop,
                                 batch_size=args.batch_size, on_batch=on_batch, metrics=metrics)
    log.info("bemi-pg: stopped after writing %d changes", total.changes)
    return 0


def _as_of(conn: psycopg.Connection[Any], args: argparse.Namespace, source: str) -> int:
    if args.all:
        if len(args.args) != 1:
            raise ConfigError("as-of TABLE --all TIMESTAMP takes one TIMESTAMP")
        for (text,) in conn.execute("SELECT row_data::text FROM bemi.as_of_all(%s, %s, %s::timestamptz)",
                                 (source, args.table, args.args[0])):
            print(text)
        return 0
    if len(args.args) != 2:
        raise ConfigError("as-of TABLE PK TIMESTAMP takes a primary key and a timestamp")
    pk, at = args.args
    found = conn.execute("SELECT bemi.as_of(%s, %s, %s, %s::timestamptz)::text", (source, args.table, pk, at)).fetchone()
    if found is None or found[0] is None:
        print(f"{args.table} {pk} did not exist at {at}", file=sys.stderr)
        return 3
    print(found[0])
    return 0


def _no_history(conn: psycopg.Connection[Any], source: str, table: str, pk: str) -> str:
    """Why a row has no history: not in the trail at all, or unchanged since tracking began
    (the baseline, taken then, holds it)."""
    said = f"no changes recorded for {table} {pk}"
    extent = conn.execute("SELECT e.began, e.baseline_taken_at, e.baseline_ready, "
                          "EXISTS (SELECT FROM bemi.snapshot_row AS r WHERE r.snapshot_id = e.baseline_id AND r.primary_key = %s) "
                          "FROM bemi.trail_extent(%s, %s) AS e", (pk, source, table)).fetchone()
    if extent is None or extent[0] is None:
        return f"{said}: the trail does not know {table} (never tracked, or no change of it written yet)"
    began, taken_at, ready, in_baseline = extent
    if ready and in_baseline:
        return (f"{said} since tracking began at {began.isoformat()}: the row is unchanged since; the baseline taken at "
                f"{taken_at.isoformat()} holds it (bemi-pg as-of {table} {pk} TIMESTAMP shows it)")
    return f"{said} since tracking began at {began.isoformat()}"


def _history(conn: psycopg.Connection[Any], args: argparse.Namespace, source: str) -> int:
    # Straight from the database as JSON text, so numbers print with every digit.
    rows = conn.execute(
        "SELECT h.committed_at, h.operation, h.transaction_id, h.context::text, h.changed::text, "
        "(to_jsonb(h) - 'ordinality')::text, h.row_key "
        "FROM bemi.history(%s, %s, %s, %s) WITH ORDINALITY AS h ORDER BY h.ordinality",
        (source, args.table, args.primary_key, args.limit)).fetchall()
    if not rows:
        raise BemiError(_no_history(conn, source, args.table, args.primary_key))
    if args.json:
        print("[" + ",\n ".join(r[5] for r in rows) + "]")
        return 0
    gaps = conn.execute("SELECT * FROM bemi.trail_gaps(%s, %s)", (source, args.table)).fetchall()
    newer = None
    for committed_at, operation, xid, context, changed, _, row_key in rows:
        for ended, ended_why, began, began_why in gaps:  # a gap between this change and the newer one
            if committed_at <= ended and (newer is None or began <= newer):
                print(f"-- gap in the trail: tracking ended {ended.isoformat()} ({ended_why}), began again "
                      f"{began.isoformat()} ({began_why}); changes in between are not known")
        newer = committed_at
        # A change filed under another key: before an UPDATE of the key moved the row.
        moved = f"  (as {args.table} {row_key}, before the row's key changed)" if row_key != args.primary_key else ""
        print(f"{committed_at.isoformat()}  {operation:<8} xid {xid}  context {context}{moved}")
        for column, old, new in conn.execute(
                "SELECT key, (value->0)::text, (value->1)::text FROM jsonb_each(%s::jsonb) ORDER BY key", (changed,)):
            print(f"    {column}: {old} → {new}")
    return 0


def _timetravel(args: argparse.Namespace, dsn: str, dest: str | None, settings: Any) -> int:
    with connect(dest or dsn, role="destination database") as conn:
        if args.command in ("history", "as-of", "blame"):  # the trail of the source connected to, only
            with connect(dsn, role="source database") as src:
                source = commands.with_installation(src, settings)[1]
        if args.command == "history":
            with timetravel.answers():
                return _history(conn, args, source)
        if args.command == "as-of":
            with timetravel.answers():
                return _as_of(conn, args, source)
        if args.command == "blame":
            rows = timetravel.blame(conn, args.table, args.primary_key, source=source)
            if not rows:
                raise BemiError(f"{args.table} {args.primary_key} does not exist now (or neither a change nor the "
                                "baseline records it: `bemi-pg snapshot TABLE` takes one)")
            if args.json:
                print(_json(rows, indent=2))
                return 0
            width = max(len(r["column"]) for r in rows)
            for r in rows:
                if r["id"] is None:
                    print(f"{r['column']:<{width}}  {_json(r['value']):<30} from before tracking began")
                    continue
                print(f"{r['column']:<{width}}  {_json(r['value']):<30} {r['operation']:<8} "
                      f"{r['committed_at'].isoformat()}  {r['id']}  {_json(r['context'])}")
            return 0
        if args.command == "prune":
            result = commands.prune(conn, settings, args.older_than)
            log.info("bemi-pg: pruned %d changes older than %s (%d partitions dropped)",
                     result["deleted"], result["cutoff"], result["partitions_dropped"])
            return 0
    # revert: read from the destination, write to the source
    try:
        context = revert.context_filter(json.loads(args.context)) if args.context is not None else None
    except ValueError:
        raise ConfigError(f"--context {args.context!r} is not JSON: pass an object, e.g. '{{\"user_id\": 42}}'") from None
    with connect(dsn, role="source database") as src, connect(dest or dsn, role="destination database") as dconn:
        plan = revert.plan_revert(src, dconn, quote_ident(*settings.destination), change_id=args.change,
                                  transaction_id=args.transaction, context=context, since=args.since, tables=args.tables)
        revert.apply_revert(src, plan, commit=args.apply, skip_conflicts=args.skip_conflicts)
    if not args.apply:
        sys.stdout.write(plan.script(skip_conflicts=args.skip_conflicts))
    for step in plan.problems:
        label = "skipped" if args.skip_conflicts else "refused" if step.outcome == "refused" else "conflict"
        print(f"{label}: {step.description}: {step.conflict}", file=sys.stderr)
    applied = sum(s.ok for s in plan.steps)
    if plan.problems and not args.skip_conflicts:
        log.info("bemi-pg: %d of %d change(s) cannot be reverted as they are now: %s (--skip-conflicts applies the rest)",
                 len(plan.problems), len(plan.steps), "nothing was applied" if args.apply else "the revert would apply nothing")
        return 4
    log.info("bemi-pg: %s %d of %d change(s)", "reverted" if args.apply else "would revert", applied, len(plan.steps))
    return 0


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, capture_mode=getattr(args, "capture_mode", None))
    if args.command == "render":
        if args.extension:
            stale = commands.write_extension(args.extension, check=args.check)
            for name in stale:
                log.info("bemi-pg: %s %s", "stale:" if args.check else "wrote", name)
            if args.check and stale:
                log.error("bemi-pg: the extension's generated files differ from the templates: "
                          "run `make -C extension generate` and commit them")
                return 1
            return 0
        if args.roles:
            sys.stdout.write(render_roles(settings, args.role))
        else:
            sys.stdout.write(commands.render(settings, uninstall=args.uninstall, drop_changes=args.drop_changes))
        return 0
    if args.command == "migration":
        if args.supabase:
            path = migrations.new_supabase(settings, args.supabase)
        elif args.alembic:
            path = migrations.new_alembic(settings, args.alembic)
        else:
            path = migrations.new_django(settings, args.django)
        print(path)
        log.info("bemi-pg: %s", migrations.SLOT_NOTE)
        return 0
    dsn = resolve_dsn(args.dsn)
    dest = resolve_destination_dsn(args.destination_dsn, dsn)
    if args.command == "doctor":
        checks = commands.doctor(dsn, dest, settings, standby_dsns=tuple(args.standby_dsn))
        for check in checks:
            print(check.line())
        return 1 if any(c.status == "FAIL" for c in checks) else 0
    if args.command == "install":
        rendered = commands.install(dsn, dest, settings, dry_run=args.dry_run, snapshot=not args.no_snapshot)
        if args.dry_run:
            sys.stdout.write(rendered.combined() if dest is None else rendered.source + "\n" + rendered.destination)
        else:
            if rendered.capture_mode == "triggers":
                log.info("bemi-pg: installed; triggers queue the changes, and `bemi-pg poll --follow` (or pg_cron: "
                         "SELECT bemi.move_changes()) moves them into the changes table")
            else:
                log.info("bemi-pg: installed; now run `bemi-pg poll --follow` (or `poll --once` from cron)")
        return 0
    if args.command == "snapshot":
        for taken in commands.snapshot(dsn, dest, settings, args.tables):
            log.info("bemi-pg: baseline of %s: %d rows as of %s (%.1f s)", taken.table, taken.rows,
                     taken.taken_at.isoformat(), taken.seconds)
        return 0
    if args.command == "uninstall":
        commands.uninstall(dsn, dest, settings, drop_changes=args.drop_changes)
        log.info("bemi-pg: uninstalled%s", "" if args.drop_changes else "; the changes table was kept")
        return 0
    if args.command == "poll":
        if args.metrics_port is not None and not args.follow:
            raise ConfigError("--metrics-port serves a running poller: use it with poll --follow")
        if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {args.metrics_port} is not a TCP port: give 1-65535 (0 picks a free one)")
        if args.follow:
            return _follow(args, dsn, dest, settings)
        commands.poll_once(dsn, dest, settings, batch_size=args.batch_size)
        return 0
    if args.command in ("history", "as-of", "blame", "revert", "prune"):
        if args.command in ("revert", "prune"):  # they use the destination table and its partitioning
            settings = commands.installed_settings(dsn, settings)
        return _timetravel(args, dsn, dest, settings)
    if args.command == "serve":
        commands.serve(dsn, dest, settings, host=args.host, port=args.port, token=commands.ui_token(args.token_file),
                       allow_revert=args.allow_revert, trusted_user_header=args.trusted_user_header)
        return 0
    if args.command == "seal":
        head = commands.seal(dsn, dest, settings)
        log.info("bemi-pg: sealed; trail head %s", head or "none (nothing to seal yet)", extra={"head": head})
        return 0
    if args.command == "verify":
        verdict = commands.verify(dsn, dest, settings, since=args.since, head=args.head)
        print("\n".join(verdict.lines()))
        return 0 if verdict.intact else TAMPERED
    if args.command == "status":
        result = commands.status(dsn, dest, settings)
        if args.json:
            print(_json(result, indent=2))
        else:
            for key, value in result.items():
                if key in ("tracked_tables", "baselines", "tracking", "gaps"):
                    value = f"{len(value)}: {', '.join(value)}" if value else "none"
                print(f"{key}: {value}")
        return 0
    raise AssertionError(args.command)  # pragma: no cover


def _error(args: argparse.Namespace, message: str) -> None:
    """The one error line: plain, or a JSON log line with --log-format json."""
    if args.log_format == "json":
        log.error("error: %s", message)
    else:
        print(logs.redact(f"error: {message}"), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bemi-pg`` command."""
    args = _parser().parse_args(argv)
    env_dsns = [os.environ.get(name) for name in ("BEMI_DSN", "DATABASE_URL", "BEMI_DESTINATION_DSN")]
    logs.configure(args.log_format, verbose=args.verbose,
                   secrets=logs.known_secrets([getattr(args, "dsn", None), getattr(args, "destination_dsn", None), *env_dsns]))
    try:
        return _run(args)
    except BemiError as exc:
        if args.verbose:
            raise
        _error(args, str(exc))
        return exc.exit_code
    except psycopg.Error as exc:
        if args.verbose:
            raise
        _error(args, f"database error: {' '.join(str(exc).split())}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
