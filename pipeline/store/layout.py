"""The one shard layout this project reads and writes without zarr, and the test that an array has it.

zarr v3 `sharding_indexed`, shards along time (every other axis whole), inner codecs `bytes` little-endian
+ `crc32c`, the index at the end with `bytes` + `crc32c`, no compression. A shard file is its inner
chunks (each its bytes then their crc32c), then the index: (offset, nbytes) as little-endian uint64 per
inner chunk in order, (MISSING, MISSING) for a chunk not written, then the index's crc32c. For this
layout the bytes of a row are a plain range of a file; anything else goes through zarr.
"""

from __future__ import annotations

import json
import os
from typing import Any, Self

import numpy as np
import zarr

from pipeline.store.settings import MAX_ATTEMPT_FRAMES, MAX_SHARD_FRAMES

STATE_DIM = 7  # xyz + 3 Euler angles + gripper
STORAGE_DTYPES = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}  # bf16 stored as its bits
BF16_NAN_BITS = 0x7FC0  # fill value of bfloat16 features stored as uint16: a missing chunk reads as NaN
FILL_VALUES = {"uint16": BF16_NAN_BITS, "float16": float("nan"), "float32": float("nan")}
MISSING = np.uint64(2**64 - 1)  # the index's (offset, nbytes) of a chunk that was never written
_LAYOUT = {"codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
           "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
           "index_location": "end"}


class ShardLayout:
    """Where the rows of one local array with the layout above live."""

    def __init__(self, folder: str, arr: zarr.Array):
        self.folder, self.metadata = folder, arr.metadata
        self.rows = int(arr.shape[0])
        self.shard_rows, self.chunk_rows = int(arr.shards[0]), int(arr.chunks[0])
        self.per_shard = self.shard_rows // self.chunk_rows
        self.row_bytes = int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
        self._files: dict[int, str] = {}  # shard -> its file (looked up for every chunk read)

    @classmethod
    def for_array(cls, folder: str, arr: zarr.Array) -> Self | None:
        """One for `arr` if it has exactly the layout above and lives in the local `folder`, else None."""
        codecs = json.loads(json.dumps(arr.metadata.to_dict().get("codecs", [])))  # tuples -> lists, as on disk
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed" or not os.path.isdir(folder):
            return None
        config: dict[str, Any] = codecs[0]["configuration"]
        if {k: config.get(k) for k in _LAYOUT} != _LAYOUT or any(c != s for c, s in zip(
                config["chunk_shape"][1:], arr.shape[1:], strict=True)) or arr.shards[1:] != arr.shape[1:]:
            return None
        return cls(folder, arr)

    def shard_file(self, shard: int) -> str:
        path = self._files.get(shard)
        if path is None:
            key = self.metadata.encode_chunk_key((shard, *[0] * (self.metadata.ndim - 1)))
            path = self._files[shard] = os.path.join(self.folder, *key.split("/"))
        return path


Layout = dict[str, tuple[tuple[int, ...], str]]  # array name -> (shape after the row axis, storage dtype)


def expected_layout(spec: dict[str, Any]) -> Layout:
    """The arrays a store of this fingerprint spec holds: shape after the row axis and storage dtype of each
    (features only where the spec names the encoder's grid and width, as every manifest's does)."""
    layout: Layout = {"states": ((STATE_DIM,), "float32"), "actions": ((STATE_DIM,), "float32"),
                      "frame_index": ((), "int32")}
    arch, features = spec.get("encoder", {}).get("arch"), spec.get("features", {})
    if isinstance(arch, dict) and features.get("dtype") in STORAGE_DTYPES:
        tokens = (arch["img_size"] // arch["patch_size"]) ** 2
        layout["features"] = ((tokens, arch["embed_dim"]), STORAGE_DTYPES[features["dtype"]])
    return layout


def geometry_problem(arr: zarr.Array, expected: tuple[tuple[int, ...], str] | None, rows: int) -> str | None:
    """What is wrong with an array's declared geometry, or None: its rows must hold `rows` (and at most
    MAX_ATTEMPT_FRAMES), its row shape and dtype be the fingerprint's (`expected`, where known), every axis but
    time whole in a chunk and a shard, and a sharded array's shard at most MAX_SHARD_FRAMES rows of whole
    chunks: reading one shard's index, or one chunk, then stays small whatever a zarr.json says."""
    shape, chunks = tuple(arr.shape), tuple(arr.chunks)
    shards = tuple(arr.shards) if arr.shards else chunks
    if expected is not None and (shape[1:] != expected[0] or str(arr.dtype) != expected[1]):
        return (f"zarr.json declares {shape[1:]} {arr.dtype} rows, the fingerprint says {expected[0]} "
                f"{expected[1]}")
    if not rows <= shape[0] <= MAX_ATTEMPT_FRAMES:
        return f"zarr.json declares {shape[0]} rows, the commit record needs {rows} (at most {MAX_ATTEMPT_FRAMES})"
    bound = MAX_SHARD_FRAMES if arr.shards else MAX_ATTEMPT_FRAMES
    if chunks[1:] != shape[1:] or shards[1:] != shape[1:] or not 1 <= chunks[0] <= shards[0] <= bound \
            or shards[0] % chunks[0]:
        return (f"zarr.json declares chunks {chunks} in shards {shards} of a {shape} array: not the store's layout "
                f"(whole rows, at most {bound} per shard)")
    return None
