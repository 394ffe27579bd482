"""How a store lays out the features it writes: the store's own settings (the manifest's `cache` section maps
onto them), and the bounds every reader holds a store's declared layout to.

Kept free of heavy imports: the manifest checks its `cache` values against these bounds before any
command has loaded zarr or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MAX_SHARD_FRAMES = 4096  # feature rows per shard a store may declare: bounds what reading one shard index costs
MAX_ATTEMPT_FRAMES = 1 << 22  # rows of one attempt's arrays (the per-frame ones are one chunk): bounds one read
ZSTD_LEVELS = (-131072, 22)  # the levels zstd accepts (ZSTD_minCLevel, ZSTD_maxCLevel)
FEATURE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class StoreSettings:
    """How an attempt's feature array is written (none of it changes what a feature is: not in the fingerprint)."""

    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # stored feature dtype (bf16 as its bits)
    chunk_frames: int = 4  # frames per inner chunk, each with its crc32c
    shard_frames: int = 64  # frames per shard file (a multiple of chunk_frames)
    compressor: Literal["none", "zstd"] = "none"  # features barely compress
    compression_level: int = 1  # zstd level when compressor is zstd
