"""bemi-pg's own framework integrations: SQLAlchemy, Django middleware, ASGI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

import bemi_pg
from bemi_pg.integrations.asgi import BemiContextMiddleware

from ..conftest import django_script


def _sqlalchemy_url(dsn: str) -> str:
    from psycopg import conninfo

    p = conninfo.conninfo_to_dict(dsn)
    return f"postgresql+psycopg://{p['user']}@{p['host']}:{p['port']}/{p['dbname']}"


def test_sqlalchemy_transactions_carry_the_current_context(db):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.orm import DeclarativeBase, Session

    from bemi_pg.integrations.sqlalchemy import instrument

    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install(database_keys="never")

    class Base(DeclarativeBase):
        pass

    class Todo(Base):
        __tablename__ = "todo"
        id = sqlalchemy.Column(sqlalchemy.BigInteger, primary_key=True)
        task = sqlalchemy.Column(sqlalchemy.Text)

    engine = sqlalchemy.create_engine(_sqlalchemy_url(db.dsn))
    instrument(engine)
    with bemi_pg.use_context({"user_id": 1, "via": "orm"}):
        with Session(engine) as session, session.begin():
            session.add(Todo(task="orm"))
    with bemi_pg.use_context({"user_id": 2, "via": "core"}):
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("UPDATE todo SET task = 'core'"))
    with engine.begin() as conn:  # no context in force: none recorded
        conn.execute(sqlalchemy.text("DELETE FROM todo"))
    engine.dispose()
    db.poll()
    assert [(c["operation"], c["context"]) for c in db.changes()] == [
        ("CREATE", {"user_id": 1, "via": "orm"}), ("UPDATE", {"user_id": 2, "via": "core"}), ("DELETE", {}),
    ]


DJANGO_SCRIPT = django_script(
    'MIDDLEWARE=["bemi_pg.integrations.django.BemiContextMiddleware"], BEMI_PG_CONTEXT="__main__.request_context",',
    """
def request_context(request):
    return {"method": request.method, "path": request.path, "user": request.headers.get("X-User")}

from django.db import connection, transaction
from django.http import HttpResponse
from django.urls import path

def write(request):
    with connection.cursor() as cur:
        cur.execute("INSERT INTO todo (task) VALUES (%s)", ["autocommit"])
        with transaction.atomic():
            cur.execute("UPDATE todo SET task = %s WHERE task = %s", ["atomic", "autocommit"])
    return HttpResponse("ok")

urlpatterns = [path("todos/", write)]
django.setup()
from django.test import Client
assert Client().post("/todos/", HTTP_X_USER="alice").status_code == 200
with connection.cursor() as cur:  # outside any request: no context
    cur.execute("DELETE FROM todo")
""")


def test_django_middleware_annotates_each_write(db, tmp_path):
    pytest.importorskip("django")
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install(database_keys="never")
    script = tmp_path / "django_app.py"
    script.write_text(textwrap.dedent(DJANGO_SCRIPT))
    result = subprocess.run([sys.executable, str(script), db.dsn], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    db.poll()
    context = {"method": "POST", "path": "/todos/", "user": "alice"}
    assert [(c["operation"], c["context"]) for c in db.changes()] == [("CREATE", context), ("UPDATE", context), ("DELETE", {})]


def test_asgi_middleware_sets_the_request_context(db):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install(database_keys="never")
    import psycopg

    async def app(scope, receive, send):
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute(bemi_pg.annotate("INSERT INTO todo (task) VALUES ('x')"))

    wrapped = BemiContextMiddleware(app, get_context=lambda scope: {"path": scope["path"], "method": scope["method"]})

    async def nothing():
        return {}

    async def ignore(message):
        return None

    asyncio.run(wrapped({"type": "http", "path": "/todos", "method": "POST"}, nothing, ignore))
    assert bemi_pg.current_context() is None
    db.poll()
    assert db.changes()[0]["context"] == {"path": "/todos", "method": "POST"}
