"""Training on a shared cluster: stop signals at step boundaries, checkpoints that survive, refusal of a
different run, and logs a batch job can read."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.errors import UsageError
from pipeline.manifest import Manifest, load_manifest
from stages.extract.driver import extract
from stages.train.loop import train

TRAIN = ["predictor.embed_dim=32", "predictor.depth=1", "predictor.num_heads=1", "train.global_batch_size=4",
         "train.warmup_steps=2", "train.constant_steps=36", "train.decay_steps=2", "train.lr=0.001",
         "train.heldout_fraction=0", "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=5",
         "train.checkpoint_minutes=0", "train.loader_threads=1", "train.device=cpu"]


@pytest.fixture
def cached(workdir: Path) -> Path:
    """The tiny dataset extracted; manifest.yaml plus TRAIN settings train on it."""
    extract(load(workdir), show_progress=False, echo=lambda _: None)
    return workdir


def load(workdir: Path, *overrides: str) -> Manifest:
    return load_manifest(workdir / "manifest.yaml", None, [*TRAIN, *overrides])


def quiet(m: Manifest, run: Path, steps: int, **kw: object):
    return train(m, run, steps=steps, show_progress=False, echo=lambda _: None, **kw)


def rows(run: Path) -> list[tuple[int, float]]:
    path = run / "metrics.jsonl"
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())] if path.exists() else []


def cli(workdir: Path, run: Path, steps: int, *extra: str) -> list[str]:
    sets = [x for o in TRAIN for x in ("--set", o)]
    return [sys.executable, "-m", "pipeline.cli", "train", "-m", str(workdir / "manifest.yaml"), *sets, "--out",
            str(run), "--steps", str(steps), *extra]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGUSR1, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_checkpoints_the_step_and_resume_equals_an_uninterrupted_run(
        cached: Path, sig: signal.Signals, code: int) -> None:
    run, whole = cached / "stopped", cached / "whole"
    proc = subprocess.Popen(cli(cached, run, 40), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(rows(run)) < 7:
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "stopped after step" in err and "to resume" in err
    stopped_at = int(torch.load(run / "checkpoints" / "latest.pt", weights_only=False)["step"])
    assert 7 <= stopped_at < 40 and rows(run)[-1][0] == stopped_at  # the step it stopped at was saved
    subprocess.run(cli(cached, run, 40), check=True, capture_output=True, timeout=240)
    subprocess.run(cli(cached, whole, 40), check=True, capture_output=True, timeout=240)
    assert rows(run) == rows(whole)
    a = torch.load(run / "checkpoints" / "latest.pt", weights_only=False)["predictor"]
    b = torch.load(whole / "checkpoints" / "latest.pt", weights_only=False)["predictor"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_latest_falls_back_to_the_newest_intact_checkpoint(cached: Path) -> None:
    m, run = load(cached), cached / "damaged"
    quiet(m, run, 12)  # kept: step 5, 10; latest: 12
    latest = run / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    said: list[str] = []
    s = train(m, run, steps=14, show_progress=False, echo=said.append)
    assert s.start_step == 10 and s.end_step == 14
    assert any("latest.pt is damaged" in line and "step_0000010.pt" in line for line in said)
    whole = cached / "whole-14"
    quiet(m, whole, 14)
    assert rows(run) == rows(whole)


def test_a_kill_between_the_kept_and_the_latest_write_loses_nothing(cached: Path) -> None:
    m, run = load(cached), cached / "between"
    quiet(m, run, 10)  # step_0000010.pt written, then latest.pt: simulate a kill between the two
    folder = run / "checkpoints"
    shutil.copy(folder / "step_0000005.pt", folder / "old.tmp")
    os.replace(folder / "old.tmp", folder / "latest.pt")  # latest.pt still points at step 5
    s = quiet(m, run, 12)
    assert s.start_step == 10


def test_keep_checkpoints_bounds_the_kept_ones_and_temp_files_are_removed(cached: Path) -> None:
    m, run = load(cached, "train.keep_checkpoints=2"), cached / "bounded"
    (run / "checkpoints").mkdir(parents=True)
    stray = run / "checkpoints" / "latest.pt.tmp4242"
    stray.write_bytes(b"x" * 100)  # what a killed save leaves
    quiet(m, run, 21)
    assert not stray.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest.pt", "step_0000015.pt", "step_0000020.pt"]


def test_resume_refuses_a_different_run_naming_each_change(cached: Path) -> None:
    run = cached / "refuse"
    quiet(load(cached), run, 3)
    with pytest.raises(UsageError) as err:
        quiet(load(cached, "train.lr=0.002", "predictor.depth=2"), run, 4)
    assert "train.lr: 0.001 -> 0.002" in str(err.value) and "predictor.depth: 1 -> 2" in str(err.value)
    assert "--out" in str(err.value)
    s = quiet(load(cached, "train.log_every=2", "train.loader_threads=2", "train.constant_steps=50"), run, 4)
    assert (s.start_step, s.end_step) == (3, 4)  # logging, loader threads, total steps: the same run


def test_no_held_out_episodes_is_said_once_and_writes_no_evaluation(cached: Path) -> None:
    run = cached / "no-heldout"
    said: list[str] = []
    train(load(cached), run, steps=3, show_progress=False, echo=said.append)
    assert sum("No held-out episodes" in line for line in said) == 1
    assert not (run / "eval.json").exists() and not (run / "eval.jsonl").exists()
    assert (run / "checkpoints" / "latest.pt").exists()


def test_batch_jobs_get_plain_log_lines_and_bad_steps_a_usage_error(cached: Path) -> None:
    run = cached / "plain"
    proc = subprocess.run(cli(cached, run, 4), capture_output=True, text=True, timeout=240)  # no terminal
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert "ETA" in lines[0] and "\r" not in proc.stdout + proc.stderr
    bad = subprocess.run(cli(cached, run, 0), capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and "--steps 0" in bad.stderr and "Traceback" not in bad.stderr


def test_a_config_saved_by_the_previous_version_resumes_with_its_own_settings() -> None:
    """A config as version 234b233 saved it (data.camera; no data.video_fps, train.window_range, plan, ...)."""
    from stages.train.checkpoints import run_changes

    now = load_manifest(Path(__file__).resolve().parents[3] / "data_manifest.yaml", "demo").to_dict()
    saved = json.loads(json.dumps(now))
    saved["data"] = {k: v for k, v in saved["data"].items() if k not in ("cameras", "camera", "video_fps")}
    saved["data"]["camera"] = "wrist_mp4_path"
    for key in ("window_range", "tensorboard"):
        del saved["train"][key]
    del saved["plan"]
    assert run_changes(saved, now) == ["train.window_range: 'full' -> 'release'"]  # what it did, and can do again
    assert run_changes(saved, {**now, "train": {**now["train"], "window_range": "full"}}) == []
    saved["data"]["camera"] = "ext1_mp4_path"
    assert "data.cameras: ['ext1_mp4_path'] -> ['wrist_mp4_path']" in run_changes(saved, now)
