"""ASGI (FastAPI, Starlette, …): the request's context for the code that handles it.

::

    app.add_middleware(BemiContextMiddleware, get_context=lambda scope: {"path": scope["path"]})

It sets :func:`bemi_pg.current_context` for the duration of each request; the SQLAlchemy
integration (or :func:`bemi_pg.annotate`) then puts it on the request's writes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..context import use_context

__all__ = ["BemiContextMiddleware"]

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class BemiContextMiddleware:
    """Pure ASGI middleware: ``get_context(scope)`` gives the request's context."""

    def __init__(self, app: ASGIApp, get_context: Callable[[Scope], dict[str, Any] | None]) -> None:
        self.app = app
        self.get_context = get_context

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        with use_context(self.get_context(scope)):
            await self.app(scope, receive, send)
