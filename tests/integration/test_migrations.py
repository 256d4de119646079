"""`bemi-pg migration new`: files valid for Supabase, Alembic and Django, run against the test cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
from psycopg import conninfo

from bemi_pg import commands
from bemi_pg.render import render_install

from ..conftest import run_cli

INSTALLED = """
SELECT (SELECT count(*) FROM pg_trigger WHERE tgname = 'bemi_capture' AND tgrelid = 'todo'::regclass),
       to_regprocedure('bemi.capture_context()') IS NOT NULL,
       to_regclass('public.changes') IS NOT NULL,
       (SELECT count(*) FROM pg_publication WHERE pubname = 'bemi')
"""


def _write_and_read(db) -> None:
    """After the migration: `bemi-pg install` creates the slot; a write reaches changes."""
    commands.install(db.dsn, None, db.settings)
    db.execute("INSERT INTO todo (task) VALUES ('after migration')")
    db.poll()
    assert [c["after"]["task"] for c in db.changes()] == ["after migration"]


def test_supabase_migration(db, tmp_path):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    result = run_cli("migration", "new", "--supabase", str(tmp_path / "supabase" / "migrations"))
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.parent == tmp_path / "supabase" / "migrations" and path.name.endswith("_bemi.sql") and path.name[:14].isdigit()
    text = path.read_text()
    assert render_install(db.settings).combined() in text
    with psycopg.connect(db.dsn) as conn:  # as `supabase migration up` applies it: one transaction
        conn.execute(text)
    assert db.execute(INSTALLED) == [(1, True, True, 1)]
    _write_and_read(db)


def test_alembic_migration_upgrades_and_downgrades(db, tmp_path):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    p = conninfo.conninfo_to_dict(db.dsn)
    url = f"postgresql+psycopg://{p['user']}@{p['host']}:{p['port']}/{p['dbname']}"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    alembic = [sys.executable, "-m", "alembic", "-c", str(tmp_path / "alembic.ini")]
    subprocess.run([sys.executable, "-m", "alembic", "init", str(tmp_path / "alembic")], cwd=tmp_path, check=True,
                   capture_output=True)
    ini = (tmp_path / "alembic.ini").read_text().replace("driver://user:pass@localhost/dbname", url)
    (tmp_path / "alembic.ini").write_text(ini)
    versions = tmp_path / "alembic" / "versions"
    (versions / "0001_app.py").write_text(textwrap.dedent('''
        revision = "0001app"
        down_revision = None
        def upgrade():
            pass
        def downgrade():
            pass
    '''))
    result = run_cli("migration", "new", "--alembic", str(versions))
    assert result.returncode == 0, result.stderr
    assert 'down_revision = \'0001app\'' in Path(result.stdout.strip()).read_text()
    up = subprocess.run([*alembic, "upgrade", "head"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert up.returncode == 0, up.stderr
    assert db.execute(INSTALLED) == [(1, True, True, 1)]
    subprocess.run([*alembic, "downgrade", "0001app"], cwd=tmp_path, check=True, capture_output=True, env=env)
    assert db.execute(INSTALLED) == [(0, False, True, 0)]  # the audit data stays
    subprocess.run([*alembic, "upgrade", "head"], cwd=tmp_path, check=True, capture_output=True, env=env)
    _write_and_read(db)


def test_django_migration_migrates_and_reverses(db, tmp_path):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    p = conninfo.conninfo_to_dict(db.dsn)
    app = tmp_path / "shop"
    (app / "migrations").mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "migrations" / "__init__.py").write_text("")
    (app / "migrations" / "0001_initial.py").write_text(
        "from django.db import migrations\n\nclass Migration(migrations.Migration):\n    operations = []\n")
    (tmp_path / "settings.py").write_text(textwrap.dedent(f"""
        DATABASES = {{"default": {{"ENGINE": "django.db.backends.postgresql", "NAME": {p['dbname']!r},
                                   "USER": {p['user']!r}, "HOST": {p['host']!r}, "PORT": {p['port']!r}}}}}
        INSTALLED_APPS = ["shop"]
        SECRET_KEY = "x"
        USE_TZ = True
    """))
    result = run_cli("migration", "new", "--django", str(app))
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == app / "migrations" / "0002_bemi.py"
    assert "dependencies = [('shop', '0001_initial')]" in path.read_text()
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "DJANGO_SETTINGS_MODULE": "settings"}
    django = [sys.executable, "-m", "django"]
    subprocess.run([*django, "migrate", "shop"], check=True, capture_output=True, env=env, cwd=tmp_path)
    assert db.execute(INSTALLED) == [(1, True, True, 1)]
    subprocess.run([*django, "migrate", "shop", "0001"], check=True, capture_output=True, env=env, cwd=tmp_path)
    assert db.execute(INSTALLED) == [(0, False, True, 0)]
    subprocess.run([*django, "migrate", "shop"], check=True, capture_output=True, env=env, cwd=tmp_path)
    _write_and_read(db)
