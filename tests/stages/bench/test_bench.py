"""`pipeline bench` on a tiny config: every figure is there and sane (the numbers themselves are not asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.manifest import load_manifest
from stages.bench.run import run_bench
from stages.bench.training import PAIRS

TRAIN = ["predictor.embed_dim=32", "predictor.depth=1", "predictor.num_heads=1", "train.global_batch_size=2",
         "train.loader_threads=1", "train.device=cpu"]


def test_bench_reports_every_figure(workdir: Path) -> None:
    m = load_manifest(workdir / "manifest.yaml", None, TRAIN)
    report = run_bench(m, episodes=2, vitg_frames=20, repeats=2, steps=2, echo=lambda _: None, loader_frames=64)
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
    for kind in ("warm", "cold", "sequential_cold", "zarr_warm"):
        assert 0 < ld[f"{kind}_MBps"]["min"] <= ld[f"{kind}_MBps"]["median"] <= ld[f"{kind}_MBps"]["max"], kind
    for ratio in ("cold_vs_sequential", "warm_vs_zarr"):
        assert 0 < ld[ratio]["min"] <= ld[ratio]["median"] <= ld[ratio]["max"], ratio
    assert ld["s3"]["loader_MBps"] > 0  # the test extra installs moto
    assert f["released_rate_needed"]["16_frames"]["MBps_per_8_gpu_node"] > 0 and f["break_even"]["steps"] > 0
    text = report.format()
    assert "extract end to end" in text and "checksums (ViT-g)" in text and "speedup cached vs online" in text
    assert "cold (dropped)" in text and "object storage" in text


def test_bench_index_reports_opening_with_and_without_a_snapshot(tmp_path: Path) -> None:
    from stages.bench.run import run_index_bench

    report = run_index_bench(40, 2, echo=lambda _: None)
    ix = report.to_dict()["index"]
    assert ix["local"]["views"] == 80 and ix["local"]["open_seconds"] > 0 and ix["local"]["open_seconds_snapshot"] > 0
    assert ix["s3"]["requests"] >= 40 and ix["s3"]["requests_snapshot"] == 3  # the test extra installs moto
    assert "from an index snapshot" in report.format() and "S3 (moto" in report.format()
