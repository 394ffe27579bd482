"""Stage one's unit of work: extract one part (a few episodes) into the store and commit it.

The hot path overlaps its three kinds of work so that the encoder -- the expensive part on a GPU
worker -- never waits:

    decode thread   decord -> crop (uint8, numpy view) ->  queue  ->
    main thread     to device -> resize + normalise -> encoder (batched across views) -> storage dtype ->  queue  ->
    writer thread   buffer rows per shard -> write whole shards (zarr)

A bad episode is recorded as failed with its reason and the part goes on with the others; its rows,
already allocated, are left as zeros and not listed in the commit record. The commit record is written
last: a part killed at any moment is simply not there for readers, and its retry overwrites it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.manifest import Manifest
from pipeline.store import FeatureStore, PartWriter, ViewRecord, encode_features, view_id_for
from stages.augment import draw_view
from stages.droid import Episode, EpisodeError, actions_from_states, frame_grid, frame_stride, iter_frames, open_episode
from stages.encoder import LoadedEncoder
from stages.plan import EpisodeTask, PartTask, source_identity

Progress = Callable[[int], None]  # called with the number of frames just encoded
QUEUE_DEPTH = 4  # decoded batches in flight: enough to hide decode jitter, small enough for RAM


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
    views: int = 0
    frames: int = 0
    bytes_written: int = 0
    encode_seconds: float = 0.0
    seconds: float = 0.0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (episode_id, path, reason)


def run_part(m: Manifest, store: FeatureStore, encoder: LoadedEncoder, part: PartTask,
             progress: Progress | None = None) -> PartResult:
    """Extract and commit one part; returns counts. Raises only on errors that are not an episode's fault
    (or on an episode's when extract.on_error is "raise")."""
    t0 = time.perf_counter()
    result = PartResult(part.part_id)
    jobs = _prepare(m, part, result)
    frames = sum(len(j.indices) for j in jobs)
    if frames == 0:
        _finish_failures(m, store, part, result, set())
        result.seconds = time.perf_counter() - t0
        return result
    writer = store.part_writer(part.part_id, frames, encoder.tokens, encoder.dim, m.cache)
    failed = _encode_all(m, encoder, jobs, writer, result, progress)
    good = [j for j in jobs if j.record.episode_id not in failed]
    writer.finish(*_per_frame_arrays(jobs, frames))
    store.commit(part.part_id, [j.record for j in good], frames)
    _finish_failures(m, store, part, result, failed)
    result.views, result.frames = len(good), sum(j.record.length for j in good)
    result.bytes_written, result.seconds = writer.bytes_written, time.perf_counter() - t0
    return result


def _fail(m: Manifest, result: PartResult, episode_id: str, path: str, err: EpisodeError) -> None:
    """extract.on_error: stop the run, or record the episode as failed and go on."""
    if m.extract.on_error == "raise":
        raise err
    result.failures.append((episode_id, path, err.reason))


def _prepare(m: Manifest, part: PartTask, result: PartResult) -> list[ViewJob]:
    """Open each episode (cheap: no decoding), draw its views, lay their rows out one after another."""
    jobs: list[ViewJob] = []
    for task in part.episodes:
        try:
            views = episode_jobs(m, task)
        except EpisodeError as err:
            _fail(m, result, task.episode_id, task.path, err)
            continue
        for job in views:
            job.record.part, job.record.start = part.part_id, sum(j.record.length for j in jobs)
            jobs.append(job)
    return jobs


def episode_jobs(m: Manifest, task: EpisodeTask) -> list[ViewJob]:
    """Open an episode (no decoding) and draw its views: the distinct ones not already committed."""
    folder = Path(task.path)
    if not folder.is_dir():
        raise EpisodeError(folder, "episode folder does not exist")
    ep = open_episode(folder, m.data.camera)
    stride = frame_stride(ep.video_fps, m.data.fps)
    source = source_identity(folder, m.data.camera)
    jobs, seen = [], set(task.done_views)
    for k in range(m.views.per_episode):
        d = draw_view(m.views.seed, task.episode_id, k, ep.frame_hw, stride, m.crop.scale, m.crop.ratio,
                      m.views.phase == "random")
        vid = view_id_for(task.episode_id, m.data.camera, d.phase, stride, d.box.as_list())
        if vid in seen:
            continue  # identical draw (or already committed): stored once
        seen.add(vid)
        indices = frame_grid(ep.num_usable, stride, d.phase)  # [F]
        if len(indices) < m.data.frames_per_clip:
            raise EpisodeError(folder, f"episode shorter than one clip: {ep.num_usable} usable frames at stride "
                               f"{stride} give {len(indices)} frames < data.frames_per_clip {m.data.frames_per_clip}")
        states = ep.states[indices]  # [F, 7]
        actions = np.concatenate([actions_from_states(states), np.full((1, 7), np.nan)])  # [F, 7]
        record = ViewRecord(vid, task.episode_id, str(folder), m.data.camera, ep.serial, d.phase, stride,
                            ep.video_fps, list(ep.frame_hw), d.box.as_list(), source, length=len(indices))
        jobs.append(ViewJob(record, ep, indices, states, actions))
    return jobs


def _per_frame_arrays(jobs: list[ViewJob], frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    states, actions = np.zeros((frames, 7)), np.full((frames, 7), np.nan)
    index = np.full(frames, -1, np.int64)
    for j in jobs:
        sl = slice(j.record.start, j.record.start + j.record.length)
        states[sl], actions[sl], index[sl] = j.states, j.actions, j.indices
    return states, actions, index


def _finish_failures(m: Manifest, store: FeatureStore, part: PartTask, result: PartResult, failed: set[str]) -> None:
    """Record this part's failures, clear old failure records of episodes that now succeeded."""
    failed_ids = failed | {f[0] for f in result.failures}
    for task in part.episodes:
        if task.episode_id not in failed_ids:
            store.clear_failure(task.episode_id)
    for eid, path, reason in result.failures:
        store.write_failure(eid, {"path": path, "reason": reason, "time": time.time(),
                                  "source": source_identity(Path(path), m.data.camera)})


# ----------------------------------------------------------------------------- the overlapped hot path


def _decode(m: Manifest, groups: queue.Queue, out: queue.Queue, stop: threading.Event) -> None:
    """Producer: takes episodes off `groups` and emits decoded + cropped uint8 batches tagged with their
    row offset. Several producers run at once (extract.decode_workers): 720p H.264 decodes at tens of
    frames/s per thread, far below a GPU encoder, and decord releases the GIL while it decodes."""
    try:
        while not stop.is_set():
            try:
                group = groups.get_nowait()
            except queue.Empty:
                return
            _decode_episode(m, group, out, stop)
    except BaseException as err:  # anything unexpected must reach the main thread, not die silently
        _put(out, ("error", None, err), stop)
    finally:
        _put(out, ("end", None, None), stop)


def _put(q: queue.Queue, item: tuple, stop: threading.Event) -> None:
    """Blocking put that gives up once the consumer has stopped (so no thread hangs on a full queue)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _by_episode(jobs: list[ViewJob]) -> Iterator[list[ViewJob]]:
    """The views of one episode (they are laid out next to each other)."""
    group: list[ViewJob] = []
    for job in jobs:
        if group and job.record.episode_id != group[0].record.episode_id:
            yield group
            group = []
        group.append(job)
    if group:
        yield group


def _decode_episode(m: Manifest, group: list[ViewJob], out: queue.Queue, stop: threading.Event) -> None:
    """Decode the union of the views' frames once (H.264 decodes every raw frame anyway); each view
    takes its own frames and crop from every decoded batch."""
    union = np.unique(np.concatenate([j.indices for j in group]))  # [U] sorted raw indices
    sent = [0] * len(group)
    pos = 0
    try:
        for frames in iter_frames(group[0].episode, union, m.encoder.batch_size, m.extract.decode_threads):
            batch_index = union[pos : pos + len(frames)]  # [n] raw indices of this batch
            pos += len(frames)
            for v, job in enumerate(group):
                rows = np.flatnonzero(np.isin(batch_index, job.indices))  # this view's frames, in order
                if len(rows):
                    t, left, h, w = job.record.box
                    crop = frames[rows, t : t + h, left : left + w]  # [k, h, w, 3] (a copy: fancy index)
                    _put(out, ("frames", job.record, job.record.start + sent[v], torch.from_numpy(crop)), stop)
                    sent[v] += len(rows)
    except EpisodeError as err:
        _put(out, ("fail", group[0].record, err), stop)
        for v, job in enumerate(group):
            _put(out, ("skip", job.record, job.record.start + sent[v], job.record.length - sent[v]), stop)


def _items(q: queue.Queue, producers: int) -> Iterator[tuple]:
    """Items until every producer has said it ended; a producer's crash is re-raised here."""
    while producers:
        item = q.get()
        if item[0] == "end":
            producers -= 1
            continue
        if item[0] == "error":
            raise item[2]
        yield item


def _encode_all(m: Manifest, encoder: LoadedEncoder, jobs: list[ViewJob], writer: PartWriter,
                result: PartResult, progress: Progress | None) -> set[str]:
    """Consumer: batch frames across views, encode, hand rows to the writer thread. Returns failed episodes."""
    decoded: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH * m.extract.decode_workers)
    groups: queue.Queue = queue.Queue()
    for group in _by_episode(jobs):
        groups.put(group)
    stop = threading.Event()
    readers = [threading.Thread(target=_decode, args=(m, groups, decoded, stop), daemon=True, name=f"decode-{i}")
               for i in range(m.extract.decode_workers)]
    write_q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    write_errors: list[BaseException] = []
    wthread = threading.Thread(target=_write_loop, args=(writer, write_q, write_errors), daemon=True, name="write")
    for r in readers:
        r.start()
    wthread.start()
    failed: set[str] = set()
    pending: list[tuple[int, torch.Tensor]] = []  # (row offset, cropped uint8 frames)
    try:
        for item in _items(decoded, len(readers)):
            if write_errors:
                break  # the part cannot be committed: stop encoding, report the write error below
            kind, rec = item[0], item[1]
            if kind == "frames":
                pending.append((item[2], item[3]))
                if sum(len(t) for _, t in pending) >= m.encoder.batch_size:
                    _encode_batch(m, encoder, pending, write_q, result, progress)
                    pending = []
            elif kind == "skip":
                write_q.put(("skip", item[2], item[3]))
            elif kind == "fail":
                failed.add(rec.episode_id)
                _fail(m, result, rec.episode_id, rec.episode_path, item[2])
        if pending and not write_errors:
            _encode_batch(m, encoder, pending, write_q, result, progress)
    finally:
        stop.set()
        write_q.put(None)
        wthread.join()
        for r in readers:
            r.join()
    if write_errors:
        raise write_errors[0]
    return failed


def _encode_batch(m: Manifest, encoder: LoadedEncoder, pending: list[tuple[int, torch.Tensor]],
                  write_q: queue.Queue, result: PartResult, progress: Progress | None) -> None:
    """Preprocess on the encoder's device, encode once, split the rows back to their offsets."""
    t0 = time.perf_counter()
    feats = encoder.encode_crops([t for _, t in pending], m.crop)  # [B, tokens, D]
    result.encode_seconds += time.perf_counter() - t0
    stored = encode_features(feats, m.cache.dtype)  # [B, tokens, D] storage dtype
    row = 0
    for offset, t in pending:
        write_q.put(("rows", offset, stored[row : row + len(t)]))
        row += len(t)
    if progress:
        progress(row)


def _write_loop(writer: PartWriter, q: queue.Queue, errors: list[BaseException]) -> None:
    while (item := q.get()) is not None:
        if errors:
            continue  # keep draining so the producer never blocks
        try:
            if item[0] == "rows":
                writer.write(item[1], item[2])
            else:
                writer.skip(item[1], item[2])
        except BaseException as err:
            errors.append(err)
