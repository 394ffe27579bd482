"""The errors a user can meet, and the exit codes they end in (users script around these).

    0    success
    1    the work failed or problems were found: episodes failed, damage found in a store, a disk full
    2    usage or configuration error: bad manifest or setting, wrong path, wrong store; nothing was done
    130  interrupted by Ctrl-C (SIGINT);  143  stopped by SIGTERM (or the warning signal of a batch system)
"""

from __future__ import annotations

import signal
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class UsageError(ValueError):
    """A setting, path or command line that cannot be used as given; the message names it (exit 2)."""


class StoreError(RuntimeError):
    """A store that cannot be used as asked: none there, another format version or fingerprint (exit 2)."""


class DamagedDataError(RuntimeError):
    """Bytes in a store that are not what was committed: named down to the file, never used (exit 1)."""

    def __init__(self, where: str, what: str) -> None:
        self.where, self.what = where, what
        super().__init__(f"damaged data: {where}: {what}")

    def __reduce__(self) -> tuple[type[DamagedDataError], tuple[str, str]]:
        return (type(self), (self.where, self.what))


class Interrupted(Exception):
    """A run stopped by a signal at a safe point; nothing half-committed."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum, self.detail = signum, detail
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return EXIT_SIGNAL.get(signal.Signals(self.signum), 143)


def file_in_the_way(path: str | Path) -> Path | None:
    """The regular file that keeps `path` from being a folder: the path itself, or the nearest of its parents
    that is a file (a folder asked for below a file); None if there is none. For error messages."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.is_file()), None)
