"""Templates -> SQL text: deterministic, quoted by code, checked by pglast.

Every identifier goes through :func:`quote_ident` and every literal through
:func:`quote_literal` (both built on :mod:`psycopg.sql`); no template quotes by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jinja2
import pglast
from pglast import keywords
from psycopg import sql

from . import __version__
from .config import Settings
from .errors import BemiError
from .stitch import SQLC_BODY, SQLC_PAIR

__all__ = ["Rendered", "quote_ident", "quote_literal", "render_extension", "render_install", "render_roles",
           "render_uninstall", "check_sql"]

_PLAIN_IDENT = re.compile(r"^[a-z_][a-z0-9_$]*$")
_NEEDS_QUOTES = keywords.RESERVED_KEYWORDS | keywords.TYPE_FUNC_NAME_KEYWORDS | keywords.COL_NAME_KEYWORDS


def quote_ident(*names: str) -> str:
    """Quote (and dot-join) identifiers the way ``format('%I')`` does: only where needed."""
    parts = []
    for name in names:
        if _PLAIN_IDENT.match(name) and name not in _NEEDS_QUOTES:
            parts.append(name)
        else:
            parts.append(sql.Identifier(name).as_string())
    return ".".join(parts)


def quote_literal(value: Any) -> str:
    """A SQL literal for ``value`` (str, bool, int, None)."""
    return sql.Literal(value).as_string()


def _sql_array(values: Any) -> str:
    items = ", ".join(quote_literal(v) for v in values)
    return f"ARRAY[{items}]::text[]"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["ident"] = quote_ident
    env.filters["sqlliteral"] = quote_literal
    env.filters["sqlarray"] = _sql_array
    return env


def _load_template(name: str) -> str:
    return resources.files(__package__).joinpath("sql", "templates", name).read_text(encoding="utf-8")


_ENV = _environment()


@dataclass(frozen=True)
class Rendered:
    """The SQL for each database: the same one when the destination is the source."""

    source: str
    destination: str
    trailer: str = ""
    capture_mode: str = "wal"

    def combined(self) -> str:
        """One script, for a destination inside the source database."""
        return self.source + "\n" + self.destination + self.trailer


def glob_regex(pattern: str) -> str:
    """A column rule's glob (``*``, ``?``, ``[...]``, as fnmatch reads it) as an anchored
    PostgreSQL regular expression, for the triggers of trigger mode."""
    out = ["^"]
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        i += 1
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[" and (end := pattern.find("]", i + 1 if pattern[i : i + 1] in ("!", "]") else i)) >= 0:
            body, i = pattern[i:end], end + 1
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
        elif ch.isalnum() or ch == "_":
            out.append(ch)
        else:
            out.append("\\" + ch)
    return "".join(out) + "$"


CHANGE_COLUMNS = (
    'source, "database", "schema", "table", primary_key, operation, before, after, context, committed_at, queued_at, '
    'transaction_id, "position", commit_position, seq'
)


def _context(settings: Settings, title: str, *, uninstall: bool = False, drop_changes: bool = False,
             extension: bool = False) -> dict[str, Any]:
    dest_schema, dest_name = settings.destination
    untracked = [f"{s}.{t}" for s, t in settings.excluded()] + [f"{dest_schema}.{dest_name}"]
    settings_lines = [f"{k} = {v!r}" if not isinstance(v, str) else f"{k} = {v}" for k, v in settings.summary().items()]
    return {
        "version": __version__,
        "title": title,
        "uninstall": uninstall,
        "extension": extension,
        "drop_changes": drop_changes,
        "settings_lines": settings_lines,
        "settings_json": settings.summary_json(),
        "schemas": list(settings.schemas),
        "untracked_tables": untracked,
        "replica_identity_full": settings.replica_identity_full,
        "max_context_bytes": settings.max_context_bytes,
        "max_query_bytes": 4 * settings.max_context_bytes,
        "database_keys": settings.database_keys,
        "sqlcommenter": settings.sqlcommenter,
        # What makes the statement's text part of its context: any comment when sqlcommenter tags
        # count (a Bemi comment ends with one too), else a Bemi comment.
        "comment_marker": "*/" if settings.sqlcommenter else "/*Bemi",
        "sqlcommenter_body": SQLC_BODY,  # the poller's patterns, so that both modes read tags alike
        "sqlcommenter_pair": SQLC_PAIR,
        "changes_schema": dest_schema,
        "changes_name": dest_name,
        "changes_table": quote_ident(dest_schema, dest_name),
        "row_gin_indexes": settings.row_gin_indexes,
        "context_indexes": list(dict.fromkeys(settings.context_indexes)),
        "change_columns": CHANGE_COLUMNS,
        "exclude_column_patterns": [glob_regex(p) for p in settings.exclude_columns],
        "ignore_column_patterns": [glob_regex(p) for p in settings.ignore_columns],
        "partitioned": settings.partition_by_month,
        "capture_mode": settings.capture_mode,
    }


def _render(name: str, context: dict[str, Any]) -> str:
    text = _ENV.get_template(name).render(context)
    check_sql(text, name)
    return text


def render_install(settings: Settings) -> Rendered:
    """The install SQL for the source (capture) and destination (audit table) databases."""
    return Rendered(
        source=_render("source.sql.j2", _context(settings, "install, capture side")),
        destination=_render("destination.sql.j2", _context(settings, "install, destination side")),
        capture_mode=settings.capture_mode,
    )


def render_uninstall(settings: Settings, *, drop_changes: bool = False) -> Rendered:
    """The uninstall SQL; the changes table stays unless ``drop_changes``."""
    ctx = {"uninstall": True, "drop_changes": drop_changes}
    return Rendered(
        source=_render("uninstall_source.sql.j2", _context(settings, "uninstall, capture side", **ctx)),
        destination=_render("uninstall_destination.sql.j2", _context(settings, "uninstall, destination side", **ctx)),
        trailer=_render("uninstall_schema.sql.j2", {}),
    )


EXTENSION = "bemi_pg"
# The version ALTER EXTENSION bemi_pg UPDATE comes from; its script is kept as released.
PREVIOUS_EXTENSION_VERSION = "0.3.0"


def render_extension() -> dict[str, str]:
    """The generated files of the PGXS extension (``extension/``): the control file, this
    version's install script and the upgrade script from the previous version.

    The scripts are the install SQL of the same templates with the default settings, in trigger
    mode (which needs no slot), plus ``pg_extension_config_dump`` so that pg_dump keeps the
    extension's tables. The upgrade script is the install script too: every statement in it
    is idempotent."""
    settings = Settings(capture_mode="triggers")
    context = _context(settings, f"extension {EXTENSION} {__version__}", extension=True)
    body = _render("extension.sql.j2", context)
    guard = f'\\echo Use "CREATE EXTENSION {EXTENSION}" to load this file. \\quit\n'
    control = _ENV.get_template("extension.control.j2").render(context)
    return {
        f"{EXTENSION}.control": control,
        f"{EXTENSION}--{__version__}.sql": guard + body,
        f"{EXTENSION}--{PREVIOUS_EXTENSION_VERSION}--{__version__}.sql": guard + body,
    }


def render_roles(settings: Settings, role: str = "bemi_poller") -> str:
    """SQL creating a least-privilege role for the poller: REPLICATION plus the destination."""
    return _render("roles.sql.j2", {**_context(settings, "poller role"), "role": role})


def check_sql(text: str, origin: str = "<sql>") -> int:
    """Parse every statement (PL/pgSQL bodies included) with pglast; return how many there are."""
    try:
        statements = pglast.parse_sql(text)
    except pglast.parser.ParseError as exc:
        raise BemiError(f"{origin}: generated SQL does not parse: {exc}") from None
    for raw in statements:
        stmt = raw.stmt
        kind = type(stmt).__name__
        encoded = text.encode()
        start = raw.stmt_location or 0
        end = start + raw.stmt_len if raw.stmt_len else len(encoded)
        body = encoded[start:end].decode()
        if kind in ("CreateFunctionStmt", "DoStmt") and _is_plpgsql(stmt):
            try:
                pglast.parse_plpgsql(body)
            except pglast.parser.ParseError as exc:
                raise BemiError(f"{origin}: PL/pgSQL does not parse: {exc}\n{body}") from None
    return len(statements)


def _is_plpgsql(stmt: Any) -> bool:
    options = stmt.options if type(stmt).__name__ == "CreateFunctionStmt" else stmt.args
    for opt in options or ():
        if opt.defname == "language":
            return str(opt.arg.sval) == "plpgsql"
    return type(stmt).__name__ == "DoStmt"
