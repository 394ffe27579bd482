"""`pipeline status`: what the store holds for a manifest, without changing anything."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.manifest import Manifest
from pipeline.report import human_bytes
from pipeline.store import FeatureStore, ViewTable
from stages.cache.fingerprint import reader_spec
from stages.extract.timing import CameraTiming, format_timings, manifest_timing
from stages.extract.worklist import EpisodePlan, WorkSettings, plan_episodes, unopened_strides

EPISODE_STATES = ("done", "partial", "stale", "new", "failed")


@dataclass
class StatusReport:
    """Counts of planned / committed / stale / failed views and episodes, bytes, failures with reasons."""

    profile: str
    fingerprint: str
    store: str
    store_exists: bool
    episodes: int = 0
    episodes_by_state: dict[str, int] = field(default_factory=dict)
    views_planned: int = 0
    views_committed: int = 0
    views_stale: int = 0
    views_failed: int = 0
    views_pending: int = 0
    episodes_failed: list[dict[str, str]] = field(default_factory=list)  # {episode, path, reason}
    bytes_on_disk: int = 0
    unreferenced_attempts: int = 0  # attempt folders no commit names: killed or running extracts (gc lists them)
    quarantined: list[str] = field(default_factory=list)  # commit records moved aside by verify --repair
    bad_records: dict[str, str] = field(default_factory=dict)  # record path -> what is wrong (skipped)
    timing: list[CameraTiming] = field(default_factory=list)  # video fps and stride per camera (stages/timing.py)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        uncommitted = (f"  ({self.unreferenced_attempts} uncommitted attempt(s): running or killed extracts; "
                       "`pipeline gc` lists them)" if self.unreferenced_attempts else "")
        lines = [
            f"profile      {self.profile}",
            f"store        {self.store}{'' if self.store_exists else '  (not created yet)'}",
            f"fingerprint  {self.fingerprint}",
            f"episodes     {self.episodes}  " + "  ".join(f"{k} {v}" for k, v in self.episodes_by_state.items()),
            f"views        planned {self.views_planned}  committed {self.views_committed}  "
            f"pending {self.views_pending}  stale {self.views_stale}  failed {self.views_failed}",
            f"on disk      {human_bytes(self.bytes_on_disk)}{uncommitted}",
            *format_timings(self.timing, width=13),
        ]
        lines += [f"warning      {w}" for w in self.warnings]
        lines += [f"failed       {f['episode']}: {f['reason']}" for f in self.episodes_failed]
        if self.episodes_failed:
            lines.append("             retry: fix the files (a changed episode is retried by the next extract), or "
                         "`pipeline extract --set extract.retry_failed=true`")
        lines += [f"bad record   {path}: {why}" for path, why in self.bad_records.items()]
        if self.quarantined:
            lines.append(f"quarantined  {len(self.quarantined)} commit record(s) (verify --repair); their views are "
                         "redone by `pipeline extract`, `pipeline gc` frees their space")
        return "\n".join(lines)


def status_report(m: Manifest) -> StatusReport:
    """Classify the manifest's episodes against its store (planning's rules; nothing is opened or changed)."""
    store = FeatureStore(m.cache.path, reader_spec(m)).check_path()
    report = StatusReport(m.profile, store.digest, store.url, store.exists())
    if report.store_exists:
        store.check()
    index = store.index()  # read once: planning, timing and attempts use it
    views = index.committed()
    plans = plan_episodes(WorkSettings.of(m), store, views)
    states = Counter(p.state for p in plans)
    failed = [p for p in plans if p.state == "failed"]
    report.episodes = len(plans)
    report.episodes_by_state = {k: states.get(k, 0) for k in EPISODE_STATES}
    report.views_planned = sum(p.planned for p in plans)
    report.views_committed = sum(p.committed for p in plans)
    report.views_stale = sum(p.stale for p in plans)
    report.views_failed = sum(p.planned - p.committed for p in failed)
    report.views_pending = sum(p.planned - p.committed for p in plans if p.needs_work)
    report.episodes_failed = [{"episode": p.episode_id, "path": p.path, "reason": p.reason} for p in failed]
    report.bytes_on_disk = store.bytes_on_disk()
    if report.store_exists:
        live = {(r.part, r.attempt) for r in index.records.values()}
        report.unreferenced_attempts = len(set(store.attempts()) - live)
        report.quarantined = store.quarantined()
        report.timing, report.warnings = manifest_timing(views, m.data)
    report.warnings += _lower_bound(m, views, plans)
    report.bad_records = dict(store.bad_records)
    return report


def _lower_bound(m: Manifest, views: ViewTable, plans: list[EpisodePlan]) -> list[str]:
    """A warning where "planned" counts one view per draw for episodes not yet opened: `views.phase: all`
    stores one per phase, and without data.video_fps or a committed view of the camera the rate, so the
    number of phases, is known only once a video is opened."""
    known = unopened_strides(m.data, views, np.arange(len(views)))
    unknown = [cam for cam in m.data.cameras if cam not in known]
    if m.views.phase != "all" or not unknown or not plans:  # no view of the camera: every episode lacks it
        return []
    return [f"views planned for episodes not yet opened count one phase per crop draw for {', '.join(unknown)} "
            "(views.phase: all; the frame rate, and so the number of phases, is known once a video is opened): "
            "a lower bound until the first view of that camera is committed"]
