"""Bemi's Prisma client, unchanged: ``@bemi-db/prisma`` 1.1.0 with ``prisma`` and ``@prisma/client``
6.9 through Prisma's wasm query compiler and Bemi's PrismaPg adapter, installed with npm (kept
under /tmp between runs). Prisma's engines cannot be downloaded here: ``prisma generate`` runs
with the engine variables pointing at an existing file (it does not run them), and the table is
made with SQL since ``db push`` would need the schema engine."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from psycopg import conninfo

from ..conftest import build_once

HERE = Path(__file__).resolve().parent / "prisma"
PACKAGES = ("@bemi-db/prisma@1.1.0", "prisma@6.9.0", "@prisma/client@6.9.0")
TABLE = "CREATE TABLE todo (id int PRIMARY KEY, task text NOT NULL, done boolean NOT NULL DEFAULT false)"


def _prisma_project() -> Path:
    """A node project with the packages installed and the client generated from schema.prisma."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node and npm are needed for Bemi's Prisma client (apt-get install -y nodejs npm)")
    key = hashlib.sha1(" ".join(PACKAGES).encode() + (HERE / "schema.prisma").read_bytes()).hexdigest()[:10]
    path = Path(tempfile.gettempdir()) / f"bemi-pg-npm-prisma-{key}"
    with build_once(path) as needed:
        if needed:
            path.mkdir(exist_ok=True)
            (path / "package.json").write_text('{"name": "bemi-pg-prisma-test", "private": true}\n')
            env = {**os.environ, "PRISMA_SKIP_POSTINSTALL_GENERATE": "1"}
            subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts",
                            "--cache", str(Path(tempfile.gettempdir()) / "bemi-pg-npm-cache"), *PACKAGES],
                           cwd=path, env=env, check=True, capture_output=True, timeout=900)
            shutil.copy(HERE / "schema.prisma", path / "schema.prisma")
            env.update(PRISMA_SCHEMA_ENGINE_BINARY=sys.executable, PRISMA_QUERY_ENGINE_LIBRARY=sys.executable,
                       CHECKPOINT_DISABLE="1", PRISMA_HIDE_UPDATE_MESSAGE="1", DATABASE_URL="postgresql://unused@localhost/unused")
            subprocess.run([str(path / "node_modules" / ".bin" / "prisma"), "generate", "--schema", "schema.prisma"],
                           cwd=path, env=env, check=True, capture_output=True, timeout=300)
    return path


@pytest.mark.parametrize("mode", ["wal", "triggers"])
def test_bemis_prisma_client_passes_its_context(db, mode):
    project = _prisma_project()
    db.execute(TABLE)
    db.install(capture_mode=mode, database_keys="never")
    p = conninfo.conninfo_to_dict(db.dsn)
    url = f"postgresql://{p['user']}@{p['host']}:{p['port']}/{p['dbname']}"  # node-postgres takes a URL
    done = subprocess.run(["node", str(HERE / "drive.js")], cwd=project, env={**os.environ, "DATABASE_URL": url,
                          "NODE_PATH": str(project / "node_modules")}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    db.poll()
    rows = db.execute("SELECT operation, primary_key, after ->> 'task', context FROM changes ORDER BY committed_at, seq")
    request = {"userId": 7, "endpoint": "/todos"}
    assert rows == [
        ("CREATE", "1", "a", request),          # create
        ("CREATE", "2", "b", request),          # createMany
        ("CREATE", "3", "c", request),
        ("UPDATE", "1", "a", request),          # update
        ("DELETE", "3", None, request),         # delete
        ("CREATE", "4", "d", {"job": "upsert"}),  # upsert, setBemiContext
        ("UPDATE", "4", "d2", {"job": "upsert"}),
        ("UPDATE", "2", "raw", {"userId": 7, "endpoint": "/raw"}),  # $executeRaw
    ]
