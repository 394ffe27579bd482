"""`pipeline bench`: the figures that tell whether extraction is encoder-bound, and what the codecs cost.

Measured on the same frames (view 0 of the first episodes of the manifest):
- decode: decord + crop alone, frames/s;
- encoder: preprocess + encoder forward alone on already-decoded crops, frames/s;
- end to end: a real `extract` run (inline, into a scratch store), frames/s -- with decode, encode and
  write overlapped this should be close to the encoder figure;
- store: write MB/s, random 16-frame window read MB/s (through the checked read path) and compression
  ratio per codec;
- checksums: the store's writes and checked reads (direct shard reader, crc32c per chunk and per row)
  against plain zarr arrays of the same layout without checksums, on ViT-g sized rows, interleaved,
  medians; and the share of the checked read spent computing the checksums;
- training (stages/bench_train.py): cached vs online vs predictor-only steps, the FLOP model, the
  loader against raw reads, the rate the released config needs, and the break-even of extraction.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.buffer.cpu import NDBuffer

from pipeline.manifest import Manifest
from pipeline.store import FeatureStore, ViewRecord, crc32c, encode_features
from stages.bench.flops import H100_BF16_TFLOPS
from stages.bench.index import bench_index
from stages.bench.loader import bench_loader, bench_s3_loader, write_views
from stages.bench.training import bench_training
from stages.cache.fingerprint import fingerprint_spec
from stages.demo.synthetic import write_synthetic_dataset
from stages.extract.augment import CropBox, crop_frames
from stages.extract.driver import extract
from stages.extract.droid import episode_id_for, iter_frames
from stages.extract.encoder import load_encoder
from stages.extract.episodes import list_episodes
from stages.extract.part import episode_jobs
from stages.extract.worklist import EpisodeTask

WINDOW = 16  # frames per read in the window benchmark
VITG_FRAMES = 64  # frames of 256 x 1408 written for the ViT-g sized store figures (46 MB in bf16)
LOADER_FRAMES = 2048  # frames of the loader's store (1.5 GB): larger than a round reads, so cold reads are cold


@dataclass
class BenchReport:
    """The figures of one `pipeline bench` run (frames/s, MB/s, ratios), keyed as docs/performance.md describes,
    and how they print (`format_bench`, or the GPU bench's own table)."""

    figures: dict[str, Any]
    formatter: Callable[[dict[str, Any]], str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.figures

    def format(self) -> str:
        return (self.formatter or format_bench)(self.figures)


BENCH_EPISODE = {"width": 1280, "height": 720, "min_seconds": 9.0, "max_seconds": 11.0}  # DROID's frame size


def ensure_data(m: Manifest, episodes: int, echo: Callable[[str], None] = print) -> None:
    """The bench profile's synthetic 1280x720 episodes, written once (~20 s each on 2 cores); any other
    profile must have its episodes already."""
    root = Path(m.data.root)
    if (root / "episodes.txt").exists() or m.profile != "bench":
        return
    echo(f"Writing {episodes} synthetic DROID-format episodes at 1280x720 to {root} (once) ...")
    write_synthetic_dataset(root, episodes, seed=0, progress=True, scenes=1, **BENCH_EPISODE)


def run_bench(m: Manifest, episodes: int, vitg_frames: int = VITG_FRAMES, repeats: int = 5, steps: int = 20,
              gpu_tflops: float = H100_BF16_TFLOPS, echo: Callable[[str], None] = print,
              loader_frames: int = LOADER_FRAMES) -> BenchReport:
    """Measure everything on the manifest's first `episodes` episodes (and `vitg_frames` ViT-g sized rows, a
    loader store of `loader_frames`); the training figures from `repeats` interleaved rounds of `steps` steps
    each (0 repeats: skip them)."""
    folders = list_episodes(m.data)[:episodes]
    crops, decode_s = decode_views(m, folders)
    frames = sum(len(c) for c in crops)
    spec = fingerprint_spec(m)
    encoder = load_encoder(m, FeatureStore(m.cache.path, spec).digest)
    feats, encode_s = _encode(m, encoder, crops)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "episodes.txt").write_text("\n".join(str(f) for f in folders))
        e2e_m = dataclasses.replace(
            m, cache=dataclasses.replace(m.cache, path=f"{tmp}/cache"),
            views=dataclasses.replace(m.views, per_episode=1),
            data=dataclasses.replace(m.data, episodes=str(Path(tmp) / "episodes.txt")),
            extract=dataclasses.replace(m.extract, scheduler="inline"))
        summary = extract(e2e_m, show_progress=False, echo=lambda _: None)
        codecs = {name: _codec(m, feats, f"{tmp}/codec-{name}", name, level)
                  for name, level in (("none", 0), ("zstd-1", 1), ("zstd-3", 3))}
        big = torch.randn(vitg_frames, 256, 1408)  # [F, tokens, D]: ViT-g sized rows (random values)
        codecs_vitg = {name: _codec(m, big, f"{tmp}/vitg-{name}", name, level)
                       for name, level in (("none", 0), ("zstd-1", 1))}
        checksums = _checksum_cost(m, big, tmp)
        trained = {}
        if repeats:
            os.sync()  # the store figures' writes go to disk now, not as writeback during the timed steps
            trained = bench_training(e2e_m, repeats, steps, gpu_tflops, echo)
            threads, prefetch = m.train.loader_threads, m.train.prefetch_batches
            trained["loader"] = bench_loader(m.cache.settings(), tmp, threads, prefetch, frames=loader_frames)
            trained["loader"]["s3"] = bench_s3_loader(m.cache.settings(), threads, prefetch)
            trained["break_even"] = _break_even(summary.seconds, summary.frames, trained)
    return BenchReport({**trained,
        "device": str(encoder.device), "threads": torch.get_num_threads(), "episodes": len(folders),
        "frames": frames, "tokens": encoder.tokens, "dim": encoder.dim, "feature_dtype": m.cache.dtype,
        "decode_fps": frames / decode_s, "encoder_fps": frames / encode_s,
        "end_to_end_fps": summary.frames_per_second, "end_to_end_frames": summary.frames,
        "end_to_end_vs_encoder": summary.frames_per_second / (frames / encode_s),
        "end_to_end_vs_slower_stage": summary.frames_per_second / min(frames / encode_s, frames / decode_s),
        "decode_workers": m.extract.decode_workers, "store": codecs, "store_vitg_size": codecs_vitg,
        "checksums_vitg_size": checksums,
    })


def run_index_bench(records: int, views_per_record: int, echo: Callable[[str], None] = print) -> BenchReport:
    """`pipeline bench --index`: opening a store of many commit records (stages/bench_index.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        return BenchReport({"index": bench_index(tmp, records, views_per_record, echo=echo)}, format_index)


def format_index(f: dict[str, Any]) -> str:
    ix = f["index"]
    lines = [f"opening a store of {ix['records']} commit records of {ix['views_per_record']} view(s) each "
             f"({ix['record_MB']:.0f} MB of JSON); open = listing, records, view columns, winners, window index"]
    lo = ix["local"]
    lines.append(f"  local disk   {lo['open_seconds']:.2f} s one record at a time, {lo['open_seconds_snapshot']:.2f} s "
                 f"from an index snapshot; {lo['views']} views, index {lo['index_MB']:.0f} MB")
    s3 = ix["s3"]
    if "open_seconds" in s3:
        lines.append(f"  S3 (moto on loopback, +{1000 * s3['delay_per_request_s']:.0f} ms a request)  "
                     f"{s3['open_seconds']:.1f} s and {s3['requests']} requests one record at a time, "
                     f"{s3['open_seconds_snapshot']:.2f} s and {s3['requests_snapshot']} requests from the snapshot")
    else:
        lines.append(f"  S3           skipped: {s3['skipped']}")
    return "\n".join(lines)


def decode_views(m: Manifest, folders: list[Path]) -> tuple[list[torch.Tensor], float]:
    """View 0 of each episode, decoded and cropped exactly as extraction draws it (one decoder); the
    crops and the seconds it took."""
    one_view = dataclasses.replace(m.views, per_episode=1)
    crops, t0 = [], time.perf_counter()
    for folder in folders:
        task = EpisodeTask(episode_id_for(folder, Path(m.data.root)), str(folder), {})
        job = episode_jobs(task, m.data, one_view, m.crop)[0]
        box = CropBox(*job.record.box)
        for batch in iter_frames(job.episode, job.indices, m.encoder.batch_size, m.extract.decode_threads):
            crops.append(torch.from_numpy(np.ascontiguousarray(crop_frames(batch, box))))
    return crops, time.perf_counter() - t0


def _encode(m: Manifest, encoder: Any, crops: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    encoder.encode_crops(crops[:1], m.crop)  # warm-up (allocations, kernels)
    t0 = time.perf_counter()
    feats = torch.cat([encoder.encode_crops([c], m.crop) for c in crops])  # [F, tokens, D]
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return feats, time.perf_counter() - t0


def _window_reads(read: Callable[[int, torch.Tensor], object], n: int, like: torch.Tensor) -> float:
    """Seconds for 32 random 16-frame window reads into one reused buffer (as the loader does)."""
    out = torch.empty((WINDOW, *like.shape[1:]), dtype=like.dtype)
    starts = np.random.default_rng(0).integers(0, max(1, n - WINDOW), size=32)
    t0 = time.perf_counter()
    for s in starts:
        read(int(s), out)
    return time.perf_counter() - t0


def _codec(m: Manifest, feats: torch.Tensor, path: str, name: str, level: int) -> dict[str, float]:
    """Write all frames as one committed part with this codec, then read random 16-frame windows back
    through the checked read path (crc32c per chunk and per row)."""
    cache = dataclasses.replace(m.cache.settings(), compressor="zstd" if level else "none",
                                compression_level=max(level, 1))
    store = FeatureStore(path, {"bench": name}).create()
    (view,), write_s = write_views(store, feats, cache)
    nbytes = view.length * store.array(view, "features").nbytes // view.length
    like = store.read_features(view, 0, 1)
    read_s = _window_reads(_checked_reader(store, view), view.length, like)
    window_bytes = min(WINDOW, view.length) * (nbytes // view.length) * 32
    return {"write_MBps": nbytes / write_s / 1e6, "read_MBps": window_bytes / read_s / 1e6,
            "ratio": nbytes / max(1, store.bytes_on_disk())}


def _checksum_cost(m: Manifest, feats: torch.Tensor, tmp: str, repeats: int = 3, reads: int = 5) -> dict[str, float]:
    """What the checks cost: the store's write and checked window read against plain zarr arrays of the
    same chunks and shards without checksums (same run, same bytes, interleaved, medians)."""
    cache = dataclasses.replace(m.cache.settings(), compressor="none")
    n = len(feats)
    times: dict[str, list[float]] = {k: [] for k in ("write", "write_plain", "read", "read_plain", "crc")}
    for r in range(repeats):
        store = FeatureStore(f"{tmp}/checked-{r}", {"bench": "checked"}).create()
        (view,), seconds = write_views(store, feats, cache)
        times["write"].append(seconds)
        os.sync()  # as write_views does before its timing
        t0 = time.perf_counter()
        stored = encode_features(feats, cache.dtype)  # [F, tokens, D], as the store's writer converts too
        plain = zarr.open_group(store=f"{tmp}/plain-{r}", mode="w").create_array(
            "features", shape=stored.shape, dtype=stored.dtype, chunks=(cache.chunk_frames, *stored.shape[1:]),
            shards=(cache.shard_frames, *stored.shape[1:]), compressors=None, fill_value=0)
        plain[...] = stored
        times["write_plain"].append(time.perf_counter() - t0)
        like = store.read_features(view, 0, 1)
        for _ in range(reads):
            times["read"].append(_window_reads(_checked_reader(store, view), n, like))
            times["read_plain"].append(_window_reads(_plain_reader(plain), n, like))
            times["crc"].append(_crc_seconds(like, n))
    med = {k: float(np.median(v)) for k, v in times.items()}
    nbytes = n * like[0].numel() * like.element_size()
    window_bytes = WINDOW * (nbytes // n) * 32
    return {"write_MBps": nbytes / med["write"] / 1e6, "write_plain_MBps": nbytes / med["write_plain"] / 1e6,
            "read_MBps": window_bytes / med["read"] / 1e6, "read_plain_MBps": window_bytes / med["read_plain"] / 1e6,
            "write_vs_plain": med["write_plain"] / med["write"], "read_vs_plain": med["read_plain"] / med["read"],
            "crc_share_of_read": min(1.0, med["crc"] / med["read"])}


def _crc_seconds(like: torch.Tensor, n: int) -> float:
    """The checks' own time in the 32 window reads: crc32c over every byte once (fastcrc, as the reader)."""
    rows = np.zeros((WINDOW, like[0].numel() * like.element_size()), np.uint8)
    t0 = time.perf_counter()
    for _ in range(32):
        for row in rows:
            crc32c(row)
    return time.perf_counter() - t0


def _checked_reader(store: FeatureStore, view: ViewRecord) -> Callable[[int, torch.Tensor], object]:
    """A window read through the store: crc32c per chunk and per row (the commit's digests), one pass."""
    return lambda start, out: store.read_features(view, start, WINDOW, out=out)


def _plain_reader(arr: zarr.Array) -> Callable[[int, torch.Tensor], object]:
    """The same window read from a zarr array without any checksum: the baseline."""
    def read(start: int, out: torch.Tensor) -> None:
        bits = (out.view(torch.uint16) if out.dtype == torch.bfloat16 else out).numpy()
        arr.get_basic_selection(slice(start, start + WINDOW), out=NDBuffer.from_numpy_array(bits))

    return read


def _break_even(extract_seconds: float, frames: int, f: dict[str, Any]) -> dict[str, float]:
    """After how many training steps the one-time extraction of these episodes has paid for itself."""
    t = f["training"]
    saving = t["online"]["step_seconds"]["median"] - t["cached"]["step_seconds"]["median"]
    return {"extract_seconds": extract_seconds, "extract_frames": frames, "saving_seconds_per_step": saving,
            "steps": extract_seconds / saving if saving > 0 else float("inf")}


def format_bench(f: dict[str, Any]) -> str:
    lines = [
        f"device {f['device']} ({f['threads']} threads), {f['episodes']} episodes, {f['frames']} frames, "
        f"{f['tokens']} tokens x {f['dim']} per frame, stored as {f['feature_dtype']}",
        f"decode + crop        {f['decode_fps']:8.1f} frames/s  (one decoder)",
        f"encoder alone        {f['encoder_fps']:8.1f} frames/s",
        f"extract end to end   {f['end_to_end_fps']:8.1f} frames/s  ({100 * f['end_to_end_vs_encoder']:.0f}% of the "
        f"encoder alone, {100 * f['end_to_end_vs_slower_stage']:.0f}% of the slower stage alone; "
        f"{f['decode_workers']} decoders)",
    ]
    for label, table in (("demo features", f["store"]), ("ViT-g sized", f["store_vitg_size"])):
        for name, c in table.items():
            lines.append(f"store {label:13s} {name:6s}  write {c['write_MBps']:7.1f} MB/s   16-frame window read "
                         f"{c['read_MBps']:7.1f} MB/s   ratio {c['ratio']:.3f}x")
    c = f["checksums_vitg_size"]
    lines.append(f"checksums (ViT-g)     write {c['write_MBps']:7.1f} vs {c['write_plain_MBps']:7.1f} MB/s plain zarr "
                 f"({c['write_vs_plain']:.2f}x);  checked window read {c['read_MBps']:7.1f} vs plain zarr "
                 f"{c['read_plain_MBps']:7.1f} MB/s ({c['read_vs_plain']:.2f}x), the checks "
                 f"{100 * c['crc_share_of_read']:.0f}% of it")
    if "training" in f:
        lines += format_training(f)
    return "\n".join(lines)


def format_training(f: dict[str, Any]) -> list[str]:
    """The training half of the report: clips/s, ratios with their targets, the FLOP model, the loader."""
    t, fm, ld, be = f["training"], f["flop_model"], f["loader"], f["break_even"]
    sp = f["step_vs_predictor_only_spread"]

    def clips(kind: str) -> str:
        c = t[kind]["clips_per_s"]
        return f"{c['median']:8.2f} clips/s  ({c['min']:.2f}..{c['max']:.2f})"

    lines = [f"training (batch {f['batch']} x {f['frames_per_clip']} frames, features {f['feature_dtype']})",
             f"  cached               {clips('cached')}",
             f"  online (released way){clips('online')}",
             f"  predictor only       {clips('predictor_only')}",
             f"  online loader alone  {clips('decode_only')}  (decode + crop + resize, no training)",
             f"  speedup cached vs online  {f['speedup_cached_vs_online']:.2f}x;  FLOP model: "
             f"{fm['predicted_speedup_without_decode']:.2f}x without decode, "
             f"{fm['predicted_speedup_with_decode']:.2f}x with it (no overlap);  speedup_vs_model "
             f"{f['speedup_vs_model']:.2f} (measured / compute-only model; target >= 0.9), "
             f"{f['speedup_vs_model_with_decode']:.2f} of the model with decode",
             f"  step_vs_predictor_only {f['step_vs_predictor_only']:.3f} "
             f"({sp['min']:.2f}..{sp['max']:.2f} over {f['step_pairs']} adjacent pairs; "
             f"target <= 1.05);  data wait "
             f"{100 * f['data_wait_fraction']['median']:.1f}% of the cached step",
             f"  encoder share of an online step: {100 * fm['configured']['encoder_share']:.1f}% here, "
             f"{100 * fm['released_16_frames']['encoder_share']:.1f}% released (16 frames), "
             f"{100 * fm['released_8_frames']['encoder_share']:.1f}% (8 frames)",
             *format_loader(ld),
             f"  break-even: extracting these {be['extract_frames']} frames took {be['extract_seconds']:.1f} s, "
             f"saving {be['saving_seconds_per_step']:.3f} s per step: paid back after {be['steps']:.0f} steps"]
    for frames, r in f["released_rate_needed"].items():
        lines.append(f"  released config, {frames.replace('_', ' ')}, at {f['gpu_tflops']:.0f} TFLOP/s: "
                     f"{r['clips_per_s_per_gpu']:.1f} clips/s per GPU = {r['MBps_per_gpu']:.0f} MB/s of cached "
                     f"features per GPU, {r['MBps_per_8_gpu_node'] / 1000:.2f} GB/s per 8-GPU node")
    return lines


def format_loader(ld: dict[str, Any]) -> list[str]:
    """The loader's lines: warm, cold against a sequential read, zarr-python, object storage."""
    def mbps(kind: str) -> str:
        r = ld[f"{kind}_MBps"]
        return f"{r['median']:.0f} MB/s ({r['min']:.0f}..{r['max']:.0f})"

    cold, zarr = ld["cold_vs_sequential"], ld["warm_vs_zarr"]
    s3 = ld.get("s3", {})
    s3_line = (f"{s3['loader_MBps']:.0f} MB/s ({s3['threads']} threads, moto's server on loopback)"
               if "loader_MBps" in s3 else f"skipped: {s3.get('skipped', 'not measured')}")
    return [f"  loader (ViT-g windows of {ld['window_MB']:.1f} MB, {ld['threads']} reader threads, every byte "
            f"checked; store {ld['store_MB'] / 1000:.1f} GB, {ld['round_MB']:.0f} MB a round)",
            f"    warm (page cache)   {mbps('warm')}  target >= 3000;  through zarr-python {mbps('zarr_warm')}: "
            f"{zarr['median']:.2f}x",
            f"    cold (dropped)      {mbps('cold')}  vs a sequential read of the same files {mbps('sequential_cold')}"
            f": {cold['median']:.2f} ({cold['min']:.2f}..{cold['max']:.2f}; target >= 0.8)",
            f"    object storage      {s3_line}"]
