"""Settings: command-line flags > environment > ``bemi.toml`` > defaults."""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["Settings", "load_settings", "default_slot_name", "split_qualified_name"]

CAPTURE_MODES = ("wal", "triggers", "auto")

_IDENT_RE = re.compile(r'^(?:"(?:[^"]|"")+"|[^."]+)\.(?:"(?:[^"]|"")+"|[^."]+)$')


def split_qualified_name(name: str, *, what: str) -> tuple[str, str]:
    """Split ``schema.table`` (either part may be double-quoted) into its two names."""
    if not _IDENT_RE.match(name):
        raise ConfigError(f'{what} {name!r} is not "schema.table": write it schema-qualified, e.g. "public.users"')
    parts: list[str] = []
    rest = name
    while rest:
        if rest.startswith('"'):
            end = 1
            while True:
                end = rest.index('"', end)
                if rest[end + 1 : end + 2] == '"':
                    end += 2
                    continue
                break
            parts.append(rest[1:end].replace('""', '"'))
            rest = rest[end + 1 :]
        else:
            dot = rest.find(".")
            parts.append(rest if dot < 0 else rest[:dot])
            rest = "" if dot < 0 else rest[dot:]
        if rest.startswith("."):
            rest = rest[1:]
    return parts[0], parts[1]


def default_slot_name(database: str) -> str:
    """``bemi_<database>``, reduced to what slot names allow (a-z, 0-9, _; 63 bytes)."""
    cleaned = re.sub(r"[^a-z0-9_]", "_", database.lower())
    return f"bemi_{cleaned}"[:63]


@dataclass(frozen=True)
class Settings:
    """Everything that shapes the rendered SQL and the poller."""

    capture_mode: str = "wal"  # wal, triggers, or auto (wal when the preflight passes, else triggers)
    schemas: tuple[str, ...] = ("public",)
    exclude_tables: tuple[str, ...] = ()
    replica_identity_full: bool = True
    slot_name: str | None = None  # None: bemi_<database>
    slot_failover: bool = False  # PostgreSQL 17+: the slot is synchronized to standbys and survives a failover
    destination_table: str = "public.changes"
    row_gin_indexes: bool = False
    partition_by_month: bool = False
    ignore_columns: tuple[str, ...] = ()  # "table.column", "schema.table.column", "*.updated_at"
    exclude_columns: tuple[str, ...] = ()
    batch_size: int = 10_000
    heartbeat_interval: float = 30.0
    max_context_bytes: int = 1_048_576
    database_keys: str = "no_context"  # session_user, application_name, client_addr: no_context, always, never
    sqlcommenter: bool = True  # the statement's sqlcommenter tags feed the context (the weakest source)
    source_file: str | None = field(default=None, compare=False)
    explicit: frozenset[str] = field(default=frozenset(), compare=False)  # the fields a file, flag or caller set

    @property
    def destination(self) -> tuple[str, str]:
        return split_qualified_name(self.destination_table, what="destination table")

    def excluded(self) -> tuple[tuple[str, str], ...]:
        return tuple(split_qualified_name(t, what="excluded table") for t in self.exclude_tables)

    def slot_for(self, database: str) -> str:
        return self.slot_name or default_slot_name(database)

    def summary(self) -> dict[str, Any]:
        """The settings that shape the installation, as recorded in the database."""
        data = asdict(self)
        for key in ("source_file", "explicit", *PROCESS_FIELDS):
            data.pop(key)
        data["schemas"] = list(self.schemas)
        data["exclude_tables"] = list(self.exclude_tables)
        data["ignore_columns"] = list(self.ignore_columns)
        data["exclude_columns"] = list(self.exclude_columns)
        return data

    def summary_json(self) -> str:
        return json.dumps(self.summary(), sort_keys=True, separators=(", ", ": "))

    def with_installed(self, installed: dict[str, Any], where: str = "the installation") -> Settings:
        """These settings with the installation's capture settings (``installed``: the
        ``settings`` recorded in ``bemi.installation``) in place of this process's.

        The installation owns what is captured and where it goes (every field of
        :meth:`summary`); a process only chooses how it runs (:data:`PROCESS_FIELDS`). A field
        this process set explicitly (in its file, a flag or an argument) to another value than
        the installed one is a contradiction: ConfigError, before anything is read."""
        values: dict[str, Any] = {}
        for name in self.summary():
            if name not in installed:
                continue  # recorded by an earlier version without it: the default holds
            value = installed[name]
            values[name] = tuple(value) if isinstance(value, list) else value
        for name, value in values.items():
            mine = getattr(self, name)
            if name not in self.explicit or mine == value or name == "capture_mode":  # install switches modes
                continue
            origin = self.source_file or "this command's settings"
            raise ConfigError(
                f"{origin} sets {_KEY_OF_FIELD.get(name, name)} = {_toml(mine)}, but {where} was installed with "
                f"{_toml(value)}: the installation's capture settings rule; remove it from {origin}, or run "
                "`bemi-pg install` with the new settings to change them"
            )
        return replace(self, **values)


# How a process runs, whatever the installation: the rest of Settings belongs to the installation.
PROCESS_FIELDS = ("batch_size", "heartbeat_interval")


def _toml(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "source": {"schemas": list, "exclude_tables": list},
    "capture": {"mode": str, "replica_identity_full": bool, "max_context_bytes": int, "database_keys": str,
                "sqlcommenter": bool},
    "slot": {"name": str, "failover": bool},
    "destination": {"table": str, "row_gin_indexes": bool, "partition_by_month": bool},
    "columns": {"ignore": list, "exclude": list},
    "poll": {"batch_size": int, "heartbeat_interval": (int, float)},
}


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found: pass an existing file to --config or BEMI_CONFIG") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory: pass the bemi.toml file itself to --config or BEMI_CONFIG") from None
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read (permission denied): make it readable by this user") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 (byte {exc.start}): save the file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}): fix the file or remove it") from None
    values: dict[str, Any] = {}
    for section, body in raw.items():
        if section not in _SCHEMA or not isinstance(body, dict):
            raise ConfigError(f"{path}: unknown section [{section}]; known: {', '.join(f'[{s}]' for s in _SCHEMA)}")
        for key, value in body.items():
            expected = _SCHEMA[section].get(key)
            if expected is None:
                raise ConfigError(f"{path}: unknown setting {section}.{key}; known in [{section}]: {', '.join(_SCHEMA[section])}")
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
                raise ConfigError(f"{path}: {section}.{key} must be a {names}, not {value!r}")
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: {section}.{key} must be a list of strings")
            values[f"{section}.{key}"] = value
    return values


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path``, else ``$BEMI_CONFIG``, else ``./bemi.toml`` if present."""
    chosen = path or os.environ.get("BEMI_CONFIG")
    if chosen is None and Path("bemi.toml").is_file():
        chosen = "bemi.toml"
    values = _from_toml(Path(chosen)) if chosen else {}
    kwargs: dict[str, Any] = {"source_file": str(chosen) if chosen else None}
    for key, value in values.items():
        kwargs[_MAPPING[key]] = tuple(value) if isinstance(value, list) else value
    kwargs.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None})
    kwargs["explicit"] = frozenset(k for k in kwargs if k != "source_file")
    settings = Settings(**kwargs)
    _validate(settings)
    return settings


_MAPPING = {
    "source.schemas": "schemas", "source.exclude_tables": "exclude_tables",
    "capture.mode": "capture_mode", "capture.replica_identity_full": "replica_identity_full",
    "capture.max_context_bytes": "max_context_bytes",
    "capture.database_keys": "database_keys", "capture.sqlcommenter": "sqlcommenter",
    "slot.name": "slot_name", "slot.failover": "slot_failover", "destination.table": "destination_table",
    "destination.row_gin_indexes": "row_gin_indexes", "destination.partition_by_month": "partition_by_month",
    "columns.ignore": "ignore_columns", "columns.exclude": "exclude_columns",
    "poll.batch_size": "batch_size", "poll.heartbeat_interval": "heartbeat_interval",
}
_KEY_OF_FIELD = {field_name: key for key, field_name in _MAPPING.items()}


def _validate(settings: Settings) -> None:
    where = settings.source_file or "settings"
    if not settings.schemas:
        raise ConfigError(f"{where}: source.schemas is empty: name at least one schema to track")
    if "bemi" in settings.schemas:
        raise ConfigError(f"{where}: schema bemi holds bemi-pg's own objects and cannot be tracked")
    schema, _ = settings.destination
    if schema == "bemi":
        raise ConfigError(f"{where}: destination.table may not live in schema bemi: choose e.g. public.changes")
    settings.excluded()
    if settings.slot_name is not None and not re.fullmatch(r"[a-z0-9_]{1,63}", settings.slot_name):
        raise ConfigError(f"{where}: slot.name {settings.slot_name!r} is not a valid slot name (a-z, 0-9 and _, at most 63)")
    if settings.batch_size < 1:
        raise ConfigError(f"{where}: poll.batch_size must be at least 1")
    if settings.capture_mode not in CAPTURE_MODES:
        raise ConfigError(f"{where}: capture.mode must be \"wal\", \"triggers\" or \"auto\", not {settings.capture_mode!r}")
    if settings.database_keys not in ("no_context", "always", "never"):
        raise ConfigError(f"{where}: capture.database_keys must be \"no_context\", \"always\" or \"never\"")
    if settings.max_context_bytes < 1:
        raise ConfigError(f"{where}: capture.max_context_bytes must be at least 1")
