"""`pipeline verify`: check every byte of a store against what was committed, and repair by redoing.

What is checked, for the manifest's store:
- every commit and failure record parses and matches the fingerprint (records that do not are problems);
- the arrays a commit names exist with the shapes and dtypes the fingerprint implies;
- every chunk of a view decodes (each carries a crc32c) and every row matches the commit's digests;
- no NaN/inf in features or states; states within physical bounds;
- actions agree with the states they were derived from; frame indices follow the view's grid.

Only committed records are looked at, so the work of an extract that is still running (attempts with
no record yet) is never reported as damage. `--repair` moves a broken commit record aside into
quarantine/ -- after writing a replacement record for its sound views, so those stay readable -- and the
next `pipeline extract` redoes exactly the views that were broken. No data is deleted (that is gc's).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.errors import DamagedDataError, UsageError
from pipeline.manifest import Manifest
from pipeline.progress import progress
from pipeline.report import human_bytes
from pipeline.store import INDEX_DIR, STATE_DIM, STORAGE_DTYPES, CommitRecord, FeatureStore, ViewRecord, finite_rows
from stages.cache.fingerprint import reader_spec
from stages.extract.droid import MAX_ABS_POSITION, actions_from_states

READ_ROWS = 64  # feature rows read at a time (bounded memory at ViT-g size: 46 MB in 16 bits)
ACTION_ATOL = 1e-4  # stored float32 actions vs. actions recomputed from the stored float32 states
Layout = dict[str, tuple[tuple[int, ...], str]]  # array name -> (shape after the row axis, storage dtype)


@dataclass
class Problem:
    """One thing wrong, with the file it is in."""

    where: str  # a file or record path (and the view and episode, where one is concerned)
    what: str
    commit: str | None = None  # the commit record it belongs to (None: a record that does not parse)
    view_id: str | None = None  # the view it concerns (None: the whole commit)


@dataclass
class VerifySummary:
    """What `pipeline verify` checked and found (and, with --repair, what it did about it)."""

    store: str
    sample: float
    seed: int
    commits: int = 0
    views_total: int = 0
    views_checked: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # what --repair did, one line each
    views_to_redo: int = 0
    unparsed_to_redo: int = 0  # quarantined records that did not parse: their views are redone, their count unknown

    @property
    def sound(self) -> bool:
        return not self.problems

    @property
    def mb_per_second(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e6

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "sound": self.sound, "MBps": self.mb_per_second}

    def _redo(self) -> str:
        """What the next extract redoes after a repair, in words."""
        what = [f"{self.views_to_redo} view(s)"] if self.views_to_redo else []
        if self.unparsed_to_redo:
            what.append(f"the views of {self.unparsed_to_redo} record(s) that did not parse (`pipeline status` "
                        "counts them as pending)")
        return " and ".join(what) or "the episodes whose failure records were removed"

    def format(self) -> str:
        lines = [f"problem  {p.where}: {p.what}" for p in self.problems]
        lines += [f"repair   {line}" for line in self.repaired]
        scope = "all" if self.sample >= 1 else f"a {self.sample:.0%} sample (seed {self.seed}) of the"
        lines.append(f"checked  {self.views_checked} of {self.views_total} views ({scope} views) in {self.commits} "
                     f"commits: {human_bytes(self.bytes_read)} in {self.seconds:.1f} s = {self.mb_per_second:.0f} MB/s")
        if self.sound:
            lines.append(f"sound    {self.store}: every byte checked is what was committed")
        elif self.repaired:
            lines.append(f"found    {len(self.problems)} problem(s); repaired: run `pipeline extract` to redo "
                         f"{self._redo()}")
        else:
            lines.append(f"found    {len(self.problems)} problem(s) in {self.store}: run `pipeline verify --repair`, "
                         "then `pipeline extract`")
        return "\n".join(lines)


def verify(m: Manifest, repair: bool = False, sample: float = 1.0, seed: int | None = None,
           show_progress: bool = True) -> VerifySummary:
    """Check the manifest's store (a random `sample` fraction of its views); with `repair`, quarantine."""
    if not 0 < sample <= 1:
        raise UsageError(f"--sample {sample} must be in (0, 1]")
    store = FeatureStore(m.cache.path, reader_spec(m)).check()
    seed = random.randrange(1 << 31) if seed is None else seed
    summary = VerifySummary(store.url, sample, seed)
    t0 = time.perf_counter()
    commits = store.commits()
    store.failures()  # parses every failure record: those that do not parse become problems below
    summary.problems += [Problem(path, why) for path, why in store.bad_records.items()]
    summary.commits = len(commits)
    summary.views_total = sum(len(c.views) for c in commits)
    chosen = _sample(commits, sample, seed)
    bar = progress("verify", "view", len(chosen), show_progress)
    layout = _expected_layout(store)
    for c in commits:
        whole = _check_arrays(store, c, layout)
        summary.problems += whole
        if whole:
            bar.update(sum((v.view_id, c.name) in chosen for v in c.views))
            continue
        for v in c.views:
            if (v.view_id, c.name) in chosen:
                summary.problems += _check_view(store, c, v, summary)
                summary.views_checked += 1
                bar.update(1)
    bar.close()
    summary.seconds = time.perf_counter() - t0
    if repair and summary.problems:
        _repair(store, commits, summary)
    return summary


def _sample(commits: list[CommitRecord], fraction: float, seed: int) -> set[tuple[str, str]]:
    """(view_id, commit) pairs to check: every copy of every view (a repair may make an older copy the one
    readers use), or a random fraction of them."""
    pairs = [(v.view_id, c.name) for c in commits for v in c.views]
    if fraction < 1 and pairs:
        pairs = random.Random(seed).sample(pairs, max(1, round(fraction * len(pairs))))
    return set(pairs)


def _expected_layout(store: FeatureStore) -> Layout:
    """name -> (shape after the row axis, storage dtype) that the store's fingerprint implies."""
    arch = store.spec["encoder"]["arch"]
    tokens = (arch["img_size"] // arch["patch_size"]) ** 2
    return {"features": ((tokens, arch["embed_dim"]), STORAGE_DTYPES[store.spec["features"]["dtype"]]),
            "states": ((STATE_DIM,), "float32"), "actions": ((STATE_DIM,), "float32"), "frame_index": ((), "int32")}


def _check_arrays(store: FeatureStore, c: CommitRecord, layout: Layout) -> list[Problem]:
    """The arrays the commit names exist, with its row count and the fingerprint's shapes and dtypes."""
    probe = c.views[0] if c.views else None
    problems = []
    for name, (shape, dtype) in layout.items():
        if probe is None:
            break
        try:
            arr = store.array(probe, name)
        except DamagedDataError as err:
            problems.append(Problem(err.where, err.what, c.name))
            continue
        want = (c.frames, *shape)
        if tuple(arr.shape) != want or str(arr.dtype) != dtype:
            problems.append(Problem(f"{store.url}/{probe.location}/{name}",
                                    f"shape {tuple(arr.shape)} {arr.dtype}, the commit and fingerprint say {want} "
                                    f"{dtype}", c.name))
    return problems


def _check_view(store: FeatureStore, c: CommitRecord, v: ViewRecord, summary: VerifySummary) -> list[Problem]:
    """Every check of one view; each failed check is one problem."""
    checks: list[Callable[[], int]] = [lambda: _check_features(store, v), lambda: _check_rows(store, v)]
    problems = []
    for check in checks:
        try:
            summary.bytes_read += check()
        except DamagedDataError as err:
            problems.append(Problem(err.where, err.what, c.name, v.view_id))
    return problems


def _check_features(store: FeatureStore, v: ViewRecord) -> int:
    """Read the view's features in blocks (crc32c of every chunk they touch and of every row), and look for
    NaN/inf."""
    nbytes = 0
    for start in range(0, v.length, READ_ROWS):
        n = min(READ_ROWS, v.length - start)
        rows = store.read_features(v, start, n, whole_chunks=True)  # [n, tokens, D]; every chunk it touches
        ok = finite_rows(rows)  # [n]
        if not ok.all():
            row = start + int(torch.argmin(ok.int()))
            raise DamagedDataError(store.where(v, "features"), f"non-finite (or absurdly large) values in row {row}")
        nbytes += rows.numel() * rows.element_size()
    return nbytes


def _check_rows(store: FeatureStore, v: ViewRecord) -> int:
    """States finite and plausible, actions derived from them, frame indices on the view's grid."""
    states = store.read_rows(v, "states")
    actions = store.read_rows(v, "actions")
    index = store.read_rows(v, "frame_index")
    if not np.isfinite(states).all() or np.abs(states[:, :3]).max() > MAX_ABS_POSITION:
        raise DamagedDataError(store.where(v, "states"), "non-finite or impossible end-effector states")
    want = actions_from_states(states.astype(np.float64))  # [F-1, 7]
    if not (np.isnan(actions[-1]).all() and np.allclose(actions[:-1], want, atol=ACTION_ATOL)):
        raise DamagedDataError(store.where(v, "actions"), "actions do not follow from the stored states")
    grid = v.phase + v.stride * np.arange(v.length)
    if not np.array_equal(index, grid):
        raise DamagedDataError(store.where(v, "frame_index"),
                               f"frame indices are not the view's grid (phase {v.phase}, stride {v.stride})")
    return states.nbytes + actions.nbytes + index.nbytes


def _repair(store: FeatureStore, commits: list[CommitRecord], summary: VerifySummary) -> None:
    """Quarantine broken records; write a replacement for the sound views of a partly broken commit first."""
    by_name = {c.name: c for c in commits}
    broken: dict[str, set[str | None]] = {}
    for p in summary.problems:
        if p.commit is None:
            name = p.where.rsplit("/", 1)[-1].removesuffix(".json")
            if "/commits/" in p.where and name not in by_name:  # a record that does not parse
                store.quarantine(name, p.what)
                summary.repaired.append(f"quarantined {p.where} (does not parse)")
                summary.unparsed_to_redo += 1
            elif "/failures/" in p.where:
                store.remove(p.where.split(store.root + "/", 1)[-1])
                summary.repaired.append(f"removed {p.where} (the episode is retried)")
            elif f"/{INDEX_DIR}/" in p.where:  # a cache of the records: the next open reads them one by one
                store.remove(p.where.split(store.root + "/", 1)[-1])
                summary.repaired.append(f"removed {p.where} (an index snapshot; `pipeline gc --yes` writes another)")
            continue
        broken.setdefault(p.commit, set()).add(p.view_id)
    for name, views in broken.items():
        c = by_name[name]
        bad = {v.view_id for v in c.views} if None in views else views
        good = [v for v in c.views if v.view_id not in bad]
        if good:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            replacement = dataclasses.replace(c, name=f"{c.part}.{c.attempt}.r{stamp}", views=good, repaired_from=name)
            store.commit(replacement)
            summary.repaired.append(f"wrote commits/{replacement.name}.json with the {len(good)} sound view(s)")
        store.quarantine(name, "; ".join(p.what for p in summary.problems if p.commit == name)[:2000])
        summary.repaired.append(f"quarantined commits/{name}.json ({len(bad)} broken view(s) to redo)")
        summary.views_to_redo += len(bad)
