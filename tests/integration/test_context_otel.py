"""OpenTelemetry: bemi-pg's Python helpers and integrations put the recording span's trace_id and
span_id in the context, and OpenTelemetry's own sqlcommenter (psycopg and SQLAlchemy
instrumentations with the commenter on) reaches the context through the statement's comment.
A real SDK tracer, in a virtualenv of its own (bemi-pg does not depend on OpenTelemetry)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ..conftest import package_venv

SRC = str(Path(__file__).resolve().parents[2] / "src")
REQUIREMENTS = ("opentelemetry-sdk", "opentelemetry-instrumentation-sqlalchemy==0.66b1",
                "opentelemetry-instrumentation-psycopg==0.66b1", "sqlalchemy<2.1", "psycopg[binary]", "django")

SCRIPT = r'''
import asyncio, json, sys
sys.path.insert(0, SRC)
import psycopg
from psycopg import conninfo
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
import bemi_pg
from bemi_pg.context import use_opentelemetry
from bemi_pg.integrations.asgi import BemiContextMiddleware as AsgiMiddleware
from bemi_pg.integrations.sqlalchemy import instrument
import sqlalchemy as sa

dsn = sys.argv[1]
trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("bemi-pg-test")
traces = {}

def span(id_):
    s = tracer.start_as_current_span(f"write {id_}")
    return s

with psycopg.connect(dsn, autocommit=True) as conn:
    with tracer.start_as_current_span("1") as s:
        with bemi_pg.transaction(conn, {"via": "transaction"}):
            conn.execute("INSERT INTO t VALUES (1)")
        traces[1] = s.get_span_context()
    with tracer.start_as_current_span("3") as s:
        conn.execute(bemi_pg.annotate("INSERT INTO t VALUES (3)", {"via": "annotate"}))
        traces[3] = s.get_span_context()
    use_opentelemetry(False)
    with tracer.start_as_current_span("9"):
        conn.execute(bemi_pg.annotate("INSERT INTO t VALUES (9)", {"via": "turned off"}))
    use_opentelemetry(True)
with psycopg.connect(dsn) as conn:
    with tracer.start_as_current_span("2") as s:
        bemi_pg.set_context(conn, {"via": "set_context"})
        conn.execute("INSERT INTO t VALUES (2)")
        conn.commit()
        traces[2] = s.get_span_context()

engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
instrument(engine)
with tracer.start_as_current_span("4") as s, bemi_pg.use_context({"via": "sqlalchemy"}):
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO t VALUES (4)"))
    traces[4] = s.get_span_context()

async def app(scope, receive, send):
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO t VALUES (5)"))
with tracer.start_as_current_span("5") as s:
    asyncio.run(AsgiMiddleware(app, get_context=lambda scope: {"via": "asgi", "path": scope["path"]})(
        {"type": "http", "path": "/x"}, None, None))
    traces[5] = s.get_span_context()

import django
from django.conf import settings
p = conninfo.conninfo_to_dict(dsn)
settings.configure(DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": p["dbname"],
                   "USER": p["user"], "HOST": p["host"], "PORT": p["port"]}}, USE_TZ=True)
django.setup()
from django.db import connection
from bemi_pg.integrations.django import BemiContextMiddleware as DjangoMiddleware
def view(request):
    with connection.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (6)")
with tracer.start_as_current_span("6") as s:
    DjangoMiddleware(view)(object())
    traces[6] = s.get_span_context()
connection.close()

# OpenTelemetry's own sqlcommenter: its comment carries the query span's traceparent.
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
use_opentelemetry(False)  # only the comments speak from here on
PsycopgInstrumentor().instrument(enable_commenter=True, commenter_options={})
with tracer.start_as_current_span("7") as s:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.cursor().execute("INSERT INTO t VALUES (7)")
    traces[7] = s.get_span_context()
PsycopgInstrumentor().uninstrument()
plain = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
SQLAlchemyInstrumentor().instrument(engine=plain, enable_commenter=True, commenter_options={})
with tracer.start_as_current_span("8") as s:
    with plain.begin() as c:
        c.execute(sa.text("INSERT INTO t VALUES (8)"))
    traces[8] = s.get_span_context()
print(json.dumps({k: [format(v.trace_id, "032x"), format(v.span_id, "016x")] for k, v in traces.items()}))
'''


def _run(db, mode: str) -> tuple[dict[int, list[str]], dict[int, dict]]:
    python = package_venv("otel", *REQUIREMENTS)
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.install(capture_mode=mode, database_keys="never")
    done = subprocess.run([str(python), "-c", SCRIPT.replace("SRC", repr(SRC), 1), db.dsn],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    traces = {int(k): v for k, v in json.loads(done.stdout.splitlines()[-1]).items()}
    db.poll()
    return traces, {r[0]: r[1] for r in db.execute("SELECT (after ->> 'id')::int, context FROM changes")}


def test_the_helpers_and_integrations_add_the_spans_ids(db):
    traces, got = _run(db, "wal")
    for id_, via in [(1, "transaction"), (2, "set_context"), (3, "annotate"), (4, "sqlalchemy"), (5, "asgi")]:
        trace_id, span_id = traces[id_]
        assert got[id_]["via"] == via and got[id_]["trace_id"] == trace_id and got[id_]["span_id"] == span_id, id_
    assert got[5]["path"] == "/x"
    assert got[6] == {"trace_id": traces[6][0], "span_id": traces[6][1]}  # Django, no context of the application's
    assert got[9] == {"via": "turned off"}


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_opentelemetrys_sqlcommenter_reaches_the_context(db, mode):
    traces, got = _run(db, mode)
    for id_ in (7, 8):
        assert got[id_].get("trace_id") == traces[id_][0], (id_, got[id_])  # the query's span is a child: same trace
        assert got[id_]["traceparent"].startswith(f"00-{traces[id_][0]}-")
    assert "db_driver" in got[7] and "db_driver" in got[8], got
