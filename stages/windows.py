"""Training windows from the feature store: which views a run may use, how windows are drawn, and how
their rows reach the trainer without making it wait.

Why this is one module of its own: stage two never decodes video, so its data path is only this --
pick a window of T consecutive frames inside one committed view (DESIGN section 1) and read its rows.
Three properties of that path decide whether a run can be trusted and resumed, so they live here:

- the train / held-out split is a pure function of the episode id, so adding episodes to the store
  never moves an old episode from one side to the other;
- the windows of global batch `b` on rank `r` come from their own generator seeded with
  (seed, r, b): a resumed run needs only the next batch number (no replay), prefetching ahead cannot
  change what a resumed run sees, and every DDP rank draws its own stream;
- what comes out is exactly what `FeatureStore.read_features` gives (bf16 stays bf16, bit for bit);
  the layer norm and any casting are the trainer's business.

Sampling follows the release: an episode uniformly, then a camera uniformly, then a raw start frame
uniformly among the starts the episode's views hold, in the release's range (one stored frame must
follow the window), then one of the crop draws holding it. With `views.phase: all` the views hold every
raw start, so the draw is the release's exactly; with one phase per view it is the release's restricted
to the stored phases. Reads run on a thread pool, a few batches ahead of the trainer: each reader thread
reads its share of a batch with one `FeatureStore.read_windows` call (the direct shard reader, native,
GIL released; zarr for compressed or remote stores), 7-15 GB/s of ViT-g windows on 2 vCPUs from the
page cache (README, "Performance"), so one loader keeps many GPUs fed; more threads hide disk or
object-store latency.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import DamagedDataError, StoreError
from pipeline.manifest import DataSection, Manifest
from pipeline.part_writer import STATE_DIM, TORCH_DTYPES
from pipeline.records import ViewRecord
from pipeline.store import FORMAT_VERSION, FeatureStore, store_specs
from pipeline.view_table import ViewTable
from stages.buffer_pool import Allocator, BufferPool, pinned, plain
from stages.droid import data_stride

SPLITS = ("train", "heldout", "all")
CPU = torch.device("cpu")


# -- the split ---------------------------------------------------------------------------------------


def split_of(episode_id: str, heldout_fraction: float, salt: str = "") -> str:
    """"train" or "heldout" for an episode, from a hash of its id alone.

    A hash (not a shuffled list) keeps every episode on its side forever: episodes added later are
    split by the same rule, and none of the old ones move into or out of the held-out set.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction {heldout_fraction!r} must be in [0, 1]")
    digest = hashlib.sha256((salt + episode_id).encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "heldout" if u < heldout_fraction else "train"


def manifest_views(views: ViewTable, data: DataSection) -> np.ndarray:
    """[k] rows of the committed views a manifest trains on: of its cameras, on the frame grid its rates give.

    A store keeps every view it was ever asked for. Views of another stride (made under another
    data.fps or data.video_fps) stay in it for the runs that want them, but would mix clip durations
    into this run's windows, so they are left out here."""
    cameras = [i for i, c in enumerate(views.categories["camera"]) if c in data.cameras]
    fps = views.numbers["video_fps"]
    rates, inverse = np.unique(fps, return_inverse=True)
    strides = np.array([data_stride(data, float(r)) for r in rates], np.int64)[inverse.reshape(-1)]  # [n]
    keep = np.isin(views.codes["camera"], cameras) & (views.numbers["stride"] == strides)
    return np.flatnonzero(keep)


# -- the index ---------------------------------------------------------------------------------------


@dataclass
class Window:
    """T consecutive stored frames of one view: rows start .. start+T-1 of `view`."""

    view: ViewRecord
    start: int


WINDOW_RANGES = ("release", "full")


def window_starts(length: int | np.ndarray, frames_per_clip: int, window_range: str = "release") -> int | np.ndarray:
    """How many T-frame windows a view of `length` stored frames offers (element-wise for an array).

    "release": the release draws a raw start in [0, num_frames - 1 - T * stride], so one more frame of the
    grid must follow the window (length - T starts); "full": every window that fits (length - T + 1)."""
    return np.maximum(0, length - frames_per_clip + (window_range == "full"))


class WindowIndex:
    """The committed views of one split, grouped by episode, camera and frame grid, that hold at least one
    T-frame window: what the release's draw needs, as arrays over a `ViewTable`'s rows.

    Built once at start-up from the store's index (no array is opened), in a few vectorised passes however
    many views there are. Views too short for a window are dropped and counted; an episode none of whose
    views is long enough is dropped with them. Within an episode the views are ordered by camera, then frame
    grid (stride, phase), then view id: a camera's grids share nothing, the views of one grid start their
    windows at the same raw frames, so a drawn start is shared by them and one of them is picked for it.
    """

    def __init__(self, store: FeatureStore, *, split: str, frames_per_clip: int, heldout_fraction: float = 0.0,
                 salt: str = "", cameras: Sequence[str] | None = None, window_range: str = "release"):
        self._build(store.index().committed(), None, split, frames_per_clip, heldout_fraction, salt, cameras,
                    window_range)

    @classmethod
    def from_table(cls, table: ViewTable, rows: np.ndarray | None = None, *, split: str, frames_per_clip: int,
                   heldout_fraction: float = 0.0, salt: str = "", cameras: Sequence[str] | None = None,
                   window_range: str = "release") -> WindowIndex:
        """The index of `rows` of a table (all of them by default)."""
        index = cls.__new__(cls)
        index._build(table, rows, split, frames_per_clip, heldout_fraction, salt, cameras, window_range)
        return index

    @classmethod
    def from_views(cls, views: Iterable[ViewRecord], **settings: Any) -> WindowIndex:
        """The same index from view records at hand (a store's subset, or records made up in tests)."""
        return cls.from_table(ViewTable.from_views((v.commit, v.committed_at, v) for v in views), **settings)

    def _build(self, table: ViewTable, rows: np.ndarray | None, split: str, frames_per_clip: int,
               heldout_fraction: float, salt: str, cameras: Sequence[str] | None, window_range: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} must be one of {SPLITS}")
        if frames_per_clip < 2:
            raise ValueError(f"frames_per_clip {frames_per_clip} must be >= 2 (a window needs one action)")
        if window_range not in WINDOW_RANGES:
            raise ValueError(f"window_range {window_range!r} must be one of {WINDOW_RANGES}")
        self.split, self.frames_per_clip, self.window_range = split, frames_per_clip, window_range
        self.heldout_fraction, self.salt, self.cameras = heldout_fraction, salt, cameras
        self.table = table
        rows = np.arange(len(table)) if rows is None else np.asarray(rows, np.int64)
        if cameras is not None:
            rows = rows[np.isin(table.codes["camera"][rows], [i for i, c in enumerate(table.categories["camera"])
                                                               if c in cameras])]
        if split != "all":
            sides = np.array([split_of(e, heldout_fraction, salt) == split for e in table.categories["episode_id"]],
                             bool)
            rows = rows[sides[table.codes["episode_id"][rows]]] if len(sides) else rows[:0]
        starts = window_starts(table.numbers["length"][rows], frames_per_clip, window_range)
        self.dropped_views = int((starts < 1).sum())  # views of this split too short for one window
        rows, starts = rows[starts >= 1], starts[starts >= 1]
        ep, cam = table.codes["episode_id"][rows], table.codes["camera"][rows]
        stride, phase = table.numbers["stride"][rows], table.numbers["phase"][rows]
        order = np.lexsort((table.codes["view_id"][rows], phase, stride, cam, ep))
        self.rows, self.view_starts = rows[order], starts[order]  # [k] table rows in draw order, their window starts
        ep, cam, stride, phase = ep[order], cam[order], stride[order], phase[order]
        grid_lo = _group_starts(ep, cam, stride, phase)  # [g] first position of each (episode, camera, grid)
        cam_lo = _group_starts(ep, cam)  # [c] first position of each (episode, camera)
        ep_lo = _group_starts(ep)  # [e] first position of each episode
        self._grid_lo, self._grid_hi = grid_lo, np.append(grid_lo[1:], len(rows))
        self._cam_grids = np.searchsorted(grid_lo, np.append(cam_lo, len(rows)))  # [c + 1] grid ranges of cameras
        self._ep_cams = np.searchsorted(cam_lo, np.append(ep_lo, len(rows)))  # [e + 1] camera ranges of episodes
        self._ep_lo = np.append(ep_lo, len(rows))  # [e + 1] positions of each episode's rows
        widest = np.maximum.reduceat(self.view_starts, grid_lo) if len(rows) else np.zeros(0, np.int64)  # [g]
        cum = np.cumsum(widest)
        first_grid = self._cam_grids[:-1]
        # distinct raw starts of grids 0..k of their camera: [g], restarting at each camera's first grid
        self._grid_cum = cum - np.repeat(np.concatenate([[0], cum])[first_grid], np.diff(self._cam_grids))
        self.episodes: list[str] = [table.categories["episode_id"][c] for c in ep[ep_lo].tolist()]
        self._episode = {e: k for k, e in enumerate(self.episodes)}

    def starts(self, view: ViewRecord) -> int:
        """Window starts of a view under this index's window range."""
        return int(window_starts(view.length, self.frames_per_clip, self.window_range))

    def views_of(self, episode: str) -> list[ViewRecord]:
        """The episode's usable views, sorted by view id (a stable order)."""
        return [self.table.record(r) for r in self._rows_of(self._episode[episode])]

    def _rows_of(self, e: int) -> list[int]:
        rows = self.rows[self._ep_lo[e] : self._ep_lo[e + 1]]
        return rows[np.argsort(self.table.codes["view_id"][rows], kind="stable")].tolist()

    def draw(self, episode: str, rng: np.random.Generator) -> Window:
        """The release's draw within an episode: a camera uniformly, then a raw start uniformly (the
        (phase, stored start) pair), then a crop draw holding it uniformly."""
        e = self._episode[episode]
        c = int(self._ep_cams[e]) + int(rng.integers(int(self._ep_cams[e + 1] - self._ep_cams[e])))
        g_lo, g_hi = int(self._cam_grids[c]), int(self._cam_grids[c + 1])
        cum = self._grid_cum[g_lo:g_hi]
        u = int(rng.integers(int(cum[-1])))
        k = int(np.searchsorted(cum, u, side="right"))
        start = u - (int(cum[k - 1]) if k else 0)
        lo, hi = int(self._grid_lo[g_lo + k]), int(self._grid_hi[g_lo + k])
        holders = np.flatnonzero(self.view_starts[lo:hi] > start)
        return Window(self.table.record(int(self.rows[lo + holders[int(rng.integers(len(holders)))]])), start)

    def without(self, view_ids: set[str]) -> WindowIndex:
        """This index without the given views (damaged ones)."""
        ids = self.table.strings("view_id")[self.rows] if len(self.rows) else np.array([], object)
        keep = self.rows[~np.isin(ids, list(view_ids))]
        return WindowIndex.from_table(self.table, keep, split="all", frames_per_clip=self.frames_per_clip,
                                      window_range=self.window_range)

    @property
    def num_views(self) -> int:
        return len(self.rows)

    @property
    def num_frames(self) -> int:
        return int(self.table.numbers["length"][self.rows].sum())

    @property
    def num_windows(self) -> int:
        """Distinct T-frame windows (view, start) over all usable views."""
        return int(self.view_starts.sum())

    def __repr__(self) -> str:
        return (f"WindowIndex(split={self.split!r}, T={self.frames_per_clip}, episodes={len(self.episodes)}, "
                f"views={self.num_views}, frames={self.num_frames}, windows={self.num_windows}, "
                f"dropped_views={self.dropped_views})")


def _group_starts(*keys: np.ndarray) -> np.ndarray:
    """[g] positions where the tuple of sorted `keys` changes (0 first): the first row of each group."""
    if not len(keys[0]):
        return np.zeros(0, np.int64)
    change = np.zeros(len(keys[0]), bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(change)


def split_index(m: Manifest, views: ViewTable, split: str) -> WindowIndex:
    """The windows of `split` as a run of manifest `m` sees them: its cameras and stride, its split rule
    (train.heldout_fraction, train.split_salt) and window range. Training and `pipeline eval` both call it,
    so a checkpoint evaluated later is evaluated on the windows its run used."""
    cfg = m.train
    return WindowIndex.from_table(views, manifest_views(views, m.data), split=split,
                                  frames_per_clip=m.data.frames_per_clip, cameras=m.data.cameras,
                                  heldout_fraction=cfg.heldout_fraction, salt=cfg.split_salt,
                                  window_range=cfg.window_range)


# -- opening the store for training ------------------------------------------------------------------


def open_training_store(cache_path: str, spec: dict[str, Any], tokens_per_frame: int, dim: int) -> FeatureStore:
    """The manifest's store, checked against what the predictor expects, before any training starts.

    A mismatch found here costs seconds; found after the first batch (or, worse, not found because
    shapes happen to broadcast) it costs a run. The fingerprint check refuses another encoder's or
    another augmentation's features; the shape check refuses a predictor config that disagrees with
    the manifest's encoder and crop size.
    """
    store = FeatureStore(cache_path, spec).check_path()
    if not store.exists():
        raise StoreError(
            f"no feature store for this manifest under {cache_path}: expected fingerprint {store.digest[:16]} "
            f"at {store.url}; found {_stores_under(store) or 'no stores'}. Run `pipeline extract` with this "
            "manifest (and profile) first.")
    store.check()
    views = store.committed_views()
    if not views:
        raise StoreError(
            f"{store.url}: the store has no committed views (extraction never finished a part). "
            "Run `pipeline extract` with this manifest to fill it.")
    first = next(iter(views.values()))
    found_tokens, found_dim = store.array(first, "features").shape[1:]
    if (found_tokens, found_dim) != (tokens_per_frame, dim):
        raise StoreError(
            f"{store.url}: committed features are {found_tokens} tokens x {found_dim} wide per frame "
            f"({first.location}), but the predictor config expects {tokens_per_frame} tokens x {dim}. The manifest's "
            "encoder / crop.size and the predictor's config must agree: fix the predictor config, or run "
            "`pipeline extract` with the manifest the predictor is configured for.")
    return store


def _stores_under(store: FeatureStore) -> str:
    """The stores that do exist under the cache path, for the error message (older format versions named)."""
    found = []
    for url, attrs in store_specs(store.cache_path).items():
        version = attrs.get("format_version")
        old = "" if version == FORMAT_VERSION else f" (format version {version}, written by an older pipeline)"
        found.append(f"store {url.rsplit('/', 1)[-1]}{old}")
    return ", ".join(found)


# -- sampling ----------------------------------------------------------------------------------------


def sample_batch(index: WindowIndex, batch_size: int, seed: int, rank: int, batch_number: int) -> list[Window]:
    """The windows of global batch `batch_number` on `rank`: an episode uniformly, then `WindowIndex.draw`.

    Each (seed, rank, batch) has its own generator, so any batch can be drawn without drawing the
    ones before it: resuming needs only the batch number, and ranks never share a stream.
    """
    if not index.episodes:
        raise ValueError(f"no windows to sample: {index}")
    if min(seed, rank, batch_number) < 0:
        raise ValueError(f"seed {seed}, rank {rank}, batch_number {batch_number} must be >= 0")
    rng = np.random.default_rng([seed, rank, batch_number])
    return [index.draw(index.episodes[int(rng.integers(len(index.episodes)))], rng) for _ in range(batch_size)]


class BadViews:
    """The policy for damaged views (train.on_bad_data) and the views met damaged so far (thread-safe).

    "raise" re-raises the first `DamagedDataError`; "skip" remembers the view, names it in one warning
    line and has its window replaced by another drawn from a generator of its own, so no damaged byte
    is ever trained on and the rest of the batch is unchanged.
    """

    def __init__(self, policy: str = "raise", warn: Callable[[str], None] | None = None) -> None:
        if policy not in ("raise", "skip"):
            raise ValueError(f"on_bad_data {policy!r} must be raise or skip")
        self.policy, self.warn = policy, warn or (lambda _: None)
        self.found: dict[str, str] = {}  # view_id -> the error
        self._sound: dict[int, tuple[int, WindowIndex]] = {}  # id(index) -> (views found damaged, index without them)
        self._lock = threading.Lock()

    def __contains__(self, view: ViewRecord) -> bool:
        return view.view_id in self.found

    def sound_index(self, index: WindowIndex) -> WindowIndex:
        """`index` without the views known to be damaged; rebuilt only when another view is found damaged
        (a pass over every view: cheap once, not once per replaced window at DROID scale)."""
        with self._lock:
            known, sound = self._sound.get(id(index), (-1, index))
            if known != len(self.found):
                sound = index.without(set(self.found))
                self._sound[id(index)] = (len(self.found), sound)
            return sound

    def met(self, view: ViewRecord, err: DamagedDataError) -> None:
        """Raise (policy raise) or remember the damaged view (policy skip)."""
        if self.policy == "raise":
            raise err
        with self._lock:
            new = view.view_id not in self.found
            self.found[view.view_id] = str(err)
        if new:
            self.warn(f"skipping damaged view {view.view_id} (train.on_bad_data: skip): {err}")


def replacement_window(index: WindowIndex, seed: int, rank: int, batch_number: int, slot: int, attempt: int,
                       bad: BadViews) -> Window:
    """A window for slot `slot` of a batch whose drawn window was damaged: the release's rule over the views
    not known to be damaged, from a generator of (seed, rank, batch, slot, attempt) alone."""
    sound = bad.sound_index(index)
    if not sound.episodes:
        raise DamagedDataError("every view of the training split", "all are damaged: run `pipeline verify --repair`")
    rng = np.random.default_rng([seed, rank, batch_number, slot, attempt, 1])
    return sound.draw(sound.episodes[int(rng.integers(len(sound.episodes)))], rng)


def eval_windows(index: WindowIndex, T: int, max_windows: int, seed: int) -> list[Window]:
    """A fixed set of up to `max_windows` windows, spread evenly over episodes, then views, then time.

    Evaluation compares checkpoints, so it must see the same windows every time. Each episode offers
    its windows in the order (view 0, start 0), (view 1, start 0), ..., (view 0, start T), ... (non-
    overlapping starts; one phase per crop draw); episodes take turns in a seeded order, so a small `max_windows` still
    covers as many episodes as it can, without favouring the alphabetically first ones.
    """
    order = [index.episodes[i] for i in np.random.default_rng(seed).permutation(len(index.episodes))]
    queues = [deque(_episode_windows(index, e, T)) for e in order]
    out: list[Window] = []
    while len(out) < max_windows and any(queues):
        for q in queues:
            if q and len(out) < max_windows:
                out.append(q.popleft())
    return out


def _episode_windows(index: WindowIndex, episode: str, T: int) -> list[Window]:
    """One episode's non-overlapping windows, interleaved over its views. Of the views that differ only
    in phase (`views.phase: all`) only the first phase is used: the others' windows overlap its own,
    shifted by a raw frame or two, and would fill a small evaluation with near-copies."""
    first: dict[tuple[str, int, tuple[int, ...]], ViewRecord] = {}
    for v in sorted(index.views_of(episode), key=lambda v: v.phase):
        first.setdefault((v.camera, v.stride, tuple(v.box)), v)
    views = sorted(first.values(), key=lambda v: v.view_id)
    starts = [list(range(0, index.starts(v), T)) for v in views]
    return [Window(v, s[k]) for k in range(max(map(len, starts), default=0))
            for v, s in zip(views, starts, strict=True) if k < len(s)]


# -- reading -----------------------------------------------------------------------------------------

_ROWS: weakref.WeakKeyDictionary[FeatureStore, dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]] = (
    weakref.WeakKeyDictionary())
_ROWS_LOCK = threading.Lock()


def _view_rows(store: FeatureStore, view: ViewRecord) -> tuple[np.ndarray, np.ndarray]:
    """A view's states [F, 7] and actions [F, 7], read once per store and kept (56 bytes per frame).

    Keyed by where the rows are (attempt, first row): a re-extracted view lives elsewhere.
    """
    key = (view.location, view.start)
    with _ROWS_LOCK:
        cache = _ROWS.setdefault(store, {})
        hit = cache.get(key)
    if hit is None:  # two threads may both read a view once; harmless and cheaper than a lock around I/O
        hit = (np.asarray(store.read_rows(view, "states"), np.float32),
               np.asarray(store.read_rows(view, "actions"), np.float32))
        with _ROWS_LOCK:
            cache[key] = hit
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
    of an operation stalls the whole operation (measured on 2 cores: the cached step ~25% slower)."""
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
