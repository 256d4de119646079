"""Running the poller as a service: its health, systemd's notify protocol, and the observer
that feeds them (and the metrics and the progress bar, when there are any)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING

from .logs import redact

if TYPE_CHECKING:
    from .metrics import PollerMetrics
    from .poller import PollStats
    from .progress import Progress

__all__ = ["Health", "Monitor", "Notifier"]

log = logging.getLogger("bemi_pg")


class Health:
    """Whether the poll loop is alive and keeping up: what ``/healthz`` and ``/readyz`` answer.

    Healthy while the last poll succeeded and was recent (``stale_after`` seconds: a few
    intervals, and never less than a batch may take) and the slot is usable."""

    def __init__(self, interval: float, stale_after: float | None = None) -> None:
        self.stale_after = stale_after if stale_after is not None else max(15.0, 5 * interval)
        self._lock = threading.Lock()
        self._last_success: float | None = None
        self._failure: str | None = None
        self._slot_problem: str | None = None

    def succeeded(self) -> None:
        with self._lock:
            self._last_success = time.monotonic()
            self._failure = None

    def failed(self, reason: str) -> None:
        with self._lock:
            self._failure = redact(reason)

    def slot(self, problem: str | None) -> None:
        """What the slot probe found wrong with the slot (None: nothing)."""
        with self._lock:
            self._slot_problem = problem

    @property
    def ready(self) -> bool:
        """The first poll succeeded."""
        return self._last_success is not None

    def verdict(self) -> tuple[bool, str]:
        """(healthy, the reason when not)."""
        with self._lock:
            if self._slot_problem:
                return False, self._slot_problem
            if self._failure:
                return False, self._failure
            if self._last_success is None:
                return False, "no poll has succeeded yet"
            age = time.monotonic() - self._last_success
            if age > self.stale_after:
                return False, f"no successful poll for {age:.0f}s"
            return True, "ok"


class Notifier:
    """systemd's notify protocol (sd_notify(3)) over ``$NOTIFY_SOCKET``: ``READY=1`` once, then
    ``WATCHDOG=1`` at half of ``$WATCHDOG_USEC``; nothing at all when not run by systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address  # '@': the abstract namespace
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_every = int(usec) / 2e6 if usec.isdigit() and mine else None
        self._last_ping = 0.0
        self._ready = False

    def send(self, message: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message.encode())
        except OSError as exc:  # systemd gone or the socket wrong: the poller goes on regardless
            log.debug("bemi-pg: cannot notify systemd at %s: %s", self.address, exc)

    def ready(self) -> None:
        if not self._ready:
            self._ready = True
            self.send("READY=1\nSTATUS=polling")

    def alive(self) -> None:
        """The loop is alive: ping the watchdog if it is time (from READY=1 on)."""
        now = time.monotonic()
        if self._ready and self.watchdog_every is not None and now - self._last_ping >= self.watchdog_every:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")


class Monitor:
    """The poller's observer: keeps the health, the metrics and the progress bar, pings systemd."""

    def __init__(self, health: Health | None = None, notifier: Notifier | None = None,
                 metrics: PollerMetrics | None = None, progress: Progress | None = None) -> None:
        self.health = health
        self.notifier = notifier
        self.metrics = metrics
        self.progress = progress
        self._start_lsn = 0

    def batch_written(self, stats: PollStats, seconds: float) -> None:
        if self.metrics is not None:
            committed = datetime.fromisoformat(stats.committed_at).timestamp() if stats.committed_at else None
            self.metrics.batch(stats.changes, stats.transactions, seconds, committed, stats.head)
        if self.progress is not None and stats.end_lsn:
            self.progress.update(stats.end_lsn - self._start_lsn)
        self._alive(success=True)

    def backlog(self, start_lsn: int, target_lsn: int) -> None:
        self._start_lsn = start_lsn
        if self.progress is not None:
            self.progress.start(max(target_lsn - start_lsn, 0))

    def polled(self) -> None:
        self._alive(success=True)
        if self.notifier is not None:
            self.notifier.ready()

    def failed(self, kind: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.error(kind)
        if self.health is not None:
            self.health.failed(reason)
        self._alive(success=False)

    def _alive(self, *, success: bool) -> None:
        if success and self.health is not None:
            self.health.succeeded()
        if self.notifier is not None:
            self.notifier.alive()
