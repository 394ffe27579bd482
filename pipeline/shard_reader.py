"""Rows of a sharded feature array read straight from its shard files: the training loader's fast path.

zarr-python funnels every read through one asyncio thread and copies each chunk twice; for the layout
this project writes (zarr v3 `sharding_indexed`, shards along time, inner codecs `bytes` little-endian +
`crc32c`, index at the end with `bytes` + `crc32c`, no compression) the bytes of a window are plain
ranges of a few files. This reader follows that spec exactly: it reads each shard's index once (and
checks its crc32c), then `preadv`s each inner chunk straight into the caller's buffer together with its
4 checksum bytes, and checks the crc32c of every chunk. It releases the GIL while reading, so several
loader threads really read in parallel. Anything else -- a compressed array, an object store, another
layout -- goes through zarr (`ShardedRowReader.for_array` returns None).

Damage is never read as data: a chunk the index marks missing, a file that is gone or short, an index or
a chunk whose crc32c does not match -- each raises `DamagedDataError` naming the shard file.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import google_crc32c
import numpy as np
import zarr

from pipeline.errors import DamagedDataError

MISSING = np.uint64(2**64 - 1)  # the index's (offset, nbytes) of a chunk that was never written
_LAYOUT = {"codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
           "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
           "index_location": "end"}


class ShardedRowReader:
    """Reads rows [a, b) of one local, uncompressed, time-sharded array into a caller's buffer."""

    def __init__(self, folder: str, arr: zarr.Array):
        self.folder, self.metadata = folder, arr.metadata
        self.rows = int(arr.shape[0])
        self.shard_rows, self.chunk_rows = int(arr.shards[0]), int(arr.chunks[0])
        self.per_shard = self.shard_rows // self.chunk_rows
        self.row_bytes = int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
        self._index: dict[int, np.ndarray] = {}  # shard -> [per_shard, 2] (offset, nbytes); immutable files
        self._lock = threading.Lock()

    @classmethod
    def for_array(cls, folder: str, arr: zarr.Array) -> ShardedRowReader | None:
        """A reader if the array has exactly the layout above and lives in a local folder, else None."""
        codecs = json.loads(json.dumps(arr.metadata.to_dict().get("codecs", [])))  # tuples -> lists, as on disk
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed" or not os.path.isdir(folder):
            return None
        config: dict[str, Any] = codecs[0]["configuration"]
        if {k: config.get(k) for k in _LAYOUT} != _LAYOUT or any(c != s for c, s in zip(
                config["chunk_shape"][1:], arr.shape[1:], strict=True)) or arr.shards[1:] != arr.shape[1:]:
            return None
        return cls(folder, arr)

    def shard_file(self, shard: int) -> str:
        return os.path.join(self.folder, *self.metadata.encode_chunk_key((shard, *[0] * (self.metadata.ndim - 1)))
                            .split("/"))

    def read(self, a: int, b: int, out: np.ndarray) -> None:
        """Rows a..b-1 into `out` (a C-contiguous array of exactly (b - a) rows' bytes)."""
        flat = out.reshape(-1).view(np.uint8)  # [(b - a) * row_bytes]
        if flat.nbytes != (b - a) * self.row_bytes:
            raise ValueError(f"buffer of {flat.nbytes} bytes for rows {a}..{b} of {self.row_bytes} bytes")
        chunk_bytes = self.chunk_rows * self.row_bytes
        crc = np.empty(4, np.uint8)
        for c in range(a // self.chunk_rows, (b - 1) // self.chunk_rows + 1):
            shard, j = divmod(c, self.per_shard)
            path = self.shard_file(shard)
            offset, nbytes = self._chunk_range(shard, j, path, c)
            if nbytes != chunk_bytes + 4:
                raise DamagedDataError(path, f"inner chunk {j} is {nbytes} bytes, the layout says {chunk_bytes + 4}")
            lo, hi = max(a, c * self.chunk_rows), min(b, (c + 1) * self.chunk_rows)
            if (lo, hi) == (c * self.chunk_rows, (c + 1) * self.chunk_rows):  # whole chunk: straight into `out`
                target = flat[(lo - a) * self.row_bytes : (hi - a) * self.row_bytes]
                self._pread(path, [target, crc], offset, nbytes)
                self._check(path, j, target, crc)
            else:  # a window edge inside the chunk: read it whole, keep its rows
                whole = np.empty(chunk_bytes, np.uint8)
                self._pread(path, [whole, crc], offset, nbytes)
                self._check(path, j, whole, crc)
                skip = (lo - c * self.chunk_rows) * self.row_bytes
                flat[(lo - a) * self.row_bytes : (hi - a) * self.row_bytes] = whole[skip : skip + (hi - lo) *
                                                                                    self.row_bytes]

    def _chunk_range(self, shard: int, j: int, path: str, c: int) -> tuple[int, int]:
        index = self._index.get(shard)
        if index is None:
            index = self._read_index(path)
            with self._lock:
                self._index[shard] = index
        offset, nbytes = index[j]
        if offset == MISSING:
            raise DamagedDataError(path, f"inner chunk {j} (rows {c * self.chunk_rows}.."
                                         f"{(c + 1) * self.chunk_rows - 1}) is missing from the shard")
        return int(offset), int(nbytes)

    def _read_index(self, path: str) -> np.ndarray:
        size = 16 * self.per_shard + 4
        raw = np.empty(size, np.uint8)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise DamagedDataError(path, "shard file is missing") from None
        try:
            end = os.fstat(fd).st_size
            if end < size or os.preadv(fd, [raw], end - size) != size:
                raise DamagedDataError(path, f"shard file of {end} bytes is too short for its index")
        finally:
            os.close(fd)
        if google_crc32c.value(raw[:-4]) != int(raw[-4:].view("<u4")[0]):
            raise DamagedDataError(path, "shard index does not match its crc32c")
        return raw[:-4].view("<u8").reshape(self.per_shard, 2)

    @staticmethod
    def _pread(path: str, buffers: list[np.ndarray], offset: int, nbytes: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise DamagedDataError(path, "shard file is missing") from None
        try:
            got = os.preadv(fd, buffers, offset)
        finally:
            os.close(fd)
        if got != nbytes:
            raise DamagedDataError(path, f"read {got} of {nbytes} bytes at offset {offset}: the file is cut short")

    @staticmethod
    def _check(path: str, j: int, data: np.ndarray, crc: np.ndarray) -> None:
        if google_crc32c.value(data) != int(crc.view("<u4")[0]):
            raise DamagedDataError(path, f"inner chunk {j} does not match its crc32c")
