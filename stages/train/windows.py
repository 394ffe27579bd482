"""Training windows: which views a run may use, and how its windows are drawn (their reading is `loader.py`).

Stage two never decodes video, so its data is only this: a window of T consecutive frames inside one
committed view (a view: one episode, camera, temporal phase and crop box, encoded frame by frame). Three
properties of the draw decide whether a run can be trusted and resumed, so they live here:

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
to the stored phases (docs/release.md, "One training sample").
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import DamagedDataError, StoreError
from pipeline.manifest import DataSection, TrainSection
from pipeline.store import FORMAT_VERSION, FeatureStore, ViewRecord, ViewTable, store_specs
from stages.cache.sampling import manifest_views

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


def split_index(data: DataSection, cfg: TrainSection, views: ViewTable, split: str) -> WindowIndex:
    """The windows of `split` as a run sees them: its cameras and stride, its split rule (train.heldout_fraction,
    train.split_salt) and window range. Training and `pipeline eval` both call it, so a checkpoint evaluated
    later is evaluated on the windows its run used."""
    return WindowIndex.from_table(views, manifest_views(views, data), split=split,
                                  frames_per_clip=data.frames_per_clip, cameras=data.cameras,
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


