"""`pipeline bench --gpu` at tiny sizes on the CPU: its code runs and reports every figure (the numbers
themselves only mean something on a GPU), and it refuses clearly where no GPU is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.errors import UsageError
from pipeline.manifest import load_manifest
from stages.bench.gpu import GpuBenchSizes, run_gpu_bench


def test_gpu_bench_code_runs_at_tiny_sizes_on_the_cpu(workdir: Path) -> None:
    m = load_manifest(workdir / "manifest.yaml", None, ["train.loader_threads=1"])
    saved: list[tuple[str, int]] = []  # the last section saved, and the predictor rows it had then
    report = run_gpu_bench(m, echo=lambda _: None, device=torch.device("cpu"), sizes=GpuBenchSizes.tiny(),
                           save=lambda figures: saved.append((list(figures)[-1], len(figures.get("predictor", [])))))
    f = report.to_dict()
    sections = [name for k, (name, _) in enumerate(saved) if k == 0 or saved[k - 1][0] != name]
    assert sections == ["extraction", "predictor", "loader", "ddp"]  # saved after each section ...
    rows = [n for name, n in saved if name == "predictor"]
    assert rows[:-1] == list(range(1, len(f["predictor"]) + 1))  # ... and after every predictor configuration
    e = f["extraction"]
    assert e["encoder_fps"] > 0 and e["decoder_fps"] > 0 and e["end_to_end_fps"] > 0 and e["decode_workers"] >= 1
    steps = [c for c in f["predictor"] if "largest" not in c]
    assert {(c["attention"], c["activation_checkpointing"]) for c in steps} == {("dense", False), ("dense", True)}
    assert all(c["fits"] and c["clips_per_s"] > 0 and c["mfu"] > 0 for c in steps)
    assert any(c.get("largest") for c in f["predictor"])
    assert f["loader"]["GBps"] > 0 and f["ddp"]["backend"] == "gloo" and f["ddp"]["ddp_vs_plain"] > 0
    assert "DDP over gloo" in report.format()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_bench_refuses_without_a_gpu(workdir: Path) -> None:
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        run_gpu_bench(load_manifest(workdir / "manifest.yaml", None, []), echo=lambda _: None)


def test_one_short_lease_still_gives_figures(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A section that breaks is recorded and the others run; once the budget is spent, optional
    measurements (extraction end to end, the largest-batch search) are skipped, not the core figures."""
    import stages.bench.gpu as bench_gpu

    def broken(*_: object) -> None:
        raise RuntimeError("NCCL is not there")

    monkeypatch.setattr(bench_gpu, "_ddp", broken)
    m = load_manifest(workdir / "manifest.yaml", None, ["train.loader_threads=1"])
    lines: list[str] = []
    report = run_gpu_bench(m, echo=lines.append, device=torch.device("cpu"), sizes=GpuBenchSizes.tiny(),
                           budget_seconds=0)
    f = report.to_dict()
    assert f["ddp"] == {"error": "RuntimeError: NCCL is not there"} and f["loader"]["GBps"] > 0
    assert f["extraction"]["encoder_fps"] > 0 and "end_to_end_fps" not in f["extraction"]
    assert len(f["predictor"]) == 1 and f["predictor"][0]["clips_per_s"] > 0  # the first, never the rest
    text = report.format()
    assert "ddp: failed: RuntimeError: NCCL is not there" in text and "loader ViT-g" in text
    assert any("time budget" in line for line in lines)
