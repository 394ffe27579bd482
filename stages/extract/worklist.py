"""Stage one's planning: which episodes need work, from the manifest and the store's commits alone.

Planning must be cheap at DROID scale (76k episodes): it never opens a video or an h5 file. It stats
each episode's input files (size + mtime) and compares them with what committed views and failure
records say they were made from. An episode whose files are unchanged and whose planned views are all
committed is done; its planned views can be recomputed from the frame size stored with its views. An
episode never seen, or changed, goes to a worker, which opens it and draws its views there.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.manifest import CropSection, DataSection, Manifest, ViewsSection
from pipeline.store import FailureRecord, FeatureStore, ViewTable, canonical_json
from stages.cache.sampling import data_stride
from stages.extract.augment import draw_views
from stages.extract.droid import Source, episode_id_for
from stages.extract.episodes import list_episodes, source_identity


@dataclass
class EpisodeTask:
    """One episode for a worker: where it is, and the views already committed that it can skip."""

    episode_id: str
    path: str
    source: Source
    done_views: list[str] = field(default_factory=list)


@dataclass
class PartTask:
    """One unit of work = one task = one commit: a few episodes, named by what they contain."""

    part_id: str
    episodes: list[EpisodeTask]


@dataclass
class EpisodePlan:
    """What the store says about one episode of the manifest."""

    episode_id: str
    path: str
    state: str  # done | partial | stale | new | failed
    planned: int  # views planned (before de-duplication where the episode was never opened)
    committed: int  # planned views committed from the current files
    stale: int  # committed views made from files that have changed since
    source: Source = field(default_factory=dict)  # current input files (size, mtime)
    reason: str = ""  # failure reason, for failed episodes
    done_views: list[str] = field(default_factory=list)

    @property
    def needs_work(self) -> bool:
        return self.state in ("partial", "stale", "new")


@dataclass(frozen=True)
class WorkSettings:
    """The manifest settings planning depends on, and nothing else."""

    data: DataSection  # episodes, cameras, frame rates
    views: ViewsSection  # views per episode, seed, phase rule
    crop: CropSection  # crop draws (a view's id holds its box)
    retry_failed: bool  # extract.retry_failed

    @classmethod
    def of(cls, m: Manifest) -> WorkSettings:
        return cls(m.data, m.views, m.crop, m.extract.retry_failed)


def planned_view_ids(s: WorkSettings, episode_id: str, camera: str, frame_hw: list[int], video_fps: float
                     ) -> list[str]:
    """The distinct view ids the manifest asks for of one camera, given its frame size and reported frame rate."""
    stride = data_stride(s.data, video_fps)
    return [v.view_id for v in draw_views(s.views, s.crop, camera, episode_id, (frame_hw[0], frame_hw[1]), stride)]


def episode_settings(data: DataSection) -> dict[str, Any]:
    """The stage-one settings outside the fingerprint that an episode's failure can depend on. A failure
    is recorded with them and retried when they change (e.g. a camera key an episode lacks, or a frame
    rate override that makes it long enough)."""
    cams = data.cameras
    out: dict[str, Any] = {"camera": cams[0]} if len(cams) == 1 else {"cameras": cams}
    if data.video_fps != "auto":
        out["video_fps"] = data.video_fps
    return out


def failure_applies(failure: FailureRecord, source: Source, data: DataSection) -> bool:
    """A recorded failure stands while the episode's files and the settings it failed under are unchanged."""
    return failure.source == source and failure.settings == episode_settings(data)


class Seen(NamedTuple):
    """What planning needs of one committed view (a few fields, not the whole record: planning looks at every
    view of every episode of the manifest)."""

    view_id: str
    camera: str
    source: str  # canonical JSON of the view's input files' identity
    frame_hw: tuple[int, int]
    video_fps: float


def plan_episodes(s: WorkSettings, store: FeatureStore, views: ViewTable | None = None) -> list[EpisodePlan]:
    """Classify every episode of the manifest against the store (`views`: its committed views, when the
    caller has read them already)."""
    root = Path(s.data.root)
    table = store.index().committed() if views is None else views
    rows = np.flatnonzero(np.isin(table.codes["camera"], _codes(table, "camera", s.data.cameras)))
    folders = list_episodes(s.data)
    ids = [episode_id_for(folder, root) for folder in folders]
    seen = _seen_by_episode(table, rows, ids)
    failures = store.failures()
    strides = unopened_strides(s.data, table, rows)
    return [_plan_one(s, folder, eid, seen.get(eid, []), failures, strides) for folder, eid in zip(folders, ids,
                                                                                                   strict=True)]


def _codes(table: ViewTable, key: str, values: Iterable[str]) -> list[int]:
    """The codes of those of `values` the table's column `key` holds."""
    wanted = set(values)
    return [i for i, c in enumerate(table.categories[key]) if c in wanted]


def _seen_by_episode(table: ViewTable, rows: np.ndarray, episodes: list[str]) -> dict[str, list[Seen]]:
    """episode id -> its views among `rows` (only the episodes listed)."""
    rows = rows[np.isin(table.codes["episode_id"][rows], _codes(table, "episode_id", episodes))]
    rows = rows[np.argsort(table.codes["episode_id"][rows], kind="stable")]
    n = table.numbers
    columns = zip(table.strings("episode_id")[rows].tolist(), table.strings("view_id")[rows].tolist(),
                  table.strings("camera")[rows].tolist(), table.strings("source")[rows].tolist(),
                  n["frame_h"][rows].tolist(), n["frame_w"][rows].tolist(), n["video_fps"][rows].tolist(), strict=True)
    out: dict[str, list[Seen]] = defaultdict(list)
    for eid, vid, camera, source, h, w, fps in columns:
        out[eid].append(Seen(vid, camera, source, (h, w), fps))
    return out


def unopened_strides(data: DataSection, table: ViewTable, rows: np.ndarray) -> dict[str, int]:
    """Per camera, the stride the views of an episode not yet opened will most likely have: the one
    data.video_fps gives, else the one the rate most of the camera's committed views (`rows` of the table)
    report gives (only opening a video tells its own rate). A camera with neither is left out."""
    override = data.fps_override()
    out = {}
    for cam in data.cameras:
        codes = _codes(table, "camera", [cam])
        fps = table.numbers["video_fps"][rows[np.isin(table.codes["camera"][rows], codes)]]
        if override or len(fps):
            rates, first, counts = np.unique(fps, return_index=True, return_counts=True)
            common = float(rates[np.lexsort((first, -counts))[0]]) if len(fps) else 0.0  # ties: the first seen
            out[cam] = data_stride(data, override or common)
    return out


def _plan_one(s: WorkSettings, folder: Path, eid: str, recs: list[Seen], failures: dict[str, FailureRecord],
              strides: dict[str, int]) -> EpisodePlan:
    cams = s.data.cameras
    per_camera = {c: source_identity(s.data, folder, c) for c in cams}  # a view's files: its own camera's
    src = {name: ident for one in per_camera.values() for name, ident in one.items()}  # the episode's: all of them
    identity = {c: canonical_json(per_camera[c]) for c in cams}
    current = [r for r in recs if r.source == identity[r.camera]]
    stale = len(recs) - len(current)
    planned, missing = [], []  # missing: cameras without current views (drawn when the episode is opened)
    for cam in cams:
        seen = [r for r in current if r.camera == cam]
        if seen:
            planned += planned_view_ids(s, eid, cam, list(seen[0].frame_hw), seen[0].video_fps)
        else:
            missing.append(cam)
    have = {r.view_id for r in current}
    done = [v for v in planned if v in have]
    count = len(planned) + sum(_unopened_views(s.views, strides.get(cam)) for cam in missing)
    if not missing and len(done) == len(planned):
        return EpisodePlan(eid, str(folder), "done", count, len(done), stale, src, done_views=done)
    failure = failures.get(eid)
    if failure is not None and failure_applies(failure, src, s.data):  # what is missing failed under these files
        state = "new" if s.retry_failed else "failed"
        return EpisodePlan(eid, str(folder), state, count, len(done), stale, src, failure.reason, done_views=done)
    state = "partial" if current else ("stale" if recs else "new")
    return EpisodePlan(eid, str(folder), state, count, len(done), stale, src, done_views=done)


def _unopened_views(views: ViewsSection, stride: int | None) -> int:
    """Views planned for one camera of an episode never opened (identical crop draws may still collapse):
    with `views.phase: all` one per phase of `stride` (`unopened_strides`); where that is unknown, one: a
    lower bound."""
    return views.per_episode * ((stride or 1) if views.phase == "all" else 1)


def view_settings(s: WorkSettings) -> dict[str, Any]:
    """The stage-one settings outside the fingerprint that decide which views an episode gets."""
    return {"cameras": s.data.cameras, "fps": s.data.fps, "video_fps": s.data.video_fps,
            "views": dataclasses.asdict(s.views)}


def make_parts(plans: list[EpisodePlan], episodes_per_part: int, settings: dict[str, Any] | None = None
               ) -> list[PartTask]:
    """Group the episodes that need work into parts, in a stable order, each named by its content (the
    episodes, their files, the views already there and the `view_settings` asking for more): two runs
    with the same plan form the same parts, so one recognises (and skips) what the other committed or is
    working on, while a run asking for other views (another fps or phase rule) never mistakes the earlier
    run's part for its own. Each run of a part still writes an attempt of its own."""
    todo = sorted((p for p in plans if p.needs_work), key=lambda p: p.episode_id)
    tasks = [EpisodeTask(p.episode_id, p.path, p.source, p.done_views) for p in todo]
    parts = []
    for i in range(0, len(tasks), episodes_per_part):
        group = tasks[i : i + episodes_per_part]
        key = canonical_json([[[t.episode_id, t.source, t.done_views] for t in group], settings or {}])
        parts.append(PartTask(hashlib.sha1(key.encode()).hexdigest()[:20], group))
    return parts
