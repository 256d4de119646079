"""Prometheus metrics and health checks of ``poll --follow --metrics-port N``.

prometheus_client is an optional extra (``pip install 'bemi-pg[metrics]'``): the poller runs
without it, and only ``--metrics-port`` needs it. One HTTP server on the metrics port answers
``/metrics`` (prometheus_client's own WSGI app), ``/healthz`` and ``/readyz``. Every series is
labelled with the source identity and the slot, so that one Prometheus can scrape many pollers;
they carry counts and positions only, never data or secrets."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .db import connect, fetch_dict
from .errors import ConfigError
from .queries import query
from .service import Health

__all__ = ["PollerMetrics", "WAL_STATUSES", "require", "serve"]

log = logging.getLogger("bemi_pg")

WAL_STATUSES = ("reserved", "extended", "unreserved", "lost")
ERROR_KINDS = ("source", "destination", "other")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def require() -> None:
    """Raise ConfigError unless prometheus_client is installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError("--metrics-port needs the prometheus_client package: pip install 'bemi-pg[metrics]'") from None


class PollerMetrics:
    """The poller's series, in a registry of their own."""

    def __init__(self, source: str, slot: str, *, version: str, capture_mode: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry()
        names, values = ("source", "slot"), (source, slot)
        reg = self.registry
        self.changes = Counter("bemi_pg_changes_written", "Changes written to the changes table (duplicates not counted)",
                               names, registry=reg).labels(*values)
        self.transactions = Counter("bemi_pg_transactions_written", "Source transactions whose changes were written",
                                    names, registry=reg).labels(*values)
        errors = Counter("bemi_pg_poll_errors", "Polls that failed, by what failed", (*names, "kind"), registry=reg)
        self.errors = {kind: errors.labels(*values, kind) for kind in ERROR_KINDS}  # all three exist from the start
        self.batch_duration = Histogram("bemi_pg_batch_duration_seconds", "Time to read, write and commit one batch",
                                        names, buckets=BUCKETS, registry=reg).labels(*values)
        self.lag = Gauge("bemi_pg_slot_lag_bytes", "WAL bytes between the server's position and the slot's confirmed position",
                         names, registry=reg).labels(*values)
        self.last_commit = Gauge("bemi_pg_last_commit_timestamp_seconds",
                                 "Commit time of the newest change written (time() minus this is the trail's delay)",
                                 names, registry=reg).labels(*values)
        status = Gauge("bemi_pg_wal_status", "The slot's wal_status: 1 for the current one", (*names, "status"), registry=reg)
        self.wal_status = {s: status.labels(*values, s) for s in WAL_STATUSES}
        self._keep_size = Gauge("bemi_pg_max_slot_wal_keep_size_bytes",
                                "The source's max_slot_wal_keep_size (absent where it is -1, no limit)", names, registry=reg)
        self._labels = values
        self.slot_exists = Gauge("bemi_pg_slot_exists", "1 while the replication slot exists", names, registry=reg).labels(*values)
        info = Info("bemi_pg_poller", "The poller's version, source, slot and capture mode", registry=reg)
        info.info({"version": version, "source": source, "slot": slot, "capture_mode": capture_mode})
        # A hash is no number: the head is a label, so that a log or metrics store keeps each one.
        self.head = Info("bemi_pg_trail_head", "The sealed trail's head hash after the newest batch (`bemi-pg verify --head`)",
                         names, registry=reg).labels(*values)

    def batch(self, changes: int, transactions: int, seconds: float, committed_at: float | None,
              head: str | None = None) -> None:
        if head is not None:
            self.head.info({"head": head})
        self.changes.inc(changes)
        self.transactions.inc(transactions)
        self.batch_duration.observe(seconds)
        if committed_at is not None:
            self.last_commit.set(committed_at)

    def error(self, kind: str) -> None:
        self.errors.get(kind, self.errors["other"]).inc()

    def slot(self, info: dict[str, Any] | None) -> None:
        self.slot_exists.set(info is not None)
        if info is None:
            return
        if info["lag_bytes"] is not None:
            self.lag.set(info["lag_bytes"])
        if info["keep_size_bytes"] is None:
            self._keep_size.clear()
        else:
            self._keep_size.labels(*self._labels).set(info["keep_size_bytes"])
        for status, gauge in self.wal_status.items():
            gauge.set(info["wal_status"] == status)


class SlotProbe(threading.Thread):
    """Reads the slot's state every ``every`` seconds on a connection of its own, so that the lag
    is known while the poll loop waits for an unreachable database."""

    def __init__(self, source_dsn: str, slot: str, metrics: PollerMetrics, health: Health, every: float) -> None:
        super().__init__(name="bemi-pg slot probe", daemon=True)
        self.source_dsn, self.slot_name, self.metrics, self.health, self.every = source_dsn, slot, metrics, health, every
        self.stop = threading.Event()

    def run(self) -> None:
        conn = None
        failing = False
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect(self.source_dsn, role="source database")
                info = fetch_dict(conn, query("slot_metrics"), {"slot": self.slot_name})
                self.metrics.slot(info)
                if info is None:
                    self.health.slot(f"replication slot {self.slot_name} does not exist")
                elif info["wal_status"] == "lost":
                    self.health.slot(f"replication slot {self.slot_name} is lost (wal_status lost)")
                else:
                    self.health.slot(None)
                failing = False
            except Exception as exc:  # an unreachable source is the loop's to report; try again later
                (log.debug if failing else log.warning)("bemi-pg: cannot read the slot's state for the metrics: %s",
                                                        " ".join(str(exc).split())[:300], extra={"slot": self.slot_name})
                failing = True
                if conn is not None:
                    conn.close()
                conn = None
            self.stop.wait(self.every)
        if conn is not None:
            conn.close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # no access log on stderr


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


StartResponse = Callable[..., Any]


def app(metrics: PollerMetrics, health: Health) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """The WSGI app: ``/metrics`` (prometheus_client's), ``/healthz`` and ``/readyz`` (plain text)."""
    from prometheus_client import make_wsgi_app

    exposition = make_wsgi_app(metrics.registry)

    def answer(start_response: StartResponse, ok: bool, text: str) -> list[bytes]:
        body = (text + "\n").encode()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    def wsgi(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            return answer(start_response, *health.verdict())
        if path == "/readyz":
            return answer(start_response, health.ready, "ready" if health.ready else "no poll has succeeded yet")
        if path == "/metrics":
            return exposition(environ, start_response)  # type: ignore[no-any-return]
        body = b"not found: /metrics, /healthz or /readyz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return wsgi


@contextmanager
def serve(host: str, port: int, metrics: PollerMetrics, health: Health, *, source_dsn: str, slot: str,
          probe_every: float) -> Iterator[str]:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` and probe the slot while
    inside; yields the URL (port 0 picks a free port)."""
    try:
        server = make_server(host, port, app(metrics, health), server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port} ({exc.strerror}): choose another --metrics-port") from None
    url = f"http://{host}:{server.server_port}/"
    thread = threading.Thread(target=server.serve_forever, name="bemi-pg metrics", daemon=True)
    probe = SlotProbe(source_dsn, slot, metrics, health, probe_every)
    thread.start()
    probe.start()
    log.info("bemi-pg: metrics on %smetrics, health on %shealthz and %sreadyz", url, url, url, extra={"metrics_url": url})
    try:
        yield url
    finally:
        probe.stop.set()
        server.shutdown()
        server.server_close()
        probe.join(timeout=5)
