"""Change volume as bars, drawn by the server: geometry only; the template writes the SVG
(so every label is escaped there)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

__all__ = ["bars"]

WIDTH, HEIGHT = 600, 80


def bars(series: dict[datetime, int], since: datetime, days: int) -> dict[str, Any]:
    """One bar per day from ``since`` (the day it falls in) over ``days`` days; empty days drawn as gaps."""
    start = since.replace(hour=0, minute=0, second=0, microsecond=0)
    slots = [start + timedelta(days=i) for i in range(days + 1)]
    counts = {b.replace(tzinfo=None): n for b, n in series.items()}
    top = max(series.values(), default=0) or 1
    step = WIDTH / len(slots)
    out = []
    for i, day in enumerate(slots):
        n = counts.get(day.replace(tzinfo=None), 0)
        h = round(HEIGHT * n / top, 1)
        out.append({"x": round(i * step, 1), "y": round(HEIGHT - h, 1), "w": max(round(step - 1, 1), 1), "h": h,
                    "label": f"{day.date().isoformat()}: {n} change(s)"})
    return {"width": WIDTH, "height": HEIGHT, "bars": out, "max": max(series.values(), default=0),
            "total": sum(series.values())}
