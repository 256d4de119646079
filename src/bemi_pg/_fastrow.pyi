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
