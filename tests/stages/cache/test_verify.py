"""Damage in a store is caught by verify and by training, repaired by redoing exactly the broken views."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from pipeline.errors import DamagedDataError
from pipeline.manifest import Manifest, load_manifest
from pipeline.store.records import CommitRecord
from pipeline.store.store import FeatureStore
from stages.cache.fingerprint import fingerprint_spec
from stages.cache.status import status_report
from stages.cache.verify import verify
from stages.extract.driver import extract
from stages.train.loop import train

TRAIN = ["predictor.embed_dim=32", "predictor.depth=1", "predictor.num_heads=1", "train.global_batch_size=4",
         "train.warmup_steps=1", "train.constant_steps=8", "train.decay_steps=1", "train.heldout_fraction=0",
         "train.eval_every=0", "train.log_every=1", "train.loader_threads=1", "train.device=cpu"]


def load(workdir: Path, *overrides: str) -> Manifest:
    return load_manifest(workdir / "manifest.yaml", None, [*TRAIN, *overrides])


def run(m: Manifest):
    return extract(m, show_progress=False, echo=lambda _: None)


def store_of(m: Manifest) -> FeatureStore:
    return FeatureStore(m.cache.path, fingerprint_spec(m))


def extracted(workdir: Path, *overrides: str) -> tuple[Manifest, FeatureStore, CommitRecord, Path]:
    """Extract the tiny dataset; the manifest, its store, the oldest commit and its attempt folder."""
    m = load(workdir, *overrides)
    run(m)
    store = store_of(m)
    commit = store.commits()[0]
    return m, store, commit, Path(store.root) / "parts" / commit.part / commit.attempt


def flip(path: Path, at: int = 9) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def drop_inner_chunk(shard: Path, chunk: int) -> None:
    """Mark inner chunk `chunk` of a shard as missing in its index (and re-checksum the index), as a writer
    that never wrote it would leave it: zarr then returns the fill value for its rows."""
    raw = bytearray(shard.read_bytes())
    start = len(raw) - (16 * 4 + 4)  # the index at the end: (offset, nbytes) per inner chunk (4 here), crc32c
    raw[start + 16 * chunk : start + 16 * chunk + 16] = b"\xff" * 16  # "no such chunk"
    raw[len(raw) - 4 :] = np.uint32(google_crc32c.value(bytes(raw[start : len(raw) - 4]))).tobytes()
    shard.write_bytes(bytes(raw))


def flip_edge_chunk_checksum(attempt: Path) -> str:
    """Flip a checksum byte of an inner chunk that two views share (a view boundary inside it): neither
    view's training reads check it, but a plain zarr reader would fail on it, so verify must."""
    commit = next(json.loads(p.read_text()) for p in (attempt.parent.parent.parent / "commits").glob("*.json")
                  if json.loads(p.read_text())["attempt"] == attempt.name)
    edges = sorted(v["start"] for v in commit["views"] if v["start"] % 2)  # chunks of 2 rows, shards of 8
    assert edges, "the tiny dataset should have a view starting inside a chunk"
    chunk = edges[0] // 2
    shard = attempt / f"features/c/{chunk // 4}/0/0"
    raw = shard.read_bytes()
    index = np.frombuffer(raw[-(16 * 4 + 4) : -4], np.uint64).reshape(4, 2)
    offset, nbytes = (int(x) for x in index[chunk % 4])
    flip(shard, offset + nbytes - 4)
    return f"features/c/{chunk // 4}/0/0"


DAMAGE: dict[str, Callable[[Path], str]] = {
    "shared chunk checksum": flip_edge_chunk_checksum,
    "features byte": lambda a: (flip(a / "features/c/0/0/0"), "features")[1],
    "states byte": lambda a: (flip(a / "states/c/0/0"), "states")[1],
    "actions byte": lambda a: (flip(a / "actions/c/0/0"), "actions")[1],
    "deleted shard": lambda a: ((a / "features/c/0/0/0").unlink(), "features/c/0/0/0")[1],
    "deleted chunk": lambda a: (drop_inner_chunk(a / "features/c/0/0/0", 1), "features/c/0/0/0")[1],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_found_named_and_repaired_by_redoing_exactly_those_views(
        workdir: Path, damage: str, same_features: Callable[..., None]) -> None:
    m = load(workdir)
    assert run(m).views_done == 6
    clean = verify(m, show_progress=False)
    assert clean.sound and clean.views_checked == 6 and clean.bytes_read > 0
    store = store_of(m)
    commit = store.commits()[0]
    named = DAMAGE[damage](Path(store.root) / "parts" / commit.part / commit.attempt)
    found = verify(m, show_progress=False)
    assert not found.sound and all(named in p.where or named in p.what for p in found.problems)
    broken = {p.view_id for p in found.problems}
    repaired = verify(m, repair=True, show_progress=False)
    assert repaired.repaired and repaired.views_to_redo == len(broken) >= 1
    assert status_report(m).views_pending == len(broken) and len(store.quarantined()) == 1
    again = run(m)
    assert again.views_done == len(broken) and again.views_skipped == 6 - len(broken)
    assert verify(m, show_progress=False).sound
    fresh = load(workdir, f"cache.path={workdir}/fresh")
    run(fresh)
    same_features(store_of(m), store_of(fresh))


def test_training_never_trains_on_damaged_data(workdir: Path) -> None:
    m = load(workdir)
    run(m)
    store = store_of(m)
    for c in store.commits():
        flip(Path(store.root) / "parts" / c.part / c.attempt / "states/c/0/0")
    with pytest.raises(DamagedDataError, match="states"):
        train(m, workdir / "run", steps=1, show_progress=False, echo=lambda _: None)
    with pytest.raises(DamagedDataError, match="all are damaged"):
        train(load(workdir, "train.on_bad_data=skip"), workdir / "run2", steps=1, show_progress=False,
              echo=lambda _: None)


def test_training_skips_and_counts_damaged_views_when_asked(workdir: Path) -> None:
    m, _, commit, attempt = extracted(workdir, "train.on_bad_data=skip")
    flip(attempt / "states/c/0/0")
    s = train(m, workdir / "run", steps=10, show_progress=False, echo=lambda _: None)
    damaged = {v.view_id for v in commit.views}
    assert s.end_step == 10 and s.skipped_views and set(s.skipped_views) <= damaged


@pytest.mark.parametrize("content", ['{"format_version": 2, "fingerp', "{}"])
def test_a_truncated_or_empty_commit_record_stops_nothing(workdir: Path, content: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    m = load(workdir)
    run(m)
    store = store_of(m)
    victim = Path(store.root) / "commits" / f"{store.commits()[0].name}.json"
    lost = len(json.loads(victim.read_text())["views"])
    victim.write_text(content)
    with caplog.at_level(logging.WARNING):
        report = status_report(m)
    assert report.views_committed == 6 - lost and str(victim) in report.bad_records
    assert any(str(victim) in r.getMessage() for r in caplog.records)
    assert train(m, workdir / "run", steps=1, show_progress=False, echo=lambda _: None).end_step == 1
    found = verify(m, show_progress=False)
    assert [p.where for p in found.problems] == [str(victim)]
    assert run(m).views_done == lost  # its views count as missing and are redone
    repaired = verify(m, repair=True, show_progress=False)
    assert repaired.unparsed_to_redo == 1 and repaired.views_to_redo == 0
    assert "redo the views of 1 record(s) that did not parse" in repaired.format()
    assert not victim.exists() and verify(m, show_progress=False).sound


def test_verify_samples_a_fraction_and_repairs_a_bad_failure_record(workdir: Path) -> None:
    m = load(workdir)
    run(m)
    store = store_of(m)
    (Path(store.root) / "failures").mkdir(exist_ok=True)
    (Path(store.root) / "failures" / "bad.json").write_text("{")
    sampled = verify(m, sample=0.5, seed=3, show_progress=False)
    assert sampled.views_checked == 3 and len(sampled.problems) == 1
    verify(m, repair=True, show_progress=False)
    assert verify(m, show_progress=False).sound


def test_verify_never_reports_a_running_extract(workdir: Path) -> None:
    """An attempt with no commit record yet (what a running extract has) is not damage."""
    m, _, _, attempt = extracted(workdir)
    shutil.copytree(attempt, attempt.parent / "20990101T000000Z-inprogress")
    flip(attempt.parent / "20990101T000000Z-inprogress" / "states/c/0/0")
    assert verify(m, show_progress=False).sound


def test_verify_finds_non_finite_features_even_with_matching_digests(workdir: Path) -> None:
    """Bytes exactly as committed can still be unusable (NaN from a broken encoder): verify says so."""
    import dataclasses
    import time

    from pipeline.store.records import new_attempt_id

    m, store, old, _ = extracted(workdir)
    view = old.views[0]
    feats = store.read_features(view, 0, view.length).float()
    feats[2, 1, 3] = float("nan")
    attempt = new_attempt_id()
    w = store.part_writer(old.part, attempt, view.length, feats.shape[1], feats.shape[2], m.cache.settings())
    w.write(0, feats)
    w.finish(*(store.read_rows(view, name) for name in ("states", "actions", "frame_index")))
    bad = dataclasses.replace(view, attempt=attempt, start=0, digests=w.digests(0, view.length))
    store.commit(CommitRecord(f"{old.part}.{attempt}", old.part, attempt, view.length, time.time(), [bad]))
    found = verify(m, show_progress=False)
    assert [p.what for p in found.problems] == ["non-finite (or absurdly large) values in row 2"]
