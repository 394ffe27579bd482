"""Writing one task attempt's arrays, and the bytes-level rules every reader checks them by.

Whole shards of an uncompressed features array on a local disk are written straight to their files
(`ShardedRowWriter`, below): zarr-python writes ViT-g rows slower than one GPU extracting produces them, and
for this project's layout (`layout.py`) a shard is its chunks with their crc32c, then the index -- byte for
byte what zarr writes (tested). The array's metadata stays zarr's; anything else (object stores,
compression) is written through zarr.

An attempt writes under a folder nobody else writes to (`parts/<part>/<attempt>/`, created with
`mode="w-"`: an existing folder is an error, never overwritten). Every inner chunk carries a crc32c
inside its shard, a missing chunk reads as a NaN bit pattern (the fill value), and the writer keeps a
crc32c of every stored feature row and of each view's per-frame rows, which the commit record holds:
a reader compares what it read with what was committed, so damage of any kind -- a flipped byte, a
lost chunk, a deleted shard -- is an error, never a plausible number.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import zarr
import zarr.codecs

from pipeline.errors import StoreError
from pipeline.store.checksums import crc32c, row_crcs
from pipeline.store.layout import FILL_VALUES, MISSING, STORAGE_DTYPES, ShardLayout
from pipeline.store.settings import StoreSettings

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FP16_MAX = 65504.0
SMALL_ARRAYS = {"states": "float32", "actions": "float32", "frame_index": "int32"}  # per frame, one chunk


def encode_features(x: torch.Tensor, logical_dtype: str) -> np.ndarray:
    """Encoder output -> numpy array in the storage dtype (bfloat16 travels as its uint16 bit pattern)."""
    if logical_dtype == "bfloat16":
        return x.to(torch.bfloat16).cpu().view(torch.uint16).numpy()
    if logical_dtype == "float16":
        peak = float(x.abs().max()) if x.numel() else 0.0
        if peak > FP16_MAX:
            raise StoreError(f"feature magnitude {peak:.1f} overflows float16; use cache.dtype bfloat16")
        return x.to(torch.float16).cpu().numpy()
    return x.to(torch.float32).cpu().numpy()


def finite_rows(rows: torch.Tensor) -> torch.Tensor:
    """[F] bool: which feature rows [F, ...] hold only finite numbers. A float32 row sum is NaN/inf if any
    element is (or if the row is absurdly large, ~1e34 per element): 2x torch.isfinite, 5x numpy on bf16."""
    return torch.isfinite(torch.sum(rows.flatten(1), dim=1, dtype=torch.float32))


class PartWriter:
    """Writes one attempt's arrays; features arrive in any order by row offset and go out as whole shards.

    Writing a shard frame by frame costs far more than writing it whole (zarr rewrites the shard), so rows are
    buffered per shard and a shard is written in one call as soon as all its rows have arrived. Rows that
    never arrive (an episode that failed half-way) are written as fill (NaN) and not listed in the commit.
    """

    def __init__(self, url: str, frames: int, tokens: int, dim: int, cache: StoreSettings, local: str | None = None):
        self.url, self.frames = url, frames
        self.logical_dtype = cache.dtype
        self.shard = cache.shard_frames
        self.group = zarr.open_group(store=url, mode="w-")  # a fresh attempt folder: never overwrite
        codecs: list = [zarr.codecs.ZstdCodec(level=cache.compression_level)] if cache.compressor == "zstd" else []
        storage = STORAGE_DTYPES[cache.dtype]
        self.features = self.group.create_array(
            "features", shape=(frames, tokens, dim), dtype=storage, chunks=(cache.chunk_frames, tokens, dim),
            shards=(self.shard, tokens, dim), compressors=[*codecs, zarr.codecs.Crc32cCodec()],
            fill_value=FILL_VALUES[storage], attributes={"logical_dtype": cache.dtype})
        self.feature_crc = np.zeros(frames, np.int64)  # crc32c of each stored row
        self.skipped = np.zeros(frames, bool)  # rows written as fill (a failed view)
        self.small: dict[str, np.ndarray] = {}
        self._buffers: dict[int, np.ndarray] = {}
        self._filled: dict[int, int] = {}
        # `local`: the attempt's folder on a local disk, where uncompressed shards are written straight to files
        self._direct = ShardedRowWriter.for_array(os.path.join(local, "features"), self.features) if local else None
        self.bytes_written = 0
        self._shard_bytes: dict[int, int | None] = {}  # shard -> bytes of its file (None: zarr wrote it)

    def write(self, offset: int, features: torch.Tensor) -> None:
        """Rows offset..offset+len(features) of the encoder's output, converted to the storage dtype here."""
        stored = encode_features(features, self.logical_dtype)  # [k, tokens, D]
        self.feature_crc[offset : offset + len(stored)] = row_crcs(stored)
        self._put(offset, stored)

    def skip(self, offset: int, count: int) -> None:
        """Rows that will never arrive (a failed view): fill them so that their shards still complete."""
        fill = np.full((count, *self.features.shape[1:]), self.features.fill_value, self.features.dtype)
        self.skipped[offset : offset + count] = True
        self._put(offset, fill)

    def _put(self, offset: int, feats: np.ndarray) -> None:
        """Rows already in the storage dtype into their shard buffers; full shards are written at once."""
        row = offset
        while row < offset + len(feats):
            idx = row // self.shard
            lo, hi = idx * self.shard, min((idx + 1) * self.shard, self.frames)
            n = min(hi, offset + len(feats)) - row
            buf = self._buffers.get(idx)
            if buf is None:
                buf = self._buffers[idx] = np.zeros((hi - lo, *feats.shape[1:]), feats.dtype)
                self._filled[idx] = 0
            buf[row - lo : row - lo + n] = feats[row - offset : row - offset + n]
            self._filled[idx] += n
            if self._filled[idx] == hi - lo:
                self._flush(idx)
            row += n

    def _flush(self, idx: int) -> None:
        buf = self._buffers.pop(idx)
        self._filled.pop(idx)
        lo = idx * self.shard
        if self._direct is not None:
            self._shard_bytes[idx] = self._direct.write(idx, buf, self.skipped[lo : lo + len(buf)]) or None
        else:
            self.features[lo : lo + len(buf)] = buf
            self._shard_bytes[idx] = None
        if self.skipped[lo : lo + len(buf)].all():  # nothing but fill: zarr (and the direct writer) write no file
            del self._shard_bytes[idx]
        self.bytes_written += buf.nbytes

    def finish(self, states: np.ndarray, actions: np.ndarray, frame_index: np.ndarray) -> None:
        """Flush what is left and write the small per-frame arrays (the commit is the caller's)."""
        for idx in sorted(self._buffers):
            self._flush(idx)
        for name, data in (("states", states), ("actions", actions), ("frame_index", frame_index)):
            dtype = SMALL_ARRAYS[name]
            stored = np.ascontiguousarray(data.astype(dtype))
            arr = self.group.create_array(name, shape=stored.shape, dtype=dtype,
                                          chunks=(max(self.frames, 1), *stored.shape[1:]),
                                          compressors=[zarr.codecs.Crc32cCodec()],
                                          fill_value=-1 if dtype == "int32" else float("nan"))
            arr[...] = stored
            self.small[name] = stored

    def files(self) -> dict[str, int | None]:
        """Every file this attempt's arrays must have, relative to its folder -> its size where known (the shard
        files written straight), else None: the writer checks they are all there before it commits."""
        out: dict[str, int | None] = {"zarr.json": None}
        for name in ("features", *self.small):
            out[f"{name}/zarr.json"] = None
        key = self.features.metadata.encode_chunk_key
        out |= {f"features/{key((idx, 0, 0))}": size for idx, size in self._shard_bytes.items()}
        for name, data in self.small.items():
            out[f"{name}/{self.group[name].metadata.encode_chunk_key((0,) * data.ndim)}"] = None
        return out

    def digests(self, start: int, length: int) -> dict[str, object]:
        """What a commit record holds for the view at rows start..start+length: crc32c per feature row and
        of its rows of each per-frame array (call after `finish`)."""
        rows = slice(start, start + length)
        return {"features": [int(c) for c in self.feature_crc[rows]],
                **{name: crc32c(data[rows]) for name, data in self.small.items()}}


# -- whole shards written straight to their files -------------------------------------------------------

IOV_MAX = 1024  # buffers per writev call (Linux's limit)


class ShardedRowWriter(ShardLayout):
    """Writes shard files of one local, uncompressed, time-sharded array, each exactly once."""

    def __init__(self, folder: str, arr: zarr.Array):
        super().__init__(folder, arr)
        self.fill = np.full(arr.shape[1:], arr.fill_value, arr.dtype)  # one row: pads the last chunk

    def write(self, shard: int, rows: np.ndarray, skipped: np.ndarray) -> int:
        """Shard `shard` from its rows (all of them, or up to the array's end) in the storage dtype; rows
        marked in `skipped` hold the fill value. Returns the bytes written (0: nothing but fill, so no
        file)."""
        flat = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)  # [n * row_bytes]
        n, chunk_bytes = len(rows), self.chunk_rows * self.row_bytes
        index = np.full((self.per_shard, 2), MISSING, np.uint64)
        parts: list[np.ndarray | bytes] = []
        offset = 0
        for j in range(self.per_shard):
            lo, hi = j * self.chunk_rows, min((j + 1) * self.chunk_rows, n)
            if lo >= n or skipped[lo:hi].all():
                continue  # zarr does not write a chunk of fill values
            data = flat[lo * self.row_bytes : hi * self.row_bytes]
            if hi - lo < self.chunk_rows:  # past the array's end: padded with the fill value, as zarr does
                pad = np.broadcast_to(self.fill.reshape(-1).view(np.uint8),
                                      (self.chunk_rows - (hi - lo), self.row_bytes))  # [missing rows, row bytes]
                data = np.concatenate([data, pad.reshape(-1)])
            parts += [data, crc32c(data).to_bytes(4, "little")]
            index[j] = (offset, chunk_bytes + 4)
            offset += chunk_bytes + 4
        if not parts:
            return 0
        raw_index = index.astype("<u8").tobytes()
        parts += [raw_index, crc32c(np.frombuffer(raw_index, np.uint8)).to_bytes(4, "little")]
        return self._write_new(self.shard_file(shard), parts)

    @staticmethod
    def _write_new(path: str, parts: list[np.ndarray | bytes]) -> int:
        """Create `path` (never overwrite: an attempt's files are written once) from `parts` in order."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        views = [memoryview(p).cast("B") for p in parts]
        total = sum(len(v) for v in views)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            while views:
                done = os.writev(fd, views[:IOV_MAX])
                while views and done >= len(views[0]):
                    done -= len(views[0])
                    views.pop(0)
                if views and done:
                    views[0] = views[0][done:]  # a short write: go on from where it stopped
        except OSError as err:
            raise OSError(err.errno, err.strerror, path) from err  # names the file (a full disk, say)
        finally:
            os.close(fd)
        return total
