"""Pure parsing of wal2json format-version 2 rows, and exact conversion of column values.

Rows are decoded by msgspec into the structs below; each column value stays the raw JSON
text wal2json wrote. wal2json gives each value as its PostgreSQL text output (numbers and
booleans unquoted). For strings, dates, numbers and booleans that text is already what
``to_jsonb`` gives (:meth:`TypeRegistry.plan`), so it is passed on unparsed; :func:`value_json`
converts the rest, under ``TimeZone=UTC`` and ``DateStyle=ISO``: timestamps in ISO 8601 with
``T``, bytea as ``"\\x…"``, arrays as JSON arrays, json and jsonb nested.

One limit of wal2json: it writes the numeric and float specials (NaN, ±Infinity) as
``null``. The stitcher marks such a null as *ambiguous*; the poller resolves it exactly
(see ``poller._resolve_ambiguous``). No I/O here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import msgspec

try:
    from ._fastrow import Converted, canonical, convert, lines
except ImportError:  # built without a compiler: the pure path only
    Converted = None  # type: ignore[assignment,misc]
    convert = None  # type: ignore[assignment]
    lines = None  # type: ignore[assignment]
    canonical = None  # type: ignore[assignment]

__all__ = [
    "Begin", "Change", "Column", "Commit", "Message", "TypeInfo", "TypeRegistry",
    "parse_lsn", "format_lsn", "parse_row", "value_json", "parse_array", "fast_converter", "fast_lines", "Converted", "Lines",
    "Sealing", "canonical",
]


class RawNumber(str):
    """A JSON number kept as its exact text (never a float)."""


_decoder = json.JSONDecoder(parse_float=RawNumber, parse_int=RawNumber, parse_constant=RawNumber)


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> the LSN as a 64-bit number."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    """The inverse of :func:`parse_lsn`."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# -- types -------------------------------------------------------------------------------

NUMBER, BOOL, JSON, DATE, TIMESTAMP, TIMESTAMPTZ, BYTEA, STRING, ARRAY = (
    "number", "bool", "json", "date", "timestamp", "timestamptz", "bytea", "string", "array",
)

AMBIGUOUS_NULL_OIDS = frozenset({700, 701, 1700})  # float4, float8, numeric: NaN/Infinity arrive as null
_WAL2JSON_UNQUOTED = frozenset({16, 20, 21, 23, 26, 700, 701, 1700})  # bool, int2/4/8, oid, float4/8, numeric


@dataclass(frozen=True)
class TypeInfo:
    """How ``to_jsonb`` renders a type: its kind and, for arrays, the element type."""

    kind: str
    element: TypeInfo | None = None
    delimiter: str = ","
    specials_as_null: bool = False  # a null from wal2json may be NaN or ±Infinity


_SCALARS: dict[int, TypeInfo] = {
    16: TypeInfo(BOOL),
    20: TypeInfo(NUMBER), 21: TypeInfo(NUMBER), 23: TypeInfo(NUMBER),
    26: TypeInfo(STRING),  # oid: to_jsonb writes a string, wal2json a number
    700: TypeInfo(NUMBER, specials_as_null=True), 701: TypeInfo(NUMBER, specials_as_null=True),
    1700: TypeInfo(NUMBER, specials_as_null=True),
    114: TypeInfo(JSON), 3802: TypeInfo(JSON),
    1082: TypeInfo(DATE), 1114: TypeInfo(TIMESTAMP), 1184: TypeInfo(TIMESTAMPTZ),
    17: TypeInfo(BYTEA),
    25: TypeInfo(STRING), 1043: TypeInfo(STRING), 1042: TypeInfo(STRING), 2950: TypeInfo(STRING),
    1083: TypeInfo(STRING), 1266: TypeInfo(STRING), 1186: TypeInfo(STRING), 19: TypeInfo(STRING),
}
_ARRAYS: dict[int, int] = {
    1000: 16, 1005: 21, 1007: 23, 1016: 20, 1028: 26, 1021: 700, 1022: 701, 1231: 1700,
    199: 114, 3807: 3802, 1182: 1082, 1115: 1114, 1185: 1184, 1001: 17,
    1009: 25, 1015: 1043, 1014: 1042, 2951: 2950, 1183: 1083, 1270: 1266, 1187: 1186,
    22: 21, 30: 26,  # int2vector, oidvector: arrays whose text is '1 2 3' (parse_array)
}
_VECTOR_ARRAYS = {1006: 22, 1013: 30}  # int2vector[], oidvector[]


class Passthrough:
    """A type whose values go into before/after as wal2json wrote them (see TypeRegistry.plan).
    Its two instances are told apart by identity: PASS, and PASS_SPECIALS for the float and
    numeric types, whose null may really be NaN or ±Infinity."""

    __slots__ = ()


PASS, PASS_SPECIALS = Passthrough(), Passthrough()


class TypeRegistry:
    """Maps type OIDs to :class:`TypeInfo`; unknown OIDs are asked of ``loader``.

    ``loader(oids)`` returns catalog rows ``(oid, typtype, typcategory, typelem, element's typdelim,
    typbasetype)`` for the given OIDs; the poller passes a function that queries pg_type.
    """

    def __init__(self, loader: Callable[[list[int]], Iterable[tuple[int, str, str, int, str, int]]] | None = None):
        self._known: dict[int, TypeInfo] = {}
        for oid, info in _SCALARS.items():
            self._known[oid] = info
        for array_oid, elem in _ARRAYS.items():
            self._known[array_oid] = TypeInfo(ARRAY, element=_SCALARS[elem])
        for array_oid, elem in _VECTOR_ARRAYS.items():
            self._known[array_oid] = TypeInfo(ARRAY, element=self._known[elem])
        self._loader = loader
        self.plans: dict[int, TypeInfo | Passthrough] = {}  # every column type met so far: see plan()

    def __getitem__(self, oid: int) -> TypeInfo:
        return self._known.get(oid) or self._load(oid)

    def plan(self, oid: int) -> TypeInfo | Passthrough:
        """What a value of this type needs: :data:`PASS` (or :data:`PASS_SPECIALS`, whose null may
        be NaN or ±Infinity) when wal2json's JSON for it already is what ``to_jsonb`` gives, else
        its TypeInfo for :func:`value_json`. Passthrough are strings, dates, the built-in numeric
        types and bool: wal2json writes those numbers and bool unquoted and everything else as a
        quoted string of the text output (a domain over a number too, which is why this goes by
        OID). oid is the one type wal2json writes as a number where to_jsonb writes a string."""
        info = self[oid]
        plan: TypeInfo | Passthrough = info
        unquoted = oid in _WAL2JSON_UNQUOTED
        if (info.kind in (NUMBER, BOOL) and unquoted) or (info.kind in (STRING, DATE) and not unquoted):
            plan = PASS_SPECIALS if info.specials_as_null else PASS
        self.plans[oid] = plan
        return plan

    def _load(self, oid: int) -> TypeInfo:
        rows = {r[0]: r for r in (self._loader([oid]) if self._loader else [])}
        row = rows.get(oid)
        if row is None:
            info = TypeInfo(STRING)
        else:
            _, typtype, category, elem, elem_delimiter, base = row
            if typtype == "d" and base:
                info = self[base]
            elif category == "A" and elem:
                info = TypeInfo(ARRAY, element=self[elem], delimiter=elem_delimiter or ",")
            else:
                info = TypeInfo(STRING)
        self._known[oid] = info
        return info


# -- values ------------------------------------------------------------------------------

_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?\Z")
_VECTOR = re.compile(r"[0-9 -]*")  # int2vector's and oidvector's text
_TZ_OFFSET = re.compile(rb'([+-]\d\d)((?::\d\d){0,2})( BC)?"\Z')
_dumps = json.JSONEncoder(ensure_ascii=False).encode


def _timestamp_json(raw: bytes, with_zone: bool) -> bytes:
    """A timestamp's JSON string (its text output, which needs no escapes) as to_jsonb writes it:
    ``T`` between date and time, and the zone offset with minutes (``+00:00``); infinity as it is."""
    if not raw[1:2].isdigit():
        return raw
    raw = raw.replace(b" ", b"T", 1)
    if with_zone:
        if raw.endswith(b'+00"'):  # the poller's sessions are in UTC
            return raw[:-1] + b':00"'
        m = _TZ_OFFSET.search(raw)
        if m and not m.group(2):
            return raw[: m.start()] + m.group(1) + b":00" + (m.group(3) or b"") + b'"'
    return raw


def _from_text(info: TypeInfo, text: str) -> str:
    """JSON for a value given as its PostgreSQL text output."""
    kind = info.kind
    if kind == STRING:
        return _dumps(text)
    if kind == NUMBER:
        return text if _JSON_NUMBER.match(text) else _dumps(text)
    if kind == BOOL:
        return "true" if text in ("t", "true") else "false"
    if kind == JSON:
        return text
    if kind == TIMESTAMP or kind == TIMESTAMPTZ:
        return _timestamp_json(_dumps(text).encode(), kind == TIMESTAMPTZ).decode()
    if kind == DATE:
        return _dumps(text)
    if kind == BYTEA:
        return _dumps(text if text.startswith("\\x") else "\\x" + text)
    if kind == ARRAY:
        assert info.element is not None
        try:
            items = parse_array(text, info.delimiter)
        except ValueError:  # text no array type writes: kept as the text, rather than failing the batch
            return _dumps(text)
        return _array_json(items, info.element)
    return _dumps(text)


def value_json(info: TypeInfo, raw: bytes) -> bytes:
    """JSON text, as ``to_jsonb`` gives it, for a value's JSON text as wal2json wrote it.

    The poller calls it only for types whose values wal2json does not already write as
    ``to_jsonb`` would (:meth:`TypeRegistry.plan` decides); it is exact for any type."""
    if raw == b"null":
        return raw
    if raw[:1] == b'"' and (info.kind is TIMESTAMPTZ or info.kind is TIMESTAMP):
        return _timestamp_json(raw, info.kind is TIMESTAMPTZ)
    value = _decoder.decode(raw.decode())
    if value is True:
        return b"true"
    if value is False:
        return b"false"
    return _from_text(info, str.__str__(value)).encode()


def _array_json(items: list[Any], element: TypeInfo) -> str:
    parts = []
    for item in items:
        if item is None:
            parts.append("null")
        elif isinstance(item, list):
            parts.append(_array_json(item, element))
        else:
            parts.append(_from_text(element, item))
    return "[" + ", ".join(parts) + "]"


def parse_array(text: str, delimiter: str = ",") -> list[Any]:
    """Parse PostgreSQL's array text output into nested lists of str (None for NULL); ValueError
    for text not in that form. int2vector and oidvector, arrays whose text is their elements
    separated by spaces (``'1 2 3'``), parse too."""
    if text.startswith("["):  # explicit bounds, e.g. '[0:1]={1,2}': to_jsonb ignores them
        text = text[text.find("=") + 1 :]
    elif not text.startswith("{"):
        if not _VECTOR.fullmatch(text):
            raise ValueError(f"not an array's text: {text[:40]!r}")
        return text.split()
    try:
        items, pos = _parse_level(text, 0, delimiter)
    except IndexError:
        raise ValueError(f"an array's text cut short: {text[:40]!r}") from None
    if pos != len(text):
        raise ValueError(f"text after an array: {text[pos : pos + 40]!r}")
    return items


def _parse_level(text: str, pos: int, delimiter: str) -> tuple[list[Any], int]:
    """One level of braces of parse_array, from ``text[pos]``; the items and the position after it."""
    if text[pos] != "{":
        raise ValueError(f"not an array's text at {pos}: {text[pos : pos + 40]!r}")
    pos += 1
    n = len(text)
    items: list[Any] = []
    if text[pos] == "}":
        return items, pos + 1
    while True:
        ch = text[pos]
        if ch == "{":
            nested, pos = _parse_level(text, pos, delimiter)
            items.append(nested)
        elif ch == '"':
            pos += 1
            buf = []
            while True:
                c = text[pos]
                if c == "\\":
                    buf.append(text[pos + 1])
                    pos += 2
                elif c == '"':
                    pos += 1
                    break
                else:
                    buf.append(c)
                    pos += 1
            items.append("".join(buf))
        else:
            start = pos
            while pos < n and text[pos] != delimiter and text[pos] != "}":
                pos += 1
            token = text[start:pos].strip(" \t\n\r\v\f")  # array_in's spaces (str.strip's would take U+00A0 too)
            items.append(None if token.upper() == "NULL" else token)
        while text[pos] == " ":
            pos += 1
        if text[pos] == "}":
            return items, pos + 1
        if text[pos] != delimiter:
            raise ValueError(f"no delimiter at {pos}: {text[pos : pos + 40]!r}")
        pos += 1
        while text[pos] == " ":
            pos += 1


# -- rows --------------------------------------------------------------------------------
# wal2json format-version 2 rows, decoded by msgspec straight into these structs (the
# "action" member picks the struct); column values stay raw JSON text (``msgspec.Raw``),
# so that numbers keep every digit and most values need no conversion at all.

class _Boundary(msgspec.Struct, tag_field="action"):
    """A transaction's begin or commit: ``lsn`` is its commit's position, ``nextlsn`` the end of it."""

    xid: int
    lsn: str
    nextlsn: str

    @property
    def commit_lsn(self) -> int:
        return parse_lsn(self.lsn)

    @property
    def end_lsn(self) -> int:
        return parse_lsn(self.nextlsn)


class Begin(_Boundary, tag="B"):
    timestamp: str


class Commit(_Boundary, tag="C"):
    pass


class Message(msgspec.Struct, tag="M", tag_field="action"):
    prefix: str
    content: str


class Column(msgspec.Struct):
    name: str
    typeoid: int
    value: msgspec.Raw


class _KeyColumn(msgspec.Struct):
    name: str


class Change(msgspec.Struct, tag_field="action"):
    """One row change; ``action`` is I, U, D or T (truncate)."""

    action: ClassVar[str]
    lsn: str
    schema: str
    table: str
    columns: list[Column] | None = None
    identity: list[Column] | None = None
    pk: list[_KeyColumn] | None = None


class Insert(Change, tag="I"):
    action = "I"


class Update(Change, tag="U"):
    action = "U"


class Delete(Change, tag="D"):
    action = "D"


class Truncate(Change, tag="T"):
    action = "T"


Event = Begin | Commit | Message | Insert | Update | Delete | Truncate

parse_row: Callable[[bytes | str], Event] = msgspec.json.Decoder(Event).decode
"""Parse one wal2json format-version 2 row (options: include-lsn, include-xids,
include-timestamp, include-type-oids, include-pk, include-types 0); raises ``msgspec.ValidationError``
on a row of another shape."""


# -- the compiled path -------------------------------------------------------------------
# bemi_pg._fastrow (C, built by the package's own build when a compiler is there) converts an
# INSERT, UPDATE or DELETE row straight from wal2json's bytes to before/after, byte for byte what
# parse_row and TransactionState.on_change give; it hands every other row back (None) to them.

CONVERSION_ENV = "BEMI_PG_CONVERSION"
"""``pure`` makes the poller use the pure-Python conversion, the reference; ``compiled`` (the
default when the module is built) the C one."""

# The codes _fastrow.c knows (CODE_*); any other plan is a TypeInfo it hands to value_json.
_CODES = {TIMESTAMPTZ: 2, TIMESTAMP: 3, JSON: 4}
_ARRAY_CODES = {STRING: 5, DATE: 5, NUMBER: 6, BOOL: 7}


def _code(plan: TypeInfo | Passthrough) -> int | TypeInfo:
    if plan is PASS:
        return 0
    if plan is PASS_SPECIALS:
        return 1
    assert isinstance(plan, TypeInfo)
    if plan.kind in _CODES:
        return _CODES[plan.kind]
    if plan.kind == ARRAY and plan.element is not None and plan.delimiter == "," and plan.element.kind in _ARRAY_CODES:
        return _ARRAY_CODES[plan.element.kind]
    return plan


def compiled_available() -> bool:
    """Whether the compiled conversion is built (``bemi_pg._fastrow``)."""
    return convert is not None


def fast_converter(types: TypeRegistry) -> Callable[[bytes], Converted | None] | None:
    """The compiled conversion of a row for these types: a Converted, or None for a row the pure
    path must parse (:func:`parse_row`). None when the module is not built or
    ``BEMI_PG_CONVERSION=pure``."""
    if convert is None or os.environ.get(CONVERSION_ENV, "compiled") == "pure":
        return None
    codes: dict[int, int | TypeInfo] = {}

    def plan(oid: int) -> int | TypeInfo:
        codes[oid] = code = _code(types.plans.get(oid) or types.plan(oid))
        return code

    return partial(convert, codes, plan, value_json)


Sealing = tuple[Callable[[bytes], Any], tuple[int, int], bytearray]
"""stitch.TransactionState.take_lines's sealing: sha256, (queued_at, created_at) in microseconds, the seal."""

Lines = Callable[[list[Any], int, str, str, bytes, int, int, int, bytes, bytearray, int, int,
                  tuple[Callable[[bytes], Any], tuple[bytes, bytes, bytes], bytearray] | None], tuple[int, int, bool]]
"""_fastrow.lines with its codes, plan and value_json bound (see stitch.TransactionState.take_lines)."""


def fast_lines(converter: Callable[[bytes], Converted | None]) -> Lines:
    """The compiled conversion of a run of rows into whole COPY lines, sharing ``converter``'s
    (:func:`fast_converter`'s) type codes."""
    assert isinstance(converter, partial) and lines is not None
    return partial(lines, *converter.args)
