"""The feature store: exact round trip per dtype, attempts and commits, checked reads, bad records, claims."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.errors import DamagedDataError, StoreError
from pipeline.store.records import CommitRecord, FailureRecord, ViewRecord, new_attempt_id
from pipeline.store.settings import StoreSettings
from pipeline.store.store import FeatureStore
from pipeline.store.writer import encode_features


def cache_cfg(dtype: str = "bfloat16", compressor: str = "none") -> StoreSettings:
    return StoreSettings(dtype=dtype, chunk_frames=2, shard_frames=4, compressor=compressor)


def view(vid: str, start: int, length: int, episode: str = "ep") -> ViewRecord:
    return ViewRecord(vid, episode, f"/data/{episode}", "left_mp4_path", "123", 0, 4, 15.0, [48, 64],
                      [0, 0, 48, 48], {"trajectory.h5": [1, 2]}, start=start, length=length)


def states_of(n: int) -> np.ndarray:
    """Smooth, plausible states [n, 7] (their actions are what the writer is given)."""
    t = np.arange(n)[:, None]
    return np.concatenate([0.1 * np.sin(t + np.arange(3)), 0.2 * np.cos(t + np.arange(3)), 0.5 + 0 * t], 1)


def write_attempt(store: FeatureStore, part: str, feats: torch.Tensor, views: list[ViewRecord],
                  dtype: str = "bfloat16", compressor: str = "none", when: float | None = None) -> CommitRecord:
    """Write one attempt of `part` (features out of order, across shard boundaries) and commit its views."""
    attempt = new_attempt_id()
    n = len(feats)
    w = store.part_writer(part, attempt, n, feats.shape[1], feats.shape[2], cache_cfg(dtype, compressor))
    w.write(5, feats[5:])
    w.write(0, feats[:5])
    actions = np.full((n, 7), np.nan)
    actions[:-1] = np.diff(states_of(n), axis=0)
    w.finish(states_of(n), actions, np.arange(n) * 4)
    for v in views:
        v.part, v.attempt, v.digests = part, attempt, w.digests(v.start, v.length)
    record = CommitRecord(f"{part}.{attempt}", part, attempt, n, when or time.time(), views)
    store.commit(record)
    return record


@pytest.mark.parametrize(("dtype", "compressor"), [("bfloat16", "none"), ("float16", "none"),
                                                   ("float32", "none"), ("bfloat16", "zstd")])
def test_round_trip_is_exact(tmp_path: Path, dtype: str, compressor: str) -> None:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    feats = torch.randn(11, 3, 8) * 10  # [F, tokens, D]
    write_attempt(store, "p", feats, [view("v", 2, 9)], dtype, compressor)
    rec = FeatureStore(str(tmp_path), {"x": 1}).check().committed_views()["v"]
    got = store.read_features(rec, 1, 6)
    want = feats[3:9].to(getattr(torch, dtype))
    assert got.dtype == want.dtype and torch.equal(got, want)
    np.testing.assert_array_equal(store.read_rows(rec, "frame_index"), np.arange(2, 11) * 4)
    arr = zarr.open_array(store=f"{store.url}/{rec.location}", path="features")
    assert arr.shards == (4, 3, 8) and arr.chunks == (2, 3, 8)
    assert "crc32c" in json.dumps(arr.metadata.to_dict())  # a checksum per chunk inside the shard


def test_float16_overflow_is_an_error() -> None:
    with pytest.raises(StoreError, match="overflows float16"):
        encode_features(torch.tensor([1e5]), "float16")


def test_attempts_are_immutable_and_newest_commit_wins(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    a = write_attempt(store, "p", torch.randn(6, 2, 4), [view("v", 0, 6)], when=100.0)
    b = write_attempt(store, "p", torch.randn(6, 2, 4), [view("v", 0, 6)], when=200.0)  # a retry of the part
    assert a.attempt != b.attempt and len(store.attempts()) == 2
    winner = store.committed_views()["v"]
    assert (winner.attempt, winner.commit) == (b.attempt, b.name)
    assert store.part_committed("p") and not store.part_committed("q")
    with pytest.raises(FileExistsError):  # an attempt folder is never written twice
        store.part_writer("p", a.attempt, 6, 2, 4, cache_cfg())
    assert not list(Path(store.root, "commits").glob("*.tmp"))  # write-then-rename leaves no temp files
    with pytest.raises(StoreError, match="outside view"):
        store.read_features(winner, 3, 4)


def test_uncommitted_attempt_is_invisible(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    w = store.part_writer("p", new_attempt_id(), 4, 2, 4, cache_cfg())
    w.write(0, torch.randn(4, 2, 4))
    assert store.committed_views() == {} and len(store.attempts()) == 1


def test_version_and_fingerprint_are_checked(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore(str(tmp_path), {"x": 1}).check()
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    other = FeatureStore(str(tmp_path), {"x": 2})
    assert other.url != store.url  # a different fingerprint is a different store, never mixed
    zarr.open_group(store=store.url, mode="a").attrs["format_version"] = 1
    with pytest.raises(StoreError, match=r"format version 1.*run `pipeline extract`"):
        FeatureStore(str(tmp_path), {"x": 1}).check()
    zarr.open_group(store=store.url, mode="a").attrs.update({"format_version": 2, "fingerprint": {"digest": "bad"}})
    with pytest.raises(StoreError, match="does not match"):
        FeatureStore(str(tmp_path), {"x": 1}).check()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        FeatureStore(str(tmp_path / "a-file"), {"x": 1}).create()


def test_failure_records(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    store.write_failure(FailureRecord("lab/ep 1", "/d/lab/ep 1", "corrupt", 1.0, {"a": [1, 2]}, {"camera": "c"}))
    assert store.failures()["lab/ep 1"].reason == "corrupt"
    store.clear_failure("lab/ep 1")
    assert store.failures() == {}


@pytest.mark.parametrize("content", [b'{"format_version": 2, "fingerprint": "', b"{}", b"[1, 2]", b"\xff\xfe"])
def test_a_record_that_does_not_parse_is_named_and_skipped(tmp_path: Path, content: bytes,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    write_attempt(store, "good", torch.randn(4, 2, 4), [view("v", 0, 4)])
    bad = Path(store.root, "commits", f"broken-{len(content)}.json")
    bad.write_bytes(content)
    (Path(store.root) / "failures").mkdir()
    (Path(store.root) / "failures" / "x.json").write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert list(store.committed_views()) == ["v"]
        assert store.failures() == {}
    assert str(bad) in store.bad_records and "views count as missing" in store.bad_records[str(bad)]
    assert any(str(bad) in r.getMessage() for r in caplog.records)


def test_a_newer_writers_declared_extras_are_ignored_and_others_refused(tmp_path: Path) -> None:
    """Mixed versions on one store: view keys a writer declares in `optional_view_keys` are ignored by a
    reader that does not know them (the views stay in use); an undeclared unknown key makes the record
    unreadable, named, so its views are redone rather than misread."""
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    record = write_attempt(store, "p", torch.randn(4, 2, 4), [view("v", 0, 4)])
    path = Path(store.root, "commits", f"{record.name}.json")
    raw = json.loads(path.read_text())
    assert raw["optional_view_keys"] == ["capture_fps"]  # what this version declares
    raw["views"][0]["lens_model"] = "fisheye"  # a later version's extra information
    raw["optional_view_keys"].append("lens_model")
    path.write_text(json.dumps(raw))
    fresh = FeatureStore(str(tmp_path), {"x": 1})
    assert list(fresh.committed_views()) == ["v"] and not fresh.bad_records
    raw["optional_view_keys"].remove("lens_model")
    path.write_text(json.dumps(raw))
    fresh = FeatureStore(str(tmp_path), {"x": 1})
    assert fresh.committed_views() == {} and "unknown keys ['lens_model']" in fresh.bad_records[str(path)]


def _shard_file(store: FeatureStore, rec: ViewRecord, name: str, shard: int = 0) -> Path:
    suffix = f"c/{shard}/0/0" if name == "features" else ("c/0/0" if name != "frame_index" else "c/0")
    return Path(store.root, rec.location, name, suffix)


@pytest.mark.parametrize("name", ["features", "states", "actions", "frame_index"])
def test_a_flipped_byte_is_caught_and_named(tmp_path: Path, name: str) -> None:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    write_attempt(store, "p", torch.randn(8, 2, 4), [view("v", 0, 8)])
    rec = store.committed_views()["v"]
    path = _shard_file(store, rec, name)
    raw = bytearray(path.read_bytes())
    raw[7] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(DamagedDataError) as err:
        fresh = FeatureStore(str(tmp_path), {"x": 1})
        if name == "features":
            fresh.read_features(rec, 0, 4)
        else:
            fresh.read_rows(rec, name)
    assert f"{rec.location}/{name}" in str(err.value) and "episode ep" in str(err.value)


def test_a_deleted_shard_never_reads_as_data(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    write_attempt(store, "p", torch.randn(8, 2, 4), [view("v", 0, 8)])
    rec = store.committed_views()["v"]
    _shard_file(store, rec, "features", 1).unlink()
    raw = zarr.open_array(store=f"{store.url}/{rec.location}", path="features")[4:8]
    assert (raw == 0x7FC0).all()  # a reader without our checks would get NaN (the fill), never a number
    with pytest.raises(DamagedDataError, match=r"features/c/1/0/0 .*shard file is missing"):
        FeatureStore(str(tmp_path), {"x": 1}).read_features(rec, 4, 4)


@pytest.mark.parametrize("whole_chunks", [False, True])
def test_a_shard_file_cut_short_is_named(tmp_path: Path, whole_chunks: bool) -> None:
    """A shard whose index points past its end (a chunk lost, the index kept): rows before the loss still
    read; a read that reaches it names the file and says it is cut short."""
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    feats = torch.randn(8, 2, 64)  # rows of 256 bytes; chunks of 2 rows (+4 crc bytes); shards of 4 rows
    write_attempt(store, "p", feats, [view("v", 0, 8)])
    rec = store.committed_views()["v"]
    path = _shard_file(store, rec, "features", 0)
    raw, chunk = path.read_bytes(), 2 * 256 + 4
    path.write_bytes(raw[:chunk] + raw[2 * chunk :])  # chunk 0, then the index (which still lists chunk 1)
    fresh = FeatureStore(str(tmp_path), {"x": 1})
    assert torch.equal(fresh.read_features(rec, 0, 2, whole_chunks=whole_chunks), feats[:2].to(torch.bfloat16))
    with pytest.raises(DamagedDataError, match=r"features/c/0/0/0 .*the file is cut short"):
        fresh.read_features(rec, 1, 2, whole_chunks=whole_chunks)


@pytest.mark.parametrize("whole_chunks", [False, True])
@pytest.mark.parametrize("local", [True, False])
def test_a_row_that_is_not_what_was_committed_is_named(tmp_path: Path, local: bool, whole_chunks: bool) -> None:
    """Bytes that are sound in their shard (every chunk matches its crc32c) but are not what the commit record
    says: the read names the first such row, on the direct path (one crc32c per chunk, then row by row to
    find it) and through zarr; windows without it read exactly."""
    url = str(tmp_path) if local else f"memory://bucket/record-{whole_chunks}"
    store = FeatureStore(url, {"x": 1}).create()
    feats = torch.randn(8, 2, 4)  # chunks of 2 rows, shards of 4
    write_attempt(store, "p", feats, [view("v", 0, 8)])
    rec = store.committed_views()["v"]
    for bad in (0, 3, 6):
        rec.digests["features"][bad] ^= 1  # a record of other bytes
        fresh = FeatureStore(url, {"x": 1})
        for a, n in ((0, 8), (bad, 1), (max(bad - 1, 0), 3)):
            with pytest.raises(DamagedDataError, match=rf"features/.*row {bad} of the view is not what was committed"):
                fresh.read_features(rec, a, n, whole_chunks=whole_chunks)
        if bad:
            assert torch.equal(fresh.read_features(rec, 0, bad, whole_chunks=whole_chunks),
                               feats[:bad].to(torch.bfloat16))
        rec.digests["features"][bad] ^= 1


def test_through_zarr_a_deleted_shard_fails_the_row_check() -> None:
    """Where the direct reader does not apply (object stores, compressed arrays), zarr returns the NaN fill
    for a deleted shard: the per-row crc32c of the commit record catches it."""
    store = FeatureStore("memory://bucket/deleted-shard", {"x": 1}).create()
    write_attempt(store, "p", torch.randn(8, 2, 4), [view("v", 0, 8)])
    rec = store.committed_views()["v"]
    store.fs.rm(f"{store.root}/{rec.location}/features/c/1/0/0")
    with pytest.raises(DamagedDataError, match="crc32c"):
        FeatureStore("memory://bucket/deleted-shard", {"x": 1}).read_features(rec, 4, 4)


def test_the_direct_shard_reader_equals_zarr_for_every_window(tmp_path: Path) -> None:
    from pipeline.store.reader import ShardedRowReader

    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    feats = torch.randn(22, 3, 8)  # 22 rows: shards of 4 rows in chunks of 2, a partial last shard
    write_attempt(store, "p", feats, [view("v", 0, 22)])
    rec = store.committed_views()["v"]
    arr = store.array(rec, "features")
    assert ShardedRowReader.for_array(f"{store.root}/{rec.location}/features", arr) is not None
    for a in range(22):
        for n in range(1, 23 - a):
            assert torch.equal(store.read_features(rec, a, n), feats[a : a + n].to(torch.bfloat16)), (a, n)


def test_a_deleted_chunk_of_states_never_reads_as_data(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    write_attempt(store, "p", torch.randn(8, 2, 4), [view("v", 0, 8)])
    rec = store.committed_views()["v"]
    _shard_file(store, rec, "states").unlink()
    with pytest.raises(DamagedDataError, match="states"):
        FeatureStore(str(tmp_path), {"x": 1}).read_rows(rec, "states")


def test_claims_only_hold_for_another_live_run(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    store.claim("p", "run-a", "att-1")
    assert store.claim_holder("p", "run-a", 60) is None  # our own run's claim
    holder = store.claim_holder("p", "run-b", 60)
    assert holder is not None and holder["pid"] == os.getpid()
    assert store.claim_holder("p", "run-b", 0) is None  # expired
    claim = Path(store.root, "claims", "p.json")
    claim.write_text(json.dumps({**json.loads(claim.read_text()), "pid": 2**22 + 12345}))  # no such process
    assert store.claim_holder("p", "run-b", 60) is None
    store.release_claim("p", "att-2")  # not ours: kept
    assert claim.exists()
    store.release_claim("p", "att-1")
    assert not claim.exists()


def test_object_store_layout_through_fsspec() -> None:
    """The store on an fsspec URL (memory://; the s3:// round trip is in test_s3.py): commits are single
    PUTs, zarr goes through FsspecStore, and everything reads back exactly."""
    url = "memory://bucket/test-object-store"
    store = FeatureStore(url, {"x": 1}).create()
    feats = torch.randn(9, 3, 8)
    write_attempt(store, "p", feats, [view("v", 0, 9)])
    again = FeatureStore(url, {"x": 1}).check()
    rec = again.committed_views()["v"]
    out = torch.empty(4, 3, 8, dtype=torch.bfloat16)
    assert torch.equal(again.read_features(rec, 3, 4, out=out), feats[3:7].to(torch.bfloat16))
    assert again.bytes_on_disk() > feats.numel() * 2 and len(again.attempts()) == 1


@pytest.mark.parametrize("whole_chunks", [False, True])
def test_the_direct_reader_checks_every_byte_it_delivers(tmp_path: Path, whole_chunks: bool) -> None:
    """A flipped byte anywhere in the rows a window delivers, in a whole chunk's crc32c or in a shard's index
    is an error; a flip in bytes the window does not deliver (the other rows of a chunk at its edge, that
    chunk's crc32c) leaves the window exact. With `whole_chunks` (verify) a flip anywhere in a chunk the
    window touches is an error too, as it would be for a plain zarr reader."""
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    feats = torch.randn(8, 2, 4)  # rows of 16 bytes; chunks of 2 rows (+4 crc bytes); shards of 4 rows
    write_attempt(store, "p", feats, [view("v", 0, 8)])
    rec = store.committed_views()["v"]
    row, chunk = 16, 2 * 16 + 4
    window = range(1, 5)  # rows 1..4: the edge of chunk 0, whole chunk 1, the edge of chunk 2 (shard 1)
    for shard in (0, 1):
        path = _shard_file(store, rec, "features", shard)
        clean = path.read_bytes()
        for at in range(len(clean)):
            r = shard * 4 + at // chunk * 2 + (at % chunk) // row  # the row this byte belongs to
            in_chunk_crc, in_index = at % chunk >= 2 * row, at >= 2 * chunk
            chunk_rows = {shard * 4 + at // chunk * 2, shard * 4 + at // chunk * 2 + 1}
            delivered = in_index or (in_chunk_crc and chunk_rows <= set(window)) or (not in_chunk_crc and r in window)
            delivered = delivered or (whole_chunks and bool(chunk_rows & set(window)))
            damaged = bytearray(clean)
            damaged[at] ^= 0x04
            path.write_bytes(bytes(damaged))
            fresh = FeatureStore(str(tmp_path), {"x": 1})
            if delivered:
                with pytest.raises(DamagedDataError, match="features"):
                    fresh.read_features(rec, 1, 4, whole_chunks=whole_chunks)
            else:
                assert torch.equal(fresh.read_features(rec, 1, 4, whole_chunks=whole_chunks),
                                   feats[1:5].to(torch.bfloat16)), at
        path.write_bytes(clean)


# -- windows read together (the training loader's reads) ------------------------------------------------


def _two_attempts(url: str) -> tuple[dict[str, torch.Tensor], dict[str, ViewRecord]]:
    """Two parts (two attempts, so two direct readers) of 8 and 9 rows: rows of 16 bytes, chunks of 2 rows,
    shards of 4."""
    store = FeatureStore(url, {"x": 1}).create()
    feats = {"v": torch.randn(8, 2, 4), "w": torch.randn(9, 2, 4)}
    write_attempt(store, "p", feats["v"], [view("v", 0, 8)])
    write_attempt(store, "q", feats["w"], [view("w", 0, 9, episode="e2")])
    return feats, store.committed_views()


def _all_windows(views: dict[str, ViewRecord], n: int) -> list[tuple[int, ViewRecord, int]]:
    """Every n-row window of both views, interleaved, into the rows of a batch in reverse order."""
    starts = [(v, a) for a in range(10) for v in views.values() if a + n <= v.length]
    return [(len(starts) - 1 - k, v, a) for k, (v, a) in enumerate(starts)]


def _agrees_with_read_alone(store: FeatureStore, windows: list[tuple[int, ViewRecord, int]], n: int) -> bool:
    """read_windows gives, window for window, what read_features gives alone: the rows, or the same error."""
    out = torch.empty(len(windows), n, 2, 4, dtype=torch.bfloat16)
    errors = store.read_windows(out, windows, n)
    for (row, rec, a), err in zip(windows, errors, strict=True):
        try:
            alone = store.read_features(rec, a, n)
        except DamagedDataError as expected:
            if err is None or str(err) != str(expected):
                return False
            continue
        if err is not None or not torch.equal(out[row], alone):
            return False
    return True


@pytest.mark.parametrize("local", [True, False])
def test_windows_read_together_are_the_committed_rows(tmp_path: Path, local: bool) -> None:
    url = str(tmp_path) if local else "memory://bucket/together"
    feats, views = _two_attempts(url)
    windows = _all_windows(views, 3)
    out = torch.zeros(len(windows), 3, 2, 4, dtype=torch.bfloat16)
    assert FeatureStore(url, {"x": 1}).read_windows(out, windows, 3) == [None] * len(windows)
    for row, rec, a in windows:
        assert torch.equal(out[row], feats[rec.view_id][a : a + 3].to(torch.bfloat16)), (rec.view_id, a)
    with pytest.raises(ValueError, match="contiguous"):
        FeatureStore(url, {"x": 1}).read_windows(out[:, :2], windows, 2)


def test_damage_read_together_is_named_as_read_alone(tmp_path: Path) -> None:
    """A byte flipped in a chunk, a shard cut short, one deleted, a row whose record is of other bytes: each
    window read together comes back as it does alone -- the same rows, or the same error naming the same
    file -- and the other part's windows are exact."""
    _, views = _two_attempts(str(tmp_path))
    windows = _all_windows(views, 3)
    rec = views["v"]
    store = FeatureStore(str(tmp_path), {"x": 1})
    paths = [_shard_file(store, rec, "features", shard) for shard in (0, 1)]
    for path in paths:
        clean = path.read_bytes()
        flipped = bytearray(clean)
        flipped[40] ^= 0x04  # in the second chunk's rows
        for broken in (bytes(flipped), clean[: 2 * 36] + clean[3 * 36 :], b""):  # a flip; a chunk lost; nothing
            path.write_bytes(broken)
            assert _agrees_with_read_alone(FeatureStore(str(tmp_path), {"x": 1}), windows, 3), path
        path.unlink()
        assert _agrees_with_read_alone(FeatureStore(str(tmp_path), {"x": 1}), windows, 3), path
        path.write_bytes(clean)
    rec.digests["features"][5] ^= 1
    fresh = FeatureStore(str(tmp_path), {"x": 1})
    assert _agrees_with_read_alone(fresh, windows, 3)
    out = torch.empty(len(windows), 3, 2, 4, dtype=torch.bfloat16)
    errors = fresh.read_windows(out, windows, 3)
    assert {(r.view_id, a) for (_, r, a), e in zip(windows, errors, strict=True) if e} == {("v", 3), ("v", 4),
                                                                                             ("v", 5)}
