"""Compiled conversion of wal2json change rows (_fastrow.c)."""

from collections.abc import Callable
from typing import Any

class Converted:
    """An INSERT, UPDATE or DELETE row converted: ``fields`` is its primary_key, before and after
    as ChangeRow.copy_line writes them (COPY text fields, tab-separated)."""

    action: str
    lsn: int
    schema: str
    table: str
    fields: bytes
    ambiguous: bool

def convert(codes: dict[int, Any], plan: Callable[[int], object], value_json: Callable[..., bytes],
            data: bytes, /) -> Converted | None: ...

def lines(codes: dict[int, Any], plan: Callable[[int], object], value_json: Callable[..., bytes], rows: list[Any], i: int,
          schema: str, table: str, prefix: bytes, seq: int, id_high: int, id_low: int, tail: bytes, out: bytearray,
          limit: int, limit_bytes: int,
          sealing: tuple[Callable[[bytes], Any], tuple[bytes, bytes, bytes], bytearray] | None, /) -> tuple[int, int, bool]: ...

def canonical(text: bytes, /) -> bytes | None:
    """jsonb's canonical text of a JSON text, or None where it cannot be sure."""
