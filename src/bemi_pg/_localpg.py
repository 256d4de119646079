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

import glob
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["LocalCluster", "find_bindir"]

OUTPUT_PLUGINS = "pgoutput,test_decoding,wal2json"


def find_bindir() -> Path:
    """Return the directory of the PostgreSQL server binaries (initdb, pg_ctl, postgres)."""
    env = os.environ.get("BEMI_PG_BINDIR")
    if env:
        return Path(env)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise FileNotFoundError(
        "PostgreSQL server binaries not found: install postgresql-15 "
        "(apt-get install -y postgresql-15) or set BEMI_PG_BINDIR"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    """A PostgreSQL cluster in ``datadir``, created on first start."""

    def __init__(self, datadir: Path | str, *, bindir: Path | None = None) -> None:
        self.datadir = Path(datadir).absolute()
        self.bindir = bindir or find_bindir()
        self._as_postgres = os.geteuid() == 0

    # -- helpers -------------------------------------------------------------
    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, text=True, capture_output=True)

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
        out = subprocess.run(
            [str(self.bindir / "postgres"), "--describe-config"],
            check=True, text=True, capture_output=True,
        ).stdout
        return any(line.split("\t", 1)[0] == "output_plugin_libraries" for line in out.splitlines())

    def is_running(self) -> bool:
        if not (self.datadir / "PG_VERSION").exists():
            return False
        return self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "status", check=False).returncode == 0

    # -- lifecycle -----------------------------------------------------------
    def init(self) -> None:
        """Create the data directory (owned by ``postgres`` when run as root)."""
        self.datadir.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.datadir, "postgres", "postgres")
            probe = self._run("test", "-w", str(self.datadir), check=False)
            if probe.returncode != 0:
                raise PermissionError(
                    f"the postgres OS user cannot write {self.datadir}: "
                    "put the cluster under a directory every parent of which it can enter (e.g. /tmp)"
                )
        if not (self.datadir / "PG_VERSION").exists():
            self._run(
                str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync",
            )
        if not self._port_file.exists():
            self._port_file.write_text(f"{_free_port()}\n")

    def start(self, *extra_settings: str) -> str:
        """Start the server (initialising it first if needed); return the DSN of ``postgres``."""
        self.init()
        if self.is_running():
            return self.dsn()
        settings = [
            "wal_level=logical",
            f"port={self.port}",
            "listen_addresses=127.0.0.1",
            f"unix_socket_directories={self.datadir if len(str(self.datadir)) < 80 else ''}",
            "max_replication_slots=100",
            "max_wal_senders=20",
            "max_connections=200",
            "fsync=off",
            "full_page_writes=off",
            "shared_buffers=256MB",
            "log_min_messages=warning",
        ]
        if self.supports_output_plugin_libraries():
            settings.append(f"output_plugin_libraries={OUTPUT_PLUGINS}")
        settings += extra_settings  # later settings win
        opts = " ".join(f"-c {s}" if "=" in s and " " not in s else f"-c '{s}'" for s in settings)
        log = self.datadir / "server.log"
        res = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(log),
            "-o", opts, "-w", "-t", "60", "start", check=False,
        )
        if res.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start:\n{res.stdout}{res.stderr}\n{tail}")
        return self.dsn()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs (``mode``: smart, fast or immediate)."""
        if self.is_running():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        """Stop the server and delete its data directory."""
        self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)


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
