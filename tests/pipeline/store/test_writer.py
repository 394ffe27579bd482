"""The direct shard writer and reader against zarr, the reference: the same files, byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.store.settings import StoreSettings
from pipeline.store.writer import PartWriter


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("frames", [16, 22, 21])  # whole shards; a last shard of whole chunks; a padded chunk
def test_the_direct_writer_writes_what_zarr_writes(tmp_path: Path, dtype: str, frames: int) -> None:
    cache = StoreSettings(dtype=dtype, chunk_frames=2, shard_frames=8)
    feats = torch.randn(frames, 3, 4)
    trees = {}
    for local in (True, False):
        folder = tmp_path / ("direct" if local else "zarr")
        writer = PartWriter(str(folder), frames, 3, 4, cache, local=str(folder) if local else None)
        assert (writer._direct is not None) == local
        writer.write(12, feats[12:])
        writer.skip(8, 4)  # the first half of shard 1 is fill (a failed view): those chunks are not written
        writer.skip(0, 3)  # part of a chunk is fill: written
        writer.write(3, feats[3:8])
        writer.finish(np.zeros((frames, 7)), np.zeros((frames, 7)), np.arange(frames))
        trees[local] = _tree(folder)
    assert trees[True] == trees[False]
    arr = zarr.open_array(store=str(tmp_path / "direct"), path="features")
    stored = torch.from_numpy(arr[:].view(np.int16) if dtype == "bfloat16" else arr[:])
    expect = feats.to(getattr(torch, dtype))
    assert torch.equal(stored[12:], expect[12:].view(torch.int16) if dtype == "bfloat16" else expect[12:])


def test_a_shard_of_nothing_but_fill_has_no_file(tmp_path: Path) -> None:
    cache = StoreSettings(dtype="bfloat16", chunk_frames=2, shard_frames=4)
    writer = PartWriter(str(tmp_path), 8, 3, 4, cache, local=str(tmp_path))
    writer.skip(0, 4)
    writer.write(4, torch.randn(4, 3, 4))
    writer.finish(np.zeros((8, 7)), np.zeros((8, 7)), np.arange(8))
    assert not (tmp_path / "features/c/0/0/0").exists() and (tmp_path / "features/c/1/0/0").exists()


def test_the_direct_writer_never_overwrites_a_shard(tmp_path: Path) -> None:
    cache = StoreSettings(dtype="bfloat16", chunk_frames=2, shard_frames=4)
    writer = PartWriter(str(tmp_path), 4, 3, 4, cache, local=str(tmp_path))
    writer.write(0, torch.randn(4, 3, 4))
    with pytest.raises(FileExistsError):
        writer.write(0, torch.randn(4, 3, 4))
