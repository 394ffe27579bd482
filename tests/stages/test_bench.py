"""`pipeline bench` on a tiny config: every figure is there and sane (the numbers themselves are not asserted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import shard_reader
from pipeline.manifest import CacheSection, load_manifest
from pipeline.store import FeatureStore
from stages.bench import run_bench
from stages.bench_train import PAIRS, _chunk_ranges, _map, _raw_reads, write_views
from stages.windows import WindowIndex, sample_batch

TRAIN = ["predictor.embed_dim=32", "predictor.depth=1", "predictor.num_heads=1", "train.global_batch_size=2",
         "train.loader_threads=1", "train.device=cpu"]


def test_bench_reports_every_figure(workdir: Path) -> None:
    m = load_manifest(workdir / "manifest.yaml", None, TRAIN)
    report = run_bench(m, episodes=2, vitg_frames=20, repeats=2, steps=2, echo=lambda _: None)
    f = report.to_dict()
    assert f["frames"] > 0 and f["end_to_end_frames"] == f["frames"]
    for key in ("decode_fps", "encoder_fps", "end_to_end_fps", "end_to_end_vs_encoder", "end_to_end_vs_slower_stage"):
        assert f[key] > 0, key
    for table in (f["store"], f["store_vitg_size"]):
        assert all(c["write_MBps"] > 0 and c["read_MBps"] > 0 and c["ratio"] > 0 for c in table.values())
    c = f["checksums_vitg_size"]
    assert all(c[k] > 0 for k in ("write_MBps", "write_plain_MBps", "read_MBps", "read_plain_MBps",
                                  "write_vs_plain", "read_vs_plain", "crc_share_of_read"))
    for kind in ("cached", "online", "predictor_only", "decode_only"):
        c = f["training"][kind]["clips_per_s"]
        assert 0 < c["min"] <= c["median"] <= c["max"], kind
    assert f["speedup_cached_vs_online"] > 0 and f["step_vs_predictor_only"] > 0 and f["speedup_vs_model"] > 0
    assert f["speedup_vs_model_with_decode"] == pytest.approx(
        f["speedup_cached_vs_online"] / f["flop_model"]["predicted_speedup_with_decode"])
    assert 0 <= f["data_wait_fraction"]["median"] <= 1
    sp = f["step_vs_predictor_only_spread"]  # one sample per adjacent pair: PAIRS per round
    assert f["step_pairs"] == 2 * PAIRS
    assert sp["min"] <= f["step_vs_predictor_only"] <= sp["max"]
    fm = f["flop_model"]
    assert 0.40 < fm["released_16_frames"]["encoder_share"] < 0.41  # ViT-g vs the 24 x 1024 predictor
    assert fm["predicted_speedup_with_decode"] > fm["predicted_speedup_without_decode"] > 1
    ld = f["loader"]
    assert all(ld[k] > 0 for k in ("loader_MBps", "raw_MBps", "raw_mmap_MBps", "raw_discard_MBps", "plain_zarr_MBps",
                                   "loader_vs_raw", "loader_vs_raw_mmap", "checked_read_MBps", "checked_read_vs_raw",
                                   "loader_python_MBps", "checked_read_python_MBps", "loader_python_vs_raw",
                                   "loader_vs_loader_python", "checked_read_vs_checked_read_python",
                                   "checked_read_preadv_MBps", "checked_read_vs_checked_read_preadv",
                                   "raw_kept_maps_MBps", "loader_vs_raw_kept_maps", "checked_read_vs_raw_kept_maps"))
    for key in ("loader_vs_raw", "checked_read_vs_raw", "loader_vs_raw_kept_maps", "loader_vs_loader_python",
                "checked_read_vs_checked_read_python", "checked_read_vs_checked_read_preadv"):
        assert ld[f"{key}_spread"]["min"] <= ld[key] <= ld[f"{key}_spread"]["max"], key
    assert ld["native_reads"] == (shard_reader.KERNEL if shard_reader.NATIVE else "")
    assert ld["mapped_reads"] == (shard_reader.NATIVE and shard_reader.MAPPED)
    assert ld["copy_kernel"] == (shard_reader.COPY_KERNEL if ld["mapped_reads"] else "")
    assert f["released_rate_needed"]["16_frames"]["MBps_per_8_gpu_node"] > 0 and f["break_even"]["steps"] > 0
    text = report.format()
    assert "extract end to end" in text and "checksums (ViT-g)" in text and "speedup cached vs online" in text
    assert ("reader: native" if ld["native_reads"] else "reader: the Python executor") in text


@pytest.mark.parametrize("mapped", [False, True, "kept"])
def test_the_raw_baseline_reads_exactly_the_bytes_the_loader_delivers(tmp_path: Path, mapped: bool | str) -> None:
    """loader_vs_raw compares like with like: the baseline's ranges, copied in order, are the windows' rows
    as the checked read returns them (edge chunks in part, no crc bytes, across shard boundaries)."""
    cache = CacheSection(path="unused", dtype="bfloat16", chunk_frames=2, shard_frames=4)
    store = FeatureStore(str(tmp_path / "store"), {"bench": "raw"}).create()
    views, _ = write_views(store, torch.randn(24, 3, 8), cache, views=2)
    index = WindowIndex.from_views(views, split="all", frames_per_clip=5, window_range="full")
    windows = [w for b in range(3) for w in sample_batch(index, 2, 0, 0, b)]
    ranges = _chunk_ranges(store, windows, 5)
    total = sum(size for _, _, size in ranges)
    buffer = np.zeros(2 * total, np.uint8)
    kept = {path: _map(path) for path, _, _ in ranges} if mapped == "kept" else None
    _raw_reads(ranges, total, threads=2, mapped=mapped is True, buffer=buffer, kept=kept)
    expect = torch.cat([store.read_features(w.view, w.start, 5) for w in windows])  # [windows * 5, 3, 8]
    assert np.array_equal(buffer[:total], expect.view(torch.uint8).reshape(-1).numpy())
