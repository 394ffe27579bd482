"""Stage one end to end on tiny synthetic episodes: correctness, incremental re-runs, kill -9, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.manifest import Manifest, load_manifest
from pipeline.store.store import FeatureStore
from stages.cache.fingerprint import fingerprint_spec
from stages.cache.status import status_report
from stages.extract.augment import CropBox, crop_frames
from stages.extract.driver import extract
from stages.extract.droid import decode_frames, open_episode
from stages.extract.encoder import load_encoder


def load(workdir: Path, *overrides: str) -> Manifest:
    return load_manifest(workdir / "manifest.yaml", None, list(overrides))


def run(m: Manifest):
    return extract(m, show_progress=False, echo=lambda _: None)


def test_features_are_the_encoder_on_the_drawn_crop(workdir: Path) -> None:
    m = load(workdir)
    s = run(m)
    assert not s.failed and s.views_done == 6 and s.frames > 0
    store = FeatureStore(m.cache.path, fingerprint_spec(m)).check()
    views = store.committed_views()
    assert len(views) == 6 and {v.episode_id for v in views.values()} == {
        line for line in (workdir / "data/episodes.txt").read_text().splitlines()}
    rec = next(iter(views.values()))
    ep = open_episode(rec.episode_path, m.data.cameras[0])
    index = store.read_rows(rec, "frame_index")
    assert np.array_equal(index, np.arange(rec.phase, ep.num_usable, rec.stride))
    crops = torch.from_numpy(np.ascontiguousarray(crop_frames(decode_frames(ep, index), CropBox(*rec.box))))
    want = load_encoder(m, store.digest).encode_crops([crops], m.crop).to(torch.bfloat16)  # [F, tokens, D]
    got = store.read_features(rec, 0, rec.length)
    assert torch.equal(got, want)
    states = store.read_rows(rec, "states")
    np.testing.assert_allclose(states, ep.states[index], rtol=1e-6)
    actions = store.read_rows(rec, "actions")
    assert np.isnan(actions[-1]).all() and np.isfinite(actions[:-1]).all()
    np.testing.assert_allclose(actions[:-1, :3], np.diff(states[:, :3], axis=0), atol=1e-6)


def test_second_run_does_no_encoding(workdir: Path) -> None:
    m = load(workdir)
    run(m)
    said: list[str] = []
    s = extract(m, show_progress=False, echo=said.append)
    assert s.views_done == 0 and s.frames == 0 and s.views_skipped == 6
    assert "Nothing to do" in said[0]
    r = status_report(m)
    assert (r.views_planned, r.views_committed, r.views_stale, r.views_failed) == (6, 6, 0, 0)
    assert r.bytes_on_disk > 0


def test_added_episodes_only_are_extracted(workdir: Path) -> None:
    lines = (workdir / "data/episodes.txt").read_text().splitlines()
    (workdir / "data/first.txt").write_text("\n".join(lines[:2]))
    assert run(load(workdir, "data.episodes=first.txt")).views_done == 4
    s = run(load(workdir))
    assert s.views_done == 2 and s.views_skipped == 4


def test_more_views_per_episode_adds_only_new_views(workdir: Path) -> None:
    run(load(workdir, "views.per_episode=1"))
    s = run(load(workdir))
    assert (s.views_skipped, s.views_done) == (3, 3)


def test_identical_draws_are_stored_once(workdir: Path) -> None:
    m = load(workdir, "views.per_episode=3", "views.phase=first", "crop.scale=[1.777, 1.777]")
    s = run(m)
    assert s.views_done == 3  # every draw is the same fallback crop with the same phase
    assert status_report(m).views_planned == 3


def test_status_plans_unopened_episodes_at_the_rate_already_seen(workdir: Path) -> None:
    """`views.phase: all` with the reported rate: an episode never opened is planned at the stride its
    camera's committed views give (exact here: the same rate); before any is committed, one phase per draw,
    said to be a lower bound."""
    lines = (workdir / "data/episodes.txt").read_text().splitlines()
    (workdir / "data/first.txt").write_text(lines[0])
    m_first, m_all = load(workdir, "data.episodes=first.txt", "views.phase=all"), load(workdir, "views.phase=all")
    before = status_report(m_all)
    assert before.views_planned == 2 * len(lines) and "lower bound" in " ".join(before.warnings)
    run(m_first)
    estimated = status_report(m_all)
    assert not any("lower bound" in w for w in estimated.warnings)
    run(m_all)
    exact = status_report(m_all)  # every episode opened: its views drawn
    assert estimated.views_planned == exact.views_planned == exact.views_committed == 2 * 4 * len(lines)


@pytest.mark.parametrize("override", ["encoder.seed=1", "crop.size=48", "data.fps=5", "crop.scale=[0.4, 1.0]",
                                      "cache.dtype=float32", "encoder.depth=2"])
def test_changed_settings_make_a_new_fingerprint(workdir: Path, override: str) -> None:
    m0 = load(workdir)
    run(m0)
    m1 = load(workdir, override)
    s = run(m1)
    assert s.fingerprint != FeatureStore(m0.cache.path, fingerprint_spec(m0)).digest
    assert s.views_skipped == 0 and s.views_done > 0  # nothing old reused


def test_changed_episode_is_re_extracted(workdir: Path) -> None:
    m = load(workdir)
    run(m)
    lines = (workdir / "data/episodes.txt").read_text().splitlines()
    h5 = workdir / "data" / lines[1] / "trajectory.h5"
    st = h5.stat()
    os.utime(h5, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r = status_report(m)
    assert r.views_stale == 2 and r.episodes_by_state["stale"] == 1
    s = run(m)
    assert s.views_done == 2 and s.views_skipped == 4
    r = status_report(m)
    assert r.views_committed == 6 and r.views_stale == 0


def _corrupt(folder: Path, how: str) -> None:
    import h5py

    mp4 = next((folder / "recordings/MP4").glob("*.mp4"))
    meta = next(folder.glob("metadata_*.json"))
    if how == "missing mp4":
        for f in (folder / "recordings/MP4").glob("*.mp4"):
            f.unlink()
    elif how == "corrupt mp4":
        for f in (folder / "recordings/MP4").glob("*.mp4"):
            f.write_bytes(b"\x00garbage" * 100)
    elif how == "missing metadata":
        meta.unlink()
    elif how in ("no cartesian_position", "nan states", "lengths disagree", "integer states", "absurd states"):
        with h5py.File(folder / "trajectory.h5", "r+") as f:
            rs = f["observation/robot_state"]
            if how == "no cartesian_position":
                del rs["cartesian_position"]
            elif how == "nan states":
                data = rs["cartesian_position"][...]
                data[3, 1] = np.nan
                rs["cartesian_position"][...] = data
            elif how in ("integer states", "absurd states"):
                data = rs["cartesian_position"][...]
                data = data.astype(np.int32) if how == "integer states" else data + np.array([0, 0, 500.0, 0, 0, 0])
                del rs["cartesian_position"]
                rs.create_dataset("cartesian_position", data=data)
            else:  # h5 five rows shorter than the video: beyond the known one-frame case
                keep = len(rs["gripper_position"]) - 5
                for name in ("cartesian_position", "gripper_position"):
                    data = rs[name][:keep]
                    del rs[name]
                    rs.create_dataset(name, data=data)
    assert mp4.parent.exists()


@pytest.mark.parametrize(("how", "reason"), [
    ("missing mp4", "mp4"), ("corrupt mp4", "mp4"), ("missing metadata", "metadata"),
    ("no cartesian_position", "cartesian_position"), ("nan states", "cartesian_position"),
    ("lengths disagree", "frames"), ("integer states", "cartesian_position has dtype int32"),
    ("absurd states", "cartesian_position xyz beyond the plausible bound"),
])
def test_bad_episode_is_recorded_and_the_run_goes_on(workdir: Path, how: str, reason: str) -> None:
    lines = (workdir / "data/episodes.txt").read_text().splitlines()
    _corrupt(workdir / "data" / lines[0], how)
    m = load(workdir)
    s = run(m)
    assert [f["episode"] for f in s.failed] == [lines[0]]
    assert reason in s.failed[0]["reason"] and s.views_done == 4
    r = status_report(m)
    assert r.episodes_failed[0]["episode"] == lines[0] and r.views_committed == 4
    again = run(m)  # unchanged files: the failure stands, nothing is redone
    assert again.views_done == 0 and len(again.failed) == 1


def test_stage_one_never_fails_an_episode_for_a_stage_two_setting(workdir: Path) -> None:
    s = run(load(workdir, "data.frames_per_clip=40"))  # longer than every view: training skips them, not extract
    assert not s.failed and s.views_done == 6


def test_a_failure_is_retried_when_the_setting_it_depended_on_changes(workdir: Path) -> None:
    lines = (workdir / "data/episodes.txt").read_text().splitlines()
    meta = next((workdir / "data" / lines[0]).glob("metadata_*.json"))
    data = json.loads(meta.read_text())
    del data["ext2_mp4_path"]
    meta.write_text(json.dumps(data))
    ext2 = load(workdir, "data.camera=ext2_mp4_path")
    assert [f["episode"] for f in run(ext2).failed] == [lines[0]]
    assert run(ext2).views_done == 0  # same files, same setting: the failure stands
    s = run(load(workdir, "data.camera=left_mp4_path"))  # another camera: retried without being asked
    assert not s.failed and s.views_done == 6
    report = status_report(ext2)
    assert report.episodes_failed == [] and report.episodes_by_state["new"] == 1  # retried again under ext2


def test_fixed_episode_is_retried(workdir: Path) -> None:
    lines = (workdir / "data/episodes.txt").read_text().splitlines()
    folder = workdir / "data" / lines[0]
    backup = workdir / "backup"
    shutil.copytree(folder, backup)
    _corrupt(folder, "corrupt mp4")
    m = load(workdir)
    assert len(run(m).failed) == 1
    shutil.rmtree(folder)
    shutil.copytree(backup, folder)
    s = run(m)
    assert not s.failed and s.views_done == 2
    assert status_report(m).episodes_failed == []


def test_on_error_raise_stops_the_run(workdir: Path) -> None:
    from stages.extract.droid import EpisodeError

    lines = (workdir / "data/episodes.txt").read_text().splitlines()
    _corrupt(workdir / "data" / lines[0], "missing mp4")
    with pytest.raises(EpisodeError):
        run(load(workdir, "extract.on_error=raise"))


KILL_SCRIPT = """
import sys
from pipeline.manifest import load_manifest
from stages.extract.driver import extract
extract(load_manifest(sys.argv[1], None, sys.argv[2:]), show_progress=False)
"""


def test_kill_9_in_the_middle_of_a_part_then_resume(workdir: Path, same_features: Callable[..., None]) -> None:
    """Kill the extraction while a part is written but not committed; the next run completes the job."""
    m = load(workdir, "extract.episodes_per_part=3", "encoder.batch_size=2")
    root = Path(FeatureStore(m.cache.path, fingerprint_spec(m)).root)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(workdir / "manifest.yaml"),
                             "extract.episodes_per_part=3", "encoder.batch_size=2"], stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(root.glob("parts/*/*/features/c/*")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = FeatureStore(m.cache.path, fingerprint_spec(m))
    assert list(root.glob("parts/*")), "the kill should land while a part is being written"
    assert store.committed_views() == {} and status_report(m).views_committed == 0
    s = run(m)
    assert s.views_done == 6 and not s.failed
    fresh = load(workdir, f"cache.path={workdir}/fresh")
    run(fresh)
    resumed = FeatureStore(m.cache.path, fingerprint_spec(m))  # a new reader: the records as they are now
    same_features(resumed, FeatureStore(fresh.cache.path, fingerprint_spec(fresh)))


def test_dask_local_cluster_gives_the_same_store(workdir: Path, same_features: Callable[..., None]) -> None:
    m = load(workdir, "extract.scheduler=local", "views.per_episode=1")
    s = run(m)
    assert s.views_done == 3 and not s.failed
    inline = load(workdir, "views.per_episode=1", f"cache.path={workdir}/inline")
    run(inline)
    same_features(FeatureStore(m.cache.path, fingerprint_spec(m)),
                         FeatureStore(inline.cache.path, fingerprint_spec(inline)))


def test_video_corrupt_in_the_middle_fails_only_its_episode(workdir: Path) -> None:
    """Corruption found while decoding (after rows were allocated): the episode fails, the part commits the rest."""
    m = load(workdir, "extract.episodes_per_part=3")
    lines = (workdir / "data/episodes.txt").read_text().splitlines()
    mp4 = open_episode(workdir / "data" / lines[1], m.data.cameras[0]).video_path
    data = bytearray(mp4.read_bytes())
    cut = len(data) // 3
    data[cut : cut + len(data) // 3] = np.random.default_rng(0).integers(0, 256, len(data) // 3, np.uint8).tobytes()
    mp4.write_bytes(bytes(data))
    open_episode(mp4.parent.parent.parent, m.data.cameras[0])  # still opens: the damage shows only when decoding
    s = run(m)
    assert [f["episode"] for f in s.failed] == [lines[1]] and "decode" in s.failed[0]["reason"]
    views = FeatureStore(m.cache.path, fingerprint_spec(m)).committed_views()
    assert sorted({v.episode_id for v in views.values()}) == sorted([lines[0], lines[2]])


def test_parallel_decoders_give_the_same_store(workdir: Path, same_features: Callable[..., None]) -> None:
    one = load(workdir)
    two = load(workdir, "extract.decode_workers=3", f"cache.path={workdir}/two", "encoder.batch_size=5")
    run(one)
    run(two)
    same_features(FeatureStore(one.cache.path, fingerprint_spec(one)),
                         FeatureStore(two.cache.path, fingerprint_spec(two)), exact=False)


def test_a_failing_write_commits_nothing_and_the_rerun_completes(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.store.store import PartWriter

    def broken(*_: object) -> None:
        raise OSError("disk full")

    m = load(workdir)
    monkeypatch.setattr(PartWriter, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        run(m)
    assert FeatureStore(m.cache.path, fingerprint_spec(m)).committed_views() == {}
    monkeypatch.undo()
    assert run(m).views_done == 6


def test_extract_into_an_object_store_url(workdir: Path) -> None:
    m = load(workdir, "cache.path=memory://bucket/extract-cache")
    assert run(m).views_done == 6
    again = run(m)
    assert again.views_done == 0 and again.views_skipped == 6
    assert status_report(m).views_committed == 6


def test_listed_episode_folder_that_does_not_exist(workdir: Path) -> None:
    episodes = workdir / "data" / "episodes.txt"
    episodes.write_text(episodes.read_text() + "LAB/success/2026-01-01/not_there\n")
    s = run(load(workdir))
    assert [f["episode"] for f in s.failed] == ["LAB/success/2026-01-01/not_there"]
    assert "does not exist" in s.failed[0]["reason"] and s.views_done == 6
