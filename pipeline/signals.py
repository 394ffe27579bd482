"""Ctrl-C and SIGTERM as clean stops: raised as `Interrupted` at the point the main thread is at.

A batch system stops a job with SIGTERM, a user with Ctrl-C (SIGINT). Stage one can stop anywhere:
nothing is committed before its record is written, and the record write is atomic, so the exception
unwinds through `finally` blocks that stop the worker threads, and the CLI says how to resume.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from pipeline.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def raise_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise Interrupted in the main thread (elsewhere: a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
