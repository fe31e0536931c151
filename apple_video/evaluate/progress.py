"""Progress for long evaluations: a tqdm bar on a terminal, a log line every few seconds otherwise."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

logger = logging.getLogger(__name__)


class LogProgress:
    """tqdm's update/close surface, reported as periodic log lines (for logs, CI and pipes)."""

    def __init__(self, total: int | None, desc: str, every_s: float = 10.0) -> None:
        self.total, self.desc, self.every_s = total, desc, every_s
        self.n = 0
        self._start = self._last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._log(now)

    def _log(self, now: float) -> None:
        rate = self.n / max(now - self._start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        logger.info("%s: %d%s (%.1f/s)", self.desc, self.n, of, rate)

    def close(self) -> None:
        self._log(time.perf_counter())

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "frame") -> tqdm | LogProgress:
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit)
    return LogProgress(total, desc)
