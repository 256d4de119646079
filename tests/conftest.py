"""Test harness: a throwaway PostgreSQL cluster (wal_level=logical, wal2json) per session,
and a fresh database per test.

Set BEMI_TEST_DSN to use a running server instead (superuser, wal_level=logical, wal2json).
Without either, the integration tests are skipped and the unit tests still run.
BEMI_PG_ROOT / BEMI_PG_MAJOR (`make test PG=17`) choose the server binaries (bemi_pg._localpg.PgInstall);
when the version they name is missing, the integration tests fail instead of skipping.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from bemi_pg import commands
from bemi_pg._localpg import LocalPgBouncer, find_bindir, throwaway_cluster
from bemi_pg.config import Settings, load_settings

_counter = itertools.count()


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """The DSN of a superuser connection to the ``postgres`` database of the test server."""
    if os.environ.get("BEMI_TEST_DSN"):
        yield os.environ["BEMI_TEST_DSN"]
        return
    try:
        find_bindir()
    except FileNotFoundError as exc:
        if os.environ.get("BEMI_PG_ROOT") or os.environ.get("BEMI_PG_MAJOR"):
            pytest.fail(f"the PostgreSQL version asked for is not there: {exc}")  # make test PG=N must not skip
        pytest.skip(f"no PostgreSQL server binaries ({exc}) and no BEMI_TEST_DSN")
    with throwaway_cluster(prefix="bemi-pg-test-") as cluster:
        yield cluster.dsn()


def _with_db(dsn: str, dbname: str) -> str:
    params = conninfo.conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return conninfo.make_conninfo(**params)


class Database:
    """A database of its own for one test, with helpers that go through the public API."""

    def __init__(self, server_dsn: str, name: str) -> None:
        self.server_dsn = server_dsn
        self.name = name
        self.dsn = _with_db(server_dsn, name)
        self.settings: Settings = load_settings(None)

    def execute(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    @property
    def source(self) -> str:
        """This database's source identity, as the destination files its changes."""
        [(source,)] = self.execute("SELECT system_identifier::text || '/' || current_database() FROM pg_control_system()")
        return str(source)

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, **kwargs)

    def install(self, destination: str | None = None, **settings: Any) -> None:
        if settings:
            self.settings = load_settings(None, **settings)
        commands.install(self.dsn, destination, self.settings)

    def poll(self, destination: str | None = None, **kwargs: Any) -> Any:
        return commands.poll_once(self.dsn, destination, self.settings, **kwargs)

    def changes(self, where: str = "true", dsn: str | None = None) -> list[dict[str, Any]]:
        with psycopg.connect(dsn or self.dsn, autocommit=True) as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            return cur.execute(f"SELECT * FROM changes WHERE {where} ORDER BY commit_position, seq").fetchall()


def create_database(server_dsn: str, prefix: str = "t") -> str:
    name = f"{prefix}_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(server_dsn: str, name: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s AND NOT active", (name,)
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def own_database(server_dsn: str, prefix: str = "t") -> Iterator[Database]:
    """A database of the test's own, dropped after it (for a fixture to yield from)."""
    name = create_database(server_dsn, prefix)
    try:
        yield Database(server_dsn, name)
    finally:
        drop_database(server_dsn, name)


@pytest.fixture
def db(server_dsn: str) -> Iterator[Database]:
    yield from own_database(server_dsn)


@pytest.fixture
def other_db(server_dsn: str) -> Iterator[Database]:
    yield from own_database(server_dsn, "dest")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bemi_pg`` as a user would (in ``cwd``, where a ``bemi.toml`` may be)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("BEMI_", "PG")) and k != "DATABASE_URL"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "bemi_pg", *args], env=full_env, text=True,
                          capture_output=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def pgbouncer(server_dsn: str) -> Iterator[LocalPgBouncer]:
    """pgbouncer in transaction mode, one server connection per database shared by all clients."""
    import shutil as _shutil

    if not (_shutil.which("pgbouncer") or Path("/usr/sbin/pgbouncer").exists()):
        pytest.skip("pgbouncer is not installed (apt-get install -y pgbouncer; make deps does it)")
    root = Path(tempfile.mkdtemp(prefix="bemi-pg-bouncer-", dir="/tmp"))
    root.chmod(0o755)
    port = int(conninfo.conninfo_to_dict(server_dsn)["port"])
    bouncer = LocalPgBouncer(root, port, pool_size=1)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()
        _shutil.rmtree(root, ignore_errors=True)


def package_venv(name: str, *requirements: str) -> Path:
    """A virtualenv with ``requirements`` from PyPI, kept in /tmp between runs; its python.

    Bemi's own client packages each install a top-level module named ``bemi``, so each
    gets an environment of its own."""
    import hashlib

    key = hashlib.sha1(" ".join(requirements).encode()).hexdigest()[:10]
    path = Path(tempfile.gettempdir()) / f"bemi-pg-venv-{name}-{key}"
    with build_once(path) as needed:
        if needed:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
            subprocess.run([str(path / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", *requirements],
                           check=True, timeout=900)
    return path / "bin" / "python"


@contextmanager
def build_once(path: Path) -> Iterator[bool]:
    """For a directory kept in /tmp between runs: whether it still needs building (it has no
    ``ready`` file), under a lock that other test sessions (.ci/run runs versions side by side)
    wait on; ``ready`` is written when the block ends without an error."""
    import fcntl

    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        needed = not (path / "ready").exists()
        yield needed
        if needed:
            (path / "ready").touch()


def django_script(settings: str, body: str) -> str:
    """A stand-alone Django program: settings for the database named by argv[1], then ``body``."""
    preamble = '''
import sys
import django
from django.conf import settings
from psycopg import conninfo

p = conninfo.conninfo_to_dict(sys.argv[1])
settings.configure(
    DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", "NAME": p["dbname"], "USER": p["user"],
                           "HOST": p["host"], "PORT": p["port"]}},
    ROOT_URLCONF="__main__", ALLOWED_HOSTS=["*"], SECRET_KEY="x", USE_TZ=True,
    %s
)
'''
    return preamble % settings + body


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``BEMI_TEST_SHARD=k/n`` keeps the k-th of n shares of the test files (every n-th file, in
    path order): `.ci/run` runs one version's suite as two shares side by side."""
    shard = os.environ.get("BEMI_TEST_SHARD")
    if not shard:
        return
    try:
        k, n = (int(part) for part in shard.split("/"))
        if not 1 <= k <= n:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"BEMI_TEST_SHARD={shard!r}: expected k/n with 1 <= k <= n, e.g. 1/2") from None
    files = sorted({item.path for item in items})
    keep = {path for index, path in enumerate(files) if index % n == k - 1}
    deselected = [item for item in items if item.path not in keep]
    items[:] = [item for item in items if item.path in keep]
    config.hook.pytest_deselected(items=deselected)
