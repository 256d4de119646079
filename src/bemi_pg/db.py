"""Connecting: DSN resolution, password scrubbing, clean connection errors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg.rows import dict_row

from .errors import BemiError, ConfigError, ConnectionError
from .queries import query

__all__ = ["Installation", "connect", "fetch_dict", "installation", "primary_only", "replication_command",
           "resolve_dsn", "resolve_destination_dsn", "scrub",
           "source_identity", "validate_dsn"]

APPLICATION_NAME = "bemi-pg"


def resolve_dsn(flag: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """``--dsn`` > ``BEMI_DSN`` > ``DATABASE_URL`` > libpq's own ``PG*`` variables (empty DSN)."""
    env = os.environ if env is None else env
    dsn = flag or env.get("BEMI_DSN") or env.get("DATABASE_URL") or ""
    validate_dsn(dsn)
    return dsn


def resolve_destination_dsn(flag: str | None, source_dsn: str, env: Mapping[str, str] | None = None) -> str | None:
    """``--destination-dsn`` > ``BEMI_DESTINATION_DSN``; ``None`` means the source database."""
    env = os.environ if env is None else env
    dsn = flag or env.get("BEMI_DESTINATION_DSN")
    if not dsn:
        return None
    validate_dsn(dsn)
    return dsn


def validate_dsn(dsn: str) -> dict[str, Any]:
    """Parse a DSN; raise ConfigError with a readable message if it is malformed."""
    hint = "use postgresql://user@host:5432/dbname or 'host=... dbname=...'"
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        detail = str(exc).splitlines()[0].replace(dsn, scrub_text(dsn)) if dsn else str(exc)
        raise ConfigError(f"malformed DSN {scrub_text(dsn)!r} ({detail}): {hint}") from None
    port = str(params.get("port", ""))
    if port and not all(p.strip().isdigit() for p in port.split(",")):
        raise ConfigError(f"malformed DSN {scrub(dsn)!r} (port {port!r} is not a number): {hint}")
    return params


def scrub_text(dsn: str) -> str:
    """Best effort for strings that do not parse: hide anything after ':' before '@'."""
    if "://" in dsn and "@" in dsn:
        scheme, rest = dsn.split("://", 1)
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}{':***' if ':' in creds else ''}@{host}"
    return " ".join("password=***" if part.startswith("password=") else part for part in dsn.split())


def scrub(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return scrub_text(dsn)
    params.pop("password", None)
    return conninfo.make_conninfo("", **params) or "(libpq defaults: PGHOST, PGDATABASE, ...)"


def fetch_dict(conn: psycopg.Connection[Any], sql_text: str, params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The first row of a query as a dict, or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql_text, params).fetchone()


def primary_only(dsn: str, env: Mapping[str, str] | None = None) -> str:
    """``dsn`` with the connection option that makes libpq pick the primary among a multi-host DSN's servers
    (``host=a,b``): ``target_session_attrs=read-write`` unless the DSN (or PGTARGETSESSIONATTRS)
    chooses otherwise. bemi-pg writes to both databases (the slot, the heartbeat, the trail),
    so a standby listed first must be passed over, and after a failover the promoted one found."""
    env = os.environ if env is None else env
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return dsn
    hosts = str(params.get("host") or env.get("PGHOST") or "")
    if "," not in hosts or params.get("target_session_attrs") or env.get("PGTARGETSESSIONATTRS"):
        return dsn
    return conninfo.make_conninfo(dsn, target_session_attrs="read-write")


def _connect_error(dsn: str, role: str, exc: psycopg.OperationalError) -> ConnectionError:
    reason = " ".join(str(exc).split())
    if dsn:
        reason = reason.replace(dsn, scrub(dsn))
    return ConnectionError(
        f"cannot connect to the {role} ({scrub(dsn)}): {reason}; check the DSN (--dsn, BEMI_DSN, DATABASE_URL or PG* variables)",
        role=role, reason=reason,
    )


def connect(dsn: str, *, autocommit: bool = True, role: str = "database") -> psycopg.Connection[Any]:
    """Connect with bemi-pg's session settings (UTC, ISO dates); errors become one clear line.
    Of a multi-host DSN's servers, the primary (:func:`primary_only`)."""
    try:
        conn = psycopg.connect(primary_only(dsn), autocommit=autocommit, application_name=APPLICATION_NAME)
    except psycopg.OperationalError as exc:
        raise _connect_error(dsn, role, exc) from None
    conn.execute(query("session_setup"))
    if not autocommit:
        conn.commit()
    return conn


def replication_command(dsn: str, command: str, *, role: str = "source database") -> None:
    """Run one replication protocol command (e.g. ``ALTER_REPLICATION_SLOT``) over a
    ``replication=database`` connection to the primary; BemiError in one line if it fails."""
    try:
        conn = psycopg.connect(primary_only(dsn), autocommit=True, application_name=APPLICATION_NAME,
                               replication="database")
    except psycopg.OperationalError as exc:
        raise _connect_error(dsn, role, exc) from None
    try:
        # The simple query protocol: a replication connection refuses the extended one.
        result = conn.pgconn.exec_(command.encode())
        if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
            message = " ".join(result.error_message.decode(errors="replace").split())
            raise BemiError(f"{command} failed on the {role}: {message}")
    finally:
        conn.close()


def _bemi_row(conn: psycopg.Connection[Any], table: str, name: str) -> tuple[Any, ...] | None:
    """The first row of the named query on one of bemi-pg's tables; None when the table is
    missing (bemi-pg not installed, or installed by a version without it)."""
    if conn.execute("SELECT pg_catalog.to_regclass(%s) IS NULL", (table,)).fetchone()[0]:  # type: ignore[index]
        return None
    return conn.execute(query(name)).fetchone()


def installed_capture_mode(conn: psycopg.Connection[Any]) -> str | None:
    """The source database's capture mode, ``wal`` or ``triggers``; None when bemi-pg is not installed."""
    row = _bemi_row(conn, "bemi.installation", "capture_mode")
    return row[0] if row else None


def pending_capture_switch(conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
    """(transaction_id, from_mode, to_mode) of a capture-mode switch whose slot work is not done."""
    return _bemi_row(conn, "bemi.capture_switch", "capture_switch")


@dataclass(frozen=True)
class Installation:
    """What ``bemi-pg install`` recorded in the source database (``bemi.installation``)."""

    version: str
    settings: dict[str, Any]
    source: str | None  # None: installed by a version before 0.4.0, not upgraded yet
    destination: str | None = None  # the destination's identity, where `bemi-pg install` recorded it

    @property
    def system_identifier(self) -> str | None:
        return self.source.split("/", 1)[0] if self.source else None


def installation(conn: psycopg.Connection[Any]) -> Installation | None:
    """The source database's installation record; None when bemi-pg is not installed there."""
    row = _bemi_row(conn, "bemi.installation", "installation")
    if row is None:
        return None
    data = row[0]
    return Installation(version=data["version"], settings=data["settings"], source=data.get("source"),
                        destination=data.get("destination"))


def source_identity(conn: psycopg.Connection[Any]) -> str:
    """This connection's source as the destination files it: ``<system identifier>/<database>``."""
    return str(conn.execute(query("source_identity")).fetchone()[0])  # type: ignore[index]


def check_destination(inst: Installation | None, destination: psycopg.Connection[Any]) -> None:
    """ConfigError unless ``destination`` is the database the installation writes its trail to:
    a poller that forgot --destination-dsn would otherwise start a second trail in the source."""
    if inst is None or inst.destination is None:
        return
    live = source_identity(destination)
    if live != inst.destination:
        where = ("this database" if inst.destination == inst.source
                 else f"database {inst.destination.split('/', 1)[1]!r} ({inst.destination})")
        raise ConfigError(
            f"bemi-pg was installed to write its trail into {where}, but this command's destination is {live}: "
            "give the installed destination with --destination-dsn (BEMI_DESTINATION_DSN), or run `bemi-pg install` "
            "with the new destination to move the trail"
        )


def installed_source(conn: psycopg.Connection[Any], inst: Installation) -> str:
    """The installation's source identity, checked against the server the connection reached.

    A promoted standby has its primary's system identifier, so the trail goes on there; a
    database restored from a dump onto another server does not, and continuing its trail
    under the old identity would mix two servers' WAL positions."""
    if inst.source is None:
        raise BemiError(f"bemi-pg {inst.version} is installed in this database: run `bemi-pg install` to upgrade it first")
    live = source_identity(conn).split("/", 1)[0]
    if live != inst.system_identifier:
        raise BemiError(
            f"this server (system identifier {live}) is not the one bemi-pg was installed on ({inst.source}): "
            "the database was restored or copied onto another server; run `bemi-pg install` here to start its trail"
        )
    return inst.source
