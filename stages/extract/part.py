"""Stage one's unit of work: extract one part (a few episodes) into the store and commit it.

The hot path overlaps its three kinds of work so that the encoder -- the expensive part on a GPU
worker -- never waits:

    decode threads  decord -> crop (uint8)                          -- Frames / Skip / Failed / End ->
    main thread     to device -> resize + normalise -> encoder (batched across views)  -- Rows / Skip ->
    writer thread   storage dtype -> buffer rows per shard -> write whole shards (zarr)

What crosses a queue is a small typed message handled with `match` (docs/architecture.md). A bad episode
is recorded as failed with its reason and the part goes on with the others; its rows, already
allocated, are skipped and not listed in the commit record. Each run of a part is an attempt that
writes under a new path of its own and is committed by a record written last: an attempt killed at any
moment is simply not there for readers, and two attempts of one part (two extract runs, a scheduler
retry) never touch each other's bytes. A part already committed, or claimed by another live run, is
skipped (the claim only saves work; correctness never depends on it).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline.manifest import CropSection, DataSection, Manifest, ViewsSection
from pipeline.signals import signals_deferred
from pipeline.store import (
    CommitRecord,
    FailureRecord,
    FeatureStore,
    PartWriter,
    StoreSettings,
    ViewRecord,
    new_attempt_id,
)
from stages.cache.sampling import data_stride, frame_grid
from stages.extract.augment import draw_views
from stages.extract.droid import Episode, EpisodeError, actions_from_states, iter_frames
from stages.extract.encoder import LoadedEncoder
from stages.extract.episodes import open_episode, source_identity
from stages.extract.worklist import EpisodeTask, PartTask, episode_settings
from stages.models.release_weights import CheckpointError

Progress = Callable[[int], None]  # called with the number of frames just encoded
QUEUE_DEPTH = 4  # decoded batches in flight: enough to hide decode jitter, small enough for RAM


@dataclass(frozen=True)
class PartSettings:
    """The manifest settings a part depends on, and nothing else (the encoder comes loaded)."""

    data: DataSection  # camera, fps
    views: ViewsSection  # how many views, seed, phase rule
    crop: CropSection  # crop draws and preprocessing
    cache: StoreSettings  # storage dtype, chunks, shards, codec
    batch_size: int  # frames per decoded batch and per encoder forward (encoder.batch_size)
    decode_workers: int  # episodes decoded at once (extract.decode_workers)
    decode_threads: int  # decord threads per reader (extract.decode_threads)
    on_error: Literal["record", "raise"]  # a bad episode: record it and go on, or stop (extract.on_error)
    claim_seconds: float  # another run's claim on a part is honoured this long (extract.claim_minutes)
    failure_settings: dict  # what a failure record says it depended on (plan.episode_settings)

    @classmethod
    def from_manifest(cls, m: Manifest) -> PartSettings:
        x = m.extract
        return cls(m.data, m.views, m.crop, m.cache.settings(), m.encoder.batch_size, x.decode_workers,
                   x.decode_threads, x.on_error, 60.0 * x.claim_minutes, episode_settings(m.data))


@dataclass
class ViewJob:
    """One view to extract: its record (rows in the part) and the per-frame data already computed."""

    record: ViewRecord
    episode: Episode
    indices: np.ndarray  # [F] raw frame indices
    states: np.ndarray  # [F, 7]
    actions: np.ndarray  # [F, 7], NaN on the last row


@dataclass
class PartResult:
    """What a part did, for the driver's summary."""

    part_id: str
    attempt: str = ""
    skipped: str = ""  # why the part was not run: committed already, or claimed by another run
    views: int = 0
    frames: int = 0
    bytes_written: int = 0
    encode_seconds: float = 0.0
    seconds: float = 0.0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (episode_id, path, reason)
    lost: list[str] = field(default_factory=list)  # attempts that lost files before their commit, and what


class AttemptLost(Exception):
    """An attempt's files were removed (or cut) before its commit: it is not committed, and is done again."""


LOST_ATTEMPTS = 2  # attempts of a part in one task before it is given up (named; the next run redoes it)


# -- messages between the threads ----------------------------------------------------------------


@dataclass
class Frames:
    """Decoded, cropped uint8 frames [k, h, w, 3] of one view, for rows offset..offset+k of the part."""

    offset: int
    crops: torch.Tensor


@dataclass
class Skip:
    """Rows offset..offset+count will never arrive (their episode failed while decoding)."""

    offset: int
    count: int


@dataclass
class Failed:
    """An episode failed while decoding; its views are not committed."""

    record: ViewRecord
    error: EpisodeError


@dataclass
class Rows:
    """Encoded features [k, tokens, D] (float) for rows offset..offset+k of the part."""

    offset: int
    features: torch.Tensor


@dataclass
class End:
    """A producer is done (the writer's queue ends with one too)."""


@dataclass
class Crashed:
    """A decode thread died of something that is not an episode's fault; re-raised in the main thread."""

    error: BaseException


Decoded = Frames | Skip | Failed | End | Crashed
ToWrite = Rows | Skip | End


# -- the part ------------------------------------------------------------------------------------


def run_part(part: PartTask, store: FeatureStore, encoder: LoadedEncoder, settings: PartSettings, run_id: str,
             progress: Progress | None = None) -> PartResult:
    """Extract and commit one attempt of a part; returns counts. Raises only on errors that are not an
    episode's fault (or on an episode's when on_error is "raise")."""
    t0 = time.perf_counter()
    result = PartResult(part.part_id, new_attempt_id())
    if store.part_committed(part.part_id):
        result.skipped = "committed by another run meanwhile"
        return result
    holder = store.claim_holder(part.part_id, run_id, settings.claim_seconds)
    if holder is not None:
        result.skipped = f"being extracted by another run ({holder['host']} pid {holder['pid']})"
        return result
    for _ in range(LOST_ATTEMPTS):
        store.claim(part.part_id, run_id, result.attempt)
        try:
            _run_attempt(part, store, encoder, settings, result, progress)
            break
        except AttemptLost as err:
            result.lost.append(str(err))
        finally:
            store.release_claim(part.part_id, result.attempt)
        result.attempt, result.failures = new_attempt_id(), []
    else:
        result.attempt = ""  # nothing of this part was committed by this task
    result.seconds = time.perf_counter() - t0
    return result


def _run_attempt(part: PartTask, store: FeatureStore, encoder: LoadedEncoder, settings: PartSettings,
                 result: PartResult, progress: Progress | None) -> None:
    """Write the attempt's arrays, then its commit record (the views that succeeded), then failure records."""
    jobs = _prepare(part, settings, result)
    frames = sum(len(j.indices) for j in jobs)
    failed: set[str] = set()
    if frames:
        writer = store.part_writer(part.part_id, result.attempt, frames, encoder.tokens, encoder.dim, settings.cache)
        failed = _encode_all(jobs, encoder, writer, settings, result, progress)
        writer.finish(*_per_frame_arrays(jobs, frames))
        good = [j.record for j in jobs if j.record.episode_id not in failed]
        for rec in good:
            rec.digests = writer.digests(rec.start, rec.length)
        missing = store.missing_files(part.part_id, result.attempt, writer.files())
        if missing:
            raise AttemptLost(f"attempt {result.attempt}: {len(missing)} of its files went missing before its "
                              f"commit (e.g. {missing[0]}; removed by someone else?)")
        store.commit(CommitRecord(f"{part.part_id}.{result.attempt}", part.part_id, result.attempt, frames,
                                  time.time(), good))
        result.views, result.frames = len(good), sum(r.length for r in good)
        result.bytes_written = writer.bytes_written
    _finish_failures(store, part, result, failed, settings)


def _fail(on_error: str, result: PartResult, episode_id: str, path: str, err: EpisodeError) -> None:
    """extract.on_error: stop the run, or record the episode as failed and go on."""
    if on_error == "raise":
        raise err
    result.failures.append((episode_id, path, err.reason))


def _prepare(part: PartTask, settings: PartSettings, result: PartResult) -> list[ViewJob]:
    """Open each episode (cheap: no decoding), draw its views, lay their rows out one after another."""
    jobs: list[ViewJob] = []
    for task in part.episodes:
        try:
            views = episode_jobs(task, settings.data, settings.views, settings.crop)
        except EpisodeError as err:
            _fail(settings.on_error, result, task.episode_id, task.path, err)
            continue
        for job in views:
            job.record.part, job.record.attempt = part.part_id, result.attempt
            job.record.start = sum(j.record.length for j in jobs)
            jobs.append(job)
    return jobs


def episode_jobs(task: EpisodeTask, data: DataSection, views: ViewsSection, crop: CropSection) -> list[ViewJob]:
    """Open an episode (no decoding) and draw its views of every camera: the distinct ones not already
    committed. A camera the episode cannot give fails the whole episode (named in the error)."""
    folder = Path(task.path)
    return [job for camera in data.cameras for job in _camera_jobs(task, folder, camera, data, views, crop)]


def _camera_jobs(task: EpisodeTask, folder: Path, camera: str, data: DataSection, views: ViewsSection,
                 crop: CropSection) -> list[ViewJob]:
    ep = open_episode(data, folder, camera)
    stride = data_stride(data, ep.video_fps)
    source = source_identity(data, folder, camera)
    jobs = []
    for v in draw_views(views, crop, camera, task.episode_id, ep.frame_hw, stride):
        if v.view_id in task.done_views:
            continue
        indices = frame_grid(ep.num_usable, stride, v.draw.phase)  # [F]
        if len(indices) < 2:  # how many frames a clip needs is stage two's business (views shorter are skipped)
            raise EpisodeError(folder, f"episode too short: {ep.num_usable} usable frames at stride {stride} give "
                               f"{len(indices)} frame(s) from phase {v.draw.phase} ({camera}); a view needs 2 for "
                               "one action")
        states = ep.states[indices]  # [F, 7]
        actions = np.concatenate([actions_from_states(states), np.full((1, 7), np.nan)])  # [F, 7]
        record = ViewRecord(v.view_id, task.episode_id, str(folder), camera, ep.serial, v.draw.phase, stride,
                            ep.video_fps, list(ep.frame_hw), v.draw.box.as_list(), source, length=len(indices),
                            capture_fps=ep.capture_fps)
        jobs.append(ViewJob(record, ep, indices, states, actions))
    return jobs


def _per_frame_arrays(jobs: list[ViewJob], frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    states, actions = np.zeros((frames, 7)), np.full((frames, 7), np.nan)
    index = np.full(frames, -1, np.int64)
    for j in jobs:
        sl = slice(j.record.start, j.record.start + j.record.length)
        states[sl], actions[sl], index[sl] = j.states, j.actions, j.indices
    return states, actions, index


def _finish_failures(store: FeatureStore, part: PartTask, result: PartResult, failed: set[str],
                     settings: PartSettings) -> None:
    """Record this part's failures (with what they depended on), clear those of episodes that now succeeded."""
    failed_ids = failed | {f[0] for f in result.failures}
    for task in part.episodes:
        if task.episode_id not in failed_ids:
            store.clear_failure(task.episode_id)
    for eid, path, reason in result.failures:
        store.write_failure(FailureRecord(eid, path, reason, time.time(),
                                          source_identity(settings.data, Path(path), *settings.data.cameras),
                                          settings.failure_settings))


# -- the overlapped hot path ---------------------------------------------------------------------


def _decode(groups: queue.Queue, out: queue.Queue, stop: threading.Event, batch: int, threads: int) -> None:
    """Producer: takes episodes off `groups` and emits their decoded + cropped frames. Several producers
    run at once (extract.decode_workers): 720p H.264 decodes at tens of frames/s per thread, far below a
    GPU encoder, and decord releases the GIL while it decodes."""
    try:
        while not stop.is_set():
            try:
                group = groups.get_nowait()
            except queue.Empty:
                return
            _decode_episode(group, out, stop, batch, threads)
    except BaseException as err:  # anything unexpected must reach the main thread, not die silently
        _put(out, Crashed(err), stop)
    finally:
        _put(out, End(), stop)


def _put(q: queue.Queue, item: Decoded, stop: threading.Event) -> None:
    """Blocking put that gives up once the consumer has stopped (so no thread hangs on a full queue)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _by_episode(jobs: list[ViewJob]) -> Iterator[list[ViewJob]]:
    """The views of one episode and camera, i.e. of one video (they are laid out next to each other)."""
    group: list[ViewJob] = []
    for job in jobs:
        if group and (job.record.episode_id, job.record.camera) != (group[0].record.episode_id,
                                                                   group[0].record.camera):
            yield group
            group = []
        group.append(job)
    if group:
        yield group


def _decode_episode(group: list[ViewJob], out: queue.Queue, stop: threading.Event, batch: int, threads: int) -> None:
    """Decode the union of the views' frames once (H.264 decodes every raw frame anyway); each view
    takes its own frames and crop from every decoded batch."""
    union = np.unique(np.concatenate([j.indices for j in group]))  # [U] sorted raw indices
    sent = [0] * len(group)
    pos = 0
    try:
        for frames in iter_frames(group[0].episode, union, batch, threads):
            batch_index = union[pos : pos + len(frames)]  # [n] raw indices of this batch
            pos += len(frames)
            for v, job in enumerate(group):
                rows = np.flatnonzero(np.isin(batch_index, job.indices))  # this view's frames, in order
                if len(rows):
                    t, left, h, w = job.record.box
                    crop = frames[rows, t : t + h, left : left + w]  # [k, h, w, 3] (a copy: fancy index)
                    _put(out, Frames(job.record.start + sent[v], torch.from_numpy(crop)), stop)
                    sent[v] += len(rows)
    except EpisodeError as err:
        _put(out, Failed(group[0].record, err), stop)
        for v, job in enumerate(group):
            _put(out, Skip(job.record.start + sent[v], job.record.length - sent[v]), stop)


def _messages(q: queue.Queue, producers: int) -> Iterator[Frames | Skip | Failed]:
    """Messages until every producer has ended; a producer's crash is re-raised here."""
    while producers:
        match q.get():
            case End():
                producers -= 1
            case Crashed(error=err):
                raise err
            case message:
                yield message


def _encode_all(jobs: list[ViewJob], encoder: LoadedEncoder, writer: PartWriter, settings: PartSettings,
                result: PartResult, progress: Progress | None) -> set[str]:
    """Consumer: batch frames across views, encode, hand rows to the writer thread. Returns failed episodes."""
    decoded: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH * settings.decode_workers)
    groups: queue.Queue = queue.Queue()
    for group in _by_episode(jobs):
        groups.put(group)
    stop = threading.Event()
    readers = [threading.Thread(target=_decode, args=(groups, decoded, stop, settings.batch_size,
                                                      settings.decode_threads), daemon=True, name=f"decode-{i}")
               for i in range(settings.decode_workers)]
    write_q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    write_errors: list[BaseException] = []
    wthread = threading.Thread(target=_write_loop, args=(writer, write_q, write_errors), daemon=True, name="write")
    failed: set[str] = set()
    pending: list[Frames] = []
    try:
        with signals_deferred():  # a stop signal inside Thread.start would corrupt threading's table
            for t in (*readers, wthread):
                t.start()
        for message in _messages(decoded, len(readers)):
            if write_errors:
                break  # the part cannot be committed: stop encoding, report the write error below
            match message:
                case Frames():
                    pending.append(message)
                    if sum(len(f.crops) for f in pending) >= settings.batch_size:
                        _encode_batch(pending, encoder, settings.crop, write_q, result, progress)
                        pending = []
                case Skip():
                    write_q.put(message)
                case Failed(record=rec, error=err):
                    failed.add(rec.episode_id)
                    _fail(settings.on_error, result, rec.episode_id, rec.episode_path, err)
        if pending and not write_errors:
            _encode_batch(pending, encoder, settings.crop, write_q, result, progress)
    finally:
        stop.set()
        write_q.put(End())
        for t in (wthread, *readers):
            if t.ident is not None:  # started
                t.join()
    if write_errors:
        raise write_errors[0]
    return failed


def _encode_batch(pending: list[Frames], encoder: LoadedEncoder, crop: CropSection, write_q: queue.Queue,
                  result: PartResult, progress: Progress | None) -> None:
    """Preprocess on the encoder's device, encode once, split the rows back to their offsets."""
    t0 = time.perf_counter()
    feats = encoder.encode_crops([f.crops for f in pending], crop)  # [B, tokens, D]
    result.encode_seconds += time.perf_counter() - t0
    if not torch.isfinite(feats).all():  # never commit what no reader may train on
        raise CheckpointError("the encoder produced non-finite features (NaN/inf): check encoder.checkpoint and "
                           "encoder.precision")
    row = 0
    for f in pending:
        write_q.put(Rows(f.offset, feats[row : row + len(f.crops)]))
        row += len(f.crops)
    if progress:
        progress(row)


def _write_loop(writer: PartWriter, q: queue.Queue, errors: list[BaseException]) -> None:
    """Writer thread: rows go to their shard buffers; whole shards are written as they complete."""
    while True:
        message: ToWrite = q.get()
        if isinstance(message, End):
            return
        if errors:
            continue  # keep draining so the producer never blocks
        try:
            match message:
                case Rows(offset=offset, features=feats):
                    writer.write(offset, feats)
                case Skip(offset=offset, count=count):
                    writer.skip(offset, count)
        except BaseException as err:
            errors.append(err)
