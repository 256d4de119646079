"""Pure stitching: decoded wal2json events -> change rows, each with its statement's context.

A change's context is the last ``_bemi`` message before it in its transaction, in output
order. The capture trigger emits the raw parts (see ``bemi.capture_context``) and never
validates them, so that no context can make a write fail; this module validates, merges
(PostgREST < session < transaction < comment) and marks what was wrong under the key
``_bemi_error``.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_to_bytes

import msgspec
from pglast.parser import scan

from .wal2json import (
    PASS,
    PASS_SPECIALS,
    Begin,
    Change,
    Column,
    Converted,
    Lines,
    Sealing,
    TypeInfo,
    TypeRegistry,
    canonical,
    parse_lsn,
    value_json,
)

__all__ = ["ChangeRow", "ConvertedRow", "TransactionState", "change_id", "context_json", "CONTEXT_PREFIX", "OPERATIONS"]

CONTEXT_PREFIX = "_bemi"
OPERATIONS = {"I": "CREATE", "U": "UPDATE", "D": "DELETE", "T": "TRUNCATE"}


def copy_text(value: str | None) -> bytes:
    """A value as a field of COPY's text format."""
    if value is None:
        return b"\\N"
    return copy_escape(value.encode())


def copy_escape(data: bytes) -> bytes:
    """Bytes as a field of COPY's text format: backslash, newline, return and tab escaped."""
    if len(data.translate(None, b"\\\n\r\t")) == len(data):  # none of them: one pass in C
        return data
    return data.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r").replace(b"\t", b"\\t")


@lru_cache(maxsize=4096)
def _table_fields(schema: str, table: str, operation: str) -> bytes:
    """The schema, table and operation fields, which many rows share: escaped once."""
    return _table_prefix(schema, table) + operation.encode()


@lru_cache(maxsize=4096)
def _table_prefix(schema: str, table: str) -> bytes:
    """The schema and table fields and the tab after them (what _fastrow.lines puts before the operation)."""
    return copy_text(schema) + b"\t" + copy_text(table) + b"\t"


_ID_SEQ_SHIFT = 26  # seq's place in change_id, above the source hash


def change_id(source: str, commit_position: int, seq: int) -> int:
    """The ``id`` of a change the poller writes, as a 128-bit integer: a version 8 UUID (RFC 9562)
    made of the change's commit position, its ``seq`` and a 26-bit hash of its source
    (``<system identifier>/<database>``).

    Ids so made grow with the WAL, so the primary key's index takes each batch at its right edge
    instead of at random pages as ``gen_random_uuid()`` would (on a large table, a random page
    read per change), and the same change always gets the same id. The layout, from the most
    significant bit: commit position bits 63-16, version (8), bits 15-4, variant (0b10), bits
    3-0, seq (32 bits), the source hash (26 bits). Changes of two sources that hash alike and
    share a commit position and seq would meet on the primary key: the poller then stops with
    the error rather than drop one of them (the unique key holds the source itself)."""
    return _id_base(source, commit_position) | seq << _ID_SEQ_SHIFT


def _id_base(source: str, commit_position: int) -> int:
    """change_id with seq 0: what the ids of one transaction's changes share (TransactionState
    adds each change's seq to it)."""
    return ((commit_position >> 16) << 80 | 0x8 << 76 | (commit_position >> 4 & 0xFFF) << 64
            | 0b10 << 62 | (commit_position & 0xF) << 58 | zlib.crc32(source.encode()) & 0x3FF_FFFF)


@dataclass(slots=True)
class ChangeRow:
    """One row of the ``changes`` table; JSON columns hold JSON text."""

    database: str
    schema: str
    table: str
    primary_key: str | None
    operation: str
    before: bytes
    after: bytes
    context: str
    committed_at: str
    transaction_id: int
    position: int
    commit_position: int
    seq: int
    id: int  # change_id(source, commit_position, seq)
    ambiguous: bool = False  # a float/numeric null that may really be NaN or ±Infinity
    moved_from: str | None = None  # an UPDATE of the key: the key the row left (bemi.key_move)

    def copy_line(self, tail: bytes) -> bytes:
        """The row as a line of COPY text for :data:`COLUMNS`; ``tail`` is its transaction's
        shared fields (:meth:`TransactionState.copy_tail`)."""
        return b"\t".join((
            _table_fields(self.schema, self.table, self.operation), copy_text(self.primary_key),
            copy_escape(self.before), copy_escape(self.after), b"%d\t%d\t%032x" % (self.position, self.seq, self.id), tail,
        ))


@dataclass(slots=True)
class ConvertedRow:
    """A change the compiled path converted (wal2json.fast_converter): ``fields`` holds its
    primary_key, before and after, ready as COPY fields (``Converted.fields``)."""

    schema: str
    table: str
    operation: str
    fields: bytes
    committed_at: str
    transaction_id: int
    position: int
    commit_position: int
    seq: int
    id: int
    ambiguous: bool

    def copy_line(self, tail: bytes) -> bytes:
        """The same line as :meth:`ChangeRow.copy_line` gives for this change."""
        return b"\t".join((_table_fields(self.schema, self.table, self.operation), self.fields,
                           b"%d\t%d\t%032x" % (self.position, self.seq, self.id), tail))


# -- the seal's hashes, computed by the poller (README "A sealed trail") -----------------------
# bemi.change_hash is sha256(record_send(ROW(id, source, database, schema, table, primary_key,
# operation, before, after, context, committed_at, queued_at, created_at, transaction_id,
# position, commit_position, seq))). _fastrow.lines computes it for the changes of its runs from
# the fields a run shares (SealParts, in record_send's bytes) and its own; the server hashes
# every other change (bemi.seal_batch). 32 zero bytes say "not computed here".

UNSURE = bytes(32)
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_TEXT, _JSONB, _TIMESTAMPTZ, _INT8 = 25, 3802, 1184, 20


def seal_entry(change_id: int) -> bytes:
    """A change's entry in the seal the poller supplies when the server is to hash it."""
    return change_id.to_bytes(16, "big") + UNSURE


def timestamp_us(value: str | datetime) -> int:
    """A timestamptz as record_send writes it: microseconds since 2000-01-01 00:00 UTC."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        raise ValueError("a timestamptz without its offset")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _text_field(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">Ii", _TEXT, len(data)) + data


@lru_cache(maxsize=256)
def _seal_head(source: str, database: str, schema: str, table: str) -> bytes:
    return b"".join(map(_text_field, (source, database, schema, table)))


@lru_cache(maxsize=1024)
def _canonical_context(context: str) -> bytes | None:
    if canonical is None:
        return None
    return canonical(context.encode())


# The order of COPY's fields: a change's own first, then those its transaction's changes share
# (written once per transaction: see TransactionState.copy_tail).
COLUMNS = (
    "schema", "table", "operation", "primary_key", "before", "after", "position", "seq", "id",
    "source", "database", "context", "committed_at", "transaction_id", "commit_position", "queued_at",
)


# What jsonb refuses in a string: U+0000 and a surrogate not in a pair (Python decodes a pair).
_NOT_IN_JSONB = re.compile("[\x00\ud800-\udfff]")
# A number as JSON writes it: sign, integer digits, fraction digits, exponent.
_NUMBER = re.compile(r"-?(\d+)(?:\.(\d+))?(?:[eE]([-+]?\d+))?")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _jsonb_number(text: str) -> msgspec.Raw:
    """A JSON number kept as written (msgspec writes it back unchanged), if jsonb's numeric takes
    it: at most 16383 digits after the point (the number's scale, zeros included) and, unless it
    is zero, at most 131072 before."""
    match = _NUMBER.fullmatch(text)
    if match is None:  # pragma: no cover - json only calls this for numbers
        raise ValueError(text)
    whole, fraction = match.group(1), match.group(2) or ""
    exponent = int(match.group(3) or 0)
    digits = whole + fraction
    significant = digits.lstrip("0")
    if max(len(fraction) - exponent, 0) > 16383 or (
            significant and len(whole) + exponent - (len(digits) - len(significant)) > 131072):
        raise ValueError(f"{text[:20]} is beyond jsonb's numbers")
    return msgspec.Raw(text.encode())


def _loads_jsonb(text: str) -> Any:
    """``text`` parsed as JSON, or ValueError where PostgreSQL's jsonb would refuse it: NaN and
    ±Infinity, ``\\u0000``, a lone surrogate, a number beyond numeric's range, or nesting deeper
    than Python's parser goes. Numbers come back as msgspec.Raw, their text unchanged."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_jsonb_number, parse_int=_jsonb_number)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            for key, member in item.items():
                if _NOT_IN_JSONB.search(key):
                    raise ValueError("a string jsonb refuses")
                pending.append(member)
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str) and _NOT_IN_JSONB.search(item):
            raise ValueError("a string jsonb refuses")
    return value


def _parse_object(source: str, text: str, max_bytes: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Return (context object, error marker) for one source's raw text. What jsonb would refuse
    (see _loads_jsonb) is not valid JSON here, as trigger mode's ``raw::jsonb`` says."""
    size = len(text.encode())
    if size > max_bytes:
        return None, {"source": source, "error": f"context over {max_bytes} bytes", "bytes": size}
    try:
        value = _loads_jsonb(text)
    except ValueError:
        return None, {"source": source, "error": "context is not valid JSON", "value": text[:200]}
    if isinstance(value, dict):
        return value, None
    if isinstance(value, msgspec.Raw):  # a number: named as Python's json would type it
        kind = "float" if re.search(rb"[.eE]", bytes(value)) else "int"
    else:
        kind = type(value).__name__
    return None, {"source": source, "error": f"context is a JSON {kind}, not an object"}


_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_DJANGO_SAFE = re.compile(r"""[A-Za-z0-9_.~{},\[\]:"'\\/=()% -]*""")


_SPACE = " \t\n\r\f\v"


def trailing_comments(query: str, truncated: bool = False) -> list[str]:
    """The ``/* … */`` comments after the query's last token, in order (semicolons between and
    after them aside): where a statement's Bemi and sqlcommenter comments are, in either order.

    The query is lexed with PostgreSQL's own scanner (pglast), so a comment inside a string
    literal, or one before the last token, never counts. When only the tail of a very long query
    was sent (``truncated``), comments are taken from its end: ``/*Bemi`` back to ``Bemi*/``, or
    ``/*`` back to ``*/``."""
    comments: list[str] = []
    if not truncated:
        try:
            tokens = scan(query)
        except Exception:  # noqa: BLE001 - not lexable: fall back to the plain reading below
            tokens = None
        if tokens is not None:
            for token in reversed(tokens):
                if token.name == "ASCII_59":  # ';'
                    continue
                if token.name != "C_COMMENT":
                    break
                comments.insert(0, query[token.start : token.end + 1])  # pglast gives character offsets
            return comments
    tail = query
    while True:
        tail = tail.rstrip(_SPACE + ";")
        if not tail.endswith("*/"):
            return comments
        start = tail.rfind("/*Bemi") if tail.endswith("Bemi*/") else tail.rfind("/*")
        if start < 0:
            return comments
        comments.insert(0, tail[start:])
        tail = tail[:start]


def _is_bemi(comment: str) -> bool:
    return comment.startswith("/*Bemi") and comment.endswith("Bemi*/")


def final_comment(query: str, truncated: bool = False) -> str | None:
    """The text inside the last ``/*Bemi … Bemi*/`` comment of :func:`trailing_comments`, if any."""
    return _last_bemi(trailing_comments(query, truncated))


def _last_bemi(comments: list[str]) -> str | None:
    bemi = [c for c in comments if _is_bemi(c)]
    return bemi[-1][6:-6] if bemi else None


def _url_decode(text: str) -> str | None:
    """``%XX`` sequences decoded as UTF-8, as bemi.url_decode does; None when the result is not
    UTF-8 or holds a NUL (PostgreSQL's convert_from refuses both)."""
    try:
        decoded = unquote_to_bytes(text).decode()
    except UnicodeDecodeError:
        return None
    return None if "\x00" in decoded else decoded


# sqlcommenter (key='value', URL-encoded, \' escapes), also unquoted values and the older
# marginalia style (key:value, no space after the colon). bemi.sqlcommenter uses the same patterns.
_SQLC_KEY = r"[A-Za-z0-9_.~%-]+"
_SQLC_VALUE = r"'(?:[^'\\]|\\.)*'|[^,' \t\n\r\f\v][^,']*|"
SQLC_PAIR = rf"({_SQLC_KEY})([ \t\n\r\f\v]*=[ \t\n\r\f\v]*|:)({_SQLC_VALUE})"
_SQLC_PAIR_NC = rf"{_SQLC_KEY}(?:[ \t\n\r\f\v]*=[ \t\n\r\f\v]*|:)(?:{_SQLC_VALUE})"
SQLC_BODY = rf"^[ \t\n\r\f\v]*{_SQLC_PAIR_NC}(?:[ \t\n\r\f\v]*,[ \t\n\r\f\v]*{_SQLC_PAIR_NC})*[ \t\n\r\f\v]*$"
_SQLC_BODY_RE = re.compile(SQLC_BODY, re.DOTALL)
_SQLC_PAIR_RE = re.compile(SQLC_PAIR, re.DOTALL)
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


def sqlcommenter(comments: list[str], max_bytes: int, errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The keys of the sqlcommenter comments among ``comments`` (Bemi's aside), URL-decoded;
    a W3C ``traceparent`` also gives ``trace_id`` and ``span_id``. A comment that is not in the
    format is someone else's and is ignored; what is wrong inside one is added to ``errors``."""
    ctx: dict[str, Any] = {}
    for comment in comments:
        body = comment[2:-2]
        if _is_bemi(comment) or not _SQLC_BODY_RE.match(body):
            continue
        size = len(body.encode())
        if size > max_bytes:
            errors.append({"source": "sqlcommenter", "error": f"context over {max_bytes} bytes", "bytes": size})
            continue
        for match in _SQLC_PAIR_RE.finditer(body):
            raw_key, _, raw_value = match.groups()
            if len(raw_value) >= 2 and raw_value[0] == "'" and raw_value[-1] == "'":
                raw_value = re.sub(r"\\(.)", r"\1", raw_value[1:-1], flags=re.DOTALL)
            else:
                raw_value = raw_value.rstrip(_SPACE)
            key, value = _url_decode(raw_key), _url_decode(raw_value)
            if key is None or value is None:
                errors.append({"source": "sqlcommenter", "error": "not UTF-8 once URL-decoded", "value": match.group(0)[:200]})
                continue
            ctx[key] = value
            if key == "traceparent":
                trace = _TRACEPARENT.fullmatch(value)
                if trace is None:
                    errors.append({"source": "sqlcommenter", "error": "traceparent is not 00-<32 hex>-<16 hex>-<2 hex>",
                                   "value": value[:200]})
                else:
                    ctx["trace_id"], ctx["span_id"] = trace.groups()
    return ctx


def _comment_text(raw: str) -> str:
    """Undo bemi-django's quoting (it URL-quotes the JSON and doubles every %)."""
    text = raw.strip()
    if "%" in text and _PERCENT_ESCAPE.search(text.replace("%%", "%")) and _DJANGO_SAFE.fullmatch(text):
        decoded = _url_decode(text.replace("%%", "%"))  # not UTF-8, or a NUL: it stays as written
        return text if decoded is None else decoded
    return text


def _request_context(request: list[Any], max_bytes: int, errors: list[dict[str, Any]]) -> dict[str, Any]:
    """PostgREST's per-request settings: method, path, the JWT's sub and role, x-bemi-context."""
    method, path, claims_text, headers_text = (request + [None] * 4)[:4]
    ctx: dict[str, Any] = {}
    if method:
        ctx["method"] = method
    if path:
        ctx["path"] = path
    if claims_text:
        claims, error = _parse_object("request.jwt.claims", claims_text, max_bytes)
        if claims is not None:
            ctx.update({k: claims[k] for k in ("sub", "role") if k in claims})
        elif error is not None:
            errors.append(error)
    if headers_text:
        headers, error = _parse_object("request.headers", headers_text, max_bytes)
        header = headers.get("x-bemi-context") if headers else None
        if isinstance(header, str):
            value, error = _parse_object("x-bemi-context", header, max_bytes)
            if value is not None:
                ctx.update(value)
        if error is not None:
            errors.append(error)
    return ctx


_DERIVED = "a source whose keys bemi-pg derives (sqlcommenter, PostgREST's settings), not JSON the application wrote"


@lru_cache(maxsize=4096)
def context_json(message: str, max_bytes: int = 1_048_576, database_keys: str = "no_context",
                 sqlcommenter_tags: bool = True) -> str:
    """The context JSON text for one ``_bemi`` message's content.

    Sources merge key by key, later ones winning: the statement's sqlcommenter tags (unless
    ``sqlcommenter_tags`` is off) < PostgREST request < session (``bemi_set_context``) <
    transaction (``bemi.set_context``) < the statement's Bemi comment.
    What the database knows of the session (session_user, application_name, client_addr)
    is added where the application said nothing (``no_context``), always, or never.
    """
    if not message:
        return "{}"
    try:
        parts = json.loads(message)
    except ValueError:
        parts = None
    if not isinstance(parts, list):
        parts = [None, None, None]
    session, local, query, request, database, truncated = (parts + [None] * 6)[:6]
    merged: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    sources_used: list[str] = []  # the raw text of each source that gave an object
    comments = trailing_comments(query, bool(truncated)) if isinstance(query, str) else []
    if sqlcommenter_tags and comments:
        merged.update(sqlcommenter(comments, max_bytes, errors))
        sources_used += [_DERIVED] if merged else []
    if isinstance(request, list):
        derived = _request_context(request, max_bytes, errors)
        merged.update(derived)
        sources_used += [_DERIVED] if derived else []
    comment = _last_bemi(comments)
    for source, text in (("session", session), ("transaction", local),
                         ("comment", None if comment is None else _comment_text(comment))):
        if isinstance(text, str):
            value, error = _parse_object(source, text.strip(), max_bytes)
            if value is not None:
                merged.update(value)
                sources_used.append(text.strip())
            if error is not None:
                errors.append(error)
    if len(sources_used) == 1 and not errors and sources_used[0] is not _DERIVED and database_keys != "always":
        return sources_used[0]  # exactly as the application wrote it: numbers keep every digit
    if isinstance(database, list) and (database_keys == "always" or (database_keys == "no_context" and not merged and not errors)):
        known = dict(zip(("session_user", "application_name", "client_addr"), database, strict=False))
        merged = {**{k: v for k, v in known.items() if v not in (None, "")}, **merged}
    if errors:
        merged["_bemi_error"] = errors
    return _context_text(merged).decode()


_context_text = msgspec.json.Encoder().encode  # writes the msgspec.Raw numbers as they came


# name -> the value's JSON text as to_jsonb gives it (often wal2json's own, unparsed)
Fields = dict[str, msgspec.Raw]

_object_json = msgspec.json.Encoder().encode
_NULL = msgspec.Raw(b"null")


def _raw_value(name: str, *column_lists: list[Column] | None) -> bytes:
    """The JSON text wal2json wrote for a column, from the first list that has it."""
    for columns in column_lists:
        for column in columns or ():
            if column.name == name:
                return bytes(column.value)
    raise KeyError(name)


def _pk_text(raw: bytes) -> str | None:
    """A key value as text, from wal2json's JSON for it: strings unquoted, numbers exactly as written."""
    if raw[:1] == b'"':
        return str(msgspec.json.decode(raw))
    if raw == b"null":
        return None
    return raw.decode()  # a number's exact text, or true/false


class ColumnRules:
    """Columns never stored (``exclude``) and columns whose change alone is no change (``ignore``).

    Patterns match ``schema.table.column`` or ``table.column`` (fnmatch: ``*.updated_at``)."""

    def __init__(self, ignore: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> None:
        self.ignore_patterns = ignore
        self.exclude_patterns = exclude
        self._cache: dict[tuple[str, str, str], tuple[bool, bool]] = {}

    def __bool__(self) -> bool:
        return bool(self.ignore_patterns or self.exclude_patterns)

    def _rule(self, schema: str, table: str, column: str) -> tuple[bool, bool]:
        key = (schema, table, column)
        rule = self._cache.get(key)
        if rule is None:
            names = (f"{schema}.{table}.{column}", f"{table}.{column}")
            rule = (any(fnmatchcase(n, p) for p in self.ignore_patterns for n in names),
                    any(fnmatchcase(n, p) for p in self.exclude_patterns for n in names))
            self._cache[key] = rule
        return rule

    def excluded(self, schema: str, table: str, columns: Iterable[str]) -> set[str]:
        """The excluded columns among ``columns``."""
        return {c for c in columns if self._rule(schema, table, c)[1]}

    def ignored(self, schema: str, table: str, column: str) -> bool:
        return self._rule(schema, table, column)[0]


class TransactionState:
    """Stitches the changes of one transaction, in output order."""

    __slots__ = ("source", "database", "types", "key_order", "xid", "commit_lsn", "committed_at", "context", "seq",
                 "max_bytes", "database_keys", "sqlcommenter", "column_rules", "_tail", "_id_base", "_seal_tail")

    def __init__(self, source: str, database: str, types: TypeRegistry, begin: Begin, max_context_bytes: int,
                 key_order: Callable[[str, str, list[str]], list[str]] | None = None,
                 database_keys: str = "no_context", column_rules: ColumnRules | None = None,
                 sqlcommenter: bool = True) -> None:
        self.database_keys = database_keys
        self.sqlcommenter = sqlcommenter
        self.column_rules = column_rules
        self.source = source
        self.database = database
        self.types = types
        self.key_order = key_order
        self.xid = begin.xid
        self.commit_lsn = begin.commit_lsn
        self.committed_at = begin.timestamp
        self.context = "{}"
        self.seq = 0
        self.max_bytes = max_context_bytes
        self._tail: bytes | None = None  # copy_tail's, until the context changes
        self._id_base = _id_base(source, self.commit_lsn)
        self._seal_tail: tuple[bytes, bytes] | None = None  # seal_parts's, until the context changes

    def on_message(self, content: str) -> None:
        self.context = context_json(content, self.max_bytes, self.database_keys, self.sqlcommenter)
        self._tail = None
        self._seal_tail = None

    def seal_parts(self, recorded: tuple[str, str], queued_us: int, created_us: int) -> tuple[bytes, bytes, bytes] | None:
        """What _fastrow.lines needs to hash this transaction's changes of ``recorded``: record_send's
        bytes of the fields after the id (source, database, schema, table), after ``after``
        (context, committed_at, queued_at, created_at, transaction_id) and after ``position``
        (commit_position); None where the context's canonical text is not sure (the server hashes)."""
        if self._seal_tail is None:
            context = _canonical_context(self.context)
            if context is None:
                return None
            try:
                committed_us = timestamp_us(self.committed_at)
            except ValueError:
                return None
            self._seal_tail = (struct.pack(">Ii", _JSONB, len(context) + 1) + b"\x01" + context
                               + struct.pack(">IiqIiqIiqIiq", _TIMESTAMPTZ, 8, committed_us, _TIMESTAMPTZ, 8, queued_us,
                                             _TIMESTAMPTZ, 8, created_us, _INT8, 8, self.xid),
                               struct.pack(">Iiq", _INT8, 8, self.commit_lsn))
        return _seal_head(self.source, self.database, *recorded), *self._seal_tail

    def copy_tail(self, queued_at: str) -> bytes:
        """The COPY fields this transaction's changes share (the end of :data:`COLUMNS`); one
        transaction is read in one poll, so ``queued_at`` is the same for all of them."""
        if self._tail is None:
            fields = (copy_text(self.source), copy_text(self.database), copy_text(self.context), copy_text(self.committed_at),
                      b"%d" % self.xid, b"%d" % self.commit_lsn, copy_text(queued_at))
            self._tail = b"\t".join(fields) + b"\n"
        return self._tail

    def take_lines(self, lines: Lines, rows: list[Any], i: int, table: tuple[str, str], recorded: tuple[str, str],
                   tail: bytes, out: bytearray, limit: int, limit_bytes: int, sealing: Sealing | None = None) -> tuple[int, bool]:
        """The compiled path's run of changes (:func:`wal2json.fast_lines`): rows[i:] of ``table``
        (schema, table as wal2json names it), recorded under ``recorded``, as whole COPY lines
        (:meth:`ConvertedRow.copy_line`'s bytes, ``tail`` being :meth:`copy_tail`'s) appended to
        ``out``, at most ``limit`` of them or until ``out`` holds ``limit_bytes``; each takes its
        place in the transaction's order. Returns the index of the first row not taken (the
        caller takes it one row at a time) and whether a taken one holds an ambiguous null. With
        ``sealing`` (sha256, its times: queued_at's and created_at's microseconds, the seal's
        bytearray), each taken change's entry of the seal is appended to it (:func:`seal_entry`'s
        form, or its hash when this can compute it)."""
        base = self._id_base
        seq = self.seq
        hashing = None
        if sealing is not None:
            sha256, (queued_us, created_us), seal = sealing
            parts = self.seal_parts(recorded, queued_us, created_us)
            hashing = (sha256, parts, seal) if parts is not None else None
        end, self.seq, ambiguous = lines(rows, i, table[0], table[1], _table_prefix(*recorded), seq, base >> 64,
                                         base & 0xFFFF_FFFF_FFFF_FFFF, tail, out, limit, limit_bytes, hashing)
        if sealing is not None and hashing is None:
            sealing[2].extend(b"".join(seal_entry(base | n << _ID_SEQ_SHIFT) for n in range(seq, self.seq)))
        return end, ambiguous

    def _fields(self, columns: list[Column] | None) -> tuple[Fields, bool]:
        """The row's fields, and whether one of them is an ambiguous null (maybe NaN)."""
        types = self.types
        plans = types.plans
        fields: Fields = {}
        ambiguous = False
        for col in columns or ():
            plan = plans.get(col.typeoid) or types.plan(col.typeoid)
            value = col.value
            if plan is not PASS:
                if plan is PASS_SPECIALS:
                    ambiguous = ambiguous or value == _NULL
                else:
                    assert isinstance(plan, TypeInfo)
                    value = msgspec.Raw(value_json(plan, bytes(value)))
                    ambiguous = ambiguous or (plan.specials_as_null and value == _NULL)
            fields[col.name] = value
        return fields, ambiguous

    def on_change(self, change: Change | Converted, recorded: tuple[str, str] | None = None) -> ChangeRow | ConvertedRow | None:
        """The change row, recorded under ``recorded`` (schema, table; by default the change's own);
        None for an UPDATE that changed ignored columns only. Either way the change takes its
        place in the transaction's order (``seq``). A change the compiled path converted
        (:func:`wal2json.fast_converter`, never used with column rules) only takes its place."""
        schema, table = recorded or (change.schema, change.table)
        if not isinstance(change, Change):  # never with column rules (the poller's choice)
            seq = self.seq
            self.seq = seq + 1
            return ConvertedRow(schema, table, OPERATIONS[change.action], change.fields, self.committed_at, self.xid, change.lsn,
                                self.commit_lsn, seq, self._id_base | seq << _ID_SEQ_SHIFT, change.ambiguous)
        action = change.action
        before, ambiguous_before = self._fields(change.identity)
        after, ambiguous_after = self._fields(change.columns)
        if action == "U" and before:
            # wal2json leaves out unchanged TOASTed columns: their value is the old one.
            after = {**before, **after}
        elif action == "D" and not before and after:
            before, after = after, {}
        rules = self.column_rules
        if rules:
            if action == "U":
                changed = [k for k in after.keys() | before.keys() if before.get(k) != after.get(k)]
                if changed and all(rules.ignored(schema, table, k) for k in changed):
                    self.seq += 1
                    return None
            for name in rules.excluded(schema, table, after.keys() | before.keys()):
                before.pop(name, None)
                after.pop(name, None)

        primary_key: str | None = None
        moved_from: str | None = None
        if change.pk:
            if action == "D":
                primary_key = self._key(change, before, (change.identity, change.columns))
            else:
                primary_key = self._key(change, after, (change.columns, change.identity))
            if action == "U" and primary_key is not None and before:
                old_key = self._key(change, before, (change.identity, change.columns))
                moved_from = old_key if old_key != primary_key else None

        row = ChangeRow(
            self.database, schema, table, primary_key, OPERATIONS[action],
            _object_json(before), _object_json(after), self.context, self.committed_at, self.xid,
            parse_lsn(change.lsn), self.commit_lsn, self.seq, self._id_base | self.seq << _ID_SEQ_SHIFT,
            ambiguous_before or ambiguous_after, moved_from,
        )
        self.seq += 1
        return row

    def _key(self, change: Change, source: Fields, lists: tuple[list[Column] | None, list[Column] | None]) -> str | None:
        """The primary key's text (a JSON array for a composite key) from ``source``'s values."""
        assert change.pk
        if len(change.pk) == 1:
            name = change.pk[0].name
            return _pk_text(_raw_value(name, *lists)) if name in source else None
        key = [column.name for column in change.pk]
        if not all(name in source for name in key):
            return None
        # wal2json lists key columns in table order; the key's own order is in the catalog.
        names = self.key_order(change.schema, change.table, key) if self.key_order else key
        return "[" + ", ".join(bytes(source[name]).decode() for name in names) + "]"


def tracked_filter(schemas: tuple[str, ...], untracked: set[tuple[str, str]]) -> Callable[[str, str], bool]:
    """A predicate telling whether changes of ``schema.table`` belong in the audit trail."""
    wanted = set(schemas)

    def is_tracked(schema: str, table: str) -> bool:
        return schema in wanted and (schema, table) not in untracked and schema != "bemi"

    return is_tracked
