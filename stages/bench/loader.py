"""The loader half of `pipeline bench`: the training loader at ViT-g sizes, from the page cache and from disk.

At the released scale the cache is terabytes, so training reads it from disk, a parallel file system or
object storage, not from the page cache; one GPU at full speed needs about 1 GB/s of features. So the loader
is measured in three regimes, on a real store of random ViT-g rows (256 tokens x 1408, bf16), with the
training loader as configured (reader threads, prefetch, every byte checked):

- warm: the shard files in the page cache -- what the loader's own work costs (target: 3 GB/s, three times
  what one H100 needs);
- cold: every shard file dropped from the page cache (`posix_fadvise(DONTNEED)`, after a flush) before the
  round, against a plain sequential read of the same files after the same drop, in the same round (target:
  0.8 of it). The store is larger than a round reads, so a round reads few bytes twice;
- the same loader with every window read through zarr-python (`plain zarr`): what the direct reader buys;
- object storage: the same loader from the S3-protocol server the tests use (moto's, on loopback), where it
  is installed (`pip install -e '.[test]'`): a rate through s3fs and zarr, not a prediction for a real one.

Rounds rotate the order of the kinds (a kind timed right after another runs in its wake); medians and
ranges over rounds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from pipeline.store import CommitRecord, FeatureStore, ShardedRowReader, StoreSettings, ViewRecord, new_attempt_id
from stages.train.loader import CachedSource, WindowLoader
from stages.train.windows import WindowIndex

FEATURE_BYTES_VITG = 256 * 1408 * 2  # one cached frame of the release: 256 tokens x 1408, 16 bits
BLOCK_FRAMES = 64  # distinct random rows written again and again (fills a large store without the memory)


def spread(values: list[float]) -> dict[str, float]:
    """Median and range of repeated measurements."""
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def write_views(store: FeatureStore, feats: torch.Tensor, cache: StoreSettings, views: int = 1,
                frames: int | None = None) -> tuple[list[ViewRecord], float]:
    """`frames` rows (default: len(feats); `feats` repeated as often as it takes) as `views` equal views of one
    committed attempt (bench stores); the committed records and the write seconds."""
    n, attempt = frames or len(feats), new_attempt_id()
    os.sync()  # timed into the page cache with no writeback of earlier data underway (noisy on a small VM)
    t0 = time.perf_counter()
    writer = store.part_writer("bench", attempt, n, feats.shape[1], feats.shape[2], cache)
    for at in range(0, n, len(feats)):
        writer.write(at, feats[: n - at])
    writer.finish(np.zeros((n, 7)), np.zeros((n, 7)), np.arange(n))
    seconds = time.perf_counter() - t0
    per = n // views
    records = [ViewRecord(f"bench{k}", f"bench{k}", "bench", "bench", "0", 0, 1, 1.0, [1, 1], [0, 0, 1, 1], {},
                          "bench", attempt, k * per, per, writer.digests(k * per, per)) for k in range(views)]
    store.commit(CommitRecord(f"bench.{attempt}", "bench", attempt, n, time.time(), records))
    committed = store.committed_views()
    return [committed[r.view_id] for r in records], seconds


class _ZarrOnly(FeatureStore):
    """The store with its direct shard reader off: every window read through zarr-python (then checked row by
    row against the commit record, as the direct reader checks them)."""

    def _fast_reader(self, view: ViewRecord, arr: Any) -> ShardedRowReader | None:
        return None


def bench_loader(cache: StoreSettings, tmp: str, threads: int, prefetch: int, frames: int = 2048, batches: int = 8,
                 batch: int = 8, T: int = 16, rounds: int = 5) -> dict[str, Any]:
    """The loader's MB/s warm and cold against a sequential read of the same files, and through zarr-python,
    on a store of `frames` ViT-g rows; `rounds` rounds of `batches` batches of `batch` x `T` frames."""
    cache = dataclasses.replace(cache, compressor="none", dtype="bfloat16")
    store = FeatureStore(f"{tmp}/loader-store", {"bench": "loader"}).create()
    views, _ = write_views(store, torch.randn(BLOCK_FRAMES, 256, 1408), cache, views=max(1, min(8, frames // (4 * T))),
                           frames=frames)
    os.sync()  # written back now: a dirty page cannot be dropped, and writeback must not overlap the timing
    files = _shard_files(store.root)
    index = WindowIndex.from_views(views, split="all", frames_per_clip=T, window_range="full")
    mb = batches * batch * T * FEATURE_BYTES_VITG / 1e6
    zarr_store = _ZarrOnly(store.cache_path, store.spec)
    loaders = {name: WindowLoader(CachedSource(s, T, views[0]), index, batch, T, 0, threads=threads,
                                  prefetch=prefetch) for name, s in (("loader", store), ("zarr", zarr_store))}
    kinds: dict[str, Callable[[], float]] = {
        "warm": lambda: mb / _loader_seconds(loaders["loader"], batches),
        "cold": lambda: mb / _loader_seconds(loaders["loader"], batches, before=lambda: drop_from_cache(files)),
        "sequential_cold": lambda: _sequential_mbps(files),
        "zarr_warm": lambda: mb / _loader_seconds(loaders["zarr"], batches)}
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    try:
        for loader in loaders.values():
            _loader_seconds(loader, prefetch + 3)  # warm-up: its buffers allocated (the steady state of training)
        names = list(kinds)
        for r in range(rounds):
            for kind in names[r % len(names) :] + names[: r % len(names)]:
                rates[kind].append(kinds[kind]())
    finally:
        for loader in loaders.values():
            loader.close()
    cold_vs_seq = [c / s for c, s in zip(rates["cold"], rates["sequential_cold"], strict=True)]
    warm_vs_zarr = [w / z for w, z in zip(rates["warm"], rates["zarr_warm"], strict=True)]
    return {**{f"{kind}_MBps": spread(r) for kind, r in rates.items()},
            "cold_vs_sequential": spread(cold_vs_seq), "warm_vs_zarr": spread(warm_vs_zarr),
            "threads": threads, "prefetch": prefetch, "rounds": rounds, "store_MB": frames * FEATURE_BYTES_VITG / 1e6,
            "round_MB": mb, "window_MB": T * FEATURE_BYTES_VITG / 1e6}


def _loader_seconds(loader: WindowLoader, batches: int, before: Callable[[], None] | None = None) -> float:
    """Seconds for `loader` to deliver its batches 0..batches-1 (the same windows every time), its prefetched
    reads under way from the first; they finish after the clock, not during the next kind's."""
    loader.load_state_dict({"batch_number": 0, "seed": 0, "rank": 0})
    if before is not None:
        before()
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - t0
    loader.settle()
    return seconds


def _shard_files(root: str) -> list[str]:
    """Every feature shard file of a store (the bytes the loader reads)."""
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
                  if f"{os.sep}features{os.sep}c{os.sep}" in os.path.join(folder, ""))


def drop_from_cache(paths: list[str]) -> None:
    """Drop the files' pages from the page cache (they are written back already: see `bench_loader`)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _sequential_mbps(paths: list[str], block: int = 8 << 20) -> float:
    """MB/s of a plain sequential read of the files, one after another on one thread, after dropping them
    from the page cache: what the disk gives a reader that asks for everything in order."""
    drop_from_cache(paths)
    buffer = bytearray(block)
    total, t0 = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total / 1e6 / (time.perf_counter() - t0)


# -- object storage -----------------------------------------------------------------------------------------


def bench_s3_loader(cache: StoreSettings, threads: int, prefetch: int, frames: int = 128, batches: int = 4,
                    batch: int = 8, T: int = 16) -> dict[str, Any]:
    """The loader's MB/s from moto's S3 server on loopback (skipped, said why, where moto is not installed)."""
    try:
        with s3_server() as endpoint:
            return _s3_loader(cache, endpoint, threads, prefetch, frames, batches, batch, T)
    except ImportError as err:
        return {"skipped": f"{err.name} is not installed (pip install -e '.[test]')"}


def _s3_loader(cache: StoreSettings, endpoint: str, threads: int, prefetch: int, frames: int, batches: int,
               batch: int, T: int) -> dict[str, Any]:
    url = f"s3://bench-{int(time.time())}/cache"
    store = FeatureStore(url, {"bench": "s3-loader"})
    store.fs.mkdir(url.split("/")[2])
    store.create()
    cache = dataclasses.replace(cache, compressor="none", dtype="bfloat16")
    views, _ = write_views(store, torch.randn(BLOCK_FRAMES, 256, 1408), cache, views=4, frames=frames)
    index = WindowIndex.from_views(views, split="all", frames_per_clip=T, window_range="full")
    with WindowLoader(CachedSource(store, T, views[0]), index, batch, T, 0, threads=threads,
                      prefetch=prefetch) as loader:
        _loader_seconds(loader, 2)
        seconds = _loader_seconds(loader, batches)
    return {"loader_MBps": batches * batch * T * FEATURE_BYTES_VITG / 1e6 / seconds, "endpoint": endpoint,
            "threads": threads, "store_MB": frames * FEATURE_BYTES_VITG / 1e6}


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port, with the AWS variables a cluster job would set, for this block."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    fresh_s3_clients()
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        fresh_s3_clients()


def fresh_s3_clients() -> None:
    """Close the S3 clients fsspec keeps for reuse, so that the next ones read the AWS variables as they are now
    (an endpoint changed), and none is left to be closed at exit."""
    import s3fs

    for fs in list(s3fs.S3FileSystem._cache.values()):
        if getattr(fs, "_s3", None) is not None:
            s3fs.S3FileSystem.close_session(fs.loop, fs._s3)
    s3fs.S3FileSystem.clear_instance_cache()
