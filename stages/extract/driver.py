"""Stage one, the driver: plan the missing views, run one task per part, summarise.

The driver computes the fingerprint, creates (or checks) the store, plans from the store's commits
(no video is opened), and hands parts to dask workers -- or runs them in this process with
`scheduler: inline`, which is what tests and debugging use. Workers keep their encoder loaded
between parts. A second run with nothing to do starts no cluster and encodes nothing.

Many runs may work on one store at once (two users, a resubmitted job): each run has an id, every
task attempt writes somewhere new, and a part committed or claimed by another run is skipped. A dask
worker that dies mid-task has its part retried elsewhere (`extract.task_retries`); the summary says
which parts were retried and which were left to another run.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pipeline.errors import UsageError
from pipeline.manifest import Manifest
from pipeline.progress import Bar, progress
from pipeline.report import human_bytes
from pipeline.signals import raise_on_signals
from pipeline.store import FeatureStore, ViewTable
from stages.cache.fingerprint import fingerprint_spec, vit_config
from stages.extract.encoder import load_encoder
from stages.extract.part import PartResult, PartSettings, run_part
from stages.extract.timing import CameraTiming, format_timings, manifest_timing
from stages.extract.worklist import EpisodePlan, PartTask, WorkSettings, make_parts, plan_episodes, view_settings

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
    parts_left: list[dict[str, str]] = field(default_factory=list)  # {part, why}: committed/claimed by others
    parts_retried: dict[str, int] = field(default_factory=dict)  # part -> extra attempts after a worker died
    attempts_lost: list[dict[str, Any]] = field(default_factory=list)  # {part, why, redone}: files removed early
    timing: list[CameraTiming] = field(default_factory=list)  # video fps and stride per camera (stages/timing.py)
    warnings: list[str] = field(default_factory=list)  # e.g. trajectory timestamps that disagree with the fps

    @property
    def incomplete(self) -> bool:
        """Work this run was asked to do and did not: failed episodes, or a part given up (exit 1)."""
        return bool(self.failed) or any(not a["redone"] for a in self.attempts_lost)

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    @property
    def encoder_frames_per_second(self) -> float:
        return self.frames / self.encode_seconds if self.encode_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "frames_per_second": self.frames_per_second,
                "encoder_frames_per_second": self.encoder_frames_per_second}

    def format(self) -> str:
        lines = [f"store      {self.store}",
                 f"episodes   {self.episodes}   views: planned {self.views_planned}, done now {self.views_done}, "
                 f"skipped (committed) {self.views_skipped}, failed episodes {len(self.failed)}",
                 f"frames     {self.frames} in {self.seconds:.1f} s = {self.frames_per_second:.1f} frames/s end to end"
                 f" (encoder alone {self.encoder_frames_per_second:.1f} frames/s)",
                 f"written    {human_bytes(self.bytes_written)}", *format_timings(self.timing)]
        lines += [f"warning    {w}" for w in self.warnings]
        if self.parts_retried:
            lines.append(f"retried    {len(self.parts_retried)} part(s) whose worker died: "
                         + ", ".join(f"{p} (+{n})" for p, n in sorted(self.parts_retried.items())))
        lines += [f"left       part {p['part']}: {p['why']}" for p in self.parts_left]
        lines += [f"lost       part {a['part']}, {a['why']}: " + ("done again in a new attempt" if a["redone"] else
                  "given up, not committed: re-run `pipeline extract` to redo it") for a in self.attempts_lost]
        lines += [f"failed     {f['episode']}: {f['reason']}" for f in self.failed]
        if self.failed:
            lines.append("           (a fixed or changed episode is retried by the next run; to retry unchanged "
                         "ones: pipeline extract --set extract.retry_failed=true)")
        return "\n".join(lines)


def extract(m: Manifest, scheduler: str | None = None, show_progress: bool = True,
            echo: Callable[[str], None] = print) -> ExtractSummary:
    """Bring the store up to date with the manifest; returns the run's summary.

    SIGINT / SIGTERM raise `Interrupted` (nothing half-committed: re-run to resume)."""
    scheduler = scheduler or m.extract.scheduler
    _check_device(m, scheduler)
    spec = fingerprint_spec(m)
    store = FeatureStore(m.cache.path, spec).check_path()  # created once there is work and a cluster to do it
    if store.exists():
        store.check()
    views = store.index().committed()
    work = WorkSettings.of(m)
    plans = plan_episodes(work, store, views)
    parts = make_parts(plans, m.extract.episodes_per_part, view_settings(work))
    summary = _summary_from_plan(store, plans)
    if not parts:
        echo(_nothing_to_do(summary, len(plans)))
        return _with_timing(summary, views, m)
    todo = sum(len(p.episodes) for p in parts)
    echo(f"Extracting {todo} episodes in {len(parts)} parts into {store.url} "
         f"({summary.views_skipped} views already committed, {len(summary.failed)} failed before)")
    echo(_encoder_line(m, scheduler))
    t0 = time.perf_counter()
    bar = progress("extract", "frame", show=show_progress)
    run_id = uuid.uuid4().hex
    with raise_on_signals():
        results = (_run_inline(m, store, parts, run_id, bar) if scheduler == "inline"
                   else _run_dask(m, store, parts, scheduler, run_id, bar, summary))
        try:
            for result in results:
                _add(summary, result)
                bar.set_postfix(parts=f"{summary.parts}/{len(parts)}", failed=len(summary.failed))
        finally:
            bar.close()
    summary.seconds = time.perf_counter() - t0
    store.index(refresh=True)  # read again: this run committed more
    store.compact()  # where many records had to be read one by one, the next open reads one snapshot instead
    views = store.index().committed()
    # planned again: an episode opened now has its distinct views known (identical crop draws are stored once)
    summary.views_planned = sum(p.planned for p in plan_episodes(work, store, views))
    return _with_timing(summary, views, m)


def _nothing_to_do(summary: ExtractSummary, episodes: int) -> str:
    """Why a run encodes nothing: all is committed, or what is not failed earlier under the same files."""
    failed = (f"; the other {len(summary.failed)} episode(s) failed in an earlier run with the same files and "
              "settings (listed below)" if summary.failed else "")
    return (f"Nothing to do: {summary.views_skipped} of {summary.views_planned} planned views of {episodes} episodes "
            f"are committed in {summary.store}{failed}; no encoding.")


def _with_timing(summary: ExtractSummary, views: ViewTable, m: Manifest) -> ExtractSummary:
    """The video fps and stride found per camera over the committed views, and a warning where the
    trajectory files' timestamps disagree with the rate the strides came from."""
    summary.timing, summary.warnings = manifest_timing(views, m.data)
    return summary


def _check_device(m: Manifest, scheduler: str) -> None:
    """A GPU asked for where this process runs the workers but none is there: say so before any work."""
    if scheduler in ("inline", "local") and m.encoder.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"encoder.device: {m.encoder.device!r}, but no CUDA GPU is visible here "
                         "(torch.cuda.is_available() is False); use auto or cpu")


def _encoder_line(m: Manifest, scheduler: str) -> str:
    """What will run: the encoder, where and at which precision (said at start so a wrong setting shows)."""
    arch = vit_config(m)
    weights = m.encoder.checkpoint or f"random init, seed {m.encoder.seed}"
    device = m.encoder.device
    if device == "auto" and scheduler in ("inline", "local"):
        device = f"auto -> {'cuda' if torch.cuda.is_available() else 'cpu'}"
    return (f"encoder ViT {arch.embed_dim}x{arch.depth} ({weights}) at {arch.img_size} px on {device}, "
            f"{m.encoder.precision}, batch {m.encoder.batch_size}; stored as {m.cache.dtype}; scheduler {scheduler}")


def _add(summary: ExtractSummary, r: PartResult) -> None:
    summary.attempts_lost += [{"part": r.part_id, "why": why, "redone": bool(r.attempt) or k < len(r.lost) - 1}
                              for k, why in enumerate(r.lost)]
    if r.skipped or not r.attempt:
        if r.skipped:
            summary.parts_left.append({"part": r.part_id, "why": r.skipped})
        return
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


def _run_inline(m: Manifest, store: FeatureStore, parts: list[PartTask], run_id: str,
                bar: Bar) -> Iterator[PartResult]:
    """Parts one after another in this process (tests, debugging, a single-GPU box without dask)."""
    store.create()
    encoder = load_encoder(m, store.digest)
    settings = PartSettings.from_manifest(m)
    for part in parts:
        yield run_part(part, store, encoder, settings, run_id, bar.update)


def _worker_task(m: Manifest, spec: dict, part: PartTask, run_id: str) -> PartResult:
    """What a dask worker runs: its cached encoder, one part, progress events back to the driver."""
    from distributed import get_worker

    store = FeatureStore(m.cache.path, spec)
    worker = get_worker()
    worker.log_event(EVENT_TOPIC, {"start": part.part_id})

    def progress(frames: int) -> None:
        worker.log_event(EVENT_TOPIC, {"frames": frames})

    return run_part(part, store, load_encoder(m, store.digest), PartSettings.from_manifest(m), run_id, progress)


def _run_dask(m: Manifest, store: FeatureStore, parts: list[PartTask], scheduler: str, run_id: str, bar: Bar,
              summary: ExtractSummary) -> Iterator[PartResult]:
    """One task per part on a dask cluster; results in completion order. A task whose worker dies is
    retried on another (bounded); one that fails for good is reported as crashed. The store is created
    once the cluster is there (an unreachable scheduler leaves nothing behind)."""
    from distributed import as_completed

    from pipeline.cluster import dask_client, gpu_resources

    starts: Counter[str] = Counter()

    def on_event(event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        if "start" in msg:
            starts[msg["start"]] += 1
            if starts[msg["start"]] > 1:
                summary.parts_retried[msg["start"]] = starts[msg["start"]] - 1
        else:
            bar.update(msg["frames"])

    with dask_client(scheduler, m.extract.workers, torch.cuda.device_count(), m.extract.task_retries,
                     m.extract.scheduler_timeout) as client:
        store.create()
        client.subscribe_topic(EVENT_TOPIC, on_event)
        resources = gpu_resources(client)
        futures = [client.submit(_worker_task, m, store.spec, part, run_id, resources=resources, pure=False,
                                 key=f"extract-part-{part.part_id}-{run_id[:8]}") for part in parts]
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
    """A part whose task died for good (not an episode's fault): its episodes count as failed this run."""
    reason = f"part {part.part_id} crashed: {type(err).__name__}: {err}"
    return PartResult(part.part_id, failures=[(t.episode_id, t.path, reason) for t in part.episodes])
