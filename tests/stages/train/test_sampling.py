"""Sampling as the release: with `views.phase: all` the windows' raw start frames are distributed as the
release draws them; several cameras are stored and drawn uniformly; video timing is reported."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.stats import chisquare

from pipeline.manifest import CropSection, ViewsSection, load_manifest
from pipeline.store.records import ViewRecord
from pipeline.store.store import FeatureStore
from stages.cache.fingerprint import fingerprint_spec
from stages.cache.sampling import frame_grid
from stages.cache.status import status_report
from stages.extract.augment import draw_views
from stages.extract.driver import extract
from stages.train.loop import train
from stages.train.windows import WindowIndex, sample_batch

T, STRIDE = 4, 3
TRAIN = ["predictor.embed_dim=32", "predictor.depth=1", "predictor.num_heads=1", "train.global_batch_size=4",
         "train.warmup_steps=1", "train.constant_steps=1", "train.decay_steps=1", "train.heldout_fraction=0",
         "train.eval_every=0", "train.checkpoint_minutes=0", "train.loader_threads=1", "train.device=cpu"]


def release_start(rng: np.random.Generator, num_frames: int, frames_per_clip: int, stride: int) -> int:
    """The released loader's draw (app/vjepa_droid/droid.py): ef = randint(nframes, vlen); sf = ef - nframes."""
    nframes = frames_per_clip * stride
    return int(rng.integers(nframes, num_frames)) - nframes


def phase_all_views(episode: str, num_frames: int, per_episode: int, camera: str = "left_mp4_path",
                    ) -> list[ViewRecord]:
    """The views `phase: all` stores of one episode: every phase of each crop draw, rows of the frame grid."""
    views = draw_views(ViewsSection(per_episode=per_episode, phase="all"), CropSection(scale=(0.3, 1.0)), camera,
                       episode, (48, 64), STRIDE)
    return [ViewRecord(v.view_id, episode, episode, camera, "s", v.draw.phase, STRIDE, 15.0, [48, 64],
                       v.draw.box.as_list(), {}, "p", length=len(frame_grid(num_frames, STRIDE, v.draw.phase)))
            for v in views]


def raw_starts(index: WindowIndex, draws: int) -> list[int]:
    windows = [w for b in range(draws // 100) for w in sample_batch(index, 100, seed=3, rank=0, batch_number=b)]
    return [w.view.phase + w.start * w.view.stride for w in windows]


@pytest.mark.parametrize("num_frames", [23, 25, 30])
def test_phase_all_draws_raw_starts_as_the_release(num_frames: int) -> None:
    index = WindowIndex.from_views(phase_all_views("e", num_frames, 1), split="all", frames_per_clip=T)
    ours = Counter(raw_starts(index, 20_000))
    rng = np.random.default_rng(0)
    theirs = Counter(release_start(rng, num_frames, T, STRIDE) for _ in range(20_000))
    support = list(range(num_frames - T * STRIDE))  # [0, num_frames - 1 - T * stride]
    assert sorted(ours) == sorted(theirs) == support  # exactly the release's range: no start more, none less
    for counts in (ours, theirs):  # both uniform over it
        assert chisquare([counts[s] for s in support]).pvalue > 1e-3
    assert index.num_windows == len(support)  # one window per raw start


def test_full_range_and_one_phase_are_what_they_say() -> None:
    views = phase_all_views("e", 23, 1)
    full = WindowIndex.from_views(views, split="all", frames_per_clip=T, window_range="full")
    assert sorted(Counter(raw_starts(full, 5_000))) == list(range(23 - (T - 1) * STRIDE))  # the last frame may end it
    one = WindowIndex.from_views([v for v in views if v.phase == 1], split="all", frames_per_clip=T)
    assert set(raw_starts(one, 2_000)) == {1, 4, 7, 10}  # phase 1's grid only


def test_crop_draws_and_cameras_are_drawn_uniformly() -> None:
    views = phase_all_views("e", 26, 2) + phase_all_views("e", 26, 2, camera="wrist_mp4_path")
    assert len(views) == 2 * 2 * STRIDE  # two crop draws at every phase, two cameras
    index = WindowIndex.from_views(views, split="all", frames_per_clip=T)
    windows = [w for b in range(100) for w in sample_batch(index, 100, seed=1, rank=0, batch_number=b)]
    cameras = Counter(w.view.camera for w in windows)
    assert chisquare(list(cameras.values())).pvalue > 1e-3 and len(cameras) == 2
    boxes = Counter(tuple(w.view.box) for w in windows if w.view.camera == "left_mp4_path")
    assert len(boxes) == 2 and chisquare(list(boxes.values())).pvalue > 1e-3
    starts = Counter(w.view.phase + w.start * STRIDE for w in windows)
    assert chisquare([starts[s] for s in range(26 - T * STRIDE)]).pvalue > 1e-3


def test_two_cameras_and_every_phase_end_to_end(workdir: Path) -> None:
    """Extract two cameras at every phase, see the views, the timing lines, and train on both cameras."""
    overrides = ["data.cameras=[wrist_mp4_path, ext1_mp4_path]", "views.phase=all", "views.per_episode=1", *TRAIN]
    m = load_manifest(workdir / "manifest.yaml", None, overrides)
    s = extract(m, show_progress=False, echo=lambda _: None)
    views = FeatureStore(m.cache.path, fingerprint_spec(m)).committed_views().values()
    stride = next(iter(views)).stride
    assert not s.failed and s.views_done == 3 * 2 * stride == len(views)  # episodes x cameras x phases
    assert {(v.camera, v.phase) for v in views} == {(c, p) for c in m.data.cameras for p in range(stride)}
    assert [t.camera for t in s.timing] == m.data.cameras and not s.warnings
    assert "timing     wrist_mp4_path: video 15 fps, stride 4" in s.format()
    assert extract(m, show_progress=False, echo=lambda _: None).views_done == 0  # nothing missing: nothing done
    one = load_manifest(workdir / "manifest.yaml", None, ["data.camera=wrist_mp4_path", "views.phase=all",
                                                          "views.per_episode=1"])
    assert extract(one, show_progress=False, echo=lambda _: None).views_done == 0  # a subset is already there
    summary = train(m, workdir / "run", steps=2, show_progress=False, echo=lambda _: None)
    assert summary.train_views == len(views) and summary.end_step == 2


def test_timestamps_that_disagree_with_the_video_rate_are_flagged(workdir: Path) -> None:
    """trajectory.h5 timestamps 4x apart (the reported-60-fps case of vjepa2 #183, mirrored) warn in the extract
    summary and in status, naming the camera and the setting; data.video_fps fixes the stride and the warning."""
    lines = (workdir / "data" / "episodes.txt").read_text().splitlines()
    for line in lines[:2]:
        with h5py.File(workdir / "data" / line / "trajectory.h5", "r+") as f:
            group = f["observation/timestamp/cameras"]
            for name in list(group):
                stamps = group[name][()]
                del group[name]
                group[name] = stamps[0] + (stamps - stamps[0]) * 4  # one frame every 267 ms: 3.75 Hz
    m = load_manifest(workdir / "manifest.yaml", None, ["data.camera=wrist_mp4_path"])
    s = extract(m, show_progress=False, echo=lambda _: None)
    assert len(s.warnings) == 1 and "wrist_mp4_path" in s.warnings[0] and "2 of 3 episodes" in s.warnings[0]
    assert "data.video_fps: 3.73" in s.warnings[0] and "warning    wrist_mp4_path" in s.format()
    report = status_report(m)
    assert report.warnings == s.warnings and "timestamps 3.731/3.731/14.93 Hz in 3" in report.format()
    fixed = load_manifest(workdir / "manifest.yaml", None, ["data.camera=wrist_mp4_path", "data.video_fps=3.73"])
    again = extract(fixed, show_progress=False, echo=lambda _: None)
    assert again.views_done > 0 and "stride 1 " in again.format()  # new views on the 3.73 fps grid
    assert "1 of 3 episodes" in again.warnings[0]  # now the one episode whose timestamps say 15 Hz is named
    strides = {v.stride for v in FeatureStore(fixed.cache.path, fingerprint_spec(fixed)).committed_views().values()}
    assert strides == {1, 4}  # the store keeps both grids; each manifest trains on its own


def test_a_camera_an_episode_lacks_fails_it_once_and_keeps_its_other_views(workdir: Path) -> None:
    """Adding a camera extracts only its views; an episode without it is a recorded failure (named), not
    retried on every run, and its committed views of the other camera stay in use."""
    base = ["views.per_episode=1", *TRAIN]
    one = load_manifest(workdir / "manifest.yaml", None, ["data.camera=wrist_mp4_path", *base])
    assert extract(one, show_progress=False, echo=lambda _: None).views_done == 3
    first = workdir / "data" / (workdir / "data" / "episodes.txt").read_text().splitlines()[0]
    both = load_manifest(workdir / "manifest.yaml", None, ["data.cameras=[wrist_mp4_path, ext1_mp4_path]", *base])
    ext1 = next(p for p in (first / "recordings" / "MP4").glob("*.mp4")
                if p.stem in json.loads(next(first.glob("metadata_*.json")).read_text())["ext1_mp4_path"])
    ext1.unlink()
    s = extract(both, show_progress=False, echo=lambda _: None)
    assert s.views_done == 2 and len(s.failed) == 1 and "missing" in s.failed[0]["reason"]  # only ext1, 2 episodes
    again = extract(both, show_progress=False, echo=lambda _: None)
    assert again.views_done == 0 and again.failed[0].get("recorded") == "earlier run"  # not retried
    report = status_report(both)
    assert report.episodes_by_state["failed"] == 1 and report.views_failed == 1
    summary = train(both, workdir / "run", steps=1, show_progress=False, echo=lambda _: None)
    assert summary.train_episodes == 3  # the failed episode's wrist view still trains


def test_evaluation_windows_do_not_repeat_a_clip_shifted_by_a_frame() -> None:
    from stages.train.windows import eval_windows

    index = WindowIndex.from_views(phase_all_views("e", 60, 2), split="all", frames_per_clip=T)
    windows = eval_windows(index, T, 100, seed=0)
    raw = [(tuple(w.view.box), w.view.phase + w.start * STRIDE) for w in windows]
    assert {w.view.phase for w in windows} == {0} and len(set(raw)) == len(raw)
    for box in {b for b, _ in raw}:  # per crop draw, starts T * stride apart: no two clips overlap
        starts = sorted(s for b, s in raw if b == box)
        assert all(b - a >= T * STRIDE for a, b in pairwise(starts))
