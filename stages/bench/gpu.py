"""`pipeline bench --gpu`: the figures only an accelerator can give, at the released sizes.

- extraction: random-init ViT-g/16 at 256 px in bf16, batch 64: the encoder alone on in-memory pixels,
  one decoder thread alone on the bench profile's 1280x720 episodes, and a real `extract` with enough
  decoders; how many decode workers one GPU needs;
- the released predictor (24 x 1024) training step on cached-size batches: step time, clips/s, MFU and
  peak memory at batch 8, dense-mask SDPA vs FlexAttention, with and without activation checkpointing,
  compiled and not, and the largest batch that fits;
- the window loader at ViT-g sizes into pinned memory, GB/s;
- one-GPU DDP over NCCL against the same steps without DDP.

The same code runs on the CPU with tiny sizes (`GpuBenchSizes.tiny`), which is how the test suite keeps
it working where no GPU is.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import UsageError
from pipeline.manifest import Manifest
from pipeline.store import FeatureStore
from stages.bench.flops import H100_BF16_TFLOPS, encoder_flops_per_frame, predictor_train_flops_per_clip
from stages.bench.loader import write_views
from stages.bench.run import BenchReport, decode_views
from stages.cache.fingerprint import predictor_config, vit_config
from stages.extract.driver import extract
from stages.extract.encoder import build_runtime, release_encoders
from stages.extract.episodes import list_episodes
from stages.models.predictor import PredictorConfig
from stages.train.loader import Batch, CachedSource, WindowLoader
from stages.train.loop import autocast_for, build_training, train_step
from stages.train.optim import set_schedule
from stages.train.windows import WindowIndex

Echo = Callable[[str], None]


@dataclass(frozen=True)
class GpuBenchSizes:
    """What to measure at which size: the release's on a GPU, tiny ones to exercise the code on a CPU."""

    encoder_preset: str | None = "vit_giant"  # None: the manifest's own encoder
    crop: int = 256
    extract_batch: int = 64
    predictor: tuple[int, int, int] = (1024, 24, 16)  # width, depth, heads
    frames: int = 16
    batch: int = 8
    max_batch: int = 256  # the largest-batch search stops here
    steps: int = 10
    loader_frames: int = 512  # cached frames written for the loader measurement (ViT-g: 370 MB)

    @classmethod
    def tiny(cls) -> GpuBenchSizes:
        return cls(encoder_preset=None, crop=32, extract_batch=8, predictor=(32, 1, 1), frames=4, batch=2,
                   max_batch=4, steps=2, loader_frames=16)


def format_gpu(f: dict[str, Any]) -> str:
    """The GPU bench as a few lines: extraction, each predictor configuration, loader, DDP (a section that
    failed or ran out of time says so)."""
    lines = [f"{f['device_name']}: peak {f['peak_tflops']:.0f} bf16 TFLOP/s assumed for MFU"]
    for name in SECTIONS:
        section = f.get(name, {"skipped": "not reached"})
        if isinstance(section, dict) and ("error" in section or "skipped" in section):
            lines.append(f"{name}: " + (f"failed: {section['error']}" if "error" in section
                                        else f"skipped ({section['skipped']})"))
        else:
            lines += _FORMATS[name](section)
    return "\n".join(lines)


def _format_extraction(e: dict[str, Any]) -> list[str]:
    line = (f"extraction ViT ({e['encoder']}) bf16 batch {e['batch']}: encoder alone {e['encoder_fps']:.0f} "
            f"frames/s ({e['encoder_mfu']:.0%} MFU); one decoder {e['decoder_fps']:.1f} frames/s -> "
            f"{e['decoders_needed']:.1f} decoders per GPU")
    if "end_to_end_fps" in e:
        line += (f"; extract end to end {e['end_to_end_fps']:.0f} frames/s with {e['decode_workers']} decode "
                 f"workers ({e['end_to_end_fps'] / e['encoder_fps']:.0%} of the encoder alone)")
    return [line]


def _format_predictor(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for c in rows:
        fit = "" if c.get("fits", True) else "  (out of memory)"
        lines.append(f"predictor {c['attention']:5s} ckpt {c['activation_checkpointing']!s:5s} compile "
                     f"{c['compile']!s:5s} batch {c['batch']:4d}{' (largest)' if c.get('largest') else ''}: "
                     f"{c.get('step_seconds', float('nan')):.3f} s/step, {c.get('clips_per_s', float('nan')):.1f} "
                     f"clips/s, MFU {c.get('mfu', float('nan')):.1%}, peak memory "
                     f"{c.get('peak_GiB', float('nan')):.1f} GiB" + fit + (f" [{c['error']}]" if "error" in c else ""))
    return lines


def _format_loader(ld: dict[str, Any]) -> list[str]:
    return [f"loader ViT-g windows into pinned memory: {ld['GBps']:.2f} GB/s ({ld['threads']} threads)"]


def _format_ddp(d: dict[str, Any]) -> list[str]:
    return [f"DDP over {d['backend']} (1 rank): {d['ddp_step_seconds']:.3f} s/step vs "
            f"{d['plain_step_seconds']:.3f} without DDP ({d['ddp_vs_plain']:.2f}x)"]


SECTIONS = ("extraction", "predictor", "loader", "ddp")  # in the order they run: the most wanted first
_FORMATS: dict[str, Callable[[Any], list[str]]] = {
    "extraction": _format_extraction, "predictor": _format_predictor, "loader": _format_loader,
    "ddp": _format_ddp}


class Deadline:
    """The time left of the bench's budget: optional measurements (compiled steps, the largest-batch
    search, extraction end to end) are skipped once it has passed, so one short GPU lease gives figures."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    @property
    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


def run_gpu_bench(m: Manifest, echo: Echo = print, device: torch.device | None = None,
                  sizes: GpuBenchSizes = GpuBenchSizes(), peak_tflops: float = H100_BF16_TFLOPS,
                  budget_seconds: float | None = None,
                  save: Callable[[dict[str, Any]], None] | None = None) -> BenchReport:
    """All GPU figures; refuses without a GPU unless a device is given (the CPU test).

    Made for one short lease: each section runs on its own (one that fails is recorded with its error and
    the others still run), optional measurements stop once `budget_seconds` have passed, and `save`
    gets the figures after every section, so a run cut short still leaves what it measured.
    """
    if device is None:
        if not torch.cuda.is_available():
            raise UsageError("`pipeline bench --gpu` needs a CUDA GPU (torch.cuda.is_available() is False): "
                             "run it on a GPU node")
        device = torch.device("cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    echo(f"GPU bench on {name}" + (f", budget {budget_seconds:.0f} s" if budget_seconds else ""))
    deadline = Deadline(budget_seconds)
    figures: dict[str, Any] = {"device_name": name, "peak_tflops": peak_tflops,
                               "torch": torch.__version__, "budget_seconds": budget_seconds}

    def publish(section: str, value: Any) -> None:
        """The figures so far, saved (after every section, and after every predictor configuration)."""
        figures[section] = value
        if save is not None:
            save(figures)

    runs: dict[str, Callable[[], Any]] = {
        "extraction": lambda: _extraction(m, device, sizes, peak_tflops, echo, deadline),
        "predictor": lambda: _predictor(m, device, sizes, peak_tflops, echo, deadline,
                                        lambda rows: publish("predictor", rows)),
        "loader": lambda: _loader(m, device, sizes, echo),
        "ddp": lambda: _ddp(m, device, sizes, echo)}
    for section in SECTIONS:
        publish(section, _section(section, runs[section], echo))
    return BenchReport(figures, format_gpu)


def _section(name: str, run: Callable[[], Any], echo: Echo) -> Any:
    """One section's figures, or its error (recorded, not raised: the other sections still run)."""
    try:
        return run()
    except Exception as err:  # a GPU bench reports what broke and goes on
        echo(f"{name}: failed: {type(err).__name__}: {err}")
        failed = {"error": f"{type(err).__name__}: {err}"}
    _free(torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # outside `except` (see _try)
    return failed


def _sized(m: Manifest, sizes: GpuBenchSizes, device: torch.device) -> Manifest:
    """The manifest at the measured sizes: ViT-g at 256 px in bf16, the released predictor, bf16 training."""
    enc = dataclasses.replace(m.encoder, preset=sizes.encoder_preset or m.encoder.preset, checkpoint=None,
                              precision="bf16" if device.type == "cuda" else "fp32", batch_size=sizes.extract_batch,
                              device=str(device) if device.type == "cuda" else "cpu")
    if sizes.encoder_preset is None:
        enc = dataclasses.replace(enc, preset=m.encoder.preset)
    width, depth, heads = sizes.predictor
    return dataclasses.replace(
        m, encoder=enc, crop=dataclasses.replace(m.crop, size=sizes.crop),
        data=dataclasses.replace(m.data, frames_per_clip=sizes.frames),
        predictor=dataclasses.replace(m.predictor, embed_dim=width, depth=depth, num_heads=heads, checkpoint=None),
        train=dataclasses.replace(m.train, precision="bf16" if device.type == "cuda" else "fp32",
                                  device=str(device), global_batch_size=sizes.batch, compile=False))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- extraction ---------------------------------------------------------------------------------------


def _extraction(m: Manifest, device: torch.device, sizes: GpuBenchSizes, peak: float, echo: Echo,
                deadline: Deadline) -> dict[str, Any]:
    sm = _sized(m, sizes, device)
    encoder = build_runtime(vit_config(sm), sm.encoder, device)
    pixels = torch.randn(sizes.extract_batch, 3, sizes.crop, sizes.crop, device=device)  # [B, 3, S, S]
    encoder.encode_pixels(pixels)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(sizes.steps):
        encoder.encode_pixels(pixels)
    _sync(device)
    enc_fps = sizes.steps * sizes.extract_batch / (time.perf_counter() - t0)
    flops = encoder_flops_per_frame(encoder.model.cfg)
    dec_fps = _decoder_fps(sm)
    workers = max(1, min(os.cpu_count() or 1, math.ceil(enc_fps / dec_fps)))
    echo(f"extraction: encoder {enc_fps:.0f} frames/s, one decoder {dec_fps:.1f} frames/s; extracting with "
         f"{workers} decode workers ...")
    del encoder
    figures = {"encoder": f"{sm.encoder.preset or 'manifest'} at {sizes.crop} px", "batch": sizes.extract_batch,
               "encoder_fps": enc_fps, "encoder_mfu": enc_fps * flops / (peak * 1e12),
               "decoder_fps": dec_fps, "decoders_needed": enc_fps / dec_fps, "decode_workers": workers}
    if deadline.passed:
        return {**figures, "end_to_end": "skipped (time budget)"}
    with tempfile.TemporaryDirectory() as tmp:
        e2e = dataclasses.replace(sm, cache=dataclasses.replace(sm.cache, path=f"{tmp}/cache"),
                                  extract=dataclasses.replace(sm.extract, scheduler="inline", decode_workers=workers))
        s = extract(e2e, show_progress=False, echo=lambda _: None)
    release_encoders()  # extract keeps its ViT-g loaded (~4 GiB): not while the predictor is measured
    _free(device)
    return {**figures, "end_to_end_fps": s.frames_per_second, "frames": s.frames}


def _decoder_fps(m: Manifest) -> float:
    """One decoder thread: decord + crop of the views extraction would draw, frames/s."""
    crops, seconds = decode_views(m, list_episodes(m.data)[:2])
    return sum(len(c) for c in crops) / seconds


# -- the predictor's training step -------------------------------------------------------------------


def _batch(pcfg: PredictorConfig, B: int, T: int, device: torch.device) -> Batch:
    """A cached-size batch already on the device (what a loader hands over)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    feats = torch.randn(B, T, pcfg.tokens_per_frame, pcfg.embed_dim, generator=g).to(torch.bfloat16)
    return Batch(feats.to(device), (0.05 * torch.randn(B, T - 1, 7, generator=g)).to(device),
                 torch.randn(B, T, 7, generator=g).to(device), 0)


def _seconds_per_step(sm: Manifest, device: torch.device, B: int, steps: int, ddp: bool = False) -> float:
    """Seconds per training step of the manifest's predictor on a cached-size batch already on the device,
    over `steps` steps after the warm-up; `ddp` wraps the loss in DistributedDataParallel (one rank).

    Warm-up: one step, three compiled (the first call fills the model's layout cache, which the compiled
    graph's guards see, so the second compiles again: both before the clock starts)."""
    pcfg = predictor_config(sm)
    model, optimizer, scaler, loss_fn = build_training(sm.train, sm.predictor, pcfg, device)
    if ddp:
        loss_fn = DistributedDataParallel(loss_fn, device_ids=[device.index or 0] if device.type == "cuda" else None)
    autocast, batch = autocast_for(sm.train.precision, device), _batch(pcfg, B, sm.data.frames_per_clip, device)
    warmup = 3 if sm.train.compile else 1
    for k in range(steps + warmup):
        if k == warmup:
            _sync(device)
            t0 = time.perf_counter()
        set_schedule(optimizer, k + 1, sm.train)
        train_step(loss_fn, model, optimizer, scaler, batch, B, autocast, None)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _step_figures(sm: Manifest, device: torch.device, B: int, steps: int, peak: float) -> dict[str, Any]:
    """Seconds per step, clips/s, MFU and peak memory of `steps` steps at batch B (after the warm-up).

    MFU counts the model's FLOPs: the attention the block-causal mask lets through ((T+1)/2T of a dense
    one), whichever kernel computes it (dense-mask SDPA also computes the masked part; it is not credited).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    secs = _seconds_per_step(sm, device, B, steps)
    flops = predictor_train_flops_per_clip(predictor_config(sm), sm.data.frames_per_clip, sm.train.auto_steps,
                                           causal=True) * B
    peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"step_seconds": secs, "clips_per_s": B / secs, "mfu": flops / secs / (peak * 1e12),
            "peak_GiB": peak_bytes / 2**30, "fits": True}


def _predictor(m: Manifest, device: torch.device, sizes: GpuBenchSizes, peak: float, echo: Echo,
               deadline: Deadline, progress: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Step figures at batch 8 for each attention x activation checkpointing, eager first; then the largest
    batch of each eager configuration; then compiled (each step of this order only while time is left).
    `progress` gets the rows so far after each one (a run cut short keeps them)."""
    base = _sized(m, sizes, device)
    attentions = ("dense", "flex") if device.type == "cuda" else ("dense",)  # no FlexAttention backward on CPU
    configs = [(a, ckpt) for a in attentions for ckpt in (False, True)]
    plans = [(a, ckpt, False, False) for a, ckpt in configs] + [(a, ckpt, False, True) for a, ckpt in configs]
    if device.type == "cuda":
        plans += [(a, ckpt, True, False) for a, ckpt in configs]
    results = []
    for attention, ckpt, comp, largest in plans:
        if results and deadline.passed:
            echo(f"predictor: time budget spent; {len(plans) - len(results)} configurations not measured")
            break
        sm = dataclasses.replace(base, train=dataclasses.replace(
            base.train, attention=attention, activation_checkpointing=ckpt, compile=comp))
        if largest:
            results.append(_largest_batch(sm, device, sizes, peak, echo, deadline))
        else:
            row = {"attention": attention, "activation_checkpointing": ckpt, "compile": comp, "batch": sizes.batch}
            row.update(_try(sm, device, sizes.batch, sizes.steps, peak))
            echo(f"predictor {row}")
            results.append(row)
        progress(results)
    return results


def _try(sm: Manifest, device: torch.device, B: int, steps: int, peak: float) -> dict[str, Any]:
    """Step figures, {"fits": False} when out of memory, or the error of a configuration that broke."""
    try:
        return _step_figures(sm, device, B, steps, peak)
    except torch.OutOfMemoryError:
        failed = {"fits": False}
    except Exception as err:  # e.g. a compile failure: recorded, the next configuration runs
        failed = {"fits": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    _free(device)  # here, not in `except`: there the traceback still holds the model and its activations
    return failed


def _free(device: torch.device) -> None:
    """Give the memory of what is gone back to the device (between configurations)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _largest_batch(sm: Manifest, device: torch.device, sizes: GpuBenchSizes, peak: float, echo: Echo,
                   deadline: Deadline) -> dict:
    """Double the batch from the measured one until it no longer fits (or max_batch, or the time is up)."""
    best: dict[str, Any] = {}
    B = sizes.batch * 2
    while sizes.max_batch >= B and not deadline.passed:
        got = _try(sm, device, B, max(2, sizes.steps // 2), peak)
        if not got["fits"]:
            break
        best = {**got, "batch": B}
        B *= 2
    row = {"attention": sm.train.attention, "activation_checkpointing": sm.train.activation_checkpointing,
           "compile": False, "largest": True, **(best or {"batch": sizes.batch, "fits": False})}
    echo(f"largest batch {row}")
    return row


# -- the loader at ViT-g sizes ------------------------------------------------------------------------


def _loader(m: Manifest, device: torch.device, sizes: GpuBenchSizes, echo: Echo) -> dict[str, Any]:
    """Random ViT-g sized features in a real store, read by the training loader into pinned memory."""
    sm = _sized(m, sizes, device)
    pcfg = predictor_config(sm)
    T, B, n = sizes.frames, sizes.batch, sizes.loader_frames
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore(tmp, {"bench": "loader"}).create()
        views, _ = write_views(store, torch.randn(n, pcfg.tokens_per_frame, pcfg.embed_dim), sm.cache.settings(),
                               views=4)
        index = WindowIndex.from_views(views, split="all", frames_per_clip=T, window_range="full")
        first = index.views_of(index.episodes[0])[0]
        threads = max(2, min(8, os.cpu_count() or 1))
        batches = max(4, sizes.steps)
        prefetch = 4
        with WindowLoader(CachedSource(store, T, first), index, B, T, 0, threads=threads, prefetch=prefetch,
                          device=device) as loader:
            for _ in range(prefetch + 2):  # every pinned buffer allocated (cudaHostAlloc) before the clock
                next(loader)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(batches):
                next(loader)
            _sync(device)
            secs = time.perf_counter() - t0
    nbytes = batches * B * T * pcfg.tokens_per_frame * pcfg.embed_dim * 2
    echo(f"loader: {nbytes / secs / 1e9:.2f} GB/s")
    return {"GBps": nbytes / secs / 1e9, "threads": threads, "pinned": device.type == "cuda"}


# -- DDP ------------------------------------------------------------------------------------------------


def _ddp(m: Manifest, device: torch.device, sizes: GpuBenchSizes, echo: Echo) -> dict[str, Any]:
    """One rank of DDP (NCCL on a GPU, gloo on the CPU) against the same steps without it."""
    sm = _sized(m, sizes, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group(backend, rank=0, world_size=1, timeout=timedelta(seconds=120),
                            device_id=device if device.type == "cuda" else None)
    try:
        times = {wrapped: _seconds_per_step(sm, device, sizes.batch, sizes.steps, ddp=wrapped)
                 for wrapped in (False, True)}
    finally:
        dist.destroy_process_group()
    echo(f"ddp over {backend}: {times[True]:.3f} s/step vs {times[False]:.3f} s/step (1 rank)")
    return {"backend": backend, "ddp_step_seconds": times[True], "plain_step_seconds": times[False],
            "ddp_vs_plain": times[True] / times[False]}
