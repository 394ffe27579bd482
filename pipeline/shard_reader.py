"""Rows of a sharded feature array read straight from its shard files: the training loader's fast path.

zarr-python funnels every read through one asyncio thread and copies each chunk twice; for the layout
this project writes (`shard_layout`) the bytes of a window are plain ranges of a few files. This reader
reads each shard's index once (and checks its crc32c), plans the window as ranges of inner chunks (each
read straight into the caller's buffer, a whole chunk with its 4 checksum bytes), and checks each range
in the same pass against the chunk's crc32c and the commit record's crc32c of its rows (combined with
`Concat`). Anything else -- a compressed array, an object store, another layout -- goes through zarr
(`ShardedRowReader.for_array` returns None).

Two executors run a plan, with the same results: the native one (`pipeline/_shardio.c`, built with the
package) reads every range of the window in one call with the GIL released and checksums each 256 KiB
piece while it is still in cache; the Python one `preadv`s each range and runs crc32c over it (both
release the GIL, but once per call, so reader threads queue for it between calls). The native one is
used where it was built and the CPU has its crc32c instructions (`NATIVE`); `PIPELINE_NATIVE_READS=0`
turns it off.

The training loader's reads (`read_many`) copy out of read-only maps of the shard files, kept open
across reads (`MAPS`), rather than `pread`ing them: shard files are immutable once committed, and a copy
out of a map whose pages are already mapped skips the kernel's per-call work and its slower copy; each
vector is checksummed as it is copied (`COPY_KERNEL`: AVX-512, AVX2 or SSE vectors), so the bytes are read
once, not copied and read again (checked reads ~1.6-2x those with `preadv`, at the speed of an unchecked
memcpy out of the same maps, README "Performance"). A map
is reused while its file's identity (device, inode, size, mtime) is what it was when mapped, checked by
one `stat` per file and call, so a file replaced, cut or deleted is mapped again or read as damage, as a
read call would see it. A disk error or a file cut short after it was mapped answers with SIGBUS, which
would end the process: the native copy runs under a guard that turns it into an OSError for that call,
and the window is read again alone with read calls, which name the damage. Single reads (`read`, used by
verify and to name damage) keep `preadv`. `PIPELINE_MAPPED_READS=0` turns the maps off.

Damage is never read as data: a chunk the index marks missing, a file that is gone or short, an index or
a chunk whose crc32c does not match -- each raises `DamagedDataError` naming the shard file.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import zarr

from pipeline.checksums import Concat, crc32c
from pipeline.errors import DamagedDataError
from pipeline.shard_layout import MISSING, ShardLayout
from pipeline.shard_maps import ShardMaps

_MISSING = int(MISSING)

try:
    from pipeline import _shardio
except ImportError:  # built without a C compiler: the Python executor
    _shardio = None

KERNEL = _shardio.kernel if _shardio is not None else ""  # the native crc32c kernel, "" if none
COPY_KERNEL = getattr(_shardio, "copy_kernel", "") if KERNEL else ""  # copies and checksums out of maps in one pass
NATIVE = bool(KERNEL) and os.environ.get("PIPELINE_NATIVE_READS", "1") != "0"
MAPPED = os.environ.get("PIPELINE_MAPPED_READS", "1") != "0"  # read_many copies out of MAPS (native only)
MAPS = ShardMaps()  # the maps of every shard file read_many has read, for the process
PIECE = 256 * 1024  # bytes read per call before they are checksummed: in L2 (128-512 KiB alike, 1 MiB+ ~9% slower)


def reader_crc32c(data: np.ndarray) -> int:
    """crc32c of a contiguous array by the kernel the reader's default executor checks with (for benchmarks)."""
    return _shardio.crc32c(data) if NATIVE and _shardio is not None else crc32c(data)


class Span(NamedTuple):
    """Rows lo..hi-1 (store rows) of inner chunk c, read to `at` bytes into the destination (a tuple: a few are
    made per window, on the loader's hot path)."""

    chunk: int
    lo: int
    hi: int
    at: int


class ShardedRowReader(ShardLayout):
    """Reads rows [a, b) of one local, uncompressed, time-sharded array into a caller's buffer."""

    def __init__(self, folder: str, arr: zarr.Array):
        super().__init__(folder, arr)
        self._concat = Concat(self.row_bytes)
        self._index: dict[int, list[tuple[int, int]]] = {}  # shard -> (offset, nbytes) per chunk; immutable files
        self._lock = threading.Lock()
        self.native = NATIVE  # which executor runs the plans (tests and the bench compare the two)
        self.mapped = MAPPED  # read_many out of maps of the files (when native), else with read calls

    def use_native(self, on: bool) -> None:
        """Run the plans natively (where the extension has a kernel for this CPU) or in Python."""
        self.native = on and bool(KERNEL)

    def use_maps(self, on: bool) -> None:
        """Let `read_many` copy this reader's rows out of kept maps of the files (native plans only)."""
        self.mapped = on

    def read(self, a: int, b: int, out: np.ndarray, want: Sequence[int], whole_chunks: bool = False) -> int | None:
        """Rows a..b-1 into `out` (a C-contiguous array of exactly (b - a) rows' bytes), checked against `want`,
        each row's crc32c from the commit record: None when every row matches, else the first row (counted
        from a) that does not, for the caller to name.

        The rows read from one chunk go through crc32c once, as they are read: the result must equal what
        their recorded crc32c give together (`Concat`), and a whole chunk's must also equal the crc32c stored
        after it in the shard. Of a chunk at a window edge only the window's rows are read, unless
        `whole_chunks` (verify: every chunk a view touches is checked, as a plain zarr reader would read it).
        """
        flat = out.reshape(-1).view(np.uint8)  # [(b - a) * row_bytes]
        if flat.nbytes != (b - a) * self.row_bytes or len(want) != b - a:
            raise ValueError(f"buffer of {flat.nbytes} bytes and {len(want)} crc32c for rows {a}..{b} of "
                             f"{self.row_bytes} bytes")
        spans = self._spans(a, b)
        edges = [s for s in spans if whole_chunks and s.hi - s.lo < self.chunk_rows]
        shards = range(spans[0].chunk // self.per_shard, spans[-1].chunk // self.per_shard + 1)
        paths = [self.shard_file(s) for s in shards]
        with _opened(paths) as opened:  # once per shard and call, not per chunk
            fds = dict(zip(paths, opened, strict=True))
            inner = [s for s in spans if s not in edges]
            got = dict(zip(inner, self._run(fds, inner, flat), strict=True))
            for s in edges:  # read and check the whole chunk, keep the window's rows
                chunk = np.empty(self.chunk_rows * self.row_bytes, np.uint8)
                whole = Span(s.chunk, s.chunk * self.chunk_rows, (s.chunk + 1) * self.chunk_rows, 0)
                self._run(fds, [whole], chunk)
                rows = flat[s.at : s.at + (s.hi - s.lo) * self.row_bytes]
                rows[:] = chunk[(s.lo - whole.lo) * self.row_bytes : (s.hi - whole.lo) * self.row_bytes]
                got[s] = crc32c(rows)
        for s in spans:
            recorded = want[s.lo - a : s.hi - a]
            if got[s] != self._concat.fold(recorded):
                return s.lo - a + self._first_mismatch(flat[s.at : s.at + (s.hi - s.lo) * self.row_bytes], recorded)
        return None

    def _spans(self, a: int, b: int) -> list[Span]:
        """The inner chunks rows a..b-1 lie in, with the rows of each that the window takes."""
        spans = []
        for c in range(a // self.chunk_rows, (b - 1) // self.chunk_rows + 1):
            lo, hi = max(a, c * self.chunk_rows), min(b, (c + 1) * self.chunk_rows)
            spans.append(Span(c, lo, hi, (lo - a) * self.row_bytes))
        return spans

    def _run(self, fds: dict[str, int], spans: list[Span], dest: np.ndarray) -> list[int]:
        """Read the spans into `dest` (bytes) and return their crc32c; a whole chunk's is checked against the
        crc32c stored after it in the shard."""
        if not spans:
            return []
        located = self.located(spans)
        complete, crcs, stored = execute(located, fds, dest, self.native)
        if complete < len(spans):
            path, offset, nbytes, _, trailer = located[complete]
            raise DamagedDataError(path, f"the file ends inside the {nbytes + 4 * trailer} bytes at offset {offset}: "
                                         "the file is cut short")
        for k, s in enumerate(spans):
            if located[k][4] and crcs[k] != stored[k]:
                raise DamagedDataError(located[k][0],
                                       f"inner chunk {s.chunk % self.per_shard} does not match its crc32c")
        return [int(c) for c in crcs]

    def located(self, spans: list[Span], base: int = 0) -> list[tuple[str, int, int, int, int]]:
        """(shard file, file offset, bytes, offset in the destination + base, 1 if the chunk is read whole) of
        each span: one row of a read plan, but for the file's descriptor."""
        rows = []
        for s in spans:
            path, offset, nbytes = self.chunk_location(s.chunk)
            first = s.chunk * self.chunk_rows
            if nbytes != self.chunk_rows * self.row_bytes + 4:
                raise DamagedDataError(path, f"inner chunk {s.chunk % self.per_shard} is {nbytes} bytes, the layout "
                                             f"says {self.chunk_rows * self.row_bytes + 4}")
            whole = int((s.lo, s.hi) == (first, first + self.chunk_rows))
            rows.append((path, offset + (s.lo - first) * self.row_bytes, (s.hi - s.lo) * self.row_bytes, base + s.at,
                         whole))
        return rows

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
        if offset == _MISSING:
            raise DamagedDataError(path, f"inner chunk {j} (rows {c * self.chunk_rows}.."
                                         f"{(c + 1) * self.chunk_rows - 1}) is missing from the shard")
        return path, offset, nbytes

    def _read_index(self, path: str) -> list[tuple[int, int]]:
        size = 16 * self.per_shard + 4
        raw = np.empty(size, np.uint8)
        with _opened([path]) as (fd,):
            end = os.fstat(fd).st_size
            if end < size or os.preadv(fd, [raw], end - size) != size:
                raise DamagedDataError(path, f"shard file of {end} bytes is too short for its index")
        if crc32c(raw[:-4]) != int(raw[-4:].view("<u4")[0]):
            raise DamagedDataError(path, "shard index does not match its crc32c")
        return [(o, n) for o, n in raw[:-4].view("<u8").reshape(self.per_shard, 2).tolist()]  # ints, for lookups


class Request(NamedTuple):
    """Rows a..b-1 read by `reader` to `at` bytes into a shared destination, checked against `want` (one
    crc32c per row, from the commit record)."""

    reader: ShardedRowReader
    a: int
    b: int
    at: int
    want: Sequence[int]


def read_many(dest: np.ndarray, requests: Sequence[Request]) -> list[bool]:
    """Every request's rows into `dest` (bytes) in one read plan: True for each request read whole and matching
    both its chunks' crc32c and its recorded ones, False for any other -- whatever went wrong (a missing
    file or chunk, a short file, a mismatch), the caller reads that request again alone through
    `ShardedRowReader.read`, which names the damage.

    Why a call for many windows (the training loader reads a reader thread's share of a batch with one):
    the Python around a window's native read costs ~300 us, five times what the same code costs with its
    data in cache, because each 11.5 MB read evicts it; planning every window first and checking after
    pays that once per call instead of once per window, and hands the GIL over once. The rows are copied
    out of kept maps of the files (`MAPS`) where every reader is native and mapped, else read with calls.
    """
    ok = [False] * len(requests)
    rows: list[tuple[str, int, int, int, int]] = []
    planned: dict[int, tuple[int, list[Span]]] = {}  # request -> (its first row in the plan, its spans)
    native = all(q.reader.native for q in requests)
    mapped = native and all(q.reader.mapped for q in requests)
    files: dict[str, int | mmap.mmap] = {}
    try:
        for k, q in enumerate(requests):
            try:
                spans = q.reader._spans(q.a, q.b)
                located = q.reader.located(spans, q.at)
                for path in {r[0] for r in located} - files.keys():
                    files[path] = MAPS.get(path) if mapped else os.open(path, os.O_RDONLY)
            except (DamagedDataError, OSError, ValueError):  # ValueError: an empty file has nothing to map
                continue  # read again alone, which names it
            planned[k] = (len(rows), spans)
            rows += located
        if not rows:
            return ok
        complete, crcs, stored = execute(rows, files, dest, native, mapped)
    finally:
        for fd in files.values() if not mapped else ():
            os.close(fd)
    for k, (first, spans) in planned.items():
        q = requests[k]
        ok[k] = first + len(spans) <= complete and all(
            (not rows[j][4] or crcs[j] == stored[j])  # a whole chunk matches the crc32c after it
            and int(crcs[j]) == q.reader._concat.fold(q.want[s.lo - q.a : s.hi - q.a])
            for j, s in enumerate(spans, first))
    return ok


def execute(located: list[tuple[str, int, int, int, int]], files: dict[str, int] | dict[str, int | mmap.mmap],
            dest: np.ndarray, native: bool, mapped: bool = False) -> tuple[int, np.ndarray, np.ndarray]:
    """Read the `located` rows (`ShardedRowReader.located`) from `files` into `dest`: (rows read whole, their
    crc32c [n], the 4 bytes after each whole chunk [n]), by the native executor or the Python one, out of
    the files' maps (`mapped`: `files` holds maps) or with read calls (`files` holds open descriptors)."""
    order = {path: k for k, path in enumerate(files)} if mapped else files
    plan = np.array([(order[path], offset, nbytes, at, whole) for path, offset, nbytes, at, whole in located],
                    np.int64)  # [n, (fd or map, file offset, bytes, offset in dest, trailer)]
    crcs, stored = np.zeros(len(plan), np.uint32), np.zeros(len(plan), np.uint32)
    if mapped:
        try:
            return _shardio.read_mapped(dest, list(files.values()), plan, crcs, stored, PIECE), crcs, stored
        except OSError:  # SIGBUS under a map: map these files afresh next time; the caller reads again alone
            MAPS.forget(list(files))
            raise
    run = _shardio.read_plan if native and _shardio is not None else _read_plan
    return run(dest, plan, crcs, stored, PIECE), crcs, stored


def _read_plan(dest: np.ndarray, plan: np.ndarray, crcs: np.ndarray, stored: np.ndarray, piece: int) -> int:
    """The Python executor of a read plan, with `_shardio.read_plan`'s contract: each row's bytes into dest
    and their crc32c into crcs, a whole chunk's 4 trailing bytes into stored; the number of rows read whole."""
    del piece  # one preadv and one crc32c call per row: a call per piece would cost more than the cache saves
    for k, (fd, offset, nbytes, at, trailer) in enumerate(plan.tolist()):
        target, tail = dest[at : at + nbytes], stored[k : k + 1].view(np.uint8)[: 4 * trailer]
        if os.preadv(fd, [target, tail], offset) != nbytes + 4 * trailer:
            return k
        crcs[k] = crc32c(target)
    return len(plan)


@contextlib.contextmanager
def _opened(paths: list[str]) -> Iterator[list[int]]:
    """Shard files open for reading; a missing one is damage, named."""
    fds: list[int] = []
    try:
        for path in paths:
            try:
                fds.append(os.open(path, os.O_RDONLY))
            except FileNotFoundError:
                raise DamagedDataError(path, "shard file is missing") from None
        yield fds
    finally:
        for fd in fds:
            os.close(fd)
