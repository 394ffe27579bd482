"""Rows of a sharded feature array read straight from its shard files: the training loader's path.

zarr-python funnels every read through one event-loop thread and copies each chunk more than once; for
the layout this project writes (`shard_layout`: uncompressed, a crc32c after each inner chunk, the index
at the end) the bytes of a window are plain ranges of one or two files. This reader reads each shard's
index once (checking its crc32c), then each inner chunk the window touches with one positional read
(`os.preadv`) straight into the caller's buffer, and runs crc32c over the bytes it read (fastcrc, which
releases the GIL, so reader threads check in parallel). The result must equal both the crc32c stored
after the chunk in the shard (for a chunk read whole) and the one the commit record's row digests give
together (`Concat`): every delivered byte is checked twice for the cost of one pass. Anything else -- a
compressed array, an object store -- goes through zarr (`ShardedRowReader.for_array` returns None).

What a shard file may be is checked before a byte is read from it: it is opened non-blocking and must be a
regular file (a FIFO, a device or a folder at a shard path is damage, named; opening a FIFO would otherwise
wait for a writer forever), and its index is read only for the geometry the array's metadata declares,
which the store has bounded. Damage is never read as data: a chunk the index marks missing, a file that is
gone or short, an index or a chunk whose crc32c does not match -- each raises `DamagedDataError` naming the
shard file. An error of the machine (too many open files, an I/O error) is an `OSError` naming the file,
never damage: the view is sound, the machine is not.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from pipeline.errors import DamagedDataError
from pipeline.store.checksums import Concat, crc32c
from pipeline.store.layout import MISSING, ShardLayout

_MISSING = int(MISSING)
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)


class Span(NamedTuple):
    """Rows lo..hi-1 (store rows) of inner chunk c, read to `at` bytes into the destination."""

    chunk: int
    lo: int
    hi: int
    at: int


class ShardedRowReader(ShardLayout):
    """Reads rows [a, b) of one local, uncompressed, time-sharded array into a caller's buffer."""

    def __init__(self, folder: str, arr: object) -> None:
        super().__init__(folder, arr)
        self._concat = Concat(self.row_bytes)
        self._index: dict[int, list[tuple[int, int]]] = {}  # shard -> (offset, nbytes) per chunk; immutable files
        self._lock = threading.Lock()

    def read(self, a: int, b: int, out: np.ndarray, want: Sequence[int], whole_chunks: bool = False) -> int | None:
        """Rows a..b-1 into `out` (a C-contiguous array of exactly (b - a) rows' bytes), checked against `want`,
        each row's crc32c from the commit record: None when every row matches, else the first row (counted
        from a) that does not, for the caller to name.

        The rows read from one chunk go through crc32c once: the result must equal what their recorded crc32c
        give together (`Concat`), and a whole chunk's must also equal the crc32c stored after it in the shard.
        Of a chunk at a window edge only the window's rows are read, unless `whole_chunks` (verify: every chunk
        a view touches is checked, as a plain zarr reader would read it).
        """
        flat = out.reshape(-1).view(np.uint8)  # [(b - a) * row_bytes]
        if flat.nbytes != (b - a) * self.row_bytes or len(want) != b - a:
            raise ValueError(f"buffer of {flat.nbytes} bytes and {len(want)} crc32c for rows {a}..{b} of "
                             f"{self.row_bytes} bytes")
        spans = self._spans(a, b)
        shards = range(spans[0].chunk // self.per_shard, spans[-1].chunk // self.per_shard + 1)
        with _opened([self.shard_file(s) for s in shards]) as fds:  # once per shard and call, not per chunk
            self._will_need(spans, fds, shards.start)
            for s in spans:
                fd = fds[s.chunk // self.per_shard - shards.start]
                rows = flat[s.at : s.at + (s.hi - s.lo) * self.row_bytes]
                got = self._read_span(fd, s, rows, whole_chunks)
                recorded = want[s.lo - a : s.hi - a]
                if got != self._concat.fold([int(c) for c in recorded]):
                    return s.lo - a + self._first_mismatch(rows, recorded)
        return None

    def _will_need(self, spans: list[Span], fds: list[int], first_shard: int) -> None:
        """Ask the kernel for every chunk of the window at once: from disk the reads then overlap instead of
        waiting for each other (a no-op where the pages are cached). A hint only: what is wrong with a chunk
        is left to its read, which names it."""
        size = self.chunk_rows * self.row_bytes + 4
        for s in spans:
            try:
                _, offset, nbytes = self.chunk_location(s.chunk)
            except DamagedDataError:
                return
            if nbytes == size and 0 <= offset < 1 << 62 and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fds[s.chunk // self.per_shard - first_shard], offset, nbytes, os.POSIX_FADV_WILLNEED)

    def _spans(self, a: int, b: int) -> list[Span]:
        """The inner chunks rows a..b-1 lie in, with the rows of each that the window takes."""
        spans = []
        for c in range(a // self.chunk_rows, (b - 1) // self.chunk_rows + 1):
            lo, hi = max(a, c * self.chunk_rows), min(b, (c + 1) * self.chunk_rows)
            spans.append(Span(c, lo, hi, (lo - a) * self.row_bytes))
        return spans

    def _read_span(self, fd: int, s: Span, rows: np.ndarray, whole_chunks: bool) -> int:
        """Read one span's rows into `rows` (bytes) and return their crc32c. A chunk read whole (all its rows
        are the window's, or `whole_chunks`) is checked against the crc32c stored after it."""
        path, offset, nbytes = self.chunk_location(s.chunk)
        first = s.chunk * self.chunk_rows
        if nbytes != self.chunk_rows * self.row_bytes + 4:
            raise DamagedDataError(path, f"inner chunk {s.chunk % self.per_shard} is {nbytes} bytes, the layout "
                                         f"says {self.chunk_rows * self.row_bytes + 4}")
        whole = (s.lo, s.hi) == (first, first + self.chunk_rows)
        if not whole and not whole_chunks:
            skip = (s.lo - first) * self.row_bytes
            _pread_exactly(fd, [rows], offset + skip, path)
            return crc32c(rows)
        target = rows if whole else np.empty(self.chunk_rows * self.row_bytes, np.uint8)
        trailer = np.empty(4, np.uint8)
        _pread_exactly(fd, [target, trailer], offset, path)
        crc = crc32c(target)
        if crc != int(trailer.view("<u4")[0]):
            raise DamagedDataError(path, f"inner chunk {s.chunk % self.per_shard} does not match its crc32c")
        if whole:
            return crc
        rows[:] = target[(s.lo - first) * self.row_bytes : (s.hi - first) * self.row_bytes]
        return crc32c(rows)

    def _first_mismatch(self, rows: np.ndarray, recorded: Sequence[int]) -> int:
        """The first of `rows` (bytes) whose crc32c is not its recorded one (their crc32c together differ)."""
        rb = self.row_bytes
        return next(k for k, want in enumerate(recorded) if crc32c(rows[k * rb : (k + 1) * rb]) != int(want))

    def chunk_location(self, c: int) -> tuple[str, int, int]:
        """(shard file, offset, bytes) of inner chunk c, from its shard's index (read once, checked)."""
        shard, j = divmod(c, self.per_shard)
        path = self.shard_file(shard)
        index = self._index.get(shard)
        if index is None:
            index = self._read_index(path)
            with self._lock:
                self._index[shard] = index
        offset, nbytes = index[j]
        if offset == _MISSING:
            raise DamagedDataError(path, f"inner chunk {j} (rows {c * self.chunk_rows}.."
                                         f"{(c + 1) * self.chunk_rows - 1}) is missing from the shard")
        return path, offset, nbytes

    def _read_index(self, path: str) -> list[tuple[int, int]]:
        size = 16 * self.per_shard + 4
        raw = np.empty(size, np.uint8)
        with _opened([path]) as (fd,):
            end = os.fstat(fd).st_size
            if end < size:
                raise DamagedDataError(path, f"shard file of {end} bytes is too short for its index")
            _pread_exactly(fd, [raw], end - size, path)
        if crc32c(raw[:-4]) != int(raw[-4:].view("<u4")[0]):
            raise DamagedDataError(path, "shard index does not match its crc32c")
        return [(o, n) for o, n in raw[:-4].view("<u8").reshape(self.per_shard, 2).tolist()]  # ints, for lookups


def _pread_exactly(fd: int, buffers: list[np.ndarray], offset: int, path: str) -> None:
    """Fill `buffers` from `offset` of the file: a file that ends first is damage, any error of the read an
    OSError naming the file."""
    want = sum(b.nbytes for b in buffers)
    try:
        got = os.preadv(fd, buffers, offset)
    except OSError as err:
        raise OSError(err.errno, err.strerror, path) from None
    if got != want:
        raise DamagedDataError(path, f"the file ends inside the {want} bytes at offset {offset}: the file is cut "
                                     "short")


def open_regular(path: str) -> int:
    """A descriptor of `path` for reading, which must be a regular file: anything else at a shard path (a FIFO,
    a device, a folder) is damage, named -- opened non-blocking, so a FIFO never waits for a writer. A missing
    file is damage too (committed files are never removed); any other error an OSError naming the file."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise DamagedDataError(path, "shard file is missing") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DamagedDataError(path, f"is {file_kind(mode)}, not a shard file")
    return fd


def file_kind(mode: int) -> str:
    """What a file of this mode is, in words (for messages)."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


@contextlib.contextmanager
def _opened(paths: list[str]) -> Iterator[list[int]]:
    """Shard files open for reading (each a regular file, see `open_regular`)."""
    fds: list[int] = []
    try:
        for path in paths:
            fds.append(open_regular(path))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)
