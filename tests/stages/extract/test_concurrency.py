"""Many extract processes on one store, killed at random moments: the store ends exactly as one clean run.

Two writers race on the same manifest and on an overlapping one (other parts holding the same episodes,
so the same views get committed twice); either may be SIGKILLed at any point. After a final clean
extract every planned view is committed, read by training exactly once, verify finds nothing, and the
features are bit-identical to a single clean run.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.manifest import Manifest, load_manifest
from pipeline.store.store import FeatureStore
from stages.cache.fingerprint import fingerprint_spec
from stages.cache.status import status_report
from stages.cache.verify import verify
from stages.extract.driver import extract
from stages.train.windows import WindowIndex

SCRIPT = """
import sys
from pipeline.manifest import load_manifest
from stages.extract.driver import extract
extract(load_manifest(sys.argv[1], None, sys.argv[2:]), show_progress=False, echo=lambda _: None)
"""
SMALL_BATCHES = ["encoder.batch_size=2"]  # many small writes: more moments to be killed in


def load(workdir: Path, *overrides: str) -> Manifest:
    return load_manifest(workdir / "manifest.yaml", None, [*SMALL_BATCHES, *overrides])


def writer(workdir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(workdir / "manifest.yaml"), *SMALL_BATCHES,
                             *overrides], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_concurrent_extracts_killed_at_random_end_bit_identical(workdir: Path, seed: int,
                                                                same_features: Callable[..., None]) -> None:
    rng = random.Random(seed)
    lines = (workdir / "data/episodes.txt").read_text().splitlines()
    (workdir / "data/overlap.txt").write_text("\n".join(lines[1:]))
    second = ["data.episodes=overlap.txt", "extract.episodes_per_part=2"]
    if seed == 2:
        second.append("extract.scheduler=local")  # one of them on a dask cluster
    procs = [writer(workdir, "extract.episodes_per_part=1"), writer(workdir, *second)]
    kills = {i: rng.uniform(2.0, 7.0) for i in range(2) if rng.random() < 0.8}
    t0 = time.time()
    while any(p.poll() is None for p in procs) and time.time() - t0 < 120:
        for i, p in enumerate(procs):
            if i in kills and p.poll() is None and time.time() - t0 > kills[i]:
                p.send_signal(signal.SIGKILL)
        time.sleep(0.01)
    for p in procs:
        p.wait(timeout=60)
    m = load(workdir)
    extract(m, show_progress=False, echo=lambda _: None)  # the final clean run
    report = status_report(m)
    assert (report.views_planned, report.views_committed, report.views_pending) == (6, 6, 0)
    store = FeatureStore(m.cache.path, fingerprint_spec(m))
    index = WindowIndex(store, split="all", frames_per_clip=m.data.frames_per_clip)
    assert index.num_views == 6  # each view read by training exactly once, however often it was committed
    assert verify(m, show_progress=False).sound
    fresh = load(workdir, f"cache.path={workdir}/fresh")
    extract(fresh, show_progress=False, echo=lambda _: None)
    same_features(store, FeatureStore(fresh.cache.path, fingerprint_spec(fresh)))


def test_a_dask_worker_killed_mid_task_is_retried_and_the_store_stays_consistent(
        workdir: Path, same_features: Callable[..., None]) -> None:
    import json

    import psutil

    overrides = ["extract.scheduler=local", "extract.workers=2", "extract.episodes_per_part=1"]
    m = load(workdir, *overrides)
    root = Path(FeatureStore(m.cache.path, fingerprint_spec(m)).root)
    sets = [x for o in (*SMALL_BATCHES, *overrides) for x in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "extract", "-m", str(workdir / "manifest.yaml"),
                             *sets, "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(root.glob("parts/*/*/features")):
        time.sleep(0.01)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if any("spawn_main" in part for part in p.cmdline())]
    assert workers and not list(root.glob("commits/*.json")), "kill while the first parts are being written"
    for w in workers:  # every worker dies in the middle of its task
        w.kill()
    out, _ = proc.communicate(timeout=240)
    summary = json.loads(out[out.index("{"):])
    assert proc.returncode == 0 and not summary["failed"]
    assert summary["parts_retried"] and summary["views_done"] == 6
    assert status_report(m).views_committed == 6 and verify(m, show_progress=False).sound
    inline = load(workdir, f"cache.path={workdir}/inline")
    extract(inline, show_progress=False, echo=lambda _: None)
    same_features(FeatureStore(m.cache.path, fingerprint_spec(m)), FeatureStore(inline.cache.path,
                                                                                fingerprint_spec(inline)))


# -- housekeeping beside a writer ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["inline", "local"])
def test_gc_at_no_grace_beside_an_extract_never_costs_a_view(workdir: Path, scheduler: str) -> None:
    """`pipeline gc --yes --grace-hours 0` over and over while an extract (inline, or on a dask cluster) writes:
    gc keeps every attempt of a claimed part, the extract commits everything, and each view once."""
    import json

    from stages.cache.gc import collect_garbage

    overrides = [f"extract.scheduler={scheduler}", "extract.episodes_per_part=1"]
    m = load(workdir, *overrides)
    sets = [x for o in (*SMALL_BATCHES, *overrides) for x in ("--set", o)]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "extract", "-m", str(workdir / "manifest.yaml"),
                             *sets, "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    root = Path(FeatureStore(m.cache.path, fingerprint_spec(m)).root)
    collections, removed_during_writes = 0, 0
    while proc.poll() is None:
        if (root / "zarr.json").exists():
            found = collect_garbage(m, yes=True, grace_hours=0.0).found
            collections += 1
            removed_during_writes += sum(g.removable and g.kind == "unreferenced-attempt" for g in found)
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=60)
    summary = json.loads(out[out.index("{"):])
    assert proc.returncode == 0 and not summary["failed"] and not summary["attempts_lost"], summary
    assert collections >= 3 and removed_during_writes == 0
    assert verify(m, show_progress=False).sound
    store = FeatureStore(m.cache.path, fingerprint_spec(m))
    ids = [v.view_id for c in store.commits() for v in c.views]
    assert len(ids) == len(set(ids)) == summary["views_done"] == 6  # every view committed, and once


def test_an_attempt_that_loses_files_before_its_commit_is_done_again_or_given_up_named(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer checks its attempt is whole before it commits: a shard removed under it (here just before the
    check) means no commit of that attempt -- the part is done again in a new attempt, or, lost every time,
    given up and named, with no failure record (its episodes are not at fault)."""
    from pipeline.store.store import FeatureStore as Store

    real = Store.missing_files
    losses = {"left": 1}

    def remove_a_shard_first(self: Store, part: str, attempt: str, files: dict) -> list[str]:
        if losses["left"]:
            losses["left"] -= 1
            shard = next(rel for rel in files if rel.startswith("features/c/"))
            Path(self.root, "parts", part, attempt, shard).unlink()
        return real(self, part, attempt, files)

    monkeypatch.setattr(Store, "missing_files", remove_a_shard_first)
    m = load(workdir, "extract.episodes_per_part=3")  # one part
    summary = extract(m, show_progress=False, echo=lambda _: None)
    assert [a["redone"] for a in summary.attempts_lost] == [True] and not summary.incomplete
    assert "features/c/0/0/0" in summary.attempts_lost[0]["why"] and summary.views_done == 6
    assert verify(m, show_progress=False).sound
    losses["left"] = 10**6  # every attempt loses a file
    again = load(workdir, "extract.episodes_per_part=3", f"cache.path={workdir}/again")
    summary = extract(again, show_progress=False, echo=lambda _: None)
    assert summary.incomplete and not summary.failed and [a["redone"] for a in summary.attempts_lost] == [True, False]
    assert "given up, not committed" in summary.format() and summary.views_done == 0
    store = FeatureStore(again.cache.path, fingerprint_spec(again))
    assert not store.commits() and not store.failures()
