"""Progress of long commands: a tqdm bar on a terminal, plain log lines without one.

A bar redrawn with carriage returns is what a person at a terminal wants and what a batch job's log
(Slurm, a pipe, CI) cannot show: there it becomes one endless line. So without a terminal the same
calls write a plain line now and then (at most every `interval` seconds, and at the end) on stderr:
`extract: 872 frames, 316.6 frames/s, 14.1 s (parts=2/4, failed=0)`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

from tqdm.auto import tqdm

PLAIN_INTERVAL = 10.0  # seconds between plain lines


class Bar(Protocol):
    """What the commands call on a progress bar (tqdm's names)."""

    def update(self, n: int = 1) -> Any: ...
    def set_postfix(self, **values: Any) -> Any: ...
    def close(self) -> Any: ...


def progress(desc: str, unit: str, total: int | None = None, show: bool = True,
             interval: float = PLAIN_INTERVAL) -> Bar:
    """A bar on a terminal, plain lines without one, nothing when `show` is False."""
    if show and not sys.stderr.isatty():
        return PlainProgress(desc, unit, total, interval)
    return tqdm(total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True)


class PlainProgress:
    """tqdm's update / set_postfix / close, as a plain line on stderr at most every `interval` seconds."""

    def __init__(self, desc: str, unit: str, total: int | None, interval: float):
        self.desc, self.unit, self.total, self.interval = desc, unit, total, interval
        self.n, self.postfix = 0, ""
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.interval:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.n:
            self._line()

    def _line(self) -> None:
        self.last = time.perf_counter()
        elapsed = self.last - self.start
        done = f"{self.n}/{self.total} {self.unit}s" if self.total else f"{self.n} {self.unit}s"
        rate = f"{self.n / elapsed:.1f} {self.unit}s/s" if elapsed > 0 else ""
        extra = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {done}, {rate}, {elapsed:.1f} s{extra}", file=sys.stderr, flush=True)
