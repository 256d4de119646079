from __future__ import annotations

import json

import pytest

from bemi_pg.specials import parse_change
from bemi_pg.stitch import TransactionState, change_id, context_json, final_comment
from bemi_pg.wal2json import (
    Begin,
    Change,
    TypeInfo,
    TypeRegistry,
    fast_converter,
    format_lsn,
    parse_array,
    parse_lsn,
    parse_row,
    value_json,
)

TYPES = TypeRegistry()


def test_lsn_roundtrip():
    assert parse_lsn("16/B374D848") == 0x16B374D848
    assert format_lsn(parse_lsn("0/151FEA0")) == "0/151FEA0"


@pytest.mark.parametrize("oid, raw, expected", [
    (20, '9007199254740993', '9007199254740993'),
    (1700, '123456789012345678901234567890.123456789', '123456789012345678901234567890.123456789'),
    (701, '1e+300', '1e+300'),
    (16, 'true', 'true'),
    (25, '"q\\"\\\\x"', '"q\\"\\\\x"'),
    (1184, '"2024-01-02 03:04:05.5+00"', '"2024-01-02T03:04:05.5+00:00"'),
    (1184, '"0044-03-15 10:00:01.5+00 BC"', '"0044-03-15T10:00:01.5+00:00 BC"'),
    (1114, '"2024-01-02 03:04:05"', '"2024-01-02T03:04:05"'),
    (1114, '"infinity"', '"infinity"'),
    (1082, '"-infinity"', '"-infinity"'),
    (17, '"deadbeef"', '"\\\\xdeadbeef"'),
    (3802, '"{\\"a\\": [1, 2]}"', '{"a": [1, 2]}'),
    (1009, '"{a,NULL,\\"b\\\\\\"c\\"}"', '["a", null, "b\\"c"]'),
    (1007, '"{{1,2},{3,4}}"', '[[1, 2], [3, 4]]'),
    (1231, '"{NaN,1.5}"', '["NaN", 1.5]'),
    (1115, '"{\\"2024-01-01 00:00:00\\"}"', '["2024-01-01T00:00:00"]'),
    (1000, '"{t,f}"', '[true, false]'),
    (22, '"1 2 -3"', '[1, 2, -3]'),  # int2vector and oidvector: no braces, spaces between
    (30, '"4 5"', '["4", "5"]'),
    (30, '""', '[]'),
    (1006, '"{\\"1 2\\",3}"', '[[1, 2], [3]]'),
    (1013, '"{\\"\\",7}"', '[[], ["7"]]'),
    (1007, '"[2:3]={1,2}"', '[1, 2]'),
    (1007, '"[1:2][0:0]={{1},{2}}"', '[[1], [2]]'),
    (1009, '"[0:1]={\\"a=b\\",NULL}"', '["a=b", null]'),
])
def test_value_json_matches_to_jsonb(oid, raw, expected):
    row = json.dumps({"action": "I", "xid": 1, "lsn": "0/1", "schema": "s", "table": "t",
                      "columns": [{"name": "c", "typeoid": oid, "value": json.loads(raw)}]}).replace(json.dumps(json.loads(raw)), raw)
    change = parse_row(row)
    assert isinstance(change, Change)
    assert value_json(TYPES[oid], bytes(change.columns[0].value)) == expected.encode()
    # The poller's path: wal2json's own text where it is already to_jsonb's, value_json otherwise.
    begin = parse_row('{"action":"B","xid":1,"timestamp":"2026-11-26 10:15:27+00","lsn":"0/1","nextlsn":"0/2"}')
    state = TransactionState("1/db", "db", TYPES, begin, 1000)
    assert json.loads(state.on_change(change).after) == {"c": json.loads(expected)}
    assert state.on_change(change).after == b'{"c":' + expected.encode() + b"}"
    # The compiled path, where built, gives the same bytes.
    convert = fast_converter(TypeRegistry())
    if convert is not None:
        data = '{"action":"I","xid":1,"lsn":"0/1","schema":"s","table":"t","columns":[{"name":"c","typeoid":%d,"value":%s}]}'
        converted = convert((data % (oid, raw)).encode())
        assert converted is not None and converted.fields == b'\\N\t{}\t{"c":' + expected.encode().replace(b"\\", b"\\\\") + b"}"


def test_array_parsing_edge_cases():
    assert parse_array("{}") == []
    assert parse_array("[0:1]={1,2}") == ["1", "2"]
    assert parse_array('{"",NULL,"NULL"}') == ["", None, "NULL"]
    assert parse_array("{(1,2);(3,4)}", ";") == ["(1,2)", "(3,4)"]
    assert parse_array("{\u00a0x,y\u2028}") == ["\u00a0x", "y\u2028"]  # array_out quotes only ASCII spaces
    assert parse_array("1 2 -3") == ["1", "2", "-3"] and parse_array("") == []  # int2vector, oidvector
    assert parse_array('{"1 2",3}') == ["1 2", "3"]


@pytest.mark.parametrize("oid, text, expected", [
    (1007, "{1,2", None), (1007, "{1,2}}", None), (1007, "[1:2]", None), (1007, "[1:2]=1", None), (1009, '{"a}', None),
    (1009, "x", None), (22, "1 x", None), (1006, "{1 x}", '["1 x"]'), (1007, "{1 2}", '["1 2"]'),
])
def test_text_no_array_type_writes_is_kept_as_text(oid, text, expected):
    """A value a converter cannot read as an array falls back to its text (here: the element's) on
    both paths, never failing the batch (the pure path used to raise AssertionError or IndexError)."""
    raw = json.dumps(text).encode()
    if expected is None:
        with pytest.raises(ValueError):
            parse_array(text)
    expected_json = raw if expected is None else expected.encode()
    assert value_json(TYPES[oid], raw) == expected_json
    data = b'{"action":"I","xid":1,"lsn":"0/1","schema":"s","table":"t","columns":[{"name":"c","typeoid":%d,"value":%s}]}'
    begin = parse_row('{"action":"B","xid":1,"timestamp":"2026-11-26 10:15:27+00","lsn":"0/1","nextlsn":"0/2"}')
    pure = TransactionState("1/db", "db", TYPES, begin, 1000).on_change(parse_row(data % (oid, raw)))
    assert pure is not None and pure.after == b'{"c":' + expected_json + b"}"
    convert = fast_converter(TypeRegistry())
    if convert is not None:
        state = TransactionState("1/db", "db", TYPES, begin, 1000)
        converted = state.on_change(convert(data % (oid, raw)) or parse_row(data % (oid, raw)))
        assert converted is not None and converted.copy_line(b"t\n") == pure.copy_line(b"t\n")


def test_unknown_types_are_looked_up():
    rows = {16500: (16500, "e", "E", 0, ",", 0), 16501: (16501, "b", "A", 16500, ",", 0), 16502: (16502, "d", "N", 0, ",", 1700)}
    registry = TypeRegistry(lambda oids: [rows[o] for o in oids if o in rows])
    assert registry[16500] == TypeInfo("string")
    assert registry[16501].kind == "array"
    assert registry[16502].kind == "number"


def test_begin_and_change_rows():
    begin = parse_row('{"action":"B","xid":738,"timestamp":"2026-11-26 10:15:27+00","lsn":"0/151FE70","nextlsn":"0/151FEA0"}')
    assert isinstance(begin, Begin) and begin.commit_lsn == 0x151FE70 and begin.end_lsn == 0x151FEA0
    change = parse_row('{"action":"T","xid":740,"lsn":"0/1520B78","schema":"public","table":"t"}')
    assert isinstance(change, Change) and change.action == "T" and change.columns is None


def test_change_ids_are_version_8_uuids_in_wal_order():
    import uuid

    positions = [0, 1, 0xF, 0x10, 0xFFFF, 0x10000, 0x151FE70, 2**40 + 5, 2**63 + 7, 2**64 - 1]
    keys = [(p, seq) for p in positions for seq in (0, 1, 2**26, 2**31 - 1)]
    ids = [uuid.UUID(int=change_id("app", p, seq)) for p, seq in keys]
    assert {(u.version, u.variant) for u in ids} == {(8, uuid.RFC_4122)}
    assert sorted(ids, key=lambda u: u.bytes) == ids  # PostgreSQL orders uuids by their bytes
    # The position and seq come back out of the id, so no two changes of a database share one.
    for (p, seq), u in zip(keys, ids, strict=True):
        n = u.int
        assert (n >> 80 << 16 | (n >> 64 & 0xFFF) << 4 | n >> 58 & 0xF, n >> 26 & 0xFFFF_FFFF) == (p, seq)
    assert change_id("app", 0x151FE70, 3) != change_id("app_staging", 0x151FE70, 3)


def test_a_domain_over_a_number_is_converted():
    """wal2json quotes a domain's values (it goes by type OID): the poller must not pass them through."""
    types = TypeRegistry(lambda oids: [(16600, "d", "N", 0, ",", 0 if o != 16600 else 1700) for o in oids])
    begin = parse_row('{"action":"B","xid":1,"timestamp":"2026-11-26 10:15:27+00","lsn":"0/1","nextlsn":"0/2"}')
    change = parse_row('{"action":"I","xid":1,"lsn":"0/1","schema":"s","table":"t",'
                       '"columns":[{"name":"n","typeoid":16600,"value":"1.50"},{"name":"m","typeoid":16600,"value":null}],'
                       '"pk":[{"name":"n"}]}')
    row = TransactionState("1/db", "db", types, begin, 1000).on_change(change)
    assert row.after == b'{"n":1.50,"m":null}' and row.primary_key == "1.50" and row.ambiguous


def _message(session=None, local=None, query=None, request=None, database=None, truncated=None):
    return json.dumps([session, local, query, request, database, truncated])


@pytest.mark.parametrize("message, expected", [
    ("", {}),
    (_message(session='{"a": 1}'), {"a": 1}),
    (_message(session='{"a": 1, "b": 1}', local='{"b": 2}', query='UPDATE t SET x = 1 /*Bemi {"c": 3} Bemi*/;'),
     {"a": 1, "b": 2, "c": 3}),
    (_message(query='UPDATE t SET x = 1 /*Bemi %7B%22u%22%3A%20%22a%40b%22%7D Bemi*/'), {"u": "a@b"}),
    (_message(query='UPDATE t SET x = 1 /*Bemi {"u": "50%25 @ 100%"} Bemi*/'), {"u": "50%25 @ 100%"}),
    # A string literal or an earlier comment never counts; nor does the SQL key inside the comment.
    (_message(query="INSERT INTO t VALUES ('/*Bemi {\"user\": \"admin\"} Bemi*/')"), {}),
    (_message(query="INSERT INTO t VALUES ('/*Bemi {\"user\": \"admin\"} Bemi*/') "
                    '/*Bemi {"user": "me", "SQL": "INSERT /*Bemi {} Bemi*/"} Bemi*/'),
     {"user": "me", "SQL": "INSERT /*Bemi {} Bemi*/"}),
    (_message(query='/*Bemi {"early": 1} Bemi*/ UPDATE t SET x = 1'), {}),
    (_message(query="UPDATE t SET x = 'é' /*Bemi {\"u\": \"é\"} Bemi*/"), {"u": "é"}),
    (_message(request=["POST", "/todos", '{"sub": "u1", "role": "authenticated", "exp": 1}',
                       '{"x-bemi-context": "{\\"tenant\\": 7}", "accept": "*/*"}'], session='{"role": "app"}'),
     {"method": "POST", "path": "/todos", "sub": "u1", "role": "app", "tenant": 7}),
    (_message(database=["alice", "psql", "10.0.0.1"]), {"session_user": "alice", "application_name": "psql", "client_addr": "10.0.0.1"}),
    (_message(local='{"a": 1}', database=["alice", "psql", None]), {"a": 1}),
    (_message(local='{"n": 1.000000000000000000001}'), {"n": 1.000000000000000000001}),
])
def test_context_merge(message, expected):
    assert json.loads(context_json(message)) == expected


def test_context_keeps_the_application_text_exactly():
    assert context_json(_message(local='{"n": 1.000000000000000000001}')) == '{"n": 1.000000000000000000001}'


def test_database_keys_always_and_never():
    message = _message(local='{"a": 1}', database=["alice", "", None])
    assert json.loads(context_json(message, database_keys="always")) == {"session_user": "alice", "a": 1}
    assert json.loads(context_json(_message(database=["alice", "", None]), database_keys="never")) == {}


@pytest.mark.parametrize("message, error", [
    (_message(session="not json"), "not valid JSON"),
    (_message(query="SELECT 1 /*Bemi [1, 2] Bemi*/"), "not an object"),
    (_message(local='"x"'), "not an object"),
    (_message(request=["GET", "/", "not json", None]), "not valid JSON"),
])
def test_bad_context_is_marked(message, error):
    ctx = json.loads(context_json(message))
    assert error in ctx["_bemi_error"][0]["error"]


def test_oversized_context_is_marked():
    big = _message(local=json.dumps({"x": "y" * 2000}))
    ctx = json.loads(context_json(big, 1000))
    assert "over 1000 bytes" in ctx["_bemi_error"][0]["error"]


def test_final_comment_of_a_truncated_query():
    assert final_comment('...tail of a query\' /*Bemi {"a": 1} Bemi*/ ;', truncated=True) == ' {"a": 1} '


def test_test_decoding_rows():
    line = ("table public.\"we\"\"ird\": UPDATE: old-key: id[bigint]:1 n[numeric]:NaN t[text]:'it''s' "
            "new-tuple: id[bigint]:1 n[numeric]:-Infinity a[integer[]]:'{1,2}' t[text]:'x y'")
    change = parse_change(line)
    assert change.relations == [("public", 'we"ird')] and change.action == "UPDATE"
    assert change.old["n"] == "NaN" and change.new["n"] == "-Infinity" and change.new["t"] is None
    trunc = parse_change("table public.a, s.b: TRUNCATE: (no-flags)")
    assert trunc.relations == [("public", "a"), ("s", "b")]
    assert parse_change("BEGIN 12") is None


def _row(action, columns, identity=None, pk=()):
    """A wal2json change row; columns are (name, type oid, raw JSON value)."""
    def listed(cols):
        return ",".join('{"name":"' + n + '","type":"x","typeoid":' + str(oid) + ',"value":' + raw + "}" for n, oid, raw in cols)
    identity_part = ',"identity":[' + listed(identity) + "]" if identity is not None else ""
    keys = ",".join('{"name":"' + k + '","type":"x","typeoid":23}' for k in pk)
    return ('{"action":"' + action + '","xid":7,"lsn":"1/A0","schema":"s","table":"t","columns":[' + listed(columns) + "]"
            + identity_part + ',"pk":[' + keys + "]}")


@pytest.mark.parametrize("row", [
    # an UPDATE whose new row leaves out an unchanged TOASTed column: after takes it from identity
    _row("U", [("id", 23, "1"), ("n", 1700, "null")], [("id", 23, "1"), ("big", 25, '"x\\ty"'), ("n", 1700, "2.50")], ["id"]),
    # a DELETE with the old row in columns (no identity), a text key with escapes
    _row("D", [("k", 25, '"a\\"b\\\\c\\u00e9"'), ("ts", 1184, '"2024-01-01 00:00:00-08"'), ("d", 3802, '"{\\"a\\": \\"\\\\n\\"}"')],
         pk=["k"]),
    # a keyless INSERT; arrays and timestamps of every zone form
    _row("I", [("a", 1009, '"{\\"x y\\",NULL,\\"q\\\\\\\\\\\\\\"\\",\\u00e9}"'), ("b", 1000, '"{{t},{f}}"'),
               ("c", 1231, '"{1.50,NaN}"'), ("t1", 1184, '"0044-03-15 10:00:00+05:30 BC"'), ("t2", 1184, '"infinity"'),
               ("t3", 1114, '"2024-01-01 00:00:00"'), ("e", 1185, '"{\\"2024-01-01 00:00:00+00\\"}"'), ("f", 17, '"\\\\xdead"')]),
    # a null key, a real whose null may be NaN
    _row("I", [("id", 23, "null"), ("r", 700, "null")], pk=["id"]),
])
@pytest.mark.parametrize("typed", [False, True], ids=["poller's options", "with type names"])
def test_compiled_conversion_gives_the_pure_copy_line(row, typed):
    row = row if typed else row.replace('"type":"x",', "")  # the poller decodes with include-types 0
    convert = fast_converter(TypeRegistry())
    if convert is None:
        pytest.skip("bemi_pg._fastrow is not built")
    begin = parse_row('{"action":"B","xid":7,"timestamp":"2026-11-26 10:15:27+00","lsn":"0/1","nextlsn":"0/2"}')
    pure, compiled = (TransactionState("1/db", "db", TypeRegistry(), begin, 1000) for _ in range(2))
    converted = convert(row.encode())
    assert converted is not None
    expected, got = pure.on_change(parse_row(row)), compiled.on_change(converted)
    assert got.copy_line(b"tail\n") == expected.copy_line(b"tail\n")
    assert got.ambiguous == expected.ambiguous
