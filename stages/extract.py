"""Stage one, the driver: plan the missing views, run one task per part, summarise.

The driver computes the fingerprint, creates (or checks) the store, plans from the store's commits
(no video is opened), and hands parts to dask workers -- or runs them in this process with
`scheduler: inline`, which is what tests and debugging use. Workers keep their encoder loaded
between parts. A second run with nothing to do starts no cluster and encodes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.manifest import Manifest
from pipeline.report import human_bytes
from pipeline.store import FeatureStore
from stages.encoder import load_encoder
from stages.fingerprint import fingerprint_spec
from stages.part import PartResult, PartSettings, run_part
from stages.plan import EpisodePlan, PartTask, make_parts, plan_episodes

EVENT_TOPIC = "pipeline-extract-progress"


@dataclass
class ExtractSummary:
    """What a run of `pipeline extract` did."""

    store: str
    fingerprint: str
    episodes: int = 0
    views_planned: int = 0
    views_skipped: int = 0  # already committed and current
    views_done: int = 0  # extracted by this run
    parts: int = 0  # parts finished by this run
    frames: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    bytes_written: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)  # {episode, path, reason}

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    @property
    def encoder_frames_per_second(self) -> float:
        return self.frames / self.encode_seconds if self.encode_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "frames_per_second": self.frames_per_second,
                "encoder_frames_per_second": self.encoder_frames_per_second}

    def format(self) -> str:
        lines = [f"store      {self.store}",
                 f"episodes   {self.episodes}   views: planned {self.views_planned}, done now {self.views_done}, "
                 f"skipped (committed) {self.views_skipped}, failed episodes {len(self.failed)}",
                 f"frames     {self.frames} in {self.seconds:.1f} s = {self.frames_per_second:.1f} frames/s end to end"
                 f" (encoder alone {self.encoder_frames_per_second:.1f} frames/s)",
                 f"written    {human_bytes(self.bytes_written)}"]
        lines += [f"failed     {f['episode']}: {f['reason']}" for f in self.failed]
        return "\n".join(lines)


def extract(m: Manifest, scheduler: str | None = None, show_progress: bool = True,
            echo: Callable[[str], None] = print) -> ExtractSummary:
    """Bring the store up to date with the manifest; returns the run's summary."""
    spec = fingerprint_spec(m)
    store = FeatureStore(m.cache.path, spec).create()
    plans = plan_episodes(m, store)
    parts = make_parts(plans, m.extract.episodes_per_part)
    summary = _summary_from_plan(store, plans)
    if not parts:
        echo(f"Nothing to do: all {summary.views_skipped} planned views of {len(plans)} episodes are committed "
             f"in {store.url}; no encoding.")
        return summary
    todo = sum(len(p.episodes) for p in parts)
    echo(f"Extracting {todo} episodes in {len(parts)} parts into {store.url} "
         f"({summary.views_skipped} views already committed, {len(summary.failed)} failed before)")
    t0 = time.perf_counter()
    bar = tqdm(total=None, unit="frame", desc="extract", disable=not show_progress, dynamic_ncols=True)
    scheduler = scheduler or m.extract.scheduler
    results = (_run_inline(m, store, parts, bar) if scheduler == "inline"
               else _run_dask(m, spec, store, parts, scheduler, bar))
    try:
        for result in results:
            _add(summary, result)
            bar.set_postfix(parts=f"{summary.parts}/{len(parts)}", failed=len(summary.failed))
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _add(summary: ExtractSummary, r: PartResult) -> None:
    summary.parts += 1
    summary.views_done += r.views
    summary.frames += r.frames
    summary.encode_seconds += r.encode_seconds
    summary.bytes_written += r.bytes_written
    summary.failed += [{"episode": e, "path": p, "reason": why} for e, p, why in r.failures]


def _summary_from_plan(store: FeatureStore, plans: list[EpisodePlan]) -> ExtractSummary:
    s = ExtractSummary(store=store.url, fingerprint=store.digest, episodes=len(plans))
    s.views_planned = sum(p.planned for p in plans)
    s.views_skipped = sum(p.committed for p in plans)
    s.failed = [{"episode": p.episode_id, "path": p.path, "reason": p.reason, "recorded": "earlier run"}
                for p in plans if p.state == "failed"]
    return s


def _run_inline(m: Manifest, store: FeatureStore, parts: list[PartTask], bar: tqdm):
    """Parts one after another in this process (tests, debugging, a single-GPU box without dask)."""
    encoder = load_encoder(m, store.digest)
    settings = PartSettings.from_manifest(m)
    for part in parts:
        yield run_part(part, store, encoder, settings, bar.update)


def _worker_task(m: Manifest, spec: dict, part: PartTask) -> PartResult:
    """What a dask worker runs: its cached encoder, one part, progress events back to the driver."""
    from distributed import get_worker

    store = FeatureStore(m.cache.path, spec)
    worker = get_worker()

    def progress(frames: int) -> None:
        worker.log_event(EVENT_TOPIC, {"frames": frames})

    return run_part(part, store, load_encoder(m, store.digest), PartSettings.from_manifest(m), progress)


def _run_dask(m: Manifest, spec: dict, store: FeatureStore, parts: list[PartTask], scheduler: str, bar: tqdm):
    """One task per part on a dask cluster; results in completion order; a crashed part is reported."""
    from distributed import as_completed

    from pipeline.cluster import dask_client, gpu_resources

    with dask_client(scheduler, m.extract.workers, torch.cuda.device_count()) as client:
        client.subscribe_topic(EVENT_TOPIC, lambda event: bar.update(event[1]["frames"]))
        resources = gpu_resources(client)
        futures = [client.submit(_worker_task, m, spec, part, key=f"extract-part-{part.part_id}",
                                 resources=resources, pure=False) for part in parts]
        by_key = {f.key: p for f, p in zip(futures, parts, strict=True)}
        for fut in as_completed(futures):
            part = by_key[fut.key]
            if fut.status == "error" and m.extract.on_error == "raise":
                client.cancel(futures)
                fut.result()  # re-raises the worker's exception here
            if fut.status == "error":
                yield _crashed(part, fut.exception())
            else:
                yield fut.result()


def _crashed(part: PartTask, err: BaseException) -> PartResult:
    """A part whose task died (not an episode's fault): every episode of it counts as failed this run."""
    reason = f"part {part.part_id} crashed: {type(err).__name__}: {err}"
    return PartResult(part.part_id, failures=[(t.episode_id, t.path, reason) for t in part.episodes])
