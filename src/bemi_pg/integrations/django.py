"""Django: the context of each request on every write it makes.

In ``settings.py``::

    MIDDLEWARE = [..., "bemi_pg.integrations.django.BemiContextMiddleware"]
    BEMI_PG_CONTEXT = "myapp.audit.context"   # a function: request -> dict

Django runs in autocommit mode by default (each statement its own transaction), so the
context travels as a ``/*Bemi … Bemi*/`` comment appended to each INSERT, UPDATE and DELETE
(see :func:`bemi_pg.context.sql_comment`): it is statement-local and pooler-safe.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from ..context import annotate, use_context

__all__ = ["BemiContextMiddleware", "BemiExecuteWrapper"]

_WRITE = re.compile(r"\s*(INSERT|UPDATE|DELETE|MERGE)\s", re.IGNORECASE)


class BemiExecuteWrapper:
    """A ``connection.execute_wrapper`` that annotates writes with a context."""

    def __init__(self, context: dict[str, Any]) -> None:
        self.context = context

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        if _WRITE.match(sql):  # annotate leaves it as it is when there is no context and no span
            sql = annotate(sql, self.context)
        return execute(sql, params, many, context)


class BemiContextMiddleware:
    """Computes the request's context with ``settings.BEMI_PG_CONTEXT`` and applies it."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        from django.conf import settings
        from django.utils.module_loading import import_string

        self.get_response = get_response
        path = getattr(settings, "BEMI_PG_CONTEXT", None)
        self.get_context: Callable[[Any], dict[str, Any]] = import_string(path) if path else (lambda request: {})

    def __call__(self, request: Any) -> Any:
        from django.db import connections

        context = self.get_context(request) or {}
        wrapper = BemiExecuteWrapper(context)
        with use_context(context), ExitStack() as stack:
            for conn in connections.all():
                stack.enter_context(conn.execute_wrapper(wrapper))
            return self.get_response(request)
