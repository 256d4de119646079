"""bemi-pg: a self-hosted, Postgres-native audit trail (Bemi-compatible ``changes`` table)."""

from __future__ import annotations

__version__ = "0.4.0"

from .context import annotate, current_context, set_context, sql_comment, transaction, use_context  # noqa: E402
from .timetravel import as_of, as_of_all, blame, history  # noqa: E402

__all__ = [
    "__version__", "annotate", "as_of", "as_of_all", "blame", "current_context", "history", "set_context",
    "sql_comment", "transaction", "use_context",
]
