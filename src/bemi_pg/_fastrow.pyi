"""Compiled conversion of wal2json change rows (_fastrow.c)."""

from collections.abc import Callable
from typing import Any

class Converted:
    """An INSERT, UPDATE or DELETE row converted: before/after as TransactionState writes them."""

    action: str
    lsn: int
    schema: str
    table: str
    before: bytes
    after: bytes
    primary_key: str | None
    ambiguous: bool

def convert(codes: dict[int, Any], plan: Callable[[int], object], value_json: Callable[..., bytes],
            data: bytes, /) -> Converted | None: ...
