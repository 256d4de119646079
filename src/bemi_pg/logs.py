"""Log output: plain text (the default) or one JSON object a line, with every known secret masked."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from psycopg import conninfo

__all__ = ["FIELDS", "configure", "forget_secrets", "known_secrets", "redact"]

# The structured fields a log call may pass in ``extra=``; the JSON format writes those present.
FIELDS = ("source", "slot", "position", "changes", "transactions", "batches", "error_kind", "metrics_url", "head")
MASK = "***"

_secrets: set[str] = set()


def known_secrets(dsns: Iterable[str | None], env: Mapping[str, str] | None = None) -> set[str]:
    """The passwords in these DSNs (and in ``PGPASSWORD``), to be masked wherever they would be printed."""
    env = os.environ if env is None else env
    found = {env["PGPASSWORD"]} if env.get("PGPASSWORD") else set()
    for dsn in dsns:
        if not dsn:
            continue
        try:
            password = conninfo.conninfo_to_dict(dsn).get("password")
        except Exception:  # a malformed DSN is reported elsewhere; mask its password-looking part anyway
            password = dsn.rpartition("@")[0].partition("://")[2].partition(":")[2] or None
        if password:
            found.add(str(password))
    return found


def forget_secrets() -> None:
    _secrets.clear()


def redact(text: str) -> str:
    """``text`` with every known secret replaced by ``***``."""
    for secret in _secrets:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "message": redact(record.getMessage()),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


def configure(log_format: str = "text", *, verbose: bool = False, secrets: Iterable[str] = ()) -> None:
    """Send bemi-pg's log to stderr in ``log_format`` (``text`` or ``json``), masking ``secrets``."""
    _secrets.update(s for s in secrets if s)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else _TextFormatter("%(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
