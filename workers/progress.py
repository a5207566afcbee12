"""Progress of long start-up work (downloading, converting, loading weights).

On a terminal a tqdm bar redraws in place. Written to a file, a pipe or `docker logs`, the
same bar would become one endless line of carriage returns, so there it is a log line at most
every few seconds instead, plus one when the work is done.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm import tqdm

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 5.0


class LoggedProgress:
    """tqdm's `update` and context-manager interface, reporting through logging."""

    def __init__(self, total: int, desc: str, unit: str) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.done = 0
        self.start = time.monotonic()
        self.last_log = self.start

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last_log >= LOG_INTERVAL_S and self.done < self.total:
            self.last_log = now
            logger.info("%s: %s of %s %s (%d%%)", self.desc, self._number(self.done), self._number(self.total),
                        self._label(), 100 * self.done // max(self.total, 1))

    def _number(self, count: int) -> str:
        return f"{count / 1e6:.1f}" if self.unit == "B" else str(count)

    def _label(self) -> str:
        return "MB" if self.unit == "B" else f"{self.unit}s"

    def __enter__(self) -> LoggedProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            logger.info("%s: %s %s in %.1f s", self.desc, self._number(self.done), self._label(),
                        time.monotonic() - self.start)


def progress(total: int, desc: str, unit: str) -> tqdm | LoggedProgress:
    """A progress reporter for `total` units ("B" counts bytes): a bar on a terminal, log
    lines elsewhere."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B")
    return LoggedProgress(total, desc, unit)
