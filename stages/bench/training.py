"""The training half of `pipeline bench`: cached vs online steps, the loader against raw reads, break-even.

All in one process, on one predictor, interleaved: each repeat runs `steps` cached steps, `steps` online
steps (decode + crop per clip in the loader's threads, the frozen encoder in the step, as the release)
and `steps` steps on one batch already on the device (the predictor alone). Figures are medians over the
repeats with their spread (min..max), so a slow moment of the machine shows instead of hiding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.distributed import DistInfo
from pipeline.manifest import Manifest
from stages.bench.flops import released, step_model
from stages.bench.loader import FEATURE_BYTES_VITG, spread
from stages.cache.fingerprint import predictor_config, vit_config
from stages.train.loader import Batch, WindowLoader
from stages.train.loop import Featurize, autocast_for, build_training, cached_data, online_data, train_step
from stages.train.optim import set_schedule
from stages.train.windows import split_index

PAIRS = 3  # cached / predictor-only run pairs per round (the step ratio's samples; each kind is cheap)


def bench_training(m: Manifest, repeats: int, steps: int, gpu_tflops: float,
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Training clips/s cached vs online vs predictor only, the loader vs raw reads, the FLOP model."""
    device = torch.device("cuda" if m.train.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if m.train.device == "auto" else m.train.device))
    info = DistInfo(0, 1, 0, device)
    pcfg = predictor_config(m)
    T, B = m.data.frames_per_clip, m.train.global_batch_size
    cached, online = cached_data(m, pcfg), online_data(m, info)
    index = split_index(m.data, m.train, cached.views, "all")
    first = index.views_of(index.episodes[0])[0]
    model, optimizer, scaler, loss_fn = build_training(m.train, m.predictor, pcfg, device)
    autocast = autocast_for(m.train.precision, device)
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
