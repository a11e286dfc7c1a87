"""Progress that reads well where it is written.

On a terminal a live tqdm bar redraws itself in place. In a file (a SLURM log, CI, ``> run.log``) every redraw
stays, one per update, so there progress is a log line at most every ``INTERVAL`` seconds and one at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

from tqdm import tqdm

log = logging.getLogger("ssat")

# Seconds between two lines about the same unfinished work in a non-interactive log.
INTERVAL = 30.0

T = TypeVar("T")


def interactive(stream: IO | None) -> bool:
    """Whether ``stream`` is a terminal, where a bar redrawn in place is read live."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class ProgressLines:
    """tqdm's ``update``/``close`` interface writing log lines: at most one every ``interval`` seconds of the
    injectable ``clock``, and one when the work is done."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.n, self.initial = total, desc, unit, initial, initial
        self.interval, self.clock = interval, clock
        self.start = self.last = clock()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval and self.n < self.total:
            self.last = now
            self._line(now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(self.clock())

    def _line(self, now: float) -> None:
        seconds = now - self.start
        rate = (self.n - self.initial) / seconds if seconds > 0 else float("nan")
        log.info("%s: %d/%d %s, %.1f s (%.3g %s/s)", self.desc, self.n, self.total, self.unit, seconds, rate,
                 self.unit)

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int, desc: str, unit: str, initial: int = 0, leave: bool = True,
             stream: IO | None = None) -> tqdm | ProgressLines:
    """A live bar on ``stream`` (default stderr, tqdm's) when it is a terminal, else progress lines."""
    stream = stream if stream is not None else sys.stderr
    if interactive(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=stream)
    return ProgressLines(total, desc, unit, initial)


def track(items: Iterable[T], total: int, desc: str, unit: str, initial: int = 0, leave: bool = True) -> Iterator[T]:
    """``items`` with progress counted one per item."""
    with progress(total, desc, unit, initial, leave) as bar:
        for item in items:
            yield item
            bar.update(1)
