"""The CLI end to end through typer's runner: help, synth -> extract -> status, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()

PROFILE = {
    "data": {"root": "data", "episodes": "episodes.txt", "fps": 4, "frames_per_clip": 4},
    "views": {"per_episode": 1},
    "crop": {"size": 32, "scale": [0.5, 1.0]},
    "encoder": {"checkpoint": None, "preset": None, "embed_dim": 64, "depth": 1, "num_heads": 1, "mlp_ratio": 4.0,
                "precision": "fp32", "batch_size": 8, "device": "cpu"},
    "cache": {"path": "cache", "chunk_frames": 2, "shard_frames": 8},
    "extract": {"episodes_per_part": 2, "scheduler": "inline"},
}


@pytest.mark.parametrize(
    "command", [[], ["synth"], ["extract"], ["status"], ["verify"], ["train"], ["gc"], ["demo"], ["bench"]]
)
def test_help_on_every_command(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_synth_extract_status(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "data"), "--episodes", "2", "--width", "64",
                                 "--height", "48", "--min-seconds", "5", "--max-seconds", "6"])
    assert result.exit_code == 0, result.output
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"default_profile": "t", "profiles": {"t": PROFILE}}))
    result = runner.invoke(app, ["extract", "-m", str(manifest)])
    assert result.exit_code == 0, result.output
    assert "frames/s end to end" in result.output
    result = runner.invoke(app, ["extract", "-m", str(manifest)])
    assert result.exit_code == 0 and "Nothing to do" in result.output
    result = runner.invoke(app, ["status", "-m", str(manifest), "--json"])
    report = json.loads(result.output)
    assert (report["episodes"], report["views_planned"], report["views_committed"]) == (2, 2, 2)
    assert report["views_stale"] == 0 and report["views_failed"] == 0 and report["bytes_on_disk"] > 0
    assert "fingerprint" in report and report["episodes_failed"] == []
    result = runner.invoke(app, ["status", "-m", str(manifest)])
    assert "committed 2" in result.output

    # a broken episode: the run finishes, lists it, and exits 1
    broken = next((tmp_path / "data").rglob("trajectory.h5"))
    broken.write_bytes(b"not hdf5")
    result = runner.invoke(app, ["extract", "-m", str(manifest)])
    assert result.exit_code == 1
    assert "failed" in result.output and "trajectory.h5" in result.output


def test_bad_manifest_fails_before_any_work(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"default_profile": "t", "profiles": {"t": PROFILE}}))
    result = runner.invoke(app, ["extract", "-m", str(manifest), "--set", "crop.size=33"])
    assert result.exit_code == 2 and "crop.size: 33" in result.output
    assert not (tmp_path / "cache").exists()


def test_gc_lists_then_removes_only_what_nothing_references(tmp_path: Path) -> None:
    import os
    import shutil

    runner.invoke(app, ["synth", "--out", str(tmp_path / "data"), "--episodes", "2", "--width", "64", "--height", "48",
                        "--min-seconds", "5", "--max-seconds", "6"])
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"default_profile": "t", "profiles": {"t": {
        **PROFILE, "extract": {"episodes_per_part": 1, "scheduler": "inline"}}}}))
    assert runner.invoke(app, ["extract", "-m", str(manifest)]).exit_code == 0
    cache = next((tmp_path / "cache").iterdir())
    attempt = next((cache / "parts").glob("*/*"))
    shutil.copytree(attempt, cache / "parts" / "killed" / "20200101T000000Z-0123456789")  # a killed task's
    shutil.copytree(attempt, cache / "parts" / "running" / attempt.name)  # a task writing right now
    temp = cache / "commits" / "x.json.0badc0de.tmp"
    temp.write_text("{")
    os.utime(temp, (1, 1))
    h5 = next((tmp_path / "data").rglob("trajectory.h5"))
    h5.touch()  # that episode is re-extracted into a new part; its old commit is superseded
    assert runner.invoke(app, ["extract", "-m", str(manifest)]).exit_code == 0
    assert runner.invoke(app, ["extract", "-m", str(manifest), "--set", "encoder.seed=7"]).exit_code == 0
    before = sorted(str(p) for p in cache.rglob("*"))
    listed = runner.invoke(app, ["gc", "-m", str(manifest)])
    assert listed.exit_code == 0, listed.output
    out = listed.output
    assert "would remove unreferenced-attempt" in out and "parts/killed/20200101T000000Z-0123456789" in out
    assert "keeping      unreferenced-attempt" in out and "parts/running/" in out  # younger than the grace period
    assert "keeping      superseded-commit" in out and "would remove temp-file" in out
    assert "keeping      other-store" in out and "--other-stores" in out
    assert sorted(str(p) for p in cache.rglob("*")) == before  # listing removes nothing
    result = runner.invoke(app, ["gc", "-m", str(manifest), "--yes", "--grace-hours", "0"])
    assert result.exit_code == 0 and "freed" in result.output
    assert not (cache / "parts" / "killed").exists() and not (cache / "parts" / "running").exists()
    assert not temp.exists() and len(list((cache / "commits").glob("*.json"))) == 2
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the other fingerprint's store is kept
    report = json.loads(runner.invoke(app, ["status", "-m", str(manifest), "--json"]).output)
    assert report["views_committed"] == 2 and report["unreferenced_attempts"] == 0
    assert runner.invoke(app, ["verify", "-m", str(manifest)]).exit_code == 0
    runner.invoke(app, ["gc", "-m", str(manifest), "--yes", "--other-stores"])
    assert len(list((tmp_path / "cache").iterdir())) == 1
