"""Periodic progress lines for long-running tasks: count, rate, fraction done and ETA.

A line every ``every_s`` seconds in the task's log (datatrove sends task logs to the console
and to ``_logs/logs/task_XXXXX.log``), so a Slurm array task is as easy to follow as a local run.
"""

from __future__ import annotations

import time

from loguru import logger


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, label: str, unit: str = "docs", every_s: float = 10.0):
        self.label = label
        self.unit = unit
        self.every_s = every_s
        self.count = 0
        self.started = self._last = time.monotonic()

    def update(self, n: int = 1, fraction: float | None = None) -> None:
        """Add ``n`` items; ``fraction`` (0..1) of the task's work done, when known, gives an ETA."""
        self.count += n
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        elapsed = now - self.started
        line = f"{self.label}: {self.count} {self.unit} ({self.count / elapsed:.1f}/s)"
        if fraction and fraction > 0:
            line += f", {fraction:.0%} done, ETA {_clock(elapsed * (1 - fraction) / fraction)}"
        logger.info(line)
