"""The feature store: exact round trip per dtype, commit semantics, version and fingerprint checks."""

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.manifest import CacheSection
from pipeline.store import FeatureStore, StoreError, ViewRecord, encode_features


def cache_cfg(dtype: str = "bfloat16", compressor: str = "none") -> CacheSection:
    return CacheSection(path="unused", dtype=dtype, chunk_frames=2, shard_frames=4, compressor=compressor)


def view(vid: str, part: str, start: int, length: int, episode: str = "ep") -> ViewRecord:
    return ViewRecord(vid, episode, f"/data/{episode}", "left_mp4_path", "123", 0, 4, 15.0, [48, 64],
                      [0, 0, 48, 48], {"trajectory.h5": [1, 2]}, part=part, start=start, length=length)


def write_part(store: FeatureStore, part: str, feats: torch.Tensor, dtype: str = "bfloat16",
               compressor: str = "none") -> None:
    w = store.part_writer(part, len(feats), feats.shape[1], feats.shape[2], cache_cfg(dtype, compressor))
    w.write(5, feats[5:])  # out of order, across shard boundaries
    w.write(0, feats[:5])
    n = len(feats)
    w.finish(np.arange(n * 7.0).reshape(n, 7), np.ones((n, 7)), np.arange(n) * 4)


@pytest.mark.parametrize(("dtype", "compressor"), [("bfloat16", "none"), ("float16", "none"),
                                                   ("float32", "none"), ("bfloat16", "zstd")])
def test_round_trip_is_exact(tmp_path: Path, dtype: str, compressor: str) -> None:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    feats = torch.randn(11, 3, 8) * 10  # [F, tokens, D]
    write_part(store, "p", feats, dtype, compressor)
    store.commit("p", [view("v", "p", 2, 9)], 11)
    rec = FeatureStore(str(tmp_path), {"x": 1}).check().committed_views()["v"]
    got = store.read_features(rec, 1, 6)
    want = feats[3:9].to(getattr(torch, dtype))
    assert got.dtype == want.dtype and torch.equal(got, want)
    np.testing.assert_array_equal(store.read_rows(rec, "frame_index"), np.arange(2, 11) * 4)
    arr = zarr.open_array(store=f"{store.url}/parts/p", path="features")
    assert arr.shards == (4, 3, 8) and arr.chunks == (2, 3, 8)


def test_float16_overflow_is_an_error() -> None:
    with pytest.raises(StoreError, match="overflows float16"):
        encode_features(torch.tensor([1e5]), "float16")


def test_uncommitted_part_is_invisible_and_newest_commit_wins(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    write_part(store, "a", torch.randn(6, 2, 4))
    assert store.committed_views() == {} and store.uncommitted_parts() == ["a"]
    store.commit("a", [view("v", "a", 0, 6)], 6)
    write_part(store, "b", torch.randn(6, 2, 4))
    store.commit("b", [view("v", "b", 0, 6)], 6)
    assert store.committed_views()["v"].part == "b"
    assert store.uncommitted_parts() == []
    assert not list(Path(store.root, "commits").glob("*.tmp"))  # write-then-rename leaves no temp files
    with pytest.raises(StoreError, match="outside view"):
        store.read_features(store.committed_views()["v"], 3, 4)


def test_version_and_fingerprint_are_checked(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore(str(tmp_path), {"x": 1}).check()
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    other = FeatureStore(str(tmp_path), {"x": 2})
    assert other.url != store.url  # a different fingerprint is a different store, never mixed
    zarr.open_group(store=store.url, mode="a").attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format version 99"):
        FeatureStore(str(tmp_path), {"x": 1}).check()
    zarr.open_group(store=store.url, mode="a").attrs.update({"format_version": 1, "fingerprint": {"digest": "bad"}})
    with pytest.raises(StoreError, match="does not match"):
        FeatureStore(str(tmp_path), {"x": 1}).check()


def test_failure_records(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    store.write_failure("lab/ep 1", {"path": "/d/lab/ep 1", "reason": "corrupt"})
    assert store.failures()["lab/ep 1"]["reason"] == "corrupt"
    store.clear_failure("lab/ep 1")
    assert store.failures() == {}


def test_object_store_layout_through_fsspec() -> None:
    """The store on an fsspec URL (memory://, the same code path as s3:// or gs://): commits are single
    PUTs, zarr goes through FsspecStore, and everything reads back exactly."""
    url = "memory://bucket/test-object-store"
    store = FeatureStore(url, {"x": 1}).create()
    feats = torch.randn(9, 3, 8)
    write_part(store, "p", feats)
    assert store.uncommitted_parts() == ["p"]
    store.commit("p", [view("v", "p", 0, 9)], 9)
    again = FeatureStore(url, {"x": 1}).check()
    rec = again.committed_views()["v"]
    out = torch.empty(4, 3, 8, dtype=torch.bfloat16)
    assert torch.equal(again.read_features(rec, 3, 4, out=out), feats[3:7].to(torch.bfloat16))
    assert again.bytes_on_disk() > feats.numel() * 2 and again.uncommitted_parts() == []
