"""Files that survive a kill or a power cut: written aside, fsynced, renamed into place, folder fsynced.

Used for everything the project writes once and others rely on: commit, failure and claim records of
the store (on a local disk; an object store's single PUT is atomic already) and training checkpoints.
A kill at any moment leaves the old file or the new one, never a torn one; a temp file left by a kill
is found by its name (the callers' `gc` and start-up clean-up remove them).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def replace_durably(path: str | Path, write: Callable[[BinaryIO], object], tmp: str | Path) -> None:
    """`write` the new content into `tmp`, fsync it, rename it over `path`, fsync the folder."""
    folder = os.path.dirname(os.fspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` itself durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
