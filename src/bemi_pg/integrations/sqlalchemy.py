"""SQLAlchemy: every transaction of an engine carries the current context.

::

    from bemi_pg.integrations.sqlalchemy import instrument
    instrument(engine)                      # once, at start-up
    with bemi_pg.use_context({"user_id": 42}):
        with Session(engine) as session, session.begin():
            ...                             # these changes carry {"user_id": 42}

The context is set with ``bemi.set_context`` when a transaction begins, so it is
transaction-local: safe behind pgbouncer in transaction mode.
"""

from __future__ import annotations

from typing import Any

from ..context import _payload, current_context, with_trace

__all__ = ["instrument"]


def instrument(engine: Any) -> None:
    """Set the current context at the start of each transaction on ``engine``."""
    from sqlalchemy import event

    def _bemi_begin(conn: Any) -> None:
        context = with_trace(current_context())
        if context:
            conn.exec_driver_sql("SELECT bemi.set_context(%(ctx)s::jsonb)", {"ctx": _payload(context)})

    event.listen(engine, "begin", _bemi_begin)
