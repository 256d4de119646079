"""The exceptions bemi-pg raises for problems a user can fix."""

from __future__ import annotations

__all__ = ["BemiError", "BatchRefused", "CannotSay", "ConfigError", "ConnectionError", "DecodingFailed", "PreflightError",
           "SlotBusy", "SlotLost"]


class BemiError(Exception):
    """An expected failure: the CLI prints ``error: <message>`` and exits non-zero."""

    exit_code = 1


class ConfigError(BemiError):
    """Malformed settings, DSN or arguments."""

    exit_code = 2


class ConnectionError(BemiError):  # noqa: A001 - shadowing is deliberate inside the package
    """The database cannot be reached."""

    def __init__(self, message: str, *, role: str = "database", reason: str = "") -> None:
        super().__init__(message)
        self.role = role  # "source database", "destination database", ...
        self.reason = reason


class PreflightError(BemiError):
    """The database is not ready for bemi-pg (wal_level, wal2json, privileges, slots)."""


class SlotBusy(BemiError):
    """Another poller holds the slot; nothing was touched."""

    exit_code = 75  # EX_TEMPFAIL: an overlapping cron run, try again later


class BatchRefused(BemiError):
    """The destination refused a batch for a reason the poller cannot fix (a constraint or
    trigger the user added, a full disk): nothing of it was written and the slot stays before it."""


class DecodingFailed(BemiError):
    """The source could not decode the WAL at the slot (wal2json failed on a change, e.g. on a
    value its type cannot print): nothing of the read was written and the slot stays before it."""


class SlotLost(BemiError):
    """The replication slot is gone or invalidated: changes may have been lost."""

    exit_code = 3


class CannotSay(BemiError):
    """The trail cannot answer for that moment: before tracking began, in a gap, past what the
    poller has written, or for a row no change or baseline tells about."""

    exit_code = 5
