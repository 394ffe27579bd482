"""The training half of `pipeline bench`: cached vs online steps, the loader against raw reads, break-even.

All in one process, on one predictor, interleaved: each repeat runs `steps` cached steps, `steps` online
steps (decode + crop per clip in the loader's threads, the frozen encoder in the step, as the release)
and `steps` steps on one batch already on the device (the predictor alone). Figures are medians over the
repeats with their spread (min..max), so a slow moment of the machine shows instead of hiding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.distributed import DistInfo
from pipeline.manifest import Manifest
from pipeline.part_writer import TORCH_DTYPES
from stages.fingerprint import predictor_config, vit_config
from stages.flops import released, step_model
from stages.optim import set_schedule
from stages.train import Featurize, autocast_for, build_training, cached_data, online_data, train_step
from stages.windows import Batch, CachedSource, WindowIndex, WindowLoader, sample_batch

FEATURE_BYTES_VITG = 256 * 1408 * 2  # one cached frame of the release: 256 tokens x 1408, 16 bits


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
    index = WindowIndex.from_views(cached.views, split="all", frames_per_clip=T, camera=m.data.camera)
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
        online loader alone, no training)."""
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
    waits: list[float] = []
    for r in range(repeats):
        for kind in times:
            seconds, wait = run(kind)
            times[kind].append(seconds)
            if kind == "cached":
                waits.append(wait)
        echo(f"bench training: repeat {r + 1}/{repeats}: " + ", ".join(
            f"{kind} {B / t[-1]:.2f} clips/s" for kind, t in times.items()))
    for loader in loaders.values():
        loader.close()
    return _figures(m, times, waits, B, T, gpu_tflops, in_memory)


def _figures(m: Manifest, times: dict[str, list[float]], waits: list[float], B: int, T: int, gpu_tflops: float,
             batch: Batch) -> dict[str, Any]:
    """Clips/s, ratios, and what the FLOP model predicts for the same sizes on this machine.

    The model's time unit is the predictor's achieved FLOP/s here (from the predictor-only steps); the
    encoder is assumed to run at the same rate. "With decode" adds the online loader's own time per batch
    (decode + crop + resize in its threads, measured alone) as if it did not overlap the step: on a few
    CPU cores decoding and computing share the same cores.
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
        "step_vs_predictor_only": med["cached"] / med["predictor_only"],
        "data_wait_fraction": spread(waits),
        "flop_model": {"configured": model.to_dict(), "released_16_frames": released(16).to_dict(),
                       "released_8_frames": released(8).to_dict(),
                       "achieved_gflops_predictor": achieved / 1e9,
                       "predicted_speedup_without_decode": model.speedup,
                       "predicted_speedup_with_decode": with_decode},
        "speedup_vs_model": speedup / with_decode,
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


def bench_loader(m: Manifest, batches: int) -> dict[str, Any]:
    """The window loader alone (its threads, checked reads, assembly) against raw reads of the shard files
    its windows lie in, and against plain single-thread zarr reads of the same windows."""
    pcfg = predictor_config(m)
    cached = cached_data(m, pcfg)
    T, B = m.data.frames_per_clip, m.train.global_batch_size
    index = WindowIndex.from_views(cached.views, split="all", frames_per_clip=T, camera=m.data.camera)
    source = cached.source(index.views_of(index.episodes[0])[0])
    assert isinstance(source, CachedSource)
    frame_bytes = source.tokens * source.dim * torch.empty((), dtype=source.dtype).element_size()
    windows = [w for b in range(batches) for w in sample_batch(index, B, 0, 0, 1000 + b)]
    with WindowLoader(source, index, B, T, 0, start_batch=1000, threads=m.train.loader_threads,
                      prefetch=m.train.prefetch_batches) as loader:
        t0 = time.perf_counter()
        for _ in range(batches):
            next(loader)
        loader_s = time.perf_counter() - t0
    files = sorted({_shard_file(source, w) for w in windows})
    t0 = time.perf_counter()
    raw_bytes = sum(len(Path(f).read_bytes()) for f in files) if all(Path(f).exists() for f in files) else 0
    raw_s = time.perf_counter() - t0
    out = torch.empty((T, source.tokens, source.dim), dtype=source.dtype)
    t0 = time.perf_counter()
    for w in windows:
        arr = source.store.array(w.view, "features")
        rows = slice(w.view.start + w.start, w.view.start + w.start + T)
        bits = out.view(torch.uint16) if out.dtype == torch.bfloat16 else out
        bits.numpy()[...] = arr[rows]
    zarr_s = time.perf_counter() - t0
    window_bytes = len(windows) * T * frame_bytes
    loader_mbps, zarr_mbps = window_bytes / loader_s / 1e6, window_bytes / zarr_s / 1e6
    raw_mbps = raw_bytes / raw_s / 1e6 if raw_bytes else float("nan")
    return {"loader_MBps": loader_mbps, "raw_file_MBps": raw_mbps, "plain_zarr_MBps": zarr_mbps,
            "loader_vs_raw": loader_mbps / raw_mbps, "loader_vs_plain_zarr": loader_mbps / zarr_mbps,
            "loader_threads": m.train.loader_threads, "windows": len(windows), "frame_bytes": frame_bytes,
            "dtype": str(TORCH_DTYPES[m.cache.dtype]).removeprefix("torch.")}


def _shard_file(source: CachedSource, w: Any) -> str:
    """The shard file holding a window's first row (local stores)."""
    arr = source.store.array(w.view, "features")
    shard = arr.shards[0] if arr.shards else arr.chunks[0]
    key = arr.metadata.encode_chunk_key(((w.view.start + w.start) // shard, 0, 0))
    return f"{source.store.root}/{w.view.location}/features/{key}"
