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
