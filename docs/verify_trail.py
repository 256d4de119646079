"""Re-check a bemi-pg trail with none of bemi-pg's code: recompute every change's hash and every
seal's hash from the stored rows, as README "A sealed trail" defines them.

    python docs/verify_trail.py DSN SOURCE [CHANGES_TABLE]

Prints ``intact <changes> <head hash>`` and exits 0, or one line per problem and exits 6.
Needs only psycopg (3). SOURCE is `bemi-pg status`'s ``source``."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from datetime import UTC, datetime

import psycopg
from psycopg import sql

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
UUID, TEXT, JSONB, TIMESTAMPTZ, INT8, INT4 = 2950, 25, 3802, 1184, 20, 23
COLUMNS = [("id", UUID), ("source", TEXT), ("database", TEXT), ("schema", TEXT), ("table", TEXT), ("primary_key", TEXT),
           ("operation", TEXT), ("before", JSONB), ("after", JSONB), ("context", JSONB), ("committed_at", TIMESTAMPTZ),
           ("queued_at", TIMESTAMPTZ), ("created_at", TIMESTAMPTZ), ("transaction_id", INT8), ("position", INT8),
           ("commit_position", INT8), ("seq", INT4)]


def field(oid: int, value: object) -> bytes:
    """One column as PostgreSQL's binary format of a row writes it: type OID, length, bytes."""
    if value is None:
        return struct.pack(">Ii", oid, -1)
    if oid == UUID:
        data = value.bytes  # type: ignore[attr-defined]
    elif oid == TEXT:
        data = str(value).encode()
    elif oid == JSONB:  # version 1, then jsonb's own text (fetched with ::text)
        data = b"\x01" + str(value).encode()
    elif oid == TIMESTAMPTZ:
        delta = value - EPOCH  # type: ignore[operator]
        data = struct.pack(">q", (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds)
    else:
        data = struct.pack(">q" if oid == INT8 else ">i", value)
    return struct.pack(">Ii", oid, len(data)) + data


def change_hash(row: tuple[object, ...]) -> bytes:
    fields = b"".join(field(oid, v) for (_, oid), v in zip(COLUMNS, row, strict=True))
    return hashlib.sha256(struct.pack(">i", len(COLUMNS)) + fields).digest()


def seal_hash(seal: dict[str, object]) -> bytes:
    sealed_at = seal["sealed_at"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # type: ignore[attr-defined]
    fields = json.dumps([seal["source"], seal["seal_no"], seal["kind"], sealed_at, seal["from_position"],
                         seal["to_position"], seal["change_count"], seal["pruned"]], ensure_ascii=False)
    return hashlib.sha256((seal["prev_hash"] or b"") + b"".join(seal["change_hashes"]) + fields.encode()).digest()  # type: ignore[operator,arg-type]


def main(dsn: str, source: str, table: str = "changes") -> int:
    problems, count, head = [], 0, None
    columns = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(n)) if t == JSONB else sql.Identifier(n)
                                 for n, t in COLUMNS)
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        seals = cur.execute("SELECT source, seal_no, kind, sealed_at, from_position, to_position, change_count, change_ids, "
                            "change_hashes, pruned::text AS pruned, prev_hash, hash FROM bemi.seal WHERE source = %s "
                            "ORDER BY seal_no", (source,)).fetchall()
        resume = {json.loads(s["pruned"])["last_seal"]: bytes.fromhex(json.loads(s["pruned"])["resume_hash"])
                  for s in seals if s["kind"] == "prune"}
        for n, s in enumerate(seals):
            s["change_hashes"] = [bytes(h) for h in s["change_hashes"]]
            s["prev_hash"] = bytes(s["prev_hash"]) if s["prev_hash"] is not None else None
            if seal_hash(s) != bytes(s["hash"]):
                problems.append(f"seal {s['seal_no']} altered")
            before = bytes(seals[n - 1]["hash"]) if n else resume.get(s["seal_no"] - 1)
            if s["prev_hash"] != before:
                problems.append(f"seal {s['seal_no']} does not follow the seal before it")
            if s["kind"] != "changes":
                continue
            rows = conn.execute(sql.SQL("SELECT {} FROM {} WHERE source = %s AND commit_position BETWEEN %s AND %s "
                                        "ORDER BY commit_position, seq").format(columns, sql.Identifier(table)),
                                (source, s["from_position"], s["to_position"])).fetchall()
            if [(str(r[0]), change_hash(r)) for r in rows] != list(zip(map(str, s["change_ids"]), s["change_hashes"], strict=True)):
                listed = dict(zip(map(str, s["change_ids"]), s["change_hashes"], strict=True))
                wrong = [str(r[0]) for r in rows if listed.get(str(r[0])) != change_hash(r)]
                missing = set(listed) - {str(r[0]) for r in rows}
                problems.append(f"seal {s['seal_no']}: changes differ: {', '.join(wrong + sorted(missing)) or 'their order'}")
            count += len(rows)
        head = bytes(seals[-1]["hash"]).hex() if seals else None
    if problems:
        print("\n".join(problems))
        return 6
    print("intact", count, head)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
