"""Pure parsing of test_decoding rows, to recover what wal2json writes as null.

wal2json 2.5 outputs NaN and ±Infinity in float and numeric columns as JSON ``null``.
test_decoding keeps every value's text, so the poller decodes the same range again with
test_decoding (only for batches that hold such an ambiguous null) and patches those values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TDChange", "parse_change", "SPECIALS"]

SPECIALS = frozenset({"NaN", "Infinity", "-Infinity"})


@dataclass
class TDChange:
    relations: list[tuple[str, str]]
    action: str  # INSERT, UPDATE, DELETE, TRUNCATE
    old: dict[str, str | None] = field(default_factory=dict)  # name -> bare token or quoted text
    new: dict[str, str | None] = field(default_factory=dict)


def _quoted(text: str, pos: int, quote: str) -> tuple[str, int]:
    """Read a quoted token starting at ``pos`` (a doubled quote stands for one)."""
    out = []
    pos += 1
    while True:
        ch = text[pos]
        if ch == quote:
            if text[pos + 1 : pos + 2] == quote:
                out.append(quote)
                pos += 2
                continue
            return "".join(out), pos + 1
        out.append(ch)
        pos += 1


def _ident(text: str, pos: int) -> tuple[str, int]:
    if text[pos] == '"':
        return _quoted(text, pos, '"')
    start = pos
    while text[pos] not in ".,:[ ":
        pos += 1
    return text[start:pos], pos


def parse_change(line: str) -> TDChange | None:
    """Parse ``table s.t: ACTION: cols...``; None for BEGIN, COMMIT and messages."""
    if not line.startswith("table "):
        return None
    pos = 6
    relations = []
    while True:
        schema, pos = _ident(line, pos)
        assert line[pos] == "."
        table, pos = _ident(line, pos + 1)
        relations.append((schema, table))
        if line[pos] == ",":
            pos += 2
            continue
        break
    assert line[pos : pos + 2] == ": "
    pos += 2
    colon = line.index(":", pos)
    change = TDChange(relations, line[pos:colon])
    pos = colon + 2
    target = change.new if change.action in ("INSERT", "UPDATE") else change.old
    n = len(line)
    while pos < n:
        if line.startswith("old-key: ", pos):
            target = change.old
            pos += 9
            continue
        if line.startswith("new-tuple: ", pos):
            target = change.new
            pos += 11
            continue
        if line.startswith("(no-", pos):
            break
        name, pos = _ident(line, pos)
        end = line.index("]:", pos)  # type names may hold '[]' but never ']:'
        pos = end + 2
        if pos < n and line[pos] == "'":
            _, pos = _quoted(line, pos, "'")
            target[name] = None  # a quoted value is never a bare NaN/Infinity special
        else:
            space = line.find(" ", pos)
            space = n if space < 0 else space
            target[name] = line[pos:space]
            pos = space
        pos += 1  # the space between columns
    return change
