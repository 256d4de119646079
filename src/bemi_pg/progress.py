"""Progress bars for long work that knows how much is left: ``poll --once`` draining a backlog
(WAL bytes to go), a snapshot (rows to go).

Shown on stderr only when it is a terminal and rich (the ``progress`` extra) is installed;
otherwise every call does nothing, so callers never check. Use::

    with Progress("draining", unit="bytes") as bar:
        bar.start(total)
        bar.update(done)          # or bar.advance(n)
"""

from __future__ import annotations

import sys
from typing import IO, Any

__all__ = ["Progress", "shown"]

UNITS = ("bytes", "rows")


def shown(stream: IO[str] | None = None) -> bool:
    """Whether a bar would be drawn on ``stream`` (stderr by default)."""
    stream = sys.stderr if stream is None else stream
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """One bar: what is done of a total, the rate and the time left."""

    def __init__(self, description: str, *, unit: str = "rows", total: float | None = None,
                 stream: IO[str] | None = None) -> None:
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}")
        self.description, self.unit, self.total = description, unit, total
        self.stream = sys.stderr if stream is None else stream
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.total is not None:
            self.start(self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, total: float) -> None:
        """Show the bar (again, if it was closed) with ``total`` to do."""
        self.total = total
        if not shown(self.stream):
            return
        if self._bar is None:
            self._bar = _rich_progress(self.unit, self.stream)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=total)
        else:
            self._bar.update(self._task, total=total)

    def update(self, done: float) -> None:
        """``done`` of the total is done."""
        if self._bar is not None:
            self._bar.update(self._task, completed=min(done, self.total or done))

    def advance(self, amount: float) -> None:
        """``amount`` more is done."""
        if self._bar is not None:
            self._bar.advance(self._task, amount)

    def close(self) -> None:
        """Leave the finished bar on screen."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _rich_progress(unit: str, stream: IO[str]) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        ProgressColumn,
        Task,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class RowRate(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed:,.0f} rows/s" if task.speed else "? rows/s", style="progress.data.speed")

    done: ProgressColumn = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
    rate: ProgressColumn = TransferSpeedColumn() if unit == "bytes" else RowRate()
    return RichProgress(TextColumn("{task.description}"), BarColumn(), done, rate, TimeRemainingColumn(),
                        console=Console(file=stream), transient=False)
