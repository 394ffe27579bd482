"""How training windows reach the trainer without making it wait: the prefetching `WindowLoader`.

Reads run on a thread pool, a few batches ahead of the trainer: each reader thread reads its share of a
batch with one `FeatureStore.read_windows` call (positional reads straight from the shard files, every
byte checked; zarr for compressed or remote stores), so one loader keeps a GPU fed from disk, and more
threads hide disk or object-store latency. What comes out is exactly what `FeatureStore.read_features`
gives (bf16 stays bf16, bit for bit); the layer norm and any casting are the trainer's business. A
window of a damaged view is never trained on: `BadViews` raises, or replaces it by another draw.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import DamagedDataError
from pipeline.store import STATE_DIM, TORCH_DTYPES, FeatureStore, ViewRecord
from stages.train.buffer_pool import Allocator, BufferPool, pinned, plain
from stages.train.windows import BadViews, Window, WindowIndex, replacement_window, sample_batch

CPU = torch.device("cpu")

# -- reading -----------------------------------------------------------------------------------------

_ROWS: weakref.WeakKeyDictionary[FeatureStore, OrderedDict[tuple[str, int], tuple[np.ndarray, np.ndarray]]] = (
    weakref.WeakKeyDictionary())
_ROWS_LOCK = threading.Lock()
KEPT_VIEW_ROWS = 16384  # views whose states and actions a store's loader keeps (~56 bytes a frame: tens of MB)


def _view_rows(store: FeatureStore, view: ViewRecord) -> tuple[np.ndarray, np.ndarray]:
    """A view's states [F, 7] and actions [F, 7], read once and kept for the views used most recently (a run
    over all of DROID touches every view in time: keeping them all would hold gigabytes per rank).

    Keyed by where the rows are (attempt, first row): a re-extracted view lives elsewhere.
    """
    key = (view.location, view.start)
    with _ROWS_LOCK:
        cache = _ROWS.setdefault(store, OrderedDict())
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
    if hit is None:  # two threads may both read a view once; harmless and cheaper than a lock around I/O
        hit = (np.asarray(store.read_rows(view, "states"), np.float32),
               np.asarray(store.read_rows(view, "actions"), np.float32))
        with _ROWS_LOCK:
            cache[key] = hit
            while len(cache) > KEPT_VIEW_ROWS:
                cache.popitem(last=False)
    return hit


def read_window(store: FeatureStore, window: Window, T: int) -> tuple[Tensor, Tensor, Tensor]:
    """features [T, tokens, D] as stored, actions [T-1, 7] float32, states [T, 7] float32.

    The reference read, through `FeatureStore.read_features`; the loader passes its batch buffer as `out`
    and is tested against this.
    """
    features = store.read_features(window.view, window.start, T)  # [T, tokens, D], stored dtype
    actions, states = _window_rows(store, window, T)
    return features, torch.from_numpy(actions.copy()), torch.from_numpy(states.copy())  # [T-1, 7], [T, 7]


def _window_rows(store: FeatureStore, window: Window, T: int) -> tuple[np.ndarray, np.ndarray]:
    """actions [T-1, 7] and states [T, 7] of a window, as views into the cached rows of its view."""
    view, s = window.view, window.start
    states, actions = _view_rows(store, view)
    a = actions[s : s + T - 1]  # [T-1, 7]; the view's last row (NaN) is never inside
    if not np.isfinite(a).all():
        raise DamagedDataError(store.where(view, "actions"), f"non-finite actions in rows {s}..{s + T - 2}")
    return a, states[s : s + T]


@dataclass
class Batch:
    """One batch of windows, on the trainer's device: cached features, or (online) pixels to encode first."""

    features: Tensor | None  # [B, T, tokens, D], stored dtype (None until an online batch is encoded)
    actions: Tensor  # [B, T-1, 7] float32
    states: Tensor  # [B, T, 7] float32
    batch_number: int  # global batch number (-1 for evaluation batches)
    wait_seconds: float = 0.0  # how long the trainer blocked waiting for this batch
    windows: list[Window] = field(default_factory=list, repr=False)
    pixels: Tensor | None = None  # [B, T, 3, S, S] normalised crops (train --online), encoded in the step


@dataclass
class _Buffers:
    """CPU tensors a batch is assembled in (pinned for a CUDA trainer, so the copy can be asynchronous)."""

    data: Tensor  # [B, T, tokens, D] stored features, or [B, T, 3, S, S] pixels (online)
    actions: Tensor  # [B, T-1, 7]
    states: Tensor  # [B, T, 7]
    pixels: bool = False  # what `data` holds

    @classmethod
    def empty(cls, B: int, T: int, shape: tuple[int, ...], dtype: torch.dtype, alloc: Allocator,
              pixels: bool) -> _Buffers:
        return cls(alloc((B, T, *shape), dtype), alloc((B, T - 1, STATE_DIM), torch.float32),
                   alloc((B, T, STATE_DIM), torch.float32), pixels)

    def put_rows(self, i: int, actions: np.ndarray, states: np.ndarray) -> None:
        """Row i's actions and states (a reader thread): numpy assignments, ~10x cheaper than torch's
        `copy_` dispatch, and this runs holding the GIL that the other reader threads wait for."""
        self.actions.numpy()[i] = actions
        self.states.numpy()[i] = states

    def rows(self, kept: Tensor) -> _Buffers:
        """Copies of the rows `kept` [n] (evaluation batches that left damaged windows out)."""
        return _Buffers(self.data[kept], self.actions[kept], self.states[kept], self.pixels)

    def to_batch(self, device: torch.device, batch_number: int, wait: float, windows: list[Window]) -> Batch:
        if device.type == "cpu":  # these tensors as they are (no dispatch: this runs in the trainer per batch)
            data, actions, states = self.data, self.actions, self.states
        else:
            nb = self.data.is_pinned()
            data, actions, states = (t.to(device, non_blocking=nb) for t in (self.data, self.actions, self.states))
        return Batch(None if self.pixels else data, actions, states, batch_number, wait, windows,
                     data if self.pixels else None)


class WindowSource(Protocol):
    """Where a window's rows come from: the feature store (`CachedSource`), or the videos (`OnlineSource`)."""

    def empty(self, batch: int, alloc: Allocator) -> _Buffers: ...

    def fill_many(self, buffers: _Buffers, slots: Sequence[tuple[int, Window]]) -> list[DamagedDataError | None]:
        """Read each (row, window) into its row (a reader thread; rows are disjoint): None for each read, or
        the damage found in its view (its row then holds nothing usable)."""
        ...


class CachedSource:
    """Windows read from the feature store, exactly as written (and checked: see FeatureStore)."""

    def __init__(self, store: FeatureStore, frames_per_clip: int, view: ViewRecord):
        self.store, self.T = store, frames_per_clip
        self.tokens, self.dim, self.dtype = feature_layout(store, view)

    def empty(self, batch: int, alloc: Allocator) -> _Buffers:
        return _Buffers.empty(batch, self.T, (self.tokens, self.dim), self.dtype, alloc, pixels=False)

    def fill_many(self, buffers: _Buffers, slots: Sequence[tuple[int, Window]]) -> list[DamagedDataError | None]:
        """The windows' features in one call (`FeatureStore.read_windows`), then their actions and states."""
        errors = self.store.read_windows(buffers.data, [(i, w.view, w.start) for i, w in slots], self.T)
        for k, (i, w) in enumerate(slots):
            if errors[k] is None:
                try:
                    buffers.put_rows(i, *_window_rows(self.store, w, self.T))
                except DamagedDataError as err:
                    errors[k] = err
        return errors


def fill_each(fill: Callable[[_Buffers, int, Window], None], buffers: _Buffers,
              slots: Sequence[tuple[int, Window]]) -> list[DamagedDataError | None]:
    """`WindowSource.fill_many` for a source that reads one window at a time with `fill`."""
    errors: list[DamagedDataError | None] = []
    for i, w in slots:
        try:
            fill(buffers, i, w)
            errors.append(None)
        except DamagedDataError as err:
            errors.append(err)
    return errors


def feature_layout(store: FeatureStore, view: ViewRecord) -> tuple[int, int, torch.dtype]:
    """(tokens, D, dtype) of the stored features; one fingerprint means one layout for every part."""
    arr = store.array(view, "features")
    return int(arr.shape[1]), int(arr.shape[2]), TORCH_DTYPES[arr.attrs["logical_dtype"]]


def load_windows(source: WindowSource, windows: list[Window], device: torch.device,
                 bad: BadViews | None = None) -> Batch | None:
    """An evaluation batch of the given windows, read in this thread (all at once: pass a chunk of
    `eval_windows` that fits in memory, ~11.5 MB per 16-frame ViT-g window in 16 bits). Windows of damaged
    views are left out under the skip policy (None if none is left)."""
    if not windows:
        raise ValueError("load_windows needs at least one window")
    bad = bad or BadViews()
    todo = [w for w in windows if w.view not in bad]
    if not todo:
        return None
    buffers = source.empty(len(todo), plain)
    errors = source.fill_many(buffers, list(enumerate(todo)))
    for w, err in zip(todo, errors, strict=True):
        if err is not None:
            bad.met(w.view, err)
    kept = [k for k, err in enumerate(errors) if err is None]
    if not kept:
        return None
    if len(kept) < len(todo):  # only the rows of the sound windows
        buffers = buffers.rows(torch.tensor(kept))
    return buffers.to_batch(device, -1, 0.0, [todo[k] for k in kept])


# -- the training loader -----------------------------------------------------------------------------


@dataclass
class _Pending:
    """A batch whose windows are being read in the background."""

    batch_number: int
    windows: list[Window]
    buffers: _Buffers
    reads: list[Future]


def batch_shares(batch_size: int, threads: int) -> list[list[int]]:
    """The rows of a batch split into up to `threads` contiguous shares of near-equal size: one reader task
    and one read call each (`FeatureStore.read_windows`)."""
    return [s.tolist() for s in np.array_split(np.arange(batch_size), threads) if len(s)]


def _yield_to_compute() -> None:
    """Reader threads run at a lower priority (nice +10, this thread only): their work is prefetched, and
    on a machine with no spare core a reader that takes a core from torch's intra-op threads in the middle
    of an operation stalls the whole operation."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: the normal priority
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, min(os.getpriority(os.PRIO_PROCESS, me) + 10, 19))  # run under nice too


class WindowLoader:
    """Endless batches for training, read `prefetch` batches ahead on `threads` reader threads.

    The state is just the next batch number (plus seed and rank): batches are drawn from their own
    generators, so restarting at batch k gives exactly the batches k, k+1, ... of an uninterrupted run.
    """

    def __init__(self, source: FeatureStore | WindowSource, index: WindowIndex, batch_size: int,
                 frames_per_clip: int, seed: int,
                 rank: int = 0, start_batch: int = 0, threads: int = 4, prefetch: int = 2,
                 device: torch.device = CPU, pin_memory: bool | None = None, bad: BadViews | None = None):
        if frames_per_clip != index.frames_per_clip:
            raise ValueError(f"frames_per_clip {frames_per_clip} != the index's {index.frames_per_clip}")
        if not index.episodes:
            raise ValueError(f"no training windows: {index}")
        if batch_size < 1 or threads < 1 or prefetch < 0:
            raise ValueError(f"batch_size {batch_size} and threads {threads} must be >= 1, prefetch {prefetch} >= 0")
        self.index, self.batch_size, self.T = index, batch_size, frames_per_clip
        first = index.views_of(index.episodes[0])[0]
        self.source = CachedSource(source, frames_per_clip, first) if isinstance(source, FeatureStore) else source
        self.seed, self.rank, self.prefetch = seed, rank, prefetch
        self._shares = batch_shares(batch_size, threads)  # the rows each reader task reads, per batch
        self.bad = bad or BadViews()
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self._alloc: Allocator = pinned if self.pin_memory else BufferPool(keep=prefetch + 3)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="window-reader", initializer=_yield_to_compute)
        self._pending: deque[_Pending] = deque()
        self._next = start_batch  # the next batch __next__ returns; reads start with the first call

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> WindowLoader:
        return self

    def __next__(self) -> Batch:
        return self.next()

    def next(self) -> Batch:
        """The next batch; blocks only if its reads have not finished yet (the time is in wait_seconds)."""
        self._fill(self._next + 1)
        pending = self._pending.popleft()
        t0 = time.perf_counter()
        try:
            for f in pending.reads:
                f.result()  # re-raises a reader's error here, in the trainer
        except BaseException:
            self._pending.appendleft(pending)
            self._drop_pending()  # a retry starts again at this same batch number
            raise
        wait = time.perf_counter() - t0
        self._next += 1
        self._fill(self._next + self.prefetch)  # keep the readers busy while the trainer computes
        return pending.buffers.to_batch(self.device, pending.batch_number, wait, pending.windows)

    def _fill(self, upto: int) -> None:
        """Submit the reads of every batch before `upto` that is not yet in flight: one task per reader thread,
        each a contiguous share of the batch's rows (read in one call, see `FeatureStore.read_windows`)."""
        b = self._pending[-1].batch_number + 1 if self._pending else self._next
        for number in range(b, upto):
            windows = sample_batch(self.index, self.batch_size, self.seed, self.rank, number)
            buffers = self.source.empty(self.batch_size, self._alloc)
            reads = [self._pool.submit(self._read, buffers, windows, list(rows), number) for rows in self._shares]
            self._pending.append(_Pending(number, windows, buffers, reads))

    def _read(self, buffers: _Buffers, windows: list[Window], rows: list[int], number: int) -> None:
        """Read the windows of `rows` into their rows (a reader thread). Under the skip policy the window of a
        damaged view is replaced by the next of its row's replacement draws (`replacement_window`) until one
        reads clean: the outcome depends only on which views are damaged, not on the threads' timing."""
        attempts = dict.fromkeys(rows, 0)
        while rows:
            for i in rows:
                while windows[i].view in self.bad:  # damaged (found by any thread): the next draw
                    windows[i] = replacement_window(self.index, self.seed, self.rank, number, i, attempts[i], self.bad)
                    attempts[i] += 1
            errors = self.source.fill_many(buffers, [(i, windows[i]) for i in rows])
            for i, err in zip(rows, errors, strict=True):
                if err is not None:
                    self.bad.met(windows[i].view, err)  # raises under the raise policy
            rows = [i for i, err in zip(rows, errors, strict=True) if err is not None]

    def settle(self) -> None:
        """Wait until every read in flight has finished (errors stay for `next` to raise): a benchmark
        times one kind of work without this loader's background reads on the same cores."""
        for p in self._pending:
            for f in p.reads:
                if not f.cancelled():
                    f.exception()

    # -- resuming ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"batch_number": self._next, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        """Continue at sd's batch number with sd's seed; reads in flight are dropped.

        The rank stays this loader's own: it is a property of the process, and a checkpoint saved by
        rank 0 and loaded on every rank must not give all ranks rank 0's stream.
        """
        self._drop_pending()
        self.seed, self._next = int(sd["seed"]), int(sd["batch_number"])

    def _drop_pending(self) -> None:
        for p in self._pending:
            for f in p.reads:
                f.cancel()
        self.settle()  # reads already running finish into buffers nobody will look at
        self._pending.clear()

    # -- shutting down -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the reader threads (reads in flight are dropped)."""
        self._drop_pending()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> WindowLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
