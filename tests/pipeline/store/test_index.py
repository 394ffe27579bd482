"""The store's index: views as columns, index snapshots, and opening a store with one listing."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.store.index import ViewTable
from pipeline.store.records import CommitRecord, RecordInfo, ViewRecord
from pipeline.store.store import INDEX_DIR, FeatureStore
from tests.pipeline.store.test_store import view, write_attempt


def _records() -> list[CommitRecord]:
    """Two records, one view committed in both (the newer wins), a view without a capture rate, one record
    with no views at all (every episode of its part failed)."""
    a = dataclasses.replace(view("v1", 0, 3), part="p", attempt="a1", digests={"features": [1, 2, 3], "states": 7,
                                                                                  "actions": 8, "frame_index": 9})
    b = dataclasses.replace(view("v2", 3, 2, episode="e2"), part="p", attempt="a1", capture_fps=14.9,
                            digests={"features": [4, 5], "states": 1, "actions": 2, "frame_index": 3})
    c = dataclasses.replace(a, attempt="a2", digests={**a.digests, "features": [6, 7, 8]})
    return [CommitRecord("p.a1", "p", "a1", 5, 100.0, [a, b]), CommitRecord("p.a2", "p", "a2", 3, 200.0, [c]),
            CommitRecord("q.a3", "q", "a3", 0, 300.0, [])]


def _expected(records: list[CommitRecord]) -> list[ViewRecord]:
    return [dataclasses.replace(v, committed_at=r.committed_at, commit=r.name) for r in records for v in r.views]


def test_a_table_holds_every_view_as_its_record_says_and_survives_its_snapshot() -> None:
    records = _records()
    table = ViewTable.from_records(records)
    assert len(table) == 3 and list(table.records()) == _expected(records)
    infos = [RecordInfo(r.name, r.part, r.attempt, r.frames, r.committed_at) for r in records]
    again, got = ViewTable.from_parquet(table.to_parquet(infos))
    assert list(again.records()) == _expected(records) and got == infos
    assert [again.record(i).view_id for i in again.winners()] == ["v1", "v2"]
    assert again.record(int(again.winners()[0])).commit == "p.a2"  # the newer commit of v1
    picked = again.take([2, 0])
    assert [v.commit for v in picked.records()] == ["p.a2", "p.a1"]
    assert picked.record(0).digests["features"] == [6, 7, 8]
    both = ViewTable.concat([again.take([1]), ViewTable.from_records(records[1:])])
    assert [v.view_id for v in both.records()] == ["v2", "v1"] and both.categories["view_id"] == ["v1", "v2"]


def test_a_tie_in_commit_time_goes_to_the_greatest_record_name() -> None:
    a, b, _ = _records()
    b = dataclasses.replace(b, committed_at=a.committed_at, name="p.a0")  # same time, a smaller name
    table = ViewTable.from_records([a, b])
    assert table.record(int(table.winners()[0])).commit == "p.a1"


def _store_with_records(tmp_path: Path, n: int) -> FeatureStore:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    for k in range(n):
        write_attempt(store, f"p{k}", torch.randn(4, 2, 4), [view(f"v{k}", 0, 4, episode=f"e{k}")], when=100.0 + k)
    return store


def _views(store: FeatureStore) -> dict[str, ViewRecord]:
    return {vid: v for vid, v in store.committed_views().items()}


def test_a_snapshot_serves_the_records_it_holds_and_the_listing_stays_the_truth(tmp_path: Path) -> None:
    store = _store_with_records(tmp_path, 5)
    name = store.compact(min_records=1)
    assert name and store.snapshots() == [name]
    write_attempt(store, "late", torch.randn(4, 2, 4), [view("v-late", 0, 4, episode="e-late")], when=500.0)
    quarantined = next(r for r in store.commits() if r.part == "p2")
    store.quarantine(quarantined.name, "a test")
    fresh = FeatureStore(str(tmp_path), {"x": 1})
    idx = fresh.index()
    assert idx.snapshot == name and idx.read_one_by_one == 1  # only the record committed after the snapshot
    assert sorted(_views(fresh)) == ["v-late", "v0", "v1", "v3", "v4"]  # the one moved aside is gone
    Path(store.root, INDEX_DIR, f"{name}.parquet").unlink()
    plain = FeatureStore(str(tmp_path), {"x": 1})
    assert plain.index().snapshot is None and _views(plain) == _views(fresh)
    rec = fresh.committed_views()["v3"]
    assert fresh.read_features(rec, 0, 4).shape == (4, 2, 4)  # digests from the snapshot check the reads


def test_a_damaged_snapshot_is_named_passed_over_and_repaired_by_verify(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    store = _store_with_records(tmp_path, 4)
    reference = _views(FeatureStore(str(tmp_path), {"x": 1}))
    name = store.compact(min_records=1)
    path = Path(store.root, INDEX_DIR, f"{name}.parquet")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x20
    path.write_bytes(bytes(raw))
    fresh = FeatureStore(str(tmp_path), {"x": 1})
    with caplog.at_level(logging.WARNING):
        assert _views(fresh) == reference and fresh.index().snapshot is None
    assert "index snapshot passed over" in fresh.bad_records[str(path)]


def test_gc_keeps_the_newest_snapshot_and_removes_older_ones_after_the_grace_period(tmp_path: Path) -> None:
    from stages.cache.gc import _in_store

    store = _store_with_records(tmp_path, 3)
    first = store.compact(min_records=1)
    time.sleep(1.1)  # snapshot names carry their time in seconds
    write_attempt(store, "more", torch.randn(4, 2, 4), [view("v-more", 0, 4, episode="e9")])
    second = store.compact(min_records=1)
    assert store.snapshots() == [first, second]
    found = {g.path: g for g in _in_store(store, time.time(), 3600.0, 60.0) if g.kind == "index-snapshot"}
    assert list(found) == [f"{INDEX_DIR}/{first}.parquet"] and not found[f"{INDEX_DIR}/{first}.parquet"].removable
    found = [g for g in _in_store(store, time.time() + 7200, 3600.0, 60.0) if g.kind == "index-snapshot"]
    assert [g.removable for g in found] == [True]


def test_records_are_fetched_once_per_process_and_a_commit_of_this_process_is_seen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store_with_records(tmp_path, 3)
    fresh = FeatureStore(str(tmp_path), {"x": 1})
    fetched: list[int] = []
    real = FeatureStore._fetch

    def counting(self: FeatureStore, rels: list[str]) -> list:
        fetched.append(len(rels))
        return real(self, rels)

    monkeypatch.setattr(FeatureStore, "_fetch", counting)
    for _ in range(3):
        assert len(fresh.committed_views()) == 3 and len(fresh.commits()) == 3
    assert fetched == [3]  # one batch of record reads, however often the index is asked for
    write_attempt(fresh, "mine", torch.randn(4, 2, 4), [view("v-mine", 0, 4, episode="e-mine")])
    assert "v-mine" in fresh.committed_views() and fetched == [3, 4]
    assert np.array_equal(np.sort(fresh.index().views.numbers["committed_at"])[:3], [100.0, 101.0, 102.0])
    assert json.loads(Path(store.root, "commits", f"{fresh.commits()[-1].name}.json").read_text())["views"]


def test_verify_names_a_damaged_snapshot_and_repair_removes_it(workdir: Path) -> None:
    from pipeline.manifest import load_manifest
    from stages.cache.fingerprint import fingerprint_spec
    from stages.cache.verify import verify
    from stages.extract.driver import extract

    m = load_manifest(workdir / "manifest.yaml")
    extract(m, show_progress=False, echo=lambda _: None)
    store = FeatureStore(m.cache.path, fingerprint_spec(m))
    name = store.compact(min_records=1)
    path = Path(store.root, INDEX_DIR, f"{name}.parquet")
    path.write_bytes(path.read_bytes()[:-100])
    found = verify(m, show_progress=False)
    assert not found.sound and any(str(path) in p.where for p in found.problems)
    repaired = verify(m, repair=True, show_progress=False)
    assert any("index snapshot" in line for line in repaired.repaired) and not path.exists()
    assert verify(m, show_progress=False).sound and repaired.views_to_redo == 0
