"""Runtime SQL, kept in ``sql/queries.sql`` as named blocks and looked up by name."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

__all__ = ["query"]


@cache
def _load() -> dict[str, str]:
    text = resources.files(__package__).joinpath("sql", "queries.sql").read_text(encoding="utf-8")
    blocks: dict[str, str] = {}
    for match in re.finditer(r"^-- name: (\w+)\n(.*?)(?=^-- name: |\Z)", text, re.S | re.M):
        if match.group(1) in blocks:
            raise AssertionError(f"sql/queries.sql names two queries {match.group(1)}")
        blocks[match.group(1)] = match.group(2).strip()
    return blocks


def query(name: str) -> str:
    """The SQL of the named block."""
    return _load()[name]
