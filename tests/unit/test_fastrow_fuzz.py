"""The compiled conversion (bemi_pg._fastrow) against the pure one, on random wal2json rows.

Every row is one wal2json (format-version 2, the poller's options) could write: values are built
as PostgreSQL's text output of random values of the fidelity matrix's types (arrays as array_out
quotes them, jsonb as jsonb_out writes it, timestamps with BC, infinity and odd offsets, numerics
with their specials, which wal2json writes as null), then escaped as wal2json's escape_json does.
Both paths get the same bytes and must give the same COPY line, the same ambiguity and, for a row
the pure path refuses, the same exception class. Fixed seeds: a failure is reproducible.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from typing import Any

import pytest

from bemi_pg.stitch import TransactionState
from bemi_pg.wal2json import Change, TypeRegistry, fast_converter, fast_lines, parse_row

pytestmark = pytest.mark.skipif(fast_converter(TypeRegistry()) is None, reason="bemi_pg._fastrow is not built")

# Catalog rows (oid, typtype, typcategory, typelem, element's typdelim, typbasetype) for the types
# the built-in registry does not know: an enum, a composite, a domain over numeric and one over
# text, arrays of them, box[] (delimiter ';').
CATALOG = {
    16400: (16400, "e", "E", 0, ",", 0),
    16401: (16401, "b", "A", 16400, ",", 0),
    16402: (16402, "c", "C", 0, ",", 0),
    16403: (16403, "b", "A", 16402, ",", 0),
    16404: (16404, "d", "N", 0, ",", 1700),
    16405: (16405, "d", "S", 0, ",", 25),
    16406: (16406, "b", "A", 16404, ",", 0),
    1020: (1020, "b", "A", 603, ";", 0),
    603: (603, "b", "G", 0, ";", 0),
}


def registry() -> TypeRegistry:
    return TypeRegistry(lambda oids: [CATALOG[o] for o in oids if o in CATALOG])


# -- PostgreSQL text output and wal2json's escaping -------------------------------------------

_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_TO_ESCAPE = re.compile('["\\\\\x00-\x1f]')


def escape_json(text: str) -> str:
    """PostgreSQL's escape_json (what wal2json writes for names and quoted values)."""
    return '"' + _TO_ESCAPE.sub(lambda m: _JSON_ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), text) + '"'


def rand_text(rng: random.Random, max_len: int = 12) -> str:
    """Text PostgreSQL can hold (UTF-8, no NUL, no surrogate): ASCII specials, Latin, CJK, astral."""
    pools = [
        "abcxyzABC019 _-.,;:",
        '"\\\'{}[](),\t\n\r\x01\x07\x08\x0b\x0c\x1b\x1f\x7f',
        "éüßñ\u00a0\u0085\u2028\u2029\u200b\ufeff\ufffd",
        "日本語中文한국어",
        "\U0001f600\U0001f4a9\U00010348\U0010fffd",
        "NULLnull",
    ]
    n = rng.randint(0, max_len)
    chars = []
    for _ in range(n):
        pool = rng.choice(pools)
        if pool is pools[2] and rng.random() < 0.3:
            cp = rng.randint(0x80, 0x10FFFF)
            while 0xD800 <= cp <= 0xDFFF:
                cp = rng.randint(0x80, 0x10FFFF)
            chars.append(chr(cp))
        else:
            chars.append(rng.choice(pool))
    return "".join(chars)


def rand_numeric(rng: random.Random) -> str:
    """numeric_out: plain digits, never an exponent."""
    r = rng.random()
    if r < 0.1:
        return "0"
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40))).lstrip("0") or "0"
    frac = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 30)))
    text = digits + ("." + frac if frac else "")
    if r > 0.95:
        text = "1" + "0" * rng.randint(100, 1000)  # a huge one
    elif r > 0.9:
        text = "0." + "0" * rng.randint(100, 1000) + "1"
    return ("-" if rng.random() < 0.3 else "") + text


def rand_float(rng: random.Random) -> str:
    """float8out's shortest-exact forms."""
    return rng.choice(["0", "-0", "1.5", "3.14159", "1e+300", "1.0000000000000002e-300", "-1.5e-07",
                       "1.7976931348623157e+308", "5e-324", "123456789", "1e+16", "0.1"])


def rand_timestamp(rng: random.Random, with_zone: bool) -> str:
    if rng.random() < 0.1:
        return rng.choice(["infinity", "-infinity"])
    year = rng.choice([1, 44, 1999, 2024, 9999, 10000, 294276, rng.randint(1, 5000)])
    month, day, hour, minute, second = (rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59))
    text = f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}"
    if rng.random() < 0.5:
        text += "." + str(rng.randint(0, 999999)).rjust(6, "0").rstrip("0") if rng.random() < 0.9 else ".5"
        text = text.rstrip(".")
    if with_zone:
        text += rng.choice(["+00", "+00", "-08", "+05:30", "-03:30", "+14", "-12", "+00:53:28", "-00:01:15", "+01:00:01"])
    if rng.random() < 0.15:
        text += " BC"
    return text


def jsonb_out(value: Any) -> str:
    """jsonb's text output: ", " and ": " separators, escape_json strings."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return escape_json(value)
    if isinstance(value, list):
        return "[" + ", ".join(jsonb_out(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(escape_json(k) + ": " + jsonb_out(v) for k, v in value.items()) + "}"
    return str(value)  # a number's text, as numeric_out writes it


def rand_json_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth < 4 and r < 0.25:
        keys = sorted({rand_text(rng, 5) for _ in range(rng.randint(0, 4))}, key=lambda k: (len(k.encode()), k.encode()))
        return {k: rand_json_value(rng, depth + 1) for k in keys}
    if depth < 4 and r < 0.45:
        return [rand_json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if r < 0.55:
        return rng.choice([None, True, False])
    if r < 0.7:
        return rand_numeric(rng).replace("-0.", "-0.") if rng.random() < 0.5 else rng.choice(["1e3", "-0", "1.50", "0"])
    return rand_text(rng)


def json_type_text(rng: random.Random) -> str:
    """The json type keeps its input text: whitespace, duplicate keys, \\u escapes as written."""
    return rng.choice([
        '{"a": 1, "a": 2}', "[\n\t1,\r\n 2]", '"\\u0000"', '"\\ud83d\\ude00"', '{"k":"\\u00e9\\n"}',
        '  {"b"  :  [ ]  }  ', '"just a string"', "1e400", '"tab\\there"', jsonb_out(rand_json_value(rng)),
    ])


ARRAY_SPACE = " \t\n\r\v\f"


def array_item(text: str | None, delimiter: str = ",") -> str:
    """array_out's quoting of one element."""
    if text is None:
        return "NULL"
    if (text == "" or text.upper() == "NULL" or any(c in '"\\{}' + delimiter or c in ARRAY_SPACE for c in text)):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def array_out(items: list[Any], delimiter: str = ",") -> str:
    return "{" + delimiter.join(array_out(i, delimiter) if isinstance(i, list) else array_item(i, delimiter)
                                for i in items) + "}"


def rand_array(rng: random.Random, element: Callable[[], str | None], dims: int | None = None) -> list[Any]:
    """A rectangular array of up to 3 dimensions (array_out writes no ragged ones), NULLs among them."""
    dims = dims if dims is not None else rng.choice([1, 1, 1, 2, 3])
    shape = [rng.randint(1, 3) for _ in range(dims)]

    def level(d: int) -> list[Any]:
        if d == dims - 1:
            return [None if rng.random() < 0.15 else element() for _ in range(shape[d])]
        return [level(d + 1) for _ in range(shape[d])]

    return level(0)


def rand_bool_text(rng: random.Random) -> str:
    return rng.choice(["t", "f"])


def rand_vector(rng: random.Random, oid: int) -> str:
    """int2vector's or oidvector's text."""
    low, high = (-(2**15), 2**15 - 1) if oid == 22 else (0, 2**32 - 1)
    return " ".join(str(rng.randint(low, high)) for _ in range(rng.choice([0, 1, 3])))


def rand_value(rng: random.Random, oid: int) -> str:
    """wal2json's JSON for a random non-null value of the type."""
    if oid == 16:
        return rng.choice(["true", "false"])
    if oid in (20, 21, 23, 26):
        limit = {21: 2**15, 23: 2**31, 20: 2**63, 26: 2**32}[oid]
        return str(rng.randint(0 if oid == 26 else -limit, limit - 1))
    if oid == 1700:
        return "null" if rng.random() < 0.1 else rand_numeric(rng)  # NaN, ±Infinity: null
    if oid in (700, 701):
        return "null" if rng.random() < 0.1 else rand_float(rng)
    text: str
    if oid in (25, 1043, 16405, 19):
        text = rand_text(rng, rng.choice([0, 3, 12, 40]))
    elif oid == 1042:
        text = rand_text(rng, 5).ljust(5)
    elif oid == 2950:
        text = f"{rng.getrandbits(128):032x}"
        text = "-".join((text[:8], text[8:12], text[12:16], text[16:20], text[20:]))
    elif oid == 1082:
        text = rng.choice(["2024-02-29", "0044-03-15 BC", "infinity", "-infinity", "294276-12-31", "5874897-12-31"])
    elif oid in (1114, 1184):
        text = rand_timestamp(rng, oid == 1184)
    elif oid in (1083, 1266, 1186):
        text = rng.choice(["23:59:59.999999", "00:00:00", "10:00:00+05:30", "00:00:00-12", "-1 days", "1 year 2 mons 3 days 04:05:06.7",
                           "-178000000 years", "00:00:00.000001"])
    elif oid == 114:
        text = json_type_text(rng)
    elif oid == 3802:
        text = jsonb_out(rand_json_value(rng))
    elif oid == 17:
        text = "\\x" + rng.randbytes(rng.randint(0, 20)).hex()
    elif oid == 16400:
        text = rng.choice(["happy", "sad", 'it\'s "ok"', "\U0001f600 x", ""])
    elif oid == 16402:
        text = "(" + ",".join(rng.choice(["1", "", '"a b"', '"x\\"y"', '"(\\\\)"']) for _ in range(3)) + ")"
    elif oid == 16404:
        text = rng.choice(["NaN", "Infinity", "-Infinity", rand_numeric(rng)])
    elif oid in (1009, 1015, 1014, 16401):
        text = array_out(rand_array(rng, lambda: rand_text(rng, 6)))
    elif oid in (1005, 1007, 1016):
        text = array_out(rand_array(rng, lambda: str(rng.randint(-99999, 99999))))
    elif oid in (1231, 16406):
        text = array_out(rand_array(rng, lambda: rng.choice(["NaN", "Infinity", "-Infinity", rand_numeric(rng)])))
    elif oid in (1021, 1022):
        text = array_out(rand_array(rng, lambda: rng.choice(["NaN", "Infinity", "-Infinity", rand_float(rng)])))
    elif oid == 1000:
        text = array_out(rand_array(rng, lambda: rand_bool_text(rng)))
    elif oid in (1115, 1185):
        text = array_out(rand_array(rng, lambda: rand_timestamp(rng, oid == 1185)))
    elif oid == 1182:
        text = array_out(rand_array(rng, lambda: rng.choice(["2024-02-29", "0044-03-15 BC", "infinity"])))
    elif oid == 1001:
        text = array_out(rand_array(rng, lambda: "\\x" + rng.randbytes(3).hex()))
    elif oid == 3807:
        text = array_out(rand_array(rng, lambda: jsonb_out(rand_json_value(rng, 2))))
    elif oid == 16403:
        text = array_out(rand_array(rng, lambda: "(1," + rng.choice(['"a b"', "x", ""]) + ")"))
    elif oid == 1020:
        text = array_out(rand_array(rng, lambda: "(1,2),(0,0)", 1), ";")
    elif oid in (22, 30):  # int2vector, oidvector: elements separated by spaces, no braces
        text = rand_vector(rng, oid)
    elif oid in (1006, 1013):
        text = array_out(rand_array(rng, lambda: rand_vector(rng, 22 if oid == 1006 else 30), 1))
    else:  # pragma: no cover - every OID in TYPES is handled
        raise AssertionError(oid)
    if rng.random() < 0.1 and oid in (1009, 1007, 1231, 1000):
        text = array_out([])
    if rng.random() < 0.03 and oid in (1007, 1009):
        text = "[0:1]=" + array_out([array_item("1"), array_item("2")])  # explicit lower bounds
    if rng.random() < 0.03 and oid in (1007, 1009):
        text = "[-2:-1][1:1]=" + array_out([[array_item("1")], [array_item(None)]])
    return escape_json(text)


TYPES = [16, 20, 21, 23, 26, 700, 701, 1700, 25, 1043, 1042, 19, 2950, 1082, 1114, 1184, 1083, 1266, 1186, 114, 3802, 17,
         16400, 16402, 16404, 16405, 1009, 1015, 1014, 16401, 1005, 1007, 1016, 1231, 16406, 1021, 1022, 1000, 1115, 1185,
         1182, 1001, 3807, 16403, 1020, 22, 30, 1006, 1013]


def rand_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        odd = rng.random() < 0.05  # a name wal2json escapes: the pure path's
        name = rng.choice(['we"ird', "back\\slash", "tab\tname"] if odd else
                          ["id", "a", "c_text", "Ünïcödé", "with space", "日本", "\U0001f600", "x" * 63, "NULL", "a,b", "é" * 31,
                           "\x7f\u2028\ufeff", _TO_ESCAPE.sub("", rand_text(rng, 8)) or "e"])
        name += "" if rng.random() < 0.7 else str(rng.randint(0, 99))
        if name not in taken:
            taken.add(name)
            return name


def column(name: str, oid: int, value: str, typed: bool = False) -> str:
    """A column object as the poller's options (include-types 0) make wal2json write it; typed:
    with the type's name too, as without that option."""
    kind = '"type":"t",' if typed else ""
    return f'{{"name":{escape_json(name)},{kind}"typeoid":{oid},"value":{value}}}'


def key(name: str, oid: int = 23, typed: bool = False) -> str:
    kind = ',"type":"t"' if typed else ""
    return f'{{"name":{escape_json(name)}{kind},"typeoid":{oid}}}'


def change_row(action: str, columns: list[str] | None = None, identity: list[str] | None = None, pk: list[str] | None = None,
               head: str = '"xid":1,"lsn":"0/A","schema":"s","table":"t"') -> bytes:
    """A change row of these column and key objects (None: the member left out)."""
    parts = [f'{{"action":"{action}",{head}']
    for member, items in (("columns", columns), ("identity", identity), ("pk", pk)):
        if items is not None:
            parts.append(f',"{member}":[' + ",".join(items) + "]")
    return ("".join(parts) + "}").encode()


def rand_row(rng: random.Random) -> bytes:
    """One INSERT, UPDATE or DELETE row, as wal2json writes it with the poller's options."""
    taken: set[str] = set()
    cols = [(rand_name(rng, taken), rng.choice(TYPES)) for _ in range(rng.choice([1, 2, 3, 5, 8, 20]))]
    key_count = rng.choice([0, 1, 1, 1, 2, 3])
    keys = [c for c in cols if c[1] in (20, 23, 25, 2950, 1184, 1700)][:key_count]
    action = rng.choice("IUUDD")

    def value(oid: int) -> str:
        return "null" if rng.random() < 0.15 else rand_value(rng, oid)

    new = [(n, o, value(o)) for n, o in cols]
    identity: list[tuple[str, int, str]] | None = None
    shape = rng.random()
    if action == "U":
        if shape < 0.4:  # REPLICA IDENTITY FULL: the old row, and TOASTed unchanged columns left out of the new one
            identity = [(n, o, value(o)) for n, o in cols]
            new = [c for c in new if rng.random() < 0.8]
        elif shape < 0.7 and keys:  # the key changed: the old key
            identity = [(n, o, value(o)) for n, o in keys]
        elif shape < 0.85:  # TOASTed unchanged columns without the old row: simply absent
            new = [c for c in new if rng.random() < 0.8]
    if action == "D":
        if shape < 0.4 and keys:
            identity = [(n, o, v) for n, o, v in new if (n, o) in keys]
        elif shape < 0.8:
            identity = new
        else:
            identity = []  # REPLICA IDENTITY NOTHING
        new = []
    schema = escape_json(rng.choice(["public", "s", "Ünï"] * 5 + ['we"ird', "back\\slash"]))
    table = escape_json(rng.choice(["t", "todos", "with space", "日本", "\U0001f600"] * 4 + ['q"t']))
    head = (f'"xid":{rng.randint(1, 2**32 - 1)},"timestamp":"2026-12-03 13:58:24.711408+00",'
            f'"lsn":"{rng.randint(0, 0xFFFFFFFF):X}/{rng.randint(0, 0xFFFFFFFF):X}","schema":{schema},"table":{table}')
    typed = rng.random() < 0.3
    return change_row(action, None if action == "D" else [column(*c, typed=typed) for c in new],
                      None if identity is None else [column(*c, typed=typed) for c in identity],
                      [key(n, o, typed) for n, o in keys] if rng.random() < 0.9 else None, head)


# -- the comparison ---------------------------------------------------------------------------

BEGIN = parse_row('{"action":"B","xid":7,"timestamp":"2026-11-26 10:15:27+00","lsn":"0/1","nextlsn":"0/2"}')


def key_order(schema: str, table: str, names: list[str]) -> list[str]:
    return list(reversed(names))


class Paths:
    """The pure and the compiled conversion, each with its own registry (as two pollers)."""

    def __init__(self) -> None:
        self.pure_types, compiled_types = registry(), registry()
        self.convert = fast_converter(compiled_types)
        assert self.convert is not None
        self.pure_state = TransactionState("1/db", "db", self.pure_types, BEGIN, 1000, key_order)
        self.compiled_state = TransactionState("1/db", "db", compiled_types, BEGIN, 1000, key_order)
        self.lines = fast_lines(self.convert)
        self.runs_state = TransactionState("1/db", "db", compiled_types, BEGIN, 1000, key_order)  # take_lines's
        self.taken = 0
        self.lenient = 0  # broken rows the compiled path took anyway

    def check(self, data: bytes, strict: bool = True) -> None:
        try:
            change = parse_row(data)
            expected = self.pure_state.on_change(change) if isinstance(change, Change) else None
        except Exception as error:
            try:
                converted = self.convert(data)
            except Exception as compiled_error:
                # The compiled path's own error: the same class for a row wal2json can write; for a
                # broken one (a bad escape inside a value, which the compiled path does not read but
                # hands to value_json) a ValueError as the pure path's (msgspec.DecodeError is one).
                assert type(compiled_error) is type(error) or (
                    not strict and isinstance(compiled_error, ValueError) and isinstance(error, ValueError)), data
                return
            if converted is None or strict:
                with pytest.raises(type(error)):
                    self.compiled_state.on_change(converted or parse_row(data))  # type: ignore[arg-type]
            else:
                self.lenient += 1
            return
        if not isinstance(change, Change):
            assert self.convert(data) is None, data
            return
        converted = self.convert(data)
        self.taken += converted is not None
        got = self.compiled_state.on_change(converted or parse_row(data))  # type: ignore[arg-type]
        assert expected is not None and got is not None
        assert got.copy_line(b"tail\n") == expected.copy_line(b"tail\n"), data
        assert got.ambiguous == expected.ambiguous, data
        # The same row in a run (the poller's batch loop): the whole line, or not taken at all.
        out, table = bytearray(b"before\n"), (change.schema, change.table)
        end, ambiguous = self.runs_state.take_lines(self.lines, [(data,)], 0, table, table, b"tail\n", out, 5, 1 << 30)
        if converted is None:
            assert (end, out) == (0, b"before\n"), data
            self.runs_state.on_change(parse_row(data))  # type: ignore[arg-type]
        else:
            assert (end, bytes(out), ambiguous) == (1, b"before\n" + expected.copy_line(b"tail\n"), expected.ambiguous), data


@pytest.mark.parametrize("seed", range(5))
def test_random_rows_convert_alike(seed):
    rng = random.Random(seed)
    paths = Paths()
    for _ in range(1500):
        paths.check(rand_row(rng))
    assert paths.taken > 600  # most rows take the compiled path: it is what is tested here


def test_each_type_alone_convert_alike():
    """Every type, many values, one column (and as the key where it can be one)."""
    rng = random.Random(99)
    paths = Paths()
    for oid in TYPES:
        for _ in range(150):
            v = rand_value(rng, oid)
            paths.check(change_row("I", [column("c", oid, v)], pk=[]))
            paths.check(change_row("D", identity=[column("k", oid, v)], pk=[key("k", oid)]))


def test_very_long_values():
    rng = random.Random(5)
    paths = Paths()
    big = rand_text(rng, 3000) * 400  # > 1 MB of UTF-8
    assert len(big.encode()) > 1_000_000
    for oid, text in [(25, big), (3802, jsonb_out({"k": big, "l": [big]})), (1009, array_out([big[:20_000], None, big[-20_000:]])),
                      (114, json.dumps(big)), (17, "\\x" + "ab" * 600_000)]:
        paths.check(change_row("U", [column("k", 25, escape_json(big[:5000])), column("v", oid, escape_json(text))],
                               [column("k", 25, escape_json(big[:4999]))], [key("k", 25)]))


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A row cut, or with a byte changed, dropped or doubled: what no wal2json writes."""
    at = rng.randrange(len(data))
    r = rng.random()
    if r < 0.25:
        return data[:at]
    if r < 0.5:
        return data[:at] + data[at + 1:]
    if r < 0.75:
        return data[:at] + data[at:at + 1] * 2 + data[at + 1:]
    return data[:at] + bytes([rng.choice(b'"\\{}[],:0 nu\x00\xff')]) + data[at + 1:]


def test_broken_rows_fail_alike():
    """A row that is not wal2json's: never a crash; the compiled path refuses it (the pure one
    then raises its error) or, where it reads past what it does not need, gives what pure gives."""
    rng = random.Random(7)
    paths = Paths()
    for _ in range(3000):
        paths.check(mutate(rng, rand_row(rng)), strict=False)


@pytest.mark.parametrize("bad", [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"])
@pytest.mark.parametrize("where", ["schema", "table", "column", "pk"])
@pytest.mark.parametrize("kind", [b"", b'"type":"t",'])
def test_names_not_utf8_are_refused_alike(bad, where, kind):
    """wal2json writes a SQL_ASCII database's bytes as they are: a name that is not UTF-8 is the
    pure path's error (msgspec.DecodeError), not a row (a column name) or a UnicodeDecodeError."""
    schema, table, name, key_name = (b'"n' + bad + b'"' if where == w else b'"n"' for w in ("schema", "table", "column", "pk"))
    Paths().check(b'{"action":"I","xid":1,"lsn":"0/A","schema":' + schema + b',"table":' + table + b',"columns":[{"name":' + name
                  + b"," + kind + b'"typeoid":23,"value":1}],"pk":[{"name":' + key_name + b',"typeoid":23}]}')


@pytest.mark.parametrize("count", [127, 128, 129, 1600])
def test_wide_rows(count):
    """Up to MAX_COLUMNS (128) columns the compiled path's, past it the pure one's: the same line."""
    rng = random.Random(count)
    paths = Paths()
    plain = [16, 20, 23, 25, 1700, 1184, 3802, 1082, 2950, 17]  # values the compiled path always takes
    columns = [column(f"c{i}", oid, rand_value(rng, oid)) for i, oid in enumerate(rng.choice(plain) for _ in range(count))]
    paths.check(change_row("I", columns, pk=[]))
    paths.check(change_row("U", columns[:10], columns, pk=[key("c0")]))
    paths.check(change_row("U", columns, columns[:count // 2], pk=[key("c0")]))
    assert paths.taken == (3 if count <= 128 else 0)


@pytest.mark.parametrize("depth", [6, 7, 100_000])
def test_deep_arrays(depth):
    """Six dimensions at most in PostgreSQL; a row nesting deeper (none does) is the pure path's,
    which raises RecursionError when it is very deep: the compiled one overflowed its C stack."""
    Paths().check(change_row("I", [column("a", 1009, escape_json("{" * depth + "}" * depth))], pk=[]), strict=depth < 1000)


def test_bad_arguments_raise():
    """Misuse raises its own error (never a SystemError, never a crash); a code it does not know
    hands the row back."""
    from bemi_pg._fastrow import convert
    from bemi_pg.wal2json import TypeInfo, value_json

    row = change_row("I", [column("c", 23, "1")], pk=[])

    def refuse(oid: int) -> Any:
        raise KeyError(oid)

    with pytest.raises(TypeError):
        convert({}, refuse, value_json, row.decode())  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        convert({}, refuse, value_json, row)
    with pytest.raises(OverflowError):
        convert({}, lambda oid: 2**70, value_json, row)
    with pytest.raises(TypeError):
        convert({}, lambda oid: TypeInfo("string"), lambda info, raw: "not bytes", row)
    assert convert({}, lambda oid: 99, value_json, row) is None


def test_references_are_not_leaked():
    """Converted, refused and failing rows leave every object's reference count as it was."""
    import sys

    rng = random.Random(13)
    rows = [rand_row(rng) for _ in range(60)] + [mutate(rng, rand_row(rng)) for _ in range(60)]
    rows.append(change_row("I", [column("o", 26, "4000000000"), column("b", 17, '"\\\\xdead"')], pk=[key("o", 26)]))
    convert = fast_converter(registry())
    assert convert is not None

    def run() -> None:
        for data in rows:
            try:
                convert(data)
            except Exception:  # noqa: S110 - a broken row's error is test_broken_rows_fail_alike's business
                pass

    run()  # codes and the C caches filled
    codes, plan, value_json = convert.args  # type: ignore[attr-defined]
    watched = [*rows, codes, plan, value_json, *(c for c in codes.values() if not isinstance(c, int))]  # None and ints: shared
    before = [sys.getrefcount(o) for o in watched]
    for _ in range(50):
        run()
    assert [sys.getrefcount(o) for o in watched] == before
