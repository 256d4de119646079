"""The explorer's ASGI app: routes, authentication, security headers; reads go through
:class:`~bemi_pg.explorer.trail.Trail`, time travel through :mod:`bemi_pg.timetravel`, revert
through :mod:`bemi_pg.revert`'s guarded plan."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2
import psycopg
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__, commands, revert, timetravel
from ..config import Settings
from ..db import connect
from ..errors import BemiError
from ..render import quote_ident
from . import chart
from .auth import SESSION_COOKIE, Auth
from .trail import BadRequest, Filters, Trail, parse_context, parse_filters

__all__ = ["Explorer", "create_app"]

log = logging.getLogger("bemi_pg")
HERE = Path(__file__).parent
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "base-uri 'none'; frame-ancestors 'none'")
GROUP_PAGE = 100  # changes shown on a transaction or request page; the rest are a link away
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"), (b"cache-control", b"no-store")]


@dataclass
class Explorer:
    """What one ``bemi-pg serve`` serves: one source's trail, read with its installed settings."""

    source_dsn: str
    destination_dsn: str | None
    settings: Settings
    source: str
    auth: Auth
    allow_revert: bool = False
    statement_timeout_ms: int = 5000

    @property
    def trail(self) -> Trail:
        return Trail(self.destination_dsn or self.source_dsn, self.source, self.settings.destination,
                     statement_timeout_ms=self.statement_timeout_ms)


def _json_value(value: Any) -> str:
    """JSON text with numbers exactly as stored (Decimal digits kept: 120.50 stays 120.50)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_json_value(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_json_value(v) for v in value) + "]"
    if isinstance(value, Decimal):
        return str(value) if value.is_finite() else json.dumps(str(value))
    if isinstance(value, str | int | float | bool) or value is None:
        return json.dumps(value)
    return json.dumps(value.isoformat() if hasattr(value, "isoformat") else str(value))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["json"] = _json_value
    env.filters["qs"] = lambda params: urlencode(params)
    return env


class SecurityHeaders:
    """Adds the CSP (no inline script) and friends to every response, static files included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(explorer: Explorer) -> ASGIApp:
    """The explorer as an ASGI application."""
    env = _environment()
    auth = explorer.auth
    trail = explorer.trail

    def user_of(request: Request, *, api: bool) -> str | None:
        if auth.trusted_user_header:
            proxied = request.headers.get(auth.trusted_user_header)
            if proxied:
                return proxied
        if api and auth.bearer(request.headers.get("authorization")):
            return "api"
        return auth.session_user(request.cookies.get(SESSION_COOKIE))

    def page(request: Request, template: str, code: int = 200, **context: Any) -> HTMLResponse:
        cookie = request.cookies.get(SESSION_COOKIE) or ""
        html = env.get_template(template).render(
            version=__version__, user=request.state.user if hasattr(request.state, "user") else None,
            csrf=auth.csrf_token(cookie) if cookie else "", allow_revert=explorer.allow_revert, **context)
        return HTMLResponse(html, status_code=code)

    def json_response(body: str, status: int = 200) -> Response:
        return Response(body, status_code=status, media_type="application/json")

    Handler = Callable[[Request], Awaitable[Response]]

    def guarded(handler: Handler, *, api: bool = False) -> Handler:
        """Authentication first; then a bad filter is a 400 naming it, a failed read a 503."""
        async def run(request: Request) -> Response:
            user = user_of(request, api=api)
            if user is None:
                if api:
                    return json_response('{"error": "authentication required: send Authorization: Bearer <BEMI_UI_TOKEN>"}', 401)
                return RedirectResponse("/login?" + urlencode({"next": str(request.url.path)
                                                               + (("?" + request.url.query) if request.url.query else "")}),
                                        status_code=303)
            request.state.user = user
            try:
                return await handler(request)
            except BadRequest as exc:
                if api:
                    return json_response(json.dumps({"error": str(exc)}), 400)
                return page(request, "error.html", 400, message=str(exc))
            except (BemiError, psycopg.Error) as exc:
                message = str(exc) if isinstance(exc, BemiError) else "database error: " + " ".join(str(exc).split())
                log.warning("bemi-pg serve: %s %s: %s", request.method, request.url.path, message)
                if api:
                    return json_response(json.dumps({"error": message}), 503)
                return page(request, "error.html", 503, message=message)
        return run

    # -- reads, shared by pages and the API ------------------------------------------------

    def read_changes(f: Filters) -> Any:
        with trail.read() as conn:
            return trail.changes(conn, f)

    def read_row(table: str, pk: str, at: str | None) -> dict[str, Any]:
        with trail.read() as conn:
            extent = trail.row_extent(conn, table, pk)
            result: dict[str, Any] = {"table": table, "pk": pk, "extent": extent,
                                      "history": timetravel.history(conn, table, pk, limit=500),
                                      "blame": timetravel.blame(conn, table, pk), "at": at}
            if at:
                try:
                    with conn.transaction():
                        result["as_of"] = timetravel.as_of(conn, table, pk, at)
                except psycopg.errors.DataError:
                    raise BadRequest(f"at {at!r} is not a timestamp: use ISO 8601, e.g. 2024-05-01T12:00:00Z") from None
                result["as_of_note"] = _as_of_note(conn, extent, at, result["as_of"])
            return result

    def plan(what: dict[str, Any], user: str) -> revert.RevertPlan:
        table = quote_ident(*explorer.settings.destination)
        with connect(explorer.source_dsn, autocommit=False, role="source database") as src, trail.read() as dest:
            try:
                p = revert.plan_revert(src, dest, table, **what)
            finally:
                src.rollback()
        p.by = {"user": user, "via": "bemi-pg serve"}
        return p

    def apply(what: dict[str, Any], user: str) -> revert.RevertPlan:
        p = plan(what, user)
        with connect(explorer.source_dsn, role="source database") as src:
            return revert.apply_revert(src, p, commit=True)

    # -- pages -------------------------------------------------------------------------------

    async def login_form(request: Request) -> Response:
        return page(request, "login.html", next=_safe_next(request.query_params.get("next")), error=None)

    async def login(request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode(errors="replace")))
        target = _safe_next(form.get("next"))
        user = (form.get("user") or "").strip()[:100]
        if not auth.token_ok(form.get("token")) or not user:
            error = "enter your name and the explorer's token (BEMI_UI_TOKEN)" if not user else "wrong token"
            return page(request, "login.html", 401, next=target, error=error)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, auth.new_session(user), max_age=auth.session_seconds, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https", path="/")
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def changes_page(request: Request) -> Response:
        f = parse_filters(request.query_params)
        result = await run_in_threadpool(read_changes, f)
        return page(request, "changes.html", filters=f, form=f.query_string(), page=result,
                    next_qs=f.query_string(cursor=result.next) if result.next else None, title="Changes")

    def _row_params(request: Request) -> tuple[str, str, str | None]:
        table, pk = request.query_params.get("table"), request.query_params.get("pk")
        if not table or pk is None:
            raise BadRequest("a row needs table and pk: /row?table=public.todo&pk=1")
        return table, pk, request.query_params.get("at") or None

    async def row_page(request: Request) -> Response:
        result = await run_in_threadpool(read_row, *_row_params(request))
        return page(request, "row.html", title=f"{result['table']} {result['pk']}", **result)

    def _group(request: Request) -> tuple[dict[str, Any], Filters, str]:
        if "xid" in request.path_params:
            xid = int(request.path_params["xid"])
            return {"transaction_id": xid}, Filters(transaction_id=xid, limit=GROUP_PAGE), f"Transaction {xid}"
        text = request.query_params.get("context")
        if not text:
            raise BadRequest("a request needs a context: /request?context={\"request_id\": \"...\"} or ?context=request_id=...")
        context = parse_context(text)
        return {"context": context}, Filters(context=context, limit=GROUP_PAGE), "Request " + json.dumps(context, sort_keys=True)

    async def group_page(request: Request) -> Response:
        what, f, title = _group(request)
        result = await run_in_threadpool(read_changes, f)
        script = None
        if result.raw and result.next is None:  # a larger group's plan is on its own page (/revert)
            script = (await run_in_threadpool(plan, what, request.state.user)).script()
        return page(request, "group.html", title=title, page=result, what=what, script=script,
                    what_qs={"transaction": what.get("transaction_id", ""),
                             "context": json.dumps(what["context"], sort_keys=True) if "context" in what else ""})

    def _revert_what(params: Any) -> dict[str, Any]:
        if params.get("transaction"):
            if not str(params["transaction"]).isdigit():
                raise BadRequest("transaction must be a number")
            return {"transaction_id": int(params["transaction"])}
        if params.get("context"):
            return {"context": parse_context(params["context"])}
        raise BadRequest("say what to revert: transaction=<xid> or context=<json>")

    async def revert_confirm(request: Request) -> Response:
        what = _revert_what(request.query_params)
        p = await run_in_threadpool(plan, what, request.state.user)
        return page(request, "revert.html", title="Revert", plan=p, what=what, done=False,
                    fields={"transaction": request.query_params.get("transaction", ""),
                            "context": request.query_params.get("context", "")})

    async def revert_apply(request: Request) -> Response:
        if not explorer.allow_revert:
            return page(request, "error.html", 403, message="revert is off: start `bemi-pg serve --allow-revert` to allow it")
        form = dict(parse_qsl((await request.body()).decode(errors="replace")))
        if not auth.csrf_ok(request.cookies.get(SESSION_COOKIE), form.get("csrf")):
            return page(request, "error.html", 403, message="the form expired or did not come from this explorer: open it again")
        if form.get("confirm") != "yes":
            return page(request, "error.html", 400, message="tick the confirmation box to revert")
        what = _revert_what(form)
        p = await run_in_threadpool(apply, what, request.state.user)
        log.info("bemi-pg serve: revert of %s by %s: %s", json.dumps(what, sort_keys=True), request.state.user,
                 "applied" if p.committed else "refused (conflicts)")
        return page(request, "revert.html", title="Revert", plan=p, what=what, done=True, fields={})

    def read_overview() -> dict[str, Any]:
        with trail.read() as conn:
            data = trail.overview(conn)
        try:
            data["status"] = commands.status(explorer.source_dsn, explorer.destination_dsn, explorer.settings)
        except BemiError as exc:
            data["status"] = {"error": str(exc)}
        data["charts"] = {rel: chart.bars(series, data["since"], data["days"]) for rel, series in data["volume"].items()}
        return data

    async def overview_page(request: Request) -> Response:
        data = await run_in_threadpool(read_overview)
        return page(request, "overview.html", title="Overview", **data)

    # -- the JSON API ------------------------------------------------------------------------

    async def api_changes(request: Request) -> Response:
        result = await run_in_threadpool(read_changes, parse_filters(request.query_params))
        return json_response(result.json())

    async def api_row(request: Request) -> Response:
        result = await run_in_threadpool(read_row, *_row_params(request))
        return json_response(_json_value(result))

    async def api_group(request: Request) -> Response:
        _, f, _ = _group(request)
        paging = {k: request.query_params[k] for k in ("limit", "cursor") if k in request.query_params}
        f = parse_filters({**f.query_string(), **paging})
        result = await run_in_threadpool(read_changes, f)
        return json_response(result.json())

    async def api_overview(request: Request) -> Response:
        data = await run_in_threadpool(read_overview)
        data.pop("charts")
        data["volume"] = {rel: {b.isoformat(): n for b, n in series.items()} for rel, series in data["volume"].items()}
        return json_response(_json_value(data))

    routes = [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", guarded(changes_page)),
        Route("/row", guarded(row_page)),
        Route("/transaction/{xid:int}", guarded(group_page)),
        Route("/request", guarded(group_page)),
        Route("/revert", guarded(revert_confirm), methods=["GET"]),
        Route("/revert", guarded(revert_apply), methods=["POST"]),
        Route("/overview", guarded(overview_page)),
        Route("/api/changes", guarded(api_changes, api=True)),
        Route("/api/row", guarded(api_row, api=True)),
        Route("/api/transaction/{xid:int}", guarded(api_group, api=True)),
        Route("/api/request", guarded(api_group, api=True)),
        Route("/api/overview", guarded(api_overview, api=True)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return SecurityHeaders(Starlette(routes=routes))


def _safe_next(target: str | None) -> str:
    """Only a path on this site (never //host or a scheme) is a place to go back to after login."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _as_of_note(conn: psycopg.Connection[Any], extent: dict[str, Any], at: str, row: Any) -> str | None:
    """What the trail can say where it holds no version of the row at ``at``."""
    if row is not None:
        return None
    if extent["changes"] == 0:
        return "the trail holds no change of this row: it cannot say what the row was"
    moment = conn.execute("SELECT %s::timestamptz", (at,)).fetchone()[0]  # type: ignore[index]
    if moment < extent["first_at"] and extent["first_operation"] != "CREATE":
        return ("this moment is before the trail's first record of the row, which was not its creation: "
                "the trail cannot say what the row was then")
    return "the row did not exist at this moment (not yet created, or deleted or truncated by then)"
