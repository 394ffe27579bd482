"""Training windows from a real (tiny) store: split, index, sampling, exact reads, resume, refusals."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline.manifest import load_manifest
from pipeline.store.store import FeatureStore, StoreError, ViewRecord
from stages.cache.fingerprint import fingerprint_spec
from stages.extract.driver import extract
from stages.train.buffer_pool import BufferPool
from stages.train.loader import Batch, CachedSource, WindowLoader, load_windows, read_window
from stages.train.windows import (
    BadViews,
    Window,
    WindowIndex,
    eval_windows,
    open_training_store,
    sample_batch,
    split_of,
)

T = 4
TOKENS, DIM = 4, 64  # crop 32 / patch 16 -> 2 x 2 tokens; embed_dim 64
TINY = {
    "data": {"root": "data", "episodes": "episodes.txt", "fps": 4, "frames_per_clip": 8},  # store holds whole views
    "views": {"per_episode": 2, "seed": 0},
    "crop": {"size": 32, "scale": [0.5, 1.0], "ratio": [0.75, 1.35]},
    "encoder": {"checkpoint": None, "preset": None, "embed_dim": DIM, "depth": 1, "num_heads": 1, "mlp_ratio": 4.0,
                "precision": "fp32", "batch_size": 8, "device": "cpu"},
    "cache": {"path": "cache", "chunk_frames": 2, "shard_frames": 8},
    "extract": {"episodes_per_part": 2, "scheduler": "inline", "decode_threads": 1},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, synthetic_dataset: Path) -> tuple[str, dict, FeatureStore]:
    """(cache path, fingerprint spec, store) of the tiny profile extracted from the shared synthetic data."""
    folder = tmp_path_factory.mktemp("windows")
    profile = {**TINY, "data": {**TINY["data"], "root": str(synthetic_dataset)}}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump({"default_profile": "tiny", "profiles": {"tiny": profile}}))
    m = load_manifest(path)
    summary = extract(m, show_progress=False, echo=lambda _: None)
    assert summary.views_done == 6 and not summary.failed
    spec = fingerprint_spec(m)
    return m.cache.path, spec, FeatureStore(m.cache.path, spec).check()


@pytest.fixture(scope="module")
def store(built: tuple[str, dict, FeatureStore]) -> FeatureStore:
    return built[2]


@pytest.fixture(scope="module")
def index(store: FeatureStore) -> WindowIndex:
    return WindowIndex(store, split="all", frames_per_clip=T)


def key(windows: list[Window]) -> list[tuple[str, int]]:
    return [(w.view.view_id, w.start) for w in windows]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN-safe, and -0.0 != 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def assert_same_batch(a: Batch, b: Batch) -> None:
    assert a.batch_number == b.batch_number and key(a.windows) == key(b.windows)
    assert same_bits(a.features, b.features)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.states, b.states)


def fake_view(episode: str, k: int, length: int, phase: int = 0) -> ViewRecord:
    return ViewRecord(view_id=f"{episode}-{k}", episode_id=episode, episode_path=episode, camera="left_mp4_path",
                      serial="0", phase=phase, stride=4, video_fps=15.0, frame_hw=[48, 64], box=[0, 0, 48, 64],
                      source={}, part="p", start=0, length=length)


# -- split and index --------------------------------------------------------------------------------


def test_split_is_stable_respects_the_fraction_and_depends_on_the_salt() -> None:
    ids = [f"lab/success/2023-0{i % 9 + 1}-01/episode_{i}" for i in range(4000)]
    first = [split_of(e, 0.2) for e in ids]
    assert first == [split_of(e, 0.2) for e in ids]
    assert abs(first.count("heldout") / len(ids) - 0.2) < 0.03
    assert {split_of(e, 0.0) for e in ids} == {"train"} and {split_of(e, 1.0) for e in ids} == {"heldout"}
    salted = [split_of(e, 0.2, salt="v2") for e in ids]
    assert salted != first and abs(salted.count("heldout") / len(ids) - 0.2) < 0.03
    # a larger fraction only moves episodes into the held-out set, never out of it
    assert all(split_of(e, 0.3) == "heldout" for e, s in zip(ids, first, strict=True) if s == "heldout")
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_of("x", 1.5)


def test_index_groups_views_by_episode_and_drops_short_ones(store: FeatureStore, index: WindowIndex) -> None:
    views = list(store.committed_views().values())
    assert len(index.episodes) == 3 and index.episodes == sorted({v.episode_id for v in views})
    assert index.num_views == 6 and index.dropped_views == 0
    assert index.num_frames == sum(v.length for v in views)
    assert index.num_windows == sum(v.length - T for v in views)  # the release's range: a frame follows
    full = WindowIndex(store, split="all", frames_per_clip=T, window_range="full")
    assert full.num_windows == sum(v.length - T + 1 for v in views)
    for e in index.episodes:
        vs = index.views_of(e)
        assert [v.view_id for v in vs] == sorted(v.view_id for v in vs) and {v.episode_id for v in vs} == {e}
    longest = max(v.length for v in views)
    long_only = WindowIndex(store, split="all", frames_per_clip=longest - 1)
    assert long_only.dropped_views == sum(v.length < longest for v in views) > 0
    assert long_only.num_windows == sum(v.length == longest for v in views)
    assert WindowIndex(store, split="all", frames_per_clip=T, cameras=["right_mp4_path"]).episodes == []
    train = WindowIndex(store, split="train", frames_per_clip=T, heldout_fraction=0.5, salt="s")
    held = WindowIndex(store, split="heldout", frames_per_clip=T, heldout_fraction=0.5, salt="s")
    assert sorted(train.episodes + held.episodes) == index.episodes
    assert all(split_of(e, 0.5, "s") == "heldout" for e in held.episodes)


# -- sampling ---------------------------------------------------------------------------------------


def test_sampling_is_a_function_of_seed_rank_and_batch(index: WindowIndex) -> None:
    a = sample_batch(index, 16, seed=7, rank=0, batch_number=3)
    assert key(a) == key(sample_batch(index, 16, seed=7, rank=0, batch_number=3))
    assert key(a) != key(sample_batch(index, 16, seed=7, rank=1, batch_number=3))
    assert key(a) != key(sample_batch(index, 16, seed=7, rank=0, batch_number=4))
    assert key(a) != key(sample_batch(index, 16, seed=8, rank=0, batch_number=3))
    for w in a:
        assert w.start >= 0 and w.start + T <= w.view.length and w.view in index.views_of(w.view.episode_id)


def test_episodes_are_drawn_uniformly_whatever_their_views_and_lengths() -> None:
    views = [fake_view("a", 0, 6), *(fake_view("b", k, 200) for k in range(4)), fake_view("c", 0, 10),
             fake_view("c", 1, 300, phase=1)]
    idx = WindowIndex.from_views(views, split="all", frames_per_clip=T)
    drawn = [w for b in range(200) for w in sample_batch(idx, 64, seed=0, rank=0, batch_number=b)]
    episodes = Counter(w.view.episode_id for w in drawn)
    assert all(abs(episodes[e] / len(drawn) - 1 / 3) < 0.02 for e in "abc")
    in_c = Counter(w.view.view_id for w in drawn if w.view.episode_id == "c")  # raw starts: 6 + 296 in c
    assert abs(in_c["c-0"] / episodes["c"] - 6 / 302) < 0.01
    in_b = Counter(w.view.view_id for w in drawn if w.view.episode_id == "b")  # four crop draws of one grid
    assert all(abs(in_b[f"b-{k}"] / episodes["b"] - 0.25) < 0.03 for k in range(4))
    starts_a = Counter(w.start for w in drawn if w.view.episode_id == "a")
    assert set(starts_a) == {0, 1}  # length 6, T 4: the release's bound leaves a frame after the window


def test_real_store_episodes_drawn_about_equally(index: WindowIndex) -> None:
    drawn = [w for b in range(100) for w in sample_batch(index, 32, seed=1, rank=0, batch_number=b)]
    counts = Counter(w.view.episode_id for w in drawn)
    assert all(abs(counts[e] / len(drawn) - 1 / 3) < 0.03 for e in index.episodes)


# -- reading ----------------------------------------------------------------------------------------


def test_batches_have_the_shapes_dtypes_and_actions_of_their_windows(store: FeatureStore, index: WindowIndex) -> None:
    with WindowLoader(store, index, batch_size=8, frames_per_clip=T, seed=0, threads=2) as loader:
        batch = next(loader)
    assert batch.features.shape == (8, T, TOKENS, DIM) and batch.features.dtype == torch.bfloat16
    assert batch.actions.shape == (8, T - 1, 7) and batch.actions.dtype == torch.float32
    assert batch.states.shape == (8, T, 7) and batch.states.dtype == torch.float32
    assert batch.batch_number == 0 and len(batch.windows) == 8
    assert all(torch.isfinite(x).all() for x in (batch.features.float(), batch.actions, batch.states))
    torch.testing.assert_close(batch.actions[..., :3], batch.states[:, 1:, :3] - batch.states[:, :-1, :3],
                               atol=1e-6, rtol=0)
    for i, w in enumerate(batch.windows):
        assert w.start + T <= w.view.length
        states = store.read_rows(w.view, "states")[w.start : w.start + T]
        assert np.array_equal(batch.states[i].numpy(), states)


def test_loader_output_is_the_store_bit_for_bit(store: FeatureStore, index: WindowIndex) -> None:
    with WindowLoader(store, index, batch_size=6, frames_per_clip=T, seed=3, threads=3, prefetch=3) as loader:
        batches = [next(loader) for _ in range(4)]
    for batch in batches:
        assert isinstance(batch.wait_seconds, float) and batch.wait_seconds >= 0
        for i, w in enumerate(batch.windows):
            assert same_bits(batch.features[i], store.read_features(w.view, w.start, T))
            actions = store.read_rows(w.view, "actions")[w.start : w.start + T - 1]
            assert np.array_equal(batch.actions[i].numpy(), actions)
    every = [Window(v, s) for e in index.episodes for v in index.views_of(e) for s in range(v.length - T + 1)]
    # every start: all chunk and shard boundaries
    batch = load_windows(CachedSource(store, T, every[0].view), every, torch.device("cpu"))
    assert all(same_bits(batch.features[i], store.read_features(w.view, w.start, T)) for i, w in enumerate(every))
    with WindowLoader(store, index, batch_size=6, frames_per_clip=T, seed=3, threads=1, prefetch=0) as serial:
        for batch in batches:  # thread count and prefetch depth change nothing
            assert_same_batch(batch, next(serial))


def test_the_loader_reuses_batch_memory_only_once_nothing_holds_it(store: FeatureStore, index: WindowIndex) -> None:
    """Batches are read into kept buffers (fresh pages cost more than the read): a batch, a slice of one
    or a numpy array over one that the caller keeps is never overwritten, and dropped ones are reused."""
    with WindowLoader(store, index, batch_size=4, frames_per_clip=T, seed=7, threads=2, prefetch=1) as loader:
        held = [next(loader) for _ in range(10)]  # more than the pool keeps (prefetch + 3)
        slices = [b.features[1:3] for b in held]
        arrays = [b.states.numpy() for b in held]
        for _ in range(20):  # dropped at once: these reuse memory
            next(loader)
        pool = loader._alloc
        assert isinstance(pool, BufferPool) and pool.allocated <= 3 * (10 + 3)  # 3 tensors a batch; 93 if never reused
        steady = pool.allocated
        for _ in range(20):
            next(loader)
        assert pool.allocated == steady  # nothing new in the steady state
    with WindowLoader(store, index, batch_size=4, frames_per_clip=T, seed=7, threads=1, prefetch=0) as fresh:
        for b, part, states in zip(held, slices, arrays, strict=True):
            again = next(fresh)
            assert_same_batch(b, again)
            assert same_bits(part, again.features[1:3]) and np.array_equal(states, again.states.numpy())


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_reader_threads_yield_to_the_training_step(store: FeatureStore, index: WindowIndex) -> None:
    """Reads are prefetched; on a machine with no spare core they must not take one from the step."""
    seen: list[int] = []

    class Spy(CachedSource):
        def fill_many(self, buffers: Any, slots: Any) -> Any:
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return super().fill_many(buffers, slots)

    first = index.views_of(index.episodes[0])[0]
    with WindowLoader(Spy(store, T, first), index, batch_size=2, frames_per_clip=T, seed=0, threads=2) as loader:
        next(loader)
    base = os.getpriority(os.PRIO_PROCESS, threading.main_thread().native_id)
    assert seen and set(seen) == {min(base + 10, 19)}


def test_buffer_pool_counts_every_kind_of_reference() -> None:
    pool = BufferPool(keep=2)
    a = pool((3, 4), torch.float32)
    ptr = a.data_ptr()
    view, array = a[1:], a.numpy()
    del a
    assert pool((3, 4), torch.float32).data_ptr() != ptr  # a view still holds it
    del view
    assert pool((3, 4), torch.float32).data_ptr() != ptr  # a numpy array still holds it
    del array
    assert pool((3, 4), torch.float32).data_ptr() == ptr  # free: reused
    assert pool((3, 5), torch.float32).shape == (3, 5) and pool((3, 4), torch.int64).dtype == torch.int64


def test_read_window_refuses_a_window_outside_its_view(store: FeatureStore, index: WindowIndex) -> None:
    view = index.views_of(index.episodes[0])[0]
    features, actions, states = read_window(store, Window(view, view.length - T), T)
    assert features.shape == (T, TOKENS, DIM) and actions.shape == (T - 1, 7) and states.shape == (T, 7)
    with pytest.raises(StoreError, match="outside view"):
        read_window(store, Window(view, view.length - T + 1), T)


# -- resuming ---------------------------------------------------------------------------------------


def test_a_loader_started_at_batch_k_gives_batch_k_of_a_full_run(store: FeatureStore, index: WindowIndex) -> None:
    with WindowLoader(store, index, batch_size=4, frames_per_clip=T, seed=5, threads=2) as full:
        batches = [next(full) for _ in range(5)]
    with WindowLoader(store, index, batch_size=4, frames_per_clip=T, seed=5, start_batch=3) as resumed:
        assert_same_batch(next(resumed), batches[3])
        assert_same_batch(next(resumed), batches[4])
    with WindowLoader(store, index, batch_size=4, frames_per_clip=T, seed=5, rank=1) as other_rank:
        assert key(next(other_rank).windows) != key(batches[0].windows)


def test_state_dict_round_trip(store: FeatureStore, index: WindowIndex) -> None:
    with WindowLoader(store, index, batch_size=4, frames_per_clip=T, seed=9, rank=2) as a:
        next(a), next(a)
        sd = a.state_dict()
        assert sd == {"batch_number": 2, "seed": 9, "rank": 2}
        with WindowLoader(store, index, batch_size=4, frames_per_clip=T, seed=0, rank=2) as b:
            next(b)
            b.load_state_dict(sd)
            assert b.state_dict() == sd
            assert_same_batch(next(b), next(a))
            assert_same_batch(next(b), next(a))


def test_a_read_error_reaches_the_trainer_and_the_batch_can_be_retried(
        store: FeatureStore, index: WindowIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    with WindowLoader(store, index, batch_size=4, frames_per_clip=T, seed=4, prefetch=0) as reference:
        want = next(reference)

    def broken(*_: object, **__: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(store, "read_windows", broken)
    with WindowLoader(store, index, batch_size=4, frames_per_clip=T, seed=4) as loader:
        with pytest.raises(OSError, match="disk gone"):
            next(loader)
        assert loader.state_dict()["batch_number"] == 0
        monkeypatch.undo()
        assert_same_batch(next(loader), want)


def test_the_loader_replaces_damaged_windows_the_same_whatever_its_threads(
        built: tuple[str, dict, FeatureStore], index: WindowIndex, tmp_path: Path) -> None:
    """A flipped byte in every row of one view's features (skip policy): no batch holds a byte of it, every
    window delivered is what the store holds, and the replacements are the same with one reader thread as
    with three, each reading its share of a batch in one call."""
    cache, spec, clean = built
    shutil.copytree(cache, tmp_path / "cache")
    store = FeatureStore(str(tmp_path / "cache"), spec)
    victim = index.views_of(index.episodes[0])[0]
    row_bytes = TOKENS * DIM * 2
    for r in range(victim.start, victim.start + victim.length):  # shards of 8 rows in chunks of 2
        path = Path(store.root, victim.location, "features", "c", str(r // 8), "0", "0")
        raw = bytearray(path.read_bytes())
        raw[(r % 8) // 2 * (2 * row_bytes + 4) + (r % 2) * row_bytes + 10] ^= 0x20
        path.write_bytes(bytes(raw))
    runs = []
    for threads, prefetch in ((3, 2), (1, 0)):
        bad = BadViews("skip")
        with WindowLoader(FeatureStore(store.cache_path, spec), index, batch_size=6, frames_per_clip=T, seed=11,
                          threads=threads, prefetch=prefetch, bad=bad) as loader:
            runs.append(([next(loader) for _ in range(12)], bad))
    (batches, bad), (serial, serial_bad) = runs
    assert set(bad.found) == set(serial_bad.found) == {victim.view_id}
    for batch, again in zip(batches, serial, strict=True):
        assert_same_batch(batch, again)
        assert victim.view_id not in {w.view.view_id for w in batch.windows}
        for i, w in enumerate(batch.windows):
            assert same_bits(batch.features[i], clean.read_features(w.view, w.start, T))
    mixed = [Window(v, 0) for e in index.episodes for v in index.views_of(e)]  # the victim's first
    kept = load_windows(CachedSource(store, T, victim), mixed, torch.device("cpu"), BadViews("skip"))
    assert kept is not None and key(kept.windows) == key(mixed[1:])  # evaluation leaves it out, in order
    for i, w in enumerate(kept.windows):
        assert same_bits(kept.features[i], clean.read_features(w.view, w.start, T))
        assert torch.equal(kept.states[i], torch.from_numpy(clean.read_rows(w.view, "states")[:T]).float())


def test_loader_refuses_a_clip_length_other_than_the_index(store: FeatureStore, index: WindowIndex) -> None:
    with pytest.raises(ValueError, match="frames_per_clip"):
        WindowLoader(store, index, batch_size=2, frames_per_clip=T + 1, seed=0)


# -- opening the store ------------------------------------------------------------------------------


def test_open_training_store_accepts_the_matching_store(built: tuple[str, dict, FeatureStore]) -> None:
    cache, spec, store = built
    assert open_training_store(cache, spec, TOKENS, DIM).digest == store.digest


@pytest.mark.parametrize(("tokens", "dim", "found", "expected"), [
    (TOKENS * 4, DIM, f"{TOKENS} tokens x {DIM}", f"{TOKENS * 4} tokens x {DIM}"),
    (TOKENS, DIM * 2, f"{TOKENS} tokens x {DIM}", f"{TOKENS} tokens x {DIM * 2}"),
])
def test_open_training_store_refuses_other_feature_shapes(built: tuple[str, dict, FeatureStore], tokens: int,
                                                          dim: int, found: str, expected: str) -> None:
    cache, spec, _ = built
    with pytest.raises(StoreError) as err:
        open_training_store(cache, spec, tokens, dim)
    msg = str(err.value)
    assert f"are {found} wide" in msg and f"expects {expected}" in msg and "pipeline extract" in msg


def test_open_training_store_refuses_a_missing_store(built: tuple[str, dict, FeatureStore]) -> None:
    cache, spec, store = built
    other = {**spec, "encoder": {**spec["encoder"], "weights": "random:another"}}
    with pytest.raises(StoreError) as err:
        open_training_store(cache, other, TOKENS, DIM)
    msg = str(err.value)
    assert "no feature store" in msg and FeatureStore(cache, other).digest[:16] in msg
    assert store.digest[:16] in msg and "pipeline extract" in msg  # what is there instead


def test_open_training_store_refuses_a_store_without_commits(tmp_path: Path,
                                                            built: tuple[str, dict, FeatureStore]) -> None:
    _, spec, _ = built
    FeatureStore(str(tmp_path), spec).create()
    with pytest.raises(StoreError, match=r"no committed views.*pipeline extract"):
        open_training_store(str(tmp_path), spec, TOKENS, DIM)


# -- evaluation -------------------------------------------------------------------------------------


def test_eval_windows_are_fixed_spread_and_from_the_split(store: FeatureStore, index: WindowIndex) -> None:
    salt = next(s for s in map(str, range(100))  # a salt that leaves episodes on both sides
                if 0 < sum(split_of(e, 0.5, s) == "heldout" for e in index.episodes) < 3)
    held = WindowIndex(store, split="heldout", frames_per_clip=T, heldout_fraction=0.5, salt=salt)
    windows = eval_windows(held, T, max_windows=50, seed=0)
    assert key(windows) == key(eval_windows(held, T, max_windows=50, seed=0))
    assert {w.view.episode_id for w in windows} == set(held.episodes)
    assert all(split_of(w.view.episode_id, 0.5, salt) == "heldout" for w in windows)
    assert len(set(key(windows))) == len(windows) == sum(v.length // T for e in held.episodes
                                                         for v in held.views_of(e))
    everything = eval_windows(index, T, max_windows=5, seed=0)
    assert len(everything) == 5 and len({w.view.episode_id for w in everything[:3]}) == 3
    assert all(w.start == 0 for w in everything)  # first windows of views before any later start

    batch = load_windows(CachedSource(store, T, windows[0].view), windows[:5], torch.device("cpu"))
    assert batch.features.shape == (5, T, TOKENS, DIM) and batch.batch_number == -1
    for i, w in enumerate(windows[:5]):
        assert same_bits(batch.features[i], store.read_features(w.view, w.start, T))
