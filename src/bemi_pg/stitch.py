"""Pure stitching: decoded wal2json events -> change rows, each with its statement's context.

A change's context is the last ``_bemi`` message before it in its transaction, in output
order. The capture trigger emits ``[session, transaction, comment]`` (JSON strings as the
application gave them, or null) and never validates them, so that no context can make a
write fail; this module validates, merges (session < transaction < comment) and marks
what was wrong under the key ``_bemi_error``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from .wal2json import Begin, Change, Column, RawNumber, TypeInfo, TypeRegistry, value_json

__all__ = ["ChangeRow", "TransactionState", "context_json", "CONTEXT_PREFIX", "OPERATIONS"]

CONTEXT_PREFIX = "_bemi"
OPERATIONS = {"I": "CREATE", "U": "UPDATE", "D": "DELETE", "T": "TRUNCATE"}
_SOURCES = ("session", "transaction", "comment")


@dataclass(slots=True)
class ChangeRow:
    """One row of the ``changes`` table; JSON columns hold JSON text."""

    database: str
    schema: str
    table: str
    primary_key: str | None
    operation: str
    before: str
    after: str
    context: str
    committed_at: str
    transaction_id: int
    position: int
    commit_position: int
    seq: int
    ambiguous: bool = False  # a float/numeric null that may really be NaN or ±Infinity

    def as_tuple(self, queued_at: str) -> tuple[Any, ...]:
        return (
            self.database, self.schema, self.table, self.primary_key, self.operation,
            self.before, self.after, self.context, self.committed_at, queued_at,
            self.transaction_id, self.position, self.commit_position, self.seq,
        )


COLUMNS = (
    "database", "schema", "table", "primary_key", "operation", "before", "after", "context",
    "committed_at", "queued_at", "transaction_id", "position", "commit_position", "seq",
)


def _parse_part(source: str, text: str, max_bytes: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Return (context object, error marker) for one source's raw text."""
    size = len(text.encode())
    if size > max_bytes:
        return None, {"source": source, "error": f"context over {max_bytes} bytes", "bytes": size}
    candidates = [text.strip()]
    if source == "comment" and "%" in text:
        candidates.append(unquote(text.strip()))  # bemi-django URL-quotes the comment
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value, None
        return None, {"source": source, "error": f"context is a JSON {type(value).__name__}, not an object"}
    return None, {"source": source, "error": "context is not valid JSON", "value": text[:200]}


@lru_cache(maxsize=4096)
def context_json(message: str, max_bytes: int = 1_048_576) -> str:
    """The context JSON text for one ``_bemi`` message's content."""
    if not message:
        return "{}"
    try:
        parts = json.loads(message)
    except ValueError:
        parts = [None, None, message]
    if not isinstance(parts, list):
        parts = [None, None, message]
    present = [(s, p) for s, p in zip(_SOURCES, parts, strict=False) if isinstance(p, str)]
    if len(present) == 1:
        text = present[0][1].strip()
        if text.startswith("{") and len(text.encode()) <= max_bytes:
            try:
                if isinstance(json.loads(text), dict):
                    return text  # exactly as the application wrote it
            except ValueError:
                pass
    merged: dict[str, Any] = {}
    errors = []
    for source, text in present:
        value, error = _parse_part(source, text, max_bytes)
        if value is not None:
            merged.update(value)
        if error is not None:
            errors.append(error)
    if errors:
        merged["_bemi_error"] = errors
    return json.dumps(merged, ensure_ascii=False)


_members: dict[str, str] = {}


def _member_prefix(name: str) -> str:
    """``"name": `` for a column name, computed once per name."""
    prefix = _members.get(name)
    if prefix is None:
        prefix = _members[name] = json.dumps(name, ensure_ascii=False) + ": "
    return prefix


# name -> (JSON text of the value, its type, the value as decoded)
Fields = dict[str, tuple[str, TypeInfo, Any]]


def _object_json(fields: Fields) -> str:
    return "{" + ", ".join(_member_prefix(name) + text for name, (text, _, _) in fields.items()) + "}"


def _pk_text(value: Any) -> str | None:
    if value is None:
        return None
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str.__str__(value) if isinstance(value, RawNumber) else str(value)


class TransactionState:
    """Stitches the changes of one transaction, in output order."""

    __slots__ = ("database", "types", "key_order", "xid", "commit_lsn", "end_lsn", "committed_at", "context", "seq", "max_bytes")

    def __init__(self, database: str, types: TypeRegistry, begin: Begin, max_context_bytes: int,
                 key_order: Callable[[str, str, list[str]], list[str]] | None = None) -> None:
        self.database = database
        self.types = types
        self.key_order = key_order
        self.xid = begin.xid
        self.commit_lsn = begin.commit_lsn
        self.end_lsn = begin.end_lsn
        self.committed_at = begin.timestamp
        self.context = "{}"
        self.seq = 0
        self.max_bytes = max_context_bytes

    def on_message(self, content: str) -> None:
        self.context = context_json(content, self.max_bytes)

    def _fields(self, columns: list[Column] | None) -> tuple[Fields, bool]:
        """The row's fields, and whether one of them is an ambiguous null (maybe NaN)."""
        types = self.types
        fields: Fields = {}
        ambiguous = False
        for col in columns or ():
            info = types[col.typeoid]
            value = col.value
            if value is None:
                ambiguous = ambiguous or info.specials_as_null
                fields[col.name] = ("null", info, None)
            else:
                fields[col.name] = (value_json(info, value), info, value)
        return fields, ambiguous

    def on_change(self, change: Change) -> ChangeRow:
        before, ambiguous_before = self._fields(change.identity)
        after, ambiguous_after = self._fields(change.columns)
        if change.action == "U" and before:
            # wal2json leaves out unchanged TOASTed columns: their value is the old one.
            for name, field in before.items():
                if name not in after:
                    after[name] = field
        elif change.action == "D" and not before and after:
            before, after = after, {}

        primary_key: str | None = None
        if change.pk:
            source = before if change.action == "D" else after
            if all(name in source for name in change.pk):
                if len(change.pk) == 1:
                    primary_key = _pk_text(source[change.pk[0]][2])
                else:
                    # wal2json lists key columns in table order; the key's own order is in the catalog.
                    names = self.key_order(change.schema, change.table, change.pk) if self.key_order else change.pk
                    primary_key = "[" + ", ".join(source[name][0] for name in names) + "]"

        row = ChangeRow(
            database=self.database, schema=change.schema, table=change.table, primary_key=primary_key,
            operation=OPERATIONS[change.action],
            before=_object_json(before),
            after=_object_json(after),
            context=self.context, committed_at=self.committed_at, transaction_id=self.xid,
            position=change.lsn, commit_position=self.commit_lsn, seq=self.seq, ambiguous=ambiguous_before or ambiguous_after,
        )
        self.seq += 1
        return row


def tracked_filter(schemas: tuple[str, ...], untracked: set[tuple[str, str]]) -> Callable[[str, str], bool]:
    """A predicate telling whether changes of ``schema.table`` belong in the audit trail."""
    wanted = set(schemas)

    def is_tracked(schema: str, table: str) -> bool:
        return schema in wanted and (schema, table) not in untracked and schema != "bemi"

    return is_tracked
