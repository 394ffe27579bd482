"""Hostile and unlucky files in a store: each is one clear error naming the file, never a hang, and only bytes
that are not what was committed count as damage -- an error of the machine is an I/O error, never a skipped view."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.errors import DamagedDataError
from pipeline.store.settings import MAX_SHARD_FRAMES
from pipeline.store.store import FeatureStore
from tests.pipeline.store.test_store import _shard_file, view, write_attempt


def _finishes(call: Callable[[], object], seconds: float = 20.0) -> BaseException | None:
    """Run `call` in a thread; it must finish (a hang fails the test, it does not stall the suite). Returns
    what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as err:  # handed to the test
            raised.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the read hangs"
    return raised[0] if raised else None


def _store(tmp_path: Path, compressor: str = "none") -> tuple[FeatureStore, object]:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    write_attempt(store, "p", torch.randn(8, 2, 4), [view("v", 0, 8)], compressor=compressor)
    return store, store.committed_views()["v"]


def _unblock_fifo(path: Path) -> None:
    """Open the FIFO's write end (non-blocking, once a reader would be there) so that a reader that did open
    it without O_NONBLOCK cannot keep the test process waiting after the assertion failed."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("compressor", ["none", "zstd"])  # the direct reader, and zarr's path
@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_a_shard_path_that_is_not_a_file_is_damage_named_never_a_hang(tmp_path: Path, kind: str,
                                                                      compressor: str) -> None:
    store, rec = _store(tmp_path, compressor)
    path = _shard_file(store, rec, "features", 1)
    path.unlink()
    {"fifo": os.mkfifo, "folder": os.mkdir, "device": lambda p: os.symlink("/dev/zero", p)}[kind](path)
    try:
        err = _finishes(lambda: FeatureStore(str(tmp_path), {"x": 1}).read_features(rec, 4, 4))
    finally:
        if kind == "fifo":
            _unblock_fifo(path)
    what = {"fifo": "a FIFO", "folder": "a folder", "device": "a character device"}[kind]
    assert isinstance(err, DamagedDataError), err
    assert "features/c/1/0/0" in str(err) and what in str(err)
    fresh = FeatureStore(str(tmp_path), {"x": 1})
    assert fresh.read_features(rec, 0, 4).shape == (4, 2, 4)  # the other shard still reads


def test_a_fifo_for_an_arrays_metadata_or_a_small_array_is_damage_named(tmp_path: Path) -> None:
    store, rec = _store(tmp_path)
    meta = Path(store.root, rec.location, "features", "zarr.json")
    meta.unlink()
    os.mkfifo(meta)
    states = _shard_file(store, rec, "states")
    states.unlink()
    os.mkfifo(states)
    try:
        fresh = FeatureStore(str(tmp_path), {"x": 1})
        err = _finishes(lambda: fresh.read_features(rec, 0, 4))
        assert isinstance(err, DamagedDataError) and "zarr.json (view" in str(err) and "is a FIFO" in str(err), err
        err = _finishes(lambda: fresh.read_rows(rec, "states"))
        assert isinstance(err, DamagedDataError) and "states" in str(err) and "FIFO" in str(err), err
    finally:
        _unblock_fifo(meta)
        _unblock_fifo(states)


def test_a_symlink_loop_at_a_shard_path_is_an_io_error_naming_it(tmp_path: Path) -> None:
    store, rec = _store(tmp_path)
    path = _shard_file(store, rec, "features", 0)
    path.unlink()
    os.symlink(path, path)  # points at itself
    err = _finishes(lambda: FeatureStore(str(tmp_path), {"x": 1}).read_features(rec, 0, 4))
    assert isinstance(err, OSError) and err.errno == errno.ELOOP and str(path) in str(err.filename), err


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_shard_geometry_that_disagrees_with_the_layout_is_damage_named_at_once(tmp_path: Path,
                                                                             compressor: str) -> None:
    """A zarr.json declaring 2^20-row shards (over a small sparse file) would make a reader load a 16 MB index
    per shard; declared geometry outside the store's bounds, or rows of another shape, is damage, named."""
    store, rec = _store(tmp_path, compressor)
    meta = Path(store.root, rec.location, "features", "zarr.json")
    clean = json.loads(meta.read_text())

    def declare(change: Callable[[dict], None]) -> BaseException | None:
        doc = json.loads(json.dumps(clean))
        change(doc)
        meta.write_text(json.dumps(doc))
        t0 = time.perf_counter()
        err = _finishes(lambda: FeatureStore(str(tmp_path), {"x": 1}).read_features(rec, 0, 4))
        assert time.perf_counter() - t0 < 5
        return err

    def huge_shards(doc: dict) -> None:
        doc["shape"][0] = 1 << 20
        doc["chunk_grid"]["configuration"]["chunk_shape"][0] = 1 << 20

    for change in (huge_shards, lambda d: d["shape"].__setitem__(0, 4)):
        err = declare(change)
        assert isinstance(err, DamagedDataError) and "zarr.json declares" in str(err), err
    meta.write_text(json.dumps(clean))
    layout = FeatureStore(str(tmp_path), {"x": 1})
    layout.layout["features"] = ((2, 8), "uint16")  # a fingerprint whose rows are wider than those stored
    with pytest.raises(DamagedDataError, match=r"declares \(2, 4\) uint16 rows, the fingerprint says \(2, 8\)"):
        layout.read_features(rec, 0, 4)
    assert MAX_SHARD_FRAMES < 1 << 20


# -- errors of the machine are not damage ------------------------------------------------------------------

_LOW_LIMIT = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from pipeline.store.store import FeatureStore
from pipeline.errors import DamagedDataError
store = FeatureStore({url!r}, {{"x": 1}})
views = list(store.committed_views().values())
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
out = torch.empty(1, 2, 2, 4, dtype=torch.bfloat16)
for k in range(1000):  # many views' reads under a low limit: descriptors are not kept
    v = views[k % len(views)]
    assert store.read_windows(out, [(0, v, k % 7)], 2) == [None]
held = []
try:
    while True:
        held.append(open("/dev/null"))
except OSError:
    pass
try:
    store.read_windows(out, [(0, views[0], 0)], 2)
except DamagedDataError as err:
    print("DAMAGE", err)
except OSError as err:
    print("OSERROR", err.errno, err.filename)
"""


def test_many_views_under_a_low_descriptor_limit_and_emfile_is_an_io_error(tmp_path: Path) -> None:
    store = FeatureStore(str(tmp_path), {"x": 1}).create()
    for k in range(20):
        write_attempt(store, f"p{k}", torch.randn(8, 2, 4), [view(f"v{k}", 0, 8, episode=f"e{k}")])
    root = str(Path(__file__).resolve().parents[3])
    run = subprocess.run([sys.executable, "-c", _LOW_LIMIT.format(root=root, url=str(tmp_path))],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"OSERROR {errno.EMFILE} {store.root}/"), run.stdout


def test_an_io_error_in_the_loader_stops_training_and_never_skips_the_view(tmp_path: Path) -> None:
    """train.on_bad_data: skip leaves damaged views out; an error of the machine (here ELOOP, as EIO or EMFILE
    would be) says nothing about the view: the loader raises it, naming the file, and skips nothing."""
    from stages.train.loader import WindowLoader
    from stages.train.windows import BadViews, WindowIndex

    store, rec = _store(tmp_path)
    path = _shard_file(store, rec, "features", 1)
    path.unlink()
    os.symlink(path, path)
    index = WindowIndex.from_views([rec], split="all", frames_per_clip=3)
    bad = BadViews("skip")
    with WindowLoader(FeatureStore(str(tmp_path), {"x": 1}), index, batch_size=8, frames_per_clip=3, seed=0,
                      threads=2, bad=bad) as loader, pytest.raises(OSError) as err:
        next(loader)
    assert err.value.errno == errno.ELOOP and err.value.filename == str(path) and not bad.found


def test_the_manifest_bounds_shards_as_the_store_does(tmp_path: Path) -> None:
    from pipeline.manifest import ManifestError, load_manifest
    from tests.conftest import write_manifest

    path = write_manifest(tmp_path, cache={"chunk_frames": 4, "shard_frames": MAX_SHARD_FRAMES + 4})
    with pytest.raises(ManifestError, match=f"cache.shard_frames.*at most {MAX_SHARD_FRAMES}"):
        load_manifest(path)
