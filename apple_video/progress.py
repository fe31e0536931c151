"""Progress for long work: a tqdm bar on a terminal, a log line every few seconds otherwise (CI logs,
`2> log.txt`, Ray job drivers)."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

logger = logging.getLogger(__name__)


class LogProgress:
    """tqdm's update/close surface, reported as periodic log lines and one at the end."""

    def __init__(self, total: int | None, desc: str, unit: str = "frame", every_s: float = 10.0) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = 0
        self._start = self._last = time.monotonic()
        self._logged = -1

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s or (self.total and self.n >= self.total):
            self._last = now
            self._log(now)

    def _log(self, now: float) -> None:
        self._logged = self.n
        rate = self.n / max(now - self._start, 1e-9)
        if self.total:
            logger.info("%s: %d/%d %ss (%d%%, %.1f %ss/s)", self.desc, self.n, self.total, self.unit,
                        100 * self.n // self.total, rate, self.unit)
        else:
            logger.info("%s: %d %ss (%.1f %ss/s)", self.desc, self.n, self.unit, rate, self.unit)

    def close(self) -> None:
        if self._logged != self.n:
            self._log(time.monotonic())

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "frame") -> tqdm | LogProgress:
    if sys.stderr.isatty() or total == 0:
        return tqdm(total=total, desc=desc, unit=unit, disable=None)
    return LogProgress(total, desc, unit)
