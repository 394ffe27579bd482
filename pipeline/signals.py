"""Ctrl-C, SIGTERM and a batch system's warning signal as clean stops.

A batch system stops a job with SIGTERM (and warns before its time limit with a signal of the user's
choice: Slurm's `--signal=USR1@120`), a user with Ctrl-C (SIGINT).
- Stage one can stop anywhere (`raise_on_signals`): nothing is committed before its record is written,
  and the record write is atomic, so `Interrupted` unwinds through `finally` blocks that stop the worker
  threads, and the CLI says how to resume.
- Stage two stops at the next step boundary (`StopRequest`): every rank agrees on the step, rank 0
  saves a full checkpoint of it, then `Interrupted` ends the run with 130 (SIGINT) or 143.
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
        if _held is not None:
            _held.append(signum)  # acted on at the end of `signals_deferred`
            return
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


_held: list[int] | None = None  # inside `signals_deferred`: the stop signals that arrived, to act on at its end


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Within `raise_on_signals`, a stop signal that arrives in this block raises at its end, not inside it.

    For starting threads: CPython cannot survive an exception raised inside `Thread.start` -- the
    interrupted start and the new thread's bootstrap both remove it from threading's table, and the
    second prints a KeyError traceback. (Blocking the signal in the main thread is not enough: the
    kernel hands it to any native thread -- torch's, decord's -- and Python still runs the handler.)
    """
    global _held
    if threading.current_thread() is not threading.main_thread() or _held is not None:
        yield
        return
    _held = []
    try:
        yield
    finally:
        held, _held = _held, None
    if held:
        raise Interrupted(held[0])


class StopRequest:
    """Records the first stop signal received (SIGINT, SIGTERM, and `warning`, e.g. "SIGUSR1") instead of
    interrupting the step; the training loop asks `received` at each step boundary."""

    def __init__(self, warning: str | None = None) -> None:
        self.signals = STOP_SIGNALS + ((signal.Signals[warning],) if warning else ())
        self.received = 0  # the signal's number, 0 while none came
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in self.signals}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step to end
        self.received = self.received or signum
