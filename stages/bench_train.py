"""The training half of `pipeline bench`: cached vs online steps, the loader against raw reads, break-even.

All in one process, on one predictor, interleaved: each repeat runs `steps` cached steps, `steps` online
steps (decode + crop per clip in the loader's threads, the frozen encoder in the step, as the release)
and `steps` steps on one batch already on the device (the predictor alone). Figures are medians over the
repeats with their spread (min..max), so a slow moment of the machine shows instead of hiding.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pipeline.distributed import DistInfo
from pipeline.manifest import CacheSection, Manifest
from pipeline.records import CommitRecord, ViewRecord, new_attempt_id
from pipeline.shard_reader import COPY_KERNEL, KERNEL, MAPPED, NATIVE, ShardedRowReader
from pipeline.store import FeatureStore
from stages.fingerprint import predictor_config, vit_config
from stages.flops import released, step_model
from stages.optim import set_schedule
from stages.train import Featurize, autocast_for, build_training, cached_data, online_data, train_step
from stages.windows import Batch, CachedSource, WindowIndex, WindowLoader, batch_shares, sample_batch, split_index

FEATURE_BYTES_VITG = 256 * 1408 * 2  # one cached frame of the release: 256 tokens x 1408, 16 bits
PAIRS = 3  # cached / predictor-only run pairs per round (the step ratio's samples; each kind is cheap)


def spread(values: list[float]) -> dict[str, float]:
    """Median and range of repeated measurements."""
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def bench_training(m: Manifest, repeats: int, steps: int, gpu_tflops: float,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Training clips/s cached vs online vs predictor only, the loader vs raw reads, the FLOP model."""
    device = torch.device("cuda" if m.train.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if m.train.device == "auto" else m.train.device))
    info = DistInfo(0, 1, 0, device)
    pcfg = predictor_config(m)
    T, B = m.data.frames_per_clip, m.train.global_batch_size
    cached, online = cached_data(m, pcfg), online_data(m, info)
    index = split_index(m, cached.views, "all")
    first = index.views_of(index.episodes[0])[0]
    model, optimizer, scaler, loss_fn = build_training(m, pcfg, device)
    autocast = autocast_for(m, device)
    threads, prefetch = m.train.loader_threads, m.train.prefetch_batches
    loaders = {"cached": WindowLoader(cached.source(first), index, B, T, 0, threads=threads, prefetch=prefetch,
                                      device=device),
               "online": WindowLoader(online.source(first), index, B, T, 0, threads=threads, prefetch=prefetch,
                                      device=device)}
    featurize: dict[str, Featurize] = {"cached": cached.featurize, "online": online.featurize}
    in_memory = cached.featurize(next(loaders["cached"]))

    def run(kind: str) -> tuple[float, float]:
        """Seconds per step and the data-wait share over `steps` steps of one kind ("decode_only": the
        online loader alone, no training). The loaders' reads in flight finish first: the previous kind's
        prefetching (decoding, for the online loader) would otherwise run on the cores this kind is timed on."""
        for loader in loaders.values():
            loader.settle()
        wait, t0 = 0.0, time.perf_counter()
        for k in range(steps):
            if kind == "decode_only":
                next(loaders["online"])
                continue
            batch = in_memory if kind == "predictor_only" else featurize[kind](next(loaders[kind]))
            wait += batch.wait_seconds if kind != "predictor_only" else 0.0
            set_schedule(optimizer, k + 1, m.train)
            train_step(loss_fn, model, optimizer, scaler, batch, B, autocast, m.train.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return seconds / steps, wait / seconds

    for kind in ("cached", "online", "predictor_only"):
        run(kind)  # warm-up: allocations, the loaders' threads, first decodes
    times: dict[str, list[float]] = {"cached": [], "online": [], "predictor_only": [], "decode_only": []}
    waits: list[float] = []  # the cached runs' data-wait shares
    ratios: list[float] = []  # cached / predictor-only step time, per adjacent pair
    for r in range(repeats):
        for p in range(PAIRS):  # adjacent, in alternating order: the ratio of each pair sees the same machine
            order = ("cached", "predictor_only") if (r * PAIRS + p) % 2 == 0 else ("predictor_only", "cached")
            got = {kind: run(kind) for kind in order}
            for kind, (seconds, _) in got.items():
                times[kind].append(seconds)
            waits.append(got["cached"][1])
            ratios.append(got["cached"][0] / got["predictor_only"][0])
        for kind in ("online", "decode_only"):
            times[kind].append(run(kind)[0])
        echo(f"bench training: repeat {r + 1}/{repeats}: " + ", ".join(
            f"{kind} {B / t[-1]:.2f} clips/s" for kind, t in times.items()))
    for loader in loaders.values():
        loader.close()
    return _figures(m, times, waits, ratios, B, T, gpu_tflops, in_memory)


def _figures(m: Manifest, times: dict[str, list[float]], waits: list[float], ratios: list[float], B: int, T: int,
             gpu_tflops: float, batch: Batch) -> dict[str, Any]:
    """Clips/s, ratios, and what the FLOP model predicts for the same sizes on this machine.

    `step_vs_predictor_only` is the median over pairs of adjacent runs (cached step time / predictor-only
    step time within each pair): this VM's speed drifts over seconds, and a ratio of two medians taken
    apart moved between 0.89 and 1.20 over three runs of the same code.

    `speedup_vs_model` is the measured speedup over the FLOP model's (compute alone): at 1 or more the
    cached loop loses nothing to its own overheads; above 1 the online baseline is also slowed by decoding.
    The model "with decode" adds the online loader's own time per batch (decode + crop + resize in its
    threads, measured alone) as if it did not overlap the step at all -- an upper bound where decoding and
    computing share a few CPU cores; on a GPU node they overlap and the truth lies between the two.
    `speedup_vs_model_with_decode` is the measured speedup over the model with decode: as that model counts
    no overlap of decoding with the step, the measurement lies below it by what did overlap.
    The model's time unit is the predictor's achieved FLOP/s here (from the predictor-only steps); the
    encoder is assumed to run at the same rate.
    """
    med = {k: float(np.median(v)) for k, v in times.items()}
    model = step_model(vit_config(m), predictor_config(m), T, m.train.auto_steps)
    achieved = model.predictor_per_clip * B / med["predictor_only"]  # FLOP/s of the predictor here
    online_compute = model.online_per_clip * B / achieved  # seconds per step, by the model
    with_decode = (online_compute + med["decode_only"]) / med["predictor_only"]
    speedup = med["online"] / med["cached"]
    return {
        "training": {kind: {"clips_per_s": spread([B / t for t in v]), "step_seconds": spread(v)}
                     for kind, v in times.items()},
        "speedup_cached_vs_online": speedup,
        "step_vs_predictor_only": float(np.median(ratios)), "step_vs_predictor_only_spread": spread(ratios),
        "step_pairs": len(ratios),
        "data_wait_fraction": spread(waits),
        "flop_model": {"configured": model.to_dict(), "released_16_frames": released(16).to_dict(),
                       "released_8_frames": released(8).to_dict(),
                       "achieved_gflops_predictor": achieved / 1e9,
                       "predicted_speedup_without_decode": model.speedup,
                       "predicted_speedup_with_decode": with_decode},
        "speedup_vs_model": speedup / model.speedup, "speedup_vs_model_with_decode": speedup / with_decode,
        "batch": B, "frames_per_clip": T, "feature_dtype": str(batch.features.dtype).removeprefix("torch."),
        "gpu_tflops": gpu_tflops, "released_rate_needed": _released_rates(gpu_tflops),
    }


def _released_rates(tflops: float) -> dict[str, Any]:
    """The cached reads the released config needs to keep an accelerator busy, at `tflops` achieved."""
    out = {}
    for frames in (16, 8):
        clips = released(frames).clips_per_second(tflops)
        per_gpu = clips * frames * FEATURE_BYTES_VITG
        out[f"{frames}_frames"] = {"clips_per_s_per_gpu": clips, "MBps_per_gpu": per_gpu / 1e6,
                                   "MBps_per_8_gpu_node": 8 * per_gpu / 1e6}
    return out


def write_views(store: FeatureStore, feats: torch.Tensor, cache: CacheSection,
                views: int = 1) -> tuple[list[ViewRecord], float]:
    """All frames as `views` equal views of one committed attempt (bench stores); the committed records
    and the write seconds."""
    n, attempt = len(feats), new_attempt_id()
    os.sync()  # timed into the page cache with no writeback of earlier data underway (noisy on a small VM)
    t0 = time.perf_counter()
    writer = store.part_writer("bench", attempt, n, feats.shape[1], feats.shape[2], cache)
    writer.write(0, feats)
    writer.finish(np.zeros((n, 7)), np.zeros((n, 7)), np.arange(n))
    seconds = time.perf_counter() - t0
    per = n // views
    records = [ViewRecord(f"bench{k}", f"bench{k}", "bench", "bench", "0", 0, 1, 1.0, [1, 1], [0, 0, 1, 1], {},
                          "bench", attempt, k * per, per, writer.digests(k * per, per)) for k in range(views)]
    store.commit(CommitRecord(f"bench.{attempt}", "bench", attempt, n, time.time(), records))
    committed = store.committed_views()
    return [committed[r.view_id] for r in records], seconds


def bench_loader(m: Manifest, tmp: str, frames: int = 256, batches: int = 8, batch: int = 8,
                 T: int = 16, rounds: int = 9) -> dict[str, Any]:
    """The window loader at ViT-g sizes (batches of `batch` x `T` frames of 256 x 1408 bf16, random values,
    in a real store of `frames` rows, its buffers allocated in a warm-up) in the steady state of training --
    `batches` batches timed from the delivery of batch `prefetch` + 1 on, so that its prefetching is under
    way when the clock starts as when it stops -- against plain reads of exactly the same bytes: `preadv` of
    the windows' rows in their shard files into a batch-sized buffer, on as many threads as the loader has
    (no checks, no batching) -- the least any loader must do to put the bytes in memory with read calls --
    memcpy of the same bytes out of a map of each file, mapped for each round (`raw_mmap`: the least with
    a fresh map), and memcpy out of maps made once and populated before the rounds (`raw_kept_maps`: the least
    the loader's own way of reading must do -- it keeps its maps, see `shard_reader` -- the strict baseline).
    Also timed each round: the checked reads alone (`checked_read`: the loader's `read_windows` calls for the
    same windows, each thread its share of each batch into one batch buffer -- the loader's reads without
    its prefetching, reader priority and buffer pool, which splits the loader's gap to the raw reads into
    the checks' share and the loader's own), and the loader and the checked reads with the direct reader's
    Python executor (`*_python`: what runs where the native one is not built), so that the native reader's
    gain is measured in the same run, and the checked reads with read calls instead of the kept maps
    (`checked_read_preadv`: the maps' gain). `rounds` repeats of all eight, in an order that rotates every round (a
    kind timed right after another runs in its wake: measured here, up to ~10%); medians of per-round ratios.
    Also reported: the same reads into a small reused buffer (`raw_discard`: the page cache's copy rate into
    a cache-hot destination, which no loader can use), and plain single-thread zarr reads of the windows."""
    cache = dataclasses.replace(m.cache, compressor="none", dtype="bfloat16")
    store = FeatureStore(f"{tmp}/loader-store", {"bench": "loader"}).create()
    views, _ = write_views(store, torch.randn(frames, 256, 1408), cache, views=4)
    python = FeatureStore(store.cache_path, store.spec, native_reads=False)
    preadv = FeatureStore(store.cache_path, store.spec, mapped_reads=False)  # native, with read calls
    os.sync()  # written back now, not while the reads are timed
    threads, prefetch = m.train.loader_threads, m.train.prefetch_batches
    index = WindowIndex.from_views(views, split="all", frames_per_clip=T, window_range="full")  # short views
    lead = prefetch + 1  # batches the loader delivers before the clock starts
    windows = [w for b in range(lead, lead + batches) for w in sample_batch(index, batch, 0, 0, b)]
    ranges = _chunk_ranges(store, windows, T)
    mb, batch_bytes = len(windows) * T * FEATURE_BYTES_VITG / 1e6, batch * T * FEATURE_BYTES_VITG
    out = torch.ones(batch, T, 256, 1408, dtype=torch.bfloat16)  # [B, T, tokens, D]: touched before the clock
    loaders = {kind: WindowLoader(CachedSource(s, T, views[0]), index, batch, T, 0, threads=threads,
                                  prefetch=prefetch) for kind, s in (("loader", store), ("loader_python", python))}
    kinds: dict[str, Callable[[], float]] = {
        "loader": lambda: _loader_reads(loaders["loader"], lead, batches),
        "loader_python": lambda: _loader_reads(loaders["loader_python"], lead, batches),
        "raw": lambda: _raw_reads(ranges, batch_bytes, threads),
        "raw_mmap": lambda: _raw_reads(ranges, batch_bytes, threads, mapped=True),
        "raw_kept_maps": lambda: _raw_reads(ranges, batch_bytes, threads, kept=kept),
        "checked_read": lambda: _checked_reads(store, windows, T, out, threads),
        "checked_read_python": lambda: _checked_reads(python, windows, T, out, threads),
        "checked_read_preadv": lambda: _checked_reads(preadv, windows, T, out, threads)}
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    kept = {path: _map(path) for path, _, _ in ranges}
    try:
        kinds["raw_kept_maps"]()  # populates the kept maps, as the loader's warm-up populates its own
        for loader in loaders.values():
            for _ in range(prefetch + 3):  # warm-up: until its buffers are allocated (the steady state of training)
                next(loader)
            loader.settle()
        names = list(kinds)
        for r in range(rounds):
            for kind in names[r % len(names) :] + names[: r % len(names)]:
                rates[kind].append(mb / kinds[kind]())
    finally:
        for loader in loaders.values():
            loader.close()
        for m in kept.values():
            m.close()
    vs = {f"{a}_vs_{b}": [x / y for x, y in zip(rates[a], rates[b], strict=True)] for a, b in (
        ("loader", "raw"), ("loader", "raw_mmap"), ("loader", "raw_kept_maps"), ("checked_read", "raw_kept_maps"),
        ("checked_read", "raw"), ("loader_python", "raw"),
        ("loader", "loader_python"), ("checked_read", "checked_read_python"),
        ("checked_read", "checked_read_preadv"))}
    loader_mbps, zarr_mbps = float(np.median(rates["loader"])), mb / _zarr_reads(store, windows, T)
    return {**{f"{kind}_MBps": float(np.median(r)) for kind, r in rates.items()},
            **{key: float(np.median(v)) for key, v in vs.items()},
            **{f"{key}_spread": spread(v) for key, v in vs.items()},
            "native_reads": KERNEL if NATIVE else "", "mapped_reads": NATIVE and MAPPED,
            "copy_kernel": COPY_KERNEL if NATIVE and MAPPED else "", "raw_discard_MBps": mb / _discard_reads(ranges),
            "plain_zarr_MBps": zarr_mbps, "loader_vs_plain_zarr": loader_mbps / zarr_mbps, "loader_threads": threads,
            "rounds": rounds, "windows": len(windows), "window_MB": T * FEATURE_BYTES_VITG / 1e6}


def _loader_reads(loader: WindowLoader, lead: int, batches: int) -> float:
    """Seconds for `loader` to deliver batches lead..lead+batches-1 after delivering batches 0..lead-1 (the
    same windows every time): what it keeps up with in training, its reads ahead in flight at both ends of
    the clock. Its prefetched reads finish after the clock, not during the next kind's."""
    loader.load_state_dict({"batch_number": 0, "seed": 0, "rank": 0})
    for _ in range(lead):
        next(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - t0
    loader.settle()
    return seconds


def _zarr_reads(store: FeatureStore, windows: list[Any], T: int) -> float:
    """Seconds to read the windows with plain zarr, one thread (zarr checks the chunks' crc32c)."""
    arr = store.array(windows[0].view, "features")
    out = np.empty((T, *arr.shape[1:]), np.uint16)
    t0 = time.perf_counter()
    for w in windows:
        out[...] = arr[w.view.start + w.start : w.view.start + w.start + T]
    return time.perf_counter() - t0


def _checked_reads(store: FeatureStore, windows: list[Any], T: int, out: torch.Tensor, threads: int) -> float:
    """Seconds to read the windows as the loader's reader threads read them, without the loader: batch by
    batch into the rows of `out` [B, T, tokens, D], each of `threads` threads reading its share of every
    batch with one `FeatureStore.read_windows` call (checked)."""
    B = out.shape[0]
    shares = batch_shares(B, threads)

    def read(part: list[tuple[int, list[int]]]) -> None:
        for first, rows in part:
            store.read_windows(out, [(i, windows[first + i].view, windows[first + i].start) for i in rows], T)

    return _timed_on_threads(read, [(first, rows) for first in range(0, len(windows), B) for rows in shares],
                             threads)


def _timed_on_threads(read: Callable[[list[Any]], None], items: list[Any], threads: int) -> float:
    """Seconds for `threads` threads to run `read` on every threads-th item each (items k, k + threads, ...)."""
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(read, [items[k::threads] for k in range(threads)]))
        return time.perf_counter() - t0


def _chunk_ranges(store: FeatureStore, windows: list[Any], T: int) -> list[tuple[str, int, int]]:
    """(shard file, offset, bytes) of the windows' rows in their inner chunks (the direct reader's index
    lookup): exactly the bytes the loader delivers."""
    readers: dict[str, ShardedRowReader | None] = {}
    ranges: list[tuple[str, int, int]] = []
    for w in windows:
        if w.view.location not in readers:  # one per attempt: each shard's index is read once
            readers[w.view.location] = ShardedRowReader.for_array(f"{store.root}/{w.view.location}/features",
                                                                  store.array(w.view, "features"))
        reader = readers[w.view.location]
        assert reader is not None, "bench stores are local and uncompressed"
        a, b, chunk = w.view.start + w.start, w.view.start + w.start + T, reader.chunk_rows
        for c in range(a // chunk, (b - 1) // chunk + 1):
            path, offset, _ = reader.chunk_location(c)
            lo, hi = max(a, c * chunk), min(b, (c + 1) * chunk)
            ranges.append((path, offset + (lo - c * chunk) * reader.row_bytes, (hi - lo) * reader.row_bytes))
    return ranges


def _raw_reads(ranges: list[tuple[str, int, int]], batch_bytes: int, threads: int, mapped: bool = False,
               buffer: np.ndarray | None = None, kept: dict[str, mmap.mmap] | None = None) -> float:
    """Seconds to copy the ranges into consecutive places of a batch-sized buffer, on `threads` threads:
    `preadv`, or (mapped) memcpy out of a read-only map of each file, mapped once for all its ranges --
    afresh for this call, or the `kept` maps (made once and populated by earlier calls, as the loader's are).
    The buffer comes from torch's allocator, as the loader's do: shard chunks sit at offsets that are not
    64-byte aligned (4 crc32c bytes follow each), and the copy's speed depends on how source and
    destination align (up to 1.8x apart on this machine between a numpy and a torch buffer). `buffer`: one
    to read into instead (tests), of at least batch_bytes + the largest range."""
    if buffer is None:
        buffer = torch.ones(batch_bytes + max(size for _, _, size in ranges), dtype=torch.uint8).numpy()  # touched
    places = _places(ranges, batch_bytes)
    fds = {path: os.open(path, os.O_RDONLY) for path, _, _ in ranges} if kept is None else {}
    maps = {path: mmap.mmap(fd, 0, prot=mmap.PROT_READ) for path, fd in fds.items()} if mapped else {}
    sources = {path: np.frombuffer(m, np.uint8) for path, m in (maps if kept is None else kept).items()}

    def read(part: list[tuple[int, tuple[str, int, int]]]) -> None:
        for at, (path, offset, size) in part:
            if sources:
                np.copyto(buffer[at : at + size], sources[path][offset : offset + size])
            else:
                os.preadv(fds[path], [buffer[at : at + size]], offset)

    try:
        return _timed_on_threads(read, places, threads)
    finally:
        sources.clear()  # the maps' only views, before they close
        for m in maps.values():
            m.close()
        for fd in fds.values():
            os.close(fd)


def _map(path: str) -> mmap.mmap:
    """A read-only map of the whole file (the descriptor is closed at once; the map stays valid)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)


def _places(ranges: list[tuple[str, int, int]], batch_bytes: int) -> list[tuple[int, tuple[str, int, int]]]:
    """Where each range goes in the buffer: one after another, back to the start when a batch is full."""
    places, at = [], 0
    for r in ranges:
        at = 0 if at + r[2] > batch_bytes else at
        places.append((at, r))
        at += r[2]
    return places


def _discard_reads(ranges: list[tuple[str, int, int]]) -> float:
    """Seconds to `pread` the ranges on one thread into fresh bytes objects (the allocator hands back the
    same cache-hot block each time): the copy rate out of the page cache when the bytes go nowhere."""
    t0 = time.perf_counter()
    for path, offset, size in ranges:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.pread(fd, size, offset)
        finally:
            os.close(fd)
    return time.perf_counter() - t0
