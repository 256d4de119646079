"""Bemi's published client packages, unchanged, against bemi-pg (real packages from PyPI)."""

from __future__ import annotations

import json
import subprocess
import textwrap

from psycopg import conninfo

from ..conftest import django_script, package_venv


def _run(python, script: str, *args: str) -> str:
    result = subprocess.run([str(python), "-c", textwrap.dedent(script), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


SQLALCHEMY_APP = """
import sys
from bemi import Bemi
from sqlalchemy import BigInteger, Column, Text, create_engine, text
from sqlalchemy.orm import Session, declarative_base

engine = create_engine(sys.argv[1])
Base = declarative_base()

class Todo(Base):
    __tablename__ = "todo"
    id = Column(BigInteger, primary_key=True)
    task = Column(Text)

Bemi.set_context({"user_id": 1, "endpoint": "/core", "email": "a@b.example"})
with engine.begin() as conn:
    conn.execute(text("INSERT INTO todo (task) VALUES (:task)"), {"task": "core"})
Bemi.set_context({"user_id": 2, "endpoint": "/orm"})
with Session(engine) as session, session.begin():
    session.add(Todo(task="orm"))
with Session(engine) as session, session.begin():
    session.get(Todo, 1).task = "orm update"
"""


def test_bemi_sqlalchemy_core_and_orm(db):
    python = package_venv("bemi-sqlalchemy", "bemi-sqlalchemy==0.0.2", "sqlalchemy>=2", "alembic", "starlette", "psycopg[binary]")
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install(database_keys="never")
    p = conninfo.conninfo_to_dict(db.dsn)
    _run(python, SQLALCHEMY_APP, f"postgresql+psycopg://{p['user']}@{p['host']}:{p['port']}/{p['dbname']}")
    db.poll()
    got = [(c["operation"], c["after"]["task"], {k: v for k, v in c["context"].items() if k != "SQL"}, c["context"].get("SQL", ""))
           for c in db.changes()]
    assert [g[:3] for g in got] == [
        ("CREATE", "core", {"user_id": 1, "endpoint": "/core", "email": "a@b.example"}),
        ("CREATE", "orm", {"user_id": 2, "endpoint": "/orm"}),
        ("UPDATE", "orm update", {"user_id": 2, "endpoint": "/orm"}),
    ]
    assert got[0][3].startswith("INSERT INTO todo") and got[2][3].startswith("UPDATE todo")


DJANGO_SETTINGS = django_script(
    'INSTALLED_APPS=["bemi"], MIDDLEWARE=["bemi.middleware.BemiMiddleware"], BEMI_CONTEXT_FUNCTION="__main__.get_context",',
    """
def get_context(request):
    return {"user": request.headers.get("X-User"), "endpoint": request.path, "note": "50% off: a@b.example"}

from django.db import connection
from django.http import HttpResponse
from django.urls import path

def create(request):
    with connection.cursor() as cur:
        cur.execute("INSERT INTO todo (task) VALUES (%s)", ["Sleep"])
    return HttpResponse("ok")

def complete(request, pk):
    with connection.cursor() as cur:
        cur.execute('UPDATE todo SET "isCompleted" = true WHERE id = %s', [pk])
    return HttpResponse("ok")

urlpatterns = [path("todos/", create), path("todos/<int:pk>/complete", complete)]
django.setup()
""")

DJANGO_REQUESTS = DJANGO_SETTINGS + """
from django.test import Client
client = Client()
assert client.post("/todos/", HTTP_X_USER="alice").status_code == 200
assert client.put("/todos/1/complete", HTTP_X_USER="bob").status_code == 200
"""

DJANGO_QUERIES = DJANGO_SETTINGS + """
import json
from bemi.models import BemiChange
created = BemiChange.objects.created()
print(json.dumps({
    "created": created.count(),
    "alice": BemiChange.objects.context({"user": "alice"}).count(),
    "changed": [c.diff() for c in BemiChange.objects.field_changed("todo", 1, "isCompleted")],
    "first_after": created.first().after,
}))
"""


def test_bemi_django_middleware_and_bemichange(db):
    python = package_venv("bemi-django", "bemi-django==0.1.3", "django>=4.2", "psycopg[binary]")
    db.execute('CREATE TABLE todo (id bigserial PRIMARY KEY, task text, "isCompleted" boolean DEFAULT false)')
    db.install(database_keys="never")
    _run(python, DJANGO_REQUESTS, db.dsn)
    db.poll()
    contexts = [{k: v for k, v in c["context"].items() if k != "SQL"} for c in db.changes()]
    assert contexts == [
        {"user": "alice", "endpoint": "/todos/", "note": "50% off: a@b.example"},
        {"user": "bob", "endpoint": "/todos/1/complete", "note": "50% off: a@b.example"},
    ]
    result = json.loads(_run(python, DJANGO_QUERIES, db.dsn))
    assert result == {
        "created": 1, "alice": 1,
        # Bemi's field_changed counts the CREATE too: before has no isCompleted.
        "changed": [{"id": [None, 1], "task": [None, "Sleep"], "isCompleted": [None, False]}, {"isCompleted": [False, True]}],
        "first_after": {"id": 1, "task": "Sleep", "isCompleted": False},
    }
