"""Read-only maps of shard files, kept across reads: what the training loader copies windows out of.

Why keep them: a map made for one read pays a page fault per 64 KiB it touches, which costs what the
copy out of it saves over `pread`; a map kept for the run is populated once, and every later read of the
same file is a plain memcpy (shard files of committed attempts never change). The cache holds at most
`limit` maps (least recently used dropped first): mapped pages are the page cache's, which the kernel
reclaims as it would for reads, and they show in a process's RSS as shared file pages, not as its own
memory.

A map is reused only while the file is the one that was mapped: one `stat` per file and call compares
its device, inode, size and modification time, so a file replaced or cut is mapped again, and one that
is gone raises FileNotFoundError as opening it would. A map being read by one thread stays valid when
another drops it from the cache: the reader holds a buffer of it, and it is unmapped when the last
holder lets go.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict


class ShardMaps:
    """Path -> a read-only map of the file, valid while the file's identity is unchanged."""

    def __init__(self, limit: int = 1024):
        self.limit = limit
        self._maps: OrderedDict[str, tuple[tuple[int, int, int, int], mmap.mmap]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> mmap.mmap:
        """The map of `path`: FileNotFoundError if it is gone, ValueError if it is empty (nothing to map)."""
        st = os.stat(path)
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            held = self._maps.get(path)
            if held is not None and held[0] == identity:
                self._maps.move_to_end(path)
                return held[1]
        with open(path, "rb") as f:  # the identity of what was opened, not of what was stat'ed before
            st = os.fstat(f.fileno())
            mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        with self._lock:
            self._maps[path] = ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), mapped)
            self._maps.move_to_end(path)
            while len(self._maps) > self.limit:
                self._maps.popitem(last=False)  # unmapped when no reader holds it any more
        return mapped

    def forget(self, paths: list[str]) -> None:
        """Drop these files' maps (after a read out of them failed: the next read maps them afresh)."""
        with self._lock:
            for path in paths:
                self._maps.pop(path, None)

    def __len__(self) -> int:
        return len(self._maps)
