"""A throwaway local PostgreSQL cluster for tests, the demo and benchmarks.

Not part of the public API. It starts a server configured for logical decoding with
wal2json (``wal_level=logical`` and, on Debian builds that have it,
``output_plugin_libraries``), runs it as the ``postgres`` OS user when invoked as root
(initdb and postgres refuse to run as root), and listens on 127.0.0.1 only.

Command line (used by the Makefile)::

    python -m bemi_pg._localpg start DIR   # prints the DSN of the "postgres" database
    python -m bemi_pg._localpg stop DIR
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LocalCluster", "LocalPgBouncer", "PgInstall", "find_bindir", "standby_of", "throwaway_cluster"]

# Debian's output_plugin_libraries is a list setting: one element per plugin.
OUTPUT_PLUGINS = ("pgoutput", "test_decoding", "wal2json")

# The major versions bemi-pg supports and tests (README: Supported PostgreSQL versions).
SUPPORTED_MAJORS = (15, 17, 18)


class PgInstall:
    """Where the PostgreSQL binaries are and how to run them: this host's packages, or a
    Debian root prepared by ``scripts/pgroot.sh`` (``BEMI_PG_ROOT``), whose binaries run in it
    via chroot and see only paths inside it. ``BEMI_PG_MAJOR`` picks the host's
    ``/usr/lib/postgresql/<major>``; ``BEMI_PG_BINDIR`` names a bin directory outright."""

    def __init__(self, bindir: Path, root: Path | None = None) -> None:
        self.bindir = bindir  # as the binaries see it (inside ``root`` when there is one)
        self.root = root

    @classmethod
    def from_env(cls) -> PgInstall:
        root = Path(os.environ["BEMI_PG_ROOT"]).absolute() if os.environ.get("BEMI_PG_ROOT") else None
        major = os.environ.get("BEMI_PG_MAJOR", "")
        if os.environ.get("BEMI_PG_BINDIR"):
            return cls(Path(os.environ["BEMI_PG_BINDIR"]), root)
        base = root or Path("/")
        pattern = f"usr/lib/postgresql/{major or '*'}/bin/pg_ctl"
        candidates = sorted(
            base.glob(pattern),
            key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
        )
        if candidates:
            return cls(Path("/") / candidates[-1].parent.relative_to(base), root)
        found = shutil.which("pg_ctl") if root is None and not major else None
        if found:
            return cls(Path(found).parent)
        where = f" in {root}" if root else ""
        wanted = major or "15"
        fix = (f"scripts/pgroot.sh {wanted} (make deps PG={wanted} does it)" if root
               else f"apt-get install -y postgresql-{wanted} postgresql-{wanted}-wal2json")
        raise FileNotFoundError(
            f"PostgreSQL {major + ' ' if major else ''}server binaries not found{where}: run {fix}, or set BEMI_PG_BINDIR"
        )

    @property
    def major(self) -> int | None:
        name = self.bindir.parent.name
        return int(name) if name.isdigit() else None

    def host_path(self, inner: str | Path) -> Path:
        """The host's path of a path as the binaries see it."""
        return self.root / Path(inner).relative_to("/") if self.root else Path(inner)

    def inner_path(self, host: Path) -> str:
        """The path the binaries see for a host path (which must be inside the root)."""
        return "/" + str(host.absolute().relative_to(self.root)) if self.root else str(host)

    def scratch_dir(self) -> Path:
        """The host directory for throwaway clusters: /tmp, or the root's /tmp."""
        return self.host_path("/tmp")

    def _postgres_ids(self) -> tuple[int, int]:
        passwd = self.host_path("/etc/passwd").read_text()
        for line in passwd.splitlines():
            fields = line.split(":")
            if fields[0] == "postgres":
                return int(fields[2]), int(fields[3])
        raise FileNotFoundError(f"no postgres user in {self.host_path('/etc/passwd')}")

    def chown_postgres(self, path: Path) -> None:
        """Give ``path`` to the postgres OS user the binaries run as."""
        uid, gid = self._postgres_ids()
        os.chown(path, uid, gid)

    def argv(self, program: str, *args: str, as_postgres: bool = False) -> list[str]:
        """The command line running ``program`` (a name in the bin directory, or an absolute path)."""
        exe = program if program.startswith("/") else str(self.bindir / program)
        if self.root is not None:
            user = []
            if as_postgres:
                uid, gid = self._postgres_ids()
                user = [f"--userspec={uid}:{gid}"]
            return ["chroot", *user, str(self.root), "/usr/bin/env", "HOME=/tmp", exe, *args]
        return (["runuser", "-u", "postgres", "--"] if as_postgres else []) + [exe, *args]


def find_bindir() -> Path:
    """Return the host path of the PostgreSQL server binaries (initdb, pg_ctl, postgres)."""
    pg = PgInstall.from_env()
    return pg.host_path(pg.bindir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """A PostgreSQL cluster in ``datadir`` (a host path; inside the root when ``pg`` has one),
    created on first start."""

    def __init__(self, datadir: Path | str, *, pg: PgInstall | None = None) -> None:
        self.datadir = Path(datadir).absolute()
        self.pg = pg or PgInstall.from_env()
        self._as_postgres = os.geteuid() == 0 or self.pg.root is not None
        if self.pg.root is not None and not self.datadir.is_relative_to(self.pg.root):
            raise ValueError(f"{self.datadir} is outside {self.pg.root}, where the server binaries run")

    @property
    def bindir(self) -> Path:
        """The host path of the server binaries."""
        return self.pg.host_path(self.pg.bindir)

    # -- helpers -------------------------------------------------------------
    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = self.pg.argv(program, *args, as_postgres=self._as_postgres)
        return subprocess.run(cmd, check=check, text=True, capture_output=True)

    @property
    def _inner_datadir(self) -> str:
        return self.pg.inner_path(self.datadir)

    @property
    def _port_file(self) -> Path:
        return self.datadir / "bemi-port"

    @property
    def port(self) -> int:
        return int(self._port_file.read_text().strip())

    def dsn(self, dbname: str = "postgres") -> str:
        """The libpq URL of ``dbname`` on this cluster (trust authentication)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def supports_output_plugin_libraries(self) -> bool:
        """Whether this server build has Debian's ``output_plugin_libraries`` setting."""
        out = subprocess.run(self.pg.argv("postgres", "--describe-config"), check=True, text=True,
                             capture_output=True).stdout
        return any(line.split("\t", 1)[0] == "output_plugin_libraries" for line in out.splitlines())

    def is_running(self) -> bool:
        if not (self.datadir / "PG_VERSION").exists():
            return False
        return self._run("pg_ctl", "-D", self._inner_datadir, "status", check=False).returncode == 0

    # -- lifecycle -----------------------------------------------------------
    def init(self) -> None:
        """Create the data directory (owned by ``postgres`` when run as root)."""
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            self.pg.chown_postgres(self.datadir)
            probe = self._run("/usr/bin/test", "-w", self._inner_datadir, check=False)
            if probe.returncode != 0:
                raise PermissionError(
                    f"the postgres OS user cannot write {self.datadir}: "
                    "put the cluster under a directory every parent of which it can enter (e.g. /tmp)"
                )
        if not (self.datadir / "PG_VERSION").exists():
            self._run(
                "initdb", "-D", self._inner_datadir, "-U", "postgres",
                "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync",
            )
        if not self._port_file.exists():
            self._port_file.write_text(f"{_free_port()}\n")

    def start(self, *extra_settings: str, list_output_plugins: bool = True) -> str:
        """Start the server (initialising it first if needed); return the DSN of ``postgres``.
        ``list_output_plugins=False`` leaves Debian's ``output_plugin_libraries`` as configured."""
        self.init()
        if self.is_running():
            return self.dsn()
        inner = self._inner_datadir
        settings = [
            "wal_level=logical",
            f"port={self.port}",
            "listen_addresses=127.0.0.1",
            f"unix_socket_directories={inner if len(inner) < 80 else ''}",
            "max_replication_slots=100",
            "max_wal_senders=20",
            "max_connections=200",
            "fsync=off",
            "full_page_writes=off",
            "shared_buffers=256MB",
            # Big index builds (the 5M-change plan test's fill) sort in memory, with few checkpoints.
            "maintenance_work_mem=512MB",
            "max_wal_size=4GB",
            "log_min_messages=warning",
        ]
        if list_output_plugins and self.supports_output_plugin_libraries():
            settings.append(f"output_plugin_libraries={','.join(OUTPUT_PLUGINS)}")
        settings += extra_settings  # later settings win
        opts = " ".join(f"-c {s}" if "=" in s and " " not in s else f"-c '{s}'" for s in settings)
        log = self.datadir / "server.log"
        res = self._run(
            "pg_ctl", "-D", inner, "-l", self.pg.inner_path(log),
            "-o", opts, "-w", "-t", "60", "start", check=False,
        )
        if res.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start:\n{res.stdout}{res.stderr}\n{tail}")
        return self.dsn()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs (``mode``: smart, fast or immediate)."""
        if self.is_running():
            self._run("pg_ctl", "-D", self._inner_datadir, "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        """Stop the server and delete its data directory."""
        self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)


@contextmanager
def throwaway_cluster(*databases: str, settings: tuple[str, ...] = (), prefix: str = "bemi-pg-",
                      pg: PgInstall | None = None, list_output_plugins: bool = True) -> Iterator[LocalCluster]:
    """A cluster in a new directory under /tmp (the root's /tmp for binaries in a Debian root)
    with ``databases`` created; destroyed on exit."""
    pg = pg or PgInstall.from_env()
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=pg.scratch_dir()))
    root.chmod(0o755)  # the postgres OS user must reach the data directory
    cluster = LocalCluster(root / "data", pg=pg)
    try:
        admin = cluster.start(*settings, list_output_plugins=list_output_plugins)
        if databases:
            import psycopg

            with psycopg.connect(admin, autocommit=True) as conn:
                for name in databases:
                    conn.execute(f'CREATE DATABASE "{name}"')
        yield cluster
    finally:
        cluster.destroy()
        shutil.rmtree(root, ignore_errors=True)


def standby_of(primary: LocalCluster, datadir: Path, slot: str, *settings: str) -> LocalCluster:
    """A streaming physical standby of ``primary`` in ``datadir`` (a new directory beside the
    primary's), started: ``pg_basebackup -R`` over 127.0.0.1 creates the physical slot ``slot``
    and the standby streams from it with ``hot_standby_feedback`` and the slot synchronization
    of PostgreSQL 17 (``sync_replication_slots``; ``primary_conninfo`` names a database for it).
    ``settings`` are added to (and win over) those."""
    standby = LocalCluster(datadir, pg=primary.pg)
    datadir.parent.mkdir(parents=True, exist_ok=True)
    if standby._as_postgres:
        primary.pg.chown_postgres(datadir.parent)
    conninfo = f"host=127.0.0.1 port={primary.port} user=postgres dbname=postgres"
    res = standby._run("pg_basebackup", "-D", standby._inner_datadir, "-d", conninfo, "-R", "-C", "-S", slot,
                       "-X", "stream", "-c", "fast", "--no-sync", check=False)
    if res.returncode != 0:
        raise RuntimeError(f"pg_basebackup failed: {res.stdout}{res.stderr}")
    for copied in ("bemi-port", "server.log"):  # the primary's, copied with its data directory
        (datadir / copied).unlink(missing_ok=True)
    # In postgresql.auto.conf, not on the command line: ALTER SYSTEM on the standby can change them.
    standby_settings = ["hot_standby = on", "hot_standby_feedback = on", "sync_replication_slots = on",
                        f"primary_slot_name = '{slot}'", f"primary_conninfo = '{conninfo}'"]
    with (datadir / "postgresql.auto.conf").open("a") as auto:
        auto.write("".join(f"{line}\n" for line in standby_settings))
    standby.start(*settings)
    return standby


class LocalPgBouncer:
    """pgbouncer in transaction pooling mode in front of a local cluster (tests only)."""

    def __init__(self, directory: Path | str, server_port: int, *, pool_size: int = 1) -> None:
        self.directory = Path(directory).absolute()
        self.server_port = server_port
        self.pool_size = pool_size
        self.port = _free_port()
        self._proc: subprocess.Popen[str] | None = None

    def dsn(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).exists():
            raise FileNotFoundError("pgbouncer not found: apt-get install -y pgbouncer")
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "users.txt").write_text('"postgres" ""\n')
        ini = self.directory / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.server_port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.directory / 'users.txt'}\n"
            f"pool_mode = transaction\ndefault_pool_size = {self.pool_size}\nmax_client_conn = 100\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.directory / 'pgbouncer.log'}\n"
        )
        cmd = [binary, str(ini)]
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
            for f in self.directory.iterdir():
                shutil.chown(f, "postgres", "postgres")
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self._proc.poll() is not None:
                raise RuntimeError(f"pgbouncer did not start: {self._proc.stderr.read() if self._proc.stderr else ''}")
            time.sleep(0.05)
        raise RuntimeError("pgbouncer did not start listening")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc = None


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in {"start", "stop", "dsn"}:
        print("usage: python -m bemi_pg._localpg start|stop|dsn DIR", file=sys.stderr)
        return 2
    cluster = LocalCluster(argv[1])
    if argv[0] == "start":
        print(cluster.start())
    elif argv[0] == "stop":
        cluster.stop()
    else:
        print(cluster.dsn())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
