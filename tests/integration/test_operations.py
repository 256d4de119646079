"""Running the poller in production: Prometheus metrics and health checks through a destination
outage, JSON logs with no secret in them, systemd's notify protocol, the progress bar on a
terminal, the poller without the metrics extra."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from bemi_pg import commands

from ..conftest import run_cli
from ..faults import EXCLUDE, SCHEMA, Ledger, Writer, compare, excluding_config, poller_env

text_string_to_metric_families = pytest.importorskip(
    "prometheus_client.parser", reason="the metrics extra: pip install -e '.[metrics]'").text_string_to_metric_families
PASSWORD = "Known-Pw-4f7c2e9a"  # the test cluster trusts every local connection: libpq never sends it
CLEAN = {"lost": 0, "duplicated": 0, "misattributed": 0, "phantom": 0}


def with_password(dsn: str) -> str:
    return conninfo.make_conninfo(dsn, password=PASSWORD)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[str, float]:
    """``name{label=value,...}`` -> value, through prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k not in ("source", "slot"))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


class Stderr(threading.Thread):
    """Collects a child's stderr lines as they come."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate: Any, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = predicate(line)
                if found:
                    return found
            time.sleep(0.05)
        raise AssertionError(f"not logged within {timeout}s: {self.lines[-20:]}")


def wait_until(check: Any, timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_metrics_health_and_json_logs_through_a_destination_outage(db, other_db):
    db.execute(SCHEMA)
    db.install(destination=other_db.dsn, exclude_tables=EXCLUDE)
    ledger, stop = Ledger(), threading.Event()
    writers = [Writer(db.dsn, w, ledger, stop) for w in range(2)]
    for writer in writers:
        writer.start()
    poller = subprocess.Popen(
        [sys.executable, "-m", "bemi_pg", "poll", "--follow", "--interval", "0.1", "--metrics-port", "0", "--log-format", "json",
         "--destination-dsn", with_password(other_db.dsn)],
        env=poller_env(with_password(db.dsn), config=excluding_config()), stderr=subprocess.PIPE, text=True)
    err = Stderr(poller.stderr)
    err.start()
    scraped: list[str] = []
    try:
        base = err.wait_for(lambda line: json.loads(line).get("metrics_url"))
        assert base.startswith("http://127.0.0.1:")
        wait_until(lambda: get(base + "readyz")[0] == 200, what="/readyz")
        assert get(base + "healthz") == (200, "ok\n")
        time.sleep(1.5)
        text = get(base + "metrics")[1]
        scraped.append(text)
        before = samples(text)
        assert before["bemi_pg_changes_written_total{}"] > 0
        assert before["bemi_pg_wal_status{status=reserved}"] == 1
        assert before["bemi_pg_poller_info{capture_mode=wal,version=0.4.0}"] == 1
        [head_metric] = [k for k in before if k.startswith("bemi_pg_trail_head_info{head=")]  # the sealed trail's head

        db.execute(f'ALTER DATABASE "{other_db.name}" ALLOW_CONNECTIONS false')
        db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (other_db.name,))
        health_during, lag_during = [], []
        for _ in range(10):
            time.sleep(0.5)
            health_during.append(get(base + "healthz"))
            text = get(base + "metrics")[1]
            scraped.append(text)
            lag_during.append(samples(text)["bemi_pg_slot_lag_bytes{}"])
        db.execute(f'ALTER DATABASE "{other_db.name}" ALLOW_CONNECTIONS true')
        assert any(status == 503 and "destination database is unreachable" in body for status, body in health_during), health_during
        assert max(lag_during) > 2 * before["bemi_pg_slot_lag_bytes{}"] and max(lag_during) > lag_during[0], lag_during
        wait_until(lambda: get(base + "healthz")[0] == 200, timeout=90, what="/healthz to recover")
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    try:
        def caught_up() -> dict[str, float] | None:
            text = get(base + "metrics")[1]
            scraped.append(text)
            now = samples(text)
            [(rows, transactions)] = other_db.execute(
                "SELECT count(*), count(DISTINCT commit_position) FROM changes WHERE source = %s", (db.source,))
            done = now["bemi_pg_changes_written_total{}"] == rows and now["bemi_pg_slot_lag_bytes{}"] < max(lag_during)
            return now if done and now["bemi_pg_transactions_written_total{}"] == transactions else None

        after = wait_until(caught_up, timeout=90, what="the counters to match the changes table")
        assert after["bemi_pg_poll_errors_total{kind=destination}"] >= 1
        assert after["bemi_pg_poll_errors_total{kind=other}"] == 0
        assert after["bemi_pg_batch_duration_seconds_count{}"] >= 1
        [(newest,)] = other_db.execute("SELECT extract(epoch FROM max(committed_at))::float8 FROM changes")
        assert after["bemi_pg_last_commit_timestamp_seconds{}"] == pytest.approx(newest, abs=1e-3)
    finally:
        poller.send_signal(signal.SIGTERM)
        poller.wait(timeout=120)
        err.join(timeout=10)
    assert poller.returncode == 0, err.lines[-20:]
    entries = [json.loads(line) for line in err.lines]  # every line is one JSON object
    assert all({"time", "level", "message"} <= entry.keys() for entry in entries)
    warnings = [e for e in entries if e["level"] == "warning"]
    assert warnings and all(e["error_kind"] == "destination" and e["slot"] == "bemi_" + db.name for e in warnings)
    assert any(e.get("changes", 0) > 0 and e.get("position") and e.get("transactions") for e in entries)
    for text in [*err.lines, *scraped, *(body for _, body in health_during)]:
        assert PASSWORD not in text
    commands.poll_once(db.dsn, other_db.dsn, db.settings)
    assert {k: v for k, v in compare(db.dsn, other_db.dsn, ledger).items() if k in CLEAN} == CLEAN
    logged = [e["head"] for e in entries if e.get("head")]
    assert logged and head_metric[len("bemi_pg_trail_head_info{head="):-1] in logged
    assert commands.verify(db.dsn, other_db.dsn, db.settings, head=logged[0]).intact  # a head the log kept


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_systemd_notify_ready_watchdog_and_stopping(db, abstract):
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.install()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"bemi-pg-notify-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(Path(tempfile.mkdtemp(prefix="bemi-pg-notify-")) / "notify")
        sock.bind(address)
    sock.settimeout(30)
    poller = subprocess.Popen([sys.executable, "-m", "bemi_pg", "poll", "--follow", "--interval", "0.05"],
                              env=poller_env(db.dsn, NOTIFY_SOCKET=address, WATCHDOG_USEC="200000"),
                              stderr=subprocess.PIPE, text=True)
    messages: list[str] = []
    try:
        while sum(m == "WATCHDOG=1" for m in messages) < 3:
            messages.append(sock.recv(4096).decode())
        db.execute("INSERT INTO t VALUES (1)")
    finally:
        poller.send_signal(signal.SIGTERM)
        _, err = poller.communicate(timeout=60)
    sock.settimeout(5)
    while messages[-1] != "STOPPING=1":
        messages.append(sock.recv(4096).decode())
    sock.close()
    assert poller.returncode == 0, err
    assert messages[0] == "READY=1\nSTATUS=polling"  # after the first poll, before any watchdog ping
    assert messages.count("READY=1\nSTATUS=polling") == 1
    assert set(messages[1:-1]) == {"WATCHDOG=1"}


def _run_on_pty(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; return its exit status and what the terminal showed."""
    master, slave = os.openpty()
    child = subprocess.Popen([sys.executable, "-m", "bemi_pg", *args], env={**env, "TERM": "xterm", "COLUMNS": "120"},
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return child.wait(timeout=120), shown.decode(errors="replace")


def test_progress_bar_on_a_terminal_only(db):
    db.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
    db.install()
    db.execute("INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 60000) g")
    env = poller_env(db.dsn)
    status, shown = _run_on_pty(["poll", "--once", "--batch-size", "5000"], env)
    assert status == 0, shown
    assert f"draining bemi_{db.name}" in shown
    assert "━" in shown and "B/s" in shown and ("kB" in shown or "MB" in shown)  # the bar, the rate, the bytes done of the total
    assert "wrote 60000 changes" in shown
    db.execute("INSERT INTO t SELECT g, 'y' FROM generate_series(60001, 70000) g")
    result = run_cli("poll", "--once", "--batch-size", "5000", env={"BEMI_DSN": db.dsn})
    assert result.returncode == 0, result.stderr
    assert "draining" not in result.stderr and "━" not in result.stderr and "\x1b" not in result.stderr
    assert result.stderr.splitlines() == [line for line in result.stderr.splitlines() if line.startswith("bemi-pg: wrote 10000 ")]


def test_the_poller_runs_without_the_metrics_extra(db):
    hidden = Path(tempfile.mkdtemp(prefix="bemi-pg-noprom-")) / "prometheus_client"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError('prometheus_client is not installed here')\n")
    env = {"BEMI_DSN": db.dsn, "PYTHONPATH": str(hidden.parent)}
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.install()
    db.execute("INSERT INTO t VALUES (1), (2)")
    result = run_cli("poll", "--once", env=env)
    assert result.returncode == 0, result.stderr
    assert len(db.changes()) == 2
    result = run_cli("poll", "--follow", "--metrics-port", "0", env=env)
    assert result.returncode == 2
    assert result.stderr == "error: --metrics-port needs the prometheus_client package: pip install 'bemi-pg[metrics]'\n"
    result = run_cli("poll", "--once", "--metrics-port", "9187", env={"BEMI_DSN": db.dsn})
    assert (result.returncode, result.stderr) == (2, "error: --metrics-port serves a running poller: use it with poll --follow\n")


def test_a_busy_metrics_port_is_one_clear_error(db):
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.install()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("poll", "--follow", "--metrics-port", str(port), env={"BEMI_DSN": with_password(db.dsn)}, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot serve metrics on 127.0.0.1:{port} (")
    assert result.stderr.endswith("choose another --metrics-port\n") and PASSWORD not in result.stderr
    with psycopg.connect(db.dsn) as conn:  # it let go of the slot's lock
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone() == (0,)
