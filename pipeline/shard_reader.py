"""Rows of a sharded feature array read straight from its shard files: the training loader's fast path.

zarr-python funnels every read through one asyncio thread and copies each chunk twice; for the layout
this project writes (`shard_layout`) the bytes of a window are plain ranges of a few files. This reader
reads each shard's index once (and checks its crc32c), then `preadv`s each inner chunk straight into the
caller's buffer together with its 4 checksum bytes, and checks it in one crc32c pass against both the
chunk's crc32c and the commit record's crc32c of its rows (combined with `Concat`). It releases the GIL
while reading, so several loader threads really read in parallel. Anything else -- a compressed array, an
object store, another layout -- goes through zarr (`ShardedRowReader.for_array` returns None).

Why `preadv` and not a memory map (measured, README "Performance"): a fresh map per read pays its page
faults, which cost what memcpy saves over the kernel's copy, and a disk error under a map is SIGBUS,
which ends the process, where `preadv` raises an error that names the file and lets the run go on.

Damage is never read as data: a chunk the index marks missing, a file that is gone or short, an index or
a chunk whose crc32c does not match -- each raises `DamagedDataError` naming the shard file.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import zarr

from pipeline.checksums import Concat, crc32c
from pipeline.errors import DamagedDataError
from pipeline.shard_layout import MISSING, ShardLayout


class ShardedRowReader(ShardLayout):
    """Reads rows [a, b) of one local, uncompressed, time-sharded array into a caller's buffer."""

    def __init__(self, folder: str, arr: zarr.Array):
        super().__init__(folder, arr)
        self._concat = Concat(self.row_bytes)
        self._index: dict[int, np.ndarray] = {}  # shard -> [per_shard, 2] (offset, nbytes); immutable files
        self._lock = threading.Lock()

    def read(self, a: int, b: int, out: np.ndarray, want: Sequence[int], whole_chunks: bool = False) -> int | None:
        """Rows a..b-1 into `out` (a C-contiguous array of exactly (b - a) rows' bytes), checked against `want`,
        each row's crc32c from the commit record: None when every row matches, else the first row (counted
        from a) that does not, for the caller to name.

        The rows read from one chunk go through crc32c once, in one call: the result must equal what their
        recorded crc32c give together (`Concat`), and a whole chunk's must also equal the crc32c stored after
        it in the shard. One call per chunk rather than per row: each call hands the GIL over and back while
        the other reader threads wait for it. Of a chunk at a window edge only the window's rows are read,
        unless `whole_chunks` (verify: every chunk a view touches is checked, as a plain zarr reader would
        read it).
        """
        flat = out.reshape(-1).view(np.uint8)  # [(b - a) * row_bytes]
        if flat.nbytes != (b - a) * self.row_bytes or len(want) != b - a:
            raise ValueError(f"buffer of {flat.nbytes} bytes and {len(want)} crc32c for rows {a}..{b} of "
                             f"{self.row_bytes} bytes")
        rb, c0, c1 = self.row_bytes, a // self.chunk_rows, (b - 1) // self.chunk_rows
        for shard in range(c0 // self.per_shard, c1 // self.per_shard + 1):
            with _opened(self.shard_file(shard)) as fd:  # once per shard and call, not per chunk
                for c in range(max(c0, shard * self.per_shard), min(c1 + 1, (shard + 1) * self.per_shard)):
                    first = c * self.chunk_rows
                    lo, hi = max(a, first), min(b, first + self.chunk_rows)
                    rows = flat[(lo - a) * rb : (hi - a) * rb]
                    if whole_chunks and hi - lo < self.chunk_rows:  # read and check it all, keep the window's
                        chunk = np.empty(self.chunk_rows * rb, np.uint8)
                        self._read_checked(fd, c, 0, self.chunk_rows, chunk)
                        rows[:] = chunk[(lo - first) * rb : (hi - first) * rb]
                        got = crc32c(rows)
                    else:
                        got = self._read_checked(fd, c, lo - first, hi - first, rows)
                    recorded = want[lo - a : hi - a]
                    if got != self._concat.fold(recorded):
                        return lo - a + self._first_mismatch(rows, recorded)
        return None

    def _read_checked(self, fd: int, c: int, lo: int, hi: int, target: np.ndarray) -> int:
        """Rows lo..hi-1 of inner chunk c (its shard file open as `fd`) into `target`; their crc32c (a whole
        chunk's checked against the shard's)."""
        path, offset, nbytes = self.chunk_location(c)
        j = c % self.per_shard
        if nbytes != self.chunk_rows * self.row_bytes + 4:
            raise DamagedDataError(path, f"inner chunk {j} is {nbytes} bytes, the layout says "
                                         f"{self.chunk_rows * self.row_bytes + 4}")
        whole = (lo, hi) == (0, self.chunk_rows)
        crc = np.empty(4 if whole else 0, np.uint8)
        _pread(fd, path, [target, crc], offset + lo * self.row_bytes, target.nbytes + crc.nbytes)
        got = crc32c(target)
        if whole and got != int(crc.view("<u4")[0]):
            raise DamagedDataError(path, f"inner chunk {j} does not match its crc32c")
        return got

    def _first_mismatch(self, rows: np.ndarray, recorded: Sequence[int]) -> int:
        """The first of `rows` (bytes) whose crc32c is not its recorded one (their crc32c together differ)."""
        rb = self.row_bytes
        return next(k for k, want in enumerate(recorded) if crc32c(rows[k * rb : (k + 1) * rb]) != want)

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
        if offset == MISSING:
            raise DamagedDataError(path, f"inner chunk {j} (rows {c * self.chunk_rows}.."
                                         f"{(c + 1) * self.chunk_rows - 1}) is missing from the shard")
        return path, int(offset), int(nbytes)

    def _read_index(self, path: str) -> np.ndarray:
        size = 16 * self.per_shard + 4
        raw = np.empty(size, np.uint8)
        with _opened(path) as fd:
            end = os.fstat(fd).st_size
            if end < size or os.preadv(fd, [raw], end - size) != size:
                raise DamagedDataError(path, f"shard file of {end} bytes is too short for its index")
        if crc32c(raw[:-4]) != int(raw[-4:].view("<u4")[0]):
            raise DamagedDataError(path, "shard index does not match its crc32c")
        return raw[:-4].view("<u8").reshape(self.per_shard, 2)


@contextlib.contextmanager
def _opened(path: str) -> Iterator[int]:
    """A shard file open for reading; a missing one is damage, named."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise DamagedDataError(path, "shard file is missing") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _pread(fd: int, path: str, buffers: list[np.ndarray], offset: int, nbytes: int) -> None:
    got = os.preadv(fd, buffers, offset)
    if got != nbytes:
        raise DamagedDataError(path, f"read {got} of {nbytes} bytes at offset {offset}: the file is cut short")
