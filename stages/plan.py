"""Stage one's planning: which episodes need work, from the manifest and the store's commits alone.

Planning must be cheap at DROID scale (76k episodes): it never opens a video or an h5 file. It stats
each episode's input files (size + mtime) and compares them with what committed views and failure
records say they were made from. An episode whose files are unchanged and whose planned views are all
committed is done; its planned views can be recomputed from the frame size stored with its views. An
episode never seen, or changed, goes to a worker, which opens it and draws its views there.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.manifest import Manifest
from pipeline.records import FailureRecord, ViewRecord, canonical_json
from pipeline.store import FeatureStore
from stages.augment import draw_views
from stages.droid import Source, episode_id_for, frame_stride, list_episodes, source_identity


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


def planned_view_ids(m: Manifest, episode_id: str, frame_hw: list[int], video_fps: float) -> list[str]:
    """The distinct view ids the manifest asks for, given an episode's frame size and frame rate."""
    stride = frame_stride(video_fps, m.data.fps)
    return [v.view_id for v in draw_views(m.views, m.crop, m.data.camera, episode_id, (frame_hw[0], frame_hw[1]),
                                          stride)]


def episode_settings(m: Manifest) -> dict[str, Any]:
    """The stage-one settings outside the fingerprint that an episode's failure can depend on. A failure
    is recorded with them and retried when they change (e.g. a camera key an episode lacks)."""
    return {"camera": m.data.camera}


def failure_applies(failure: FailureRecord, source: Source, m: Manifest) -> bool:
    """A recorded failure stands while the episode's files and the settings it failed under are unchanged."""
    return failure.source == source and failure.settings == episode_settings(m)


def plan_episodes(m: Manifest, store: FeatureStore) -> list[EpisodePlan]:
    """Classify every episode of the manifest against the store."""
    root = Path(m.data.root)
    by_episode: dict[str, list[ViewRecord]] = defaultdict(list)
    for rec in store.committed_views().values():
        if rec.camera == m.data.camera:
            by_episode[rec.episode_id].append(rec)
    failures = store.failures()
    return [_plan_one(m, folder, episode_id_for(folder, root), by_episode, failures)
            for folder in list_episodes(m.data.episodes, root)]


def _plan_one(m: Manifest, folder: Path, eid: str, by_episode: dict[str, list[ViewRecord]],
              failures: dict[str, FailureRecord]) -> EpisodePlan:
    src = source_identity(folder, m.data.camera)
    recs = by_episode.get(eid, [])
    current = [r for r in recs if r.source == src]
    stale = len(recs) - len(current)
    failure = failures.get(eid)
    if failure is not None and failure_applies(failure, src, m) and not current:
        state = "new" if m.extract.retry_failed else "failed"
        return EpisodePlan(eid, str(folder), state, m.views.per_episode, 0, stale, src, failure.reason)
    if not current:
        return EpisodePlan(eid, str(folder), "stale" if recs else "new", m.views.per_episode, 0, stale, src)
    planned = planned_view_ids(m, eid, current[0].frame_hw, current[0].video_fps)
    have = {r.view_id for r in current}
    done = [v for v in planned if v in have]
    state = "done" if len(done) == len(planned) else "partial"
    return EpisodePlan(eid, str(folder), state, len(planned), len(done), stale, src, done_views=done)


def make_parts(plans: list[EpisodePlan], episodes_per_part: int) -> list[PartTask]:
    """Group the episodes that need work into parts, in a stable order, each named by its content: two
    runs with the same plan form the same parts, so one recognises (and skips) what the other committed
    or is working on. Each run of a part still writes an attempt of its own."""
    todo = sorted((p for p in plans if p.needs_work), key=lambda p: p.episode_id)
    tasks = [EpisodeTask(p.episode_id, p.path, p.source, p.done_views) for p in todo]
    parts = []
    for i in range(0, len(tasks), episodes_per_part):
        group = tasks[i : i + episodes_per_part]
        key = canonical_json([[t.episode_id, t.source, t.done_views] for t in group])
        parts.append(PartTask(hashlib.sha1(key.encode()).hexdigest()[:20], group))
    return parts
