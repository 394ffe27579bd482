"""`pipeline bench` on a tiny config: every figure is there and sane (the numbers themselves are not asserted)."""

from __future__ import annotations

from pathlib import Path

from pipeline.manifest import load_manifest
from stages.bench import run_bench


def test_bench_reports_every_figure(workdir: Path) -> None:
    m = load_manifest(workdir / "manifest.yaml", None, [])
    report = run_bench(m, episodes=2, vitg_frames=20)
    f = report.to_dict()
    assert f["frames"] > 0 and f["end_to_end_frames"] == f["frames"]
    for key in ("decode_fps", "encoder_fps", "end_to_end_fps", "end_to_end_vs_encoder", "end_to_end_vs_slower_stage"):
        assert f[key] > 0, key
    for table in (f["store"], f["store_vitg_size"]):
        assert all(c["write_MBps"] > 0 and c["read_MBps"] > 0 and c["ratio"] > 0 for c in table.values())
    c = f["checksums_vitg_size"]
    assert all(c[k] > 0 for k in ("write_MBps", "write_plain_MBps", "read_MBps", "read_plain_MBps",
                                  "write_vs_plain", "read_vs_plain"))
    text = report.format()
    assert "extract end to end" in text and "checksums (ViT-g)" in text
