"""The CLI end to end through typer's runner: help, synth -> extract -> status, exit codes."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
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


COMMANDS = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)])
def test_help_on_every_command(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_every_command_is_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert len(COMMANDS) == 12 and [n for n in COMMANDS if f"`pipeline {n}" not in readme] == []


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


def _tiny(tmp_path: Path, **sections: dict) -> Path:
    """synth 2 tiny episodes + a manifest of the tiny profile (with section changes) in tmp_path."""
    runner.invoke(app, ["synth", "--out", str(tmp_path / "data"), "--episodes", "2", "--width", "64", "--height", "48",
                        "--min-seconds", "5", "--max-seconds", "6"])
    manifest = tmp_path / "m.yaml"
    profile = {k: {**v, **sections.get(k, {})} for k, v in {**PROFILE, "train": {}, "predictor": {}}.items()}
    manifest.write_text(yaml.safe_dump({"default_profile": "t", "profiles": {"t": profile}}))
    return manifest


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_extract_stops_cleanly(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    manifest = _tiny(tmp_path, encoder={"batch_size": 1}, extract={"episodes_per_part": 1})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "extract", "-m", str(manifest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "cache").glob("*/parts/*/*/features")):
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "interrupted" in err and "re-run" in err and "Traceback" not in err
    assert runner.invoke(app, ["verify", "-m", str(manifest)]).exit_code == 0  # nothing half-committed
    assert runner.invoke(app, ["extract", "-m", str(manifest)]).exit_code == 0
    report = json.loads(runner.invoke(app, ["status", "-m", str(manifest), "--json"]).output)
    assert report["views_committed"] == report["views_planned"] == 2


def test_user_mistakes_get_one_line_and_their_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = _tiny(tmp_path)
    (tmp_path / "a-file").write_text("x")

    def line(args: list[str], code: int, *needles: str) -> None:
        result = runner.invoke(app, args)
        assert result.exit_code == code, result.output
        assert "Traceback" not in result.output and all(n in result.output for n in needles), result.output

    line(["extract", "-m", str(manifest), "--scheduler", "tcp://127.0.0.1:9", "--set", "extract.scheduler_timeout=1"],
         2, "cannot reach the dask scheduler", "tcp://127.0.0.1:9")
    assert not (tmp_path / "cache").exists()  # exit 2: nothing was done, not even an empty store
    if not torch.cuda.is_available():
        line(["extract", "-m", str(manifest), "--set", "encoder.device=cuda"], 2, "encoder.device", "no CUDA GPU")
    line(["extract", "-m", str(manifest), "--set", f"cache.path={tmp_path / 'a-file'}"], 2, "is a file")
    line(["status", "-m", str(manifest), "--set", f"cache.path={tmp_path / 'a-file'}"], 2, "is a file")
    line(["train", "-m", str(manifest), "--set", f"cache.path={tmp_path / 'a-file'}"], 2, "is a file")
    assert runner.invoke(app, ["extract", "-m", str(manifest)]).exit_code == 0
    line(["train", "-m", str(manifest), "--out", str(tmp_path / "a-file"), "--steps", "1"], 2, "is a file")
    below = str(tmp_path / "a-file" / "sub")  # a folder asked for below a regular file
    for command in (["extract"], ["status"], ["verify"], ["gc"]):
        line([*command, "-m", str(manifest), "--set", f"cache.path={below}"], 2, f"{tmp_path / 'a-file'} is a file")
    line(["train", "-m", str(manifest), "--out", below, "--steps", "1"], 2, f"{tmp_path / 'a-file'} is a file")
    line(["synth", "--out", str(tmp_path / "a-file"), "--episodes", "1"], 2, "a-file: is a file, not a folder")

    from pipeline.store.writer import PartWriter

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "somewhere"))

    monkeypatch.setattr(PartWriter, "_flush", full)
    line(["extract", "-m", str(manifest), "--set", "views.per_episode=2"], 1, "disk full", "cache/somewhere")


def test_a_store_of_an_older_format_is_named_with_what_to_run(tmp_path: Path) -> None:
    manifest = _tiny(tmp_path)
    old = tmp_path / "cache" / "0123456789abcdef"
    old.mkdir(parents=True)
    (old / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
        "format_version": 1, "fingerprint": {"digest": "0123456789abcdef", "spec": {}}}}))
    result = runner.invoke(app, ["train", "-m", str(manifest), "--steps", "1"])
    assert result.exit_code == 2 and "format version 1" in result.output and "pipeline extract" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_a_gpu_asked_for_where_there_is_none_is_a_usage_error(tmp_path: Path) -> None:
    from pipeline.distributed import local_device
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match=r"plan.device: 'cuda', but no CUDA GPU is visible"):
        local_device("cuda", "plan.device")
    assert local_device("auto", "train.device").type == "cpu"
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--set", "train.device=cuda:0",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: train.device: 'cuda:0', but no CUDA GPU is visible here (torch.cuda.is_available() is False); "
        "use auto or cpu"]


@pytest.mark.parametrize(("args", "says"), [
    (["--episodes", "0"], "--episodes 0: must be >= 1"),
    (["--width", "-5"], "--width/--height -5x180"),
    (["--width", "65"], "must be even"),
    (["--min-seconds", "0"], "--min-seconds/--max-seconds 0, 20"),
    (["--min-seconds", "9", "--max-seconds", "3"], "need 1 <= min <= max"),
    (["--scenes", "-1"], "--scenes -1"),
    (["--explore", "1.5"], "--explore 1.5"),
])
def test_synth_refuses_bad_arguments_in_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "data"), *args])
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(("args", "says"), [
    (["extract", "--bogus"], "error: No such option: --bogus (see `pipeline extract --help`)"),
    (["bench", "--repeats", "x"], "error: Invalid value for '--repeats'"),
    (["nope"], "error: No such command 'nope' (see `pipeline --help`)"),
    (["eval"], "error: Missing argument 'checkpoint' (see `pipeline eval --help`)"),
])
def test_a_command_line_that_does_not_parse_is_one_error_line(args: list[str], says: str) -> None:
    entry_point = Path(sys.executable).parent / "pipeline"  # the installed `pipeline` script (pyproject's)
    result = subprocess.run([str(entry_point), *args], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(says), result.stderr
    assert result.stdout == ""


def test_runs_without_held_out_episodes_and_counts_of_deduplicated_views(tmp_path: Path) -> None:
    """No held-out episode: loss.png is still drawn and the summary lists only what exists. Three identical
    view draws per episode: planned = done (the plan is made again once the videos were opened)."""
    manifest = _tiny(tmp_path, views={"per_episode": 3, "phase": "first"}, crop={"scale": [1.777, 1.777]},
                     train={"heldout_fraction": 0.0, "global_batch_size": 2, "warmup_steps": 1, "constant_steps": 1,
                            "decay_steps": 0, "loader_threads": 1, "eval_every": 0, "device": "cpu"},
                     predictor={"embed_dim": 32, "depth": 1, "num_heads": 2})
    result = runner.invoke(app, ["extract", "-m", str(manifest), "--json"])
    summary = json.loads(result.output[result.output.index("{"):])
    assert (summary["views_planned"], summary["views_done"]) == (2, 2), result.output
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "-m", str(manifest), "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert "results   " + f"{run}: metrics.jsonl, loss.png, checkpoints/latest.pt" in result.output
    assert (run / "loss.png").stat().st_size > 0 and not (run / "eval.json").exists()


def test_nothing_to_do_where_every_episode_failed_says_so(tmp_path: Path) -> None:
    manifest = _tiny(tmp_path)
    for h5 in (tmp_path / "data").rglob("trajectory.h5"):
        h5.write_bytes(b"not hdf5")
    assert runner.invoke(app, ["extract", "-m", str(manifest)]).exit_code == 1
    result = runner.invoke(app, ["extract", "-m", str(manifest)])
    assert result.exit_code == 1, result.output
    assert "Nothing to do: 0 of 2 planned views of 2 episodes are committed" in result.output
    assert "the other 2 episode(s) failed in an earlier run with the same files" in result.output


def test_gc_lists_other_stores_where_the_manifests_own_was_never_made(tmp_path: Path) -> None:
    manifest = _tiny(tmp_path)
    assert runner.invoke(app, ["extract", "-m", str(manifest)]).exit_code == 0
    result = runner.invoke(app, ["gc", "-m", str(manifest), "--set", "encoder.seed=7"])
    assert result.exit_code == 0 and "keeping      other-store" in result.output, result.output
    result = runner.invoke(app, ["gc", "-m", str(manifest), "--set", "encoder.seed=7", "--yes", "--other-stores"])
    assert result.exit_code == 0 and not list((tmp_path / "cache").iterdir()), result.output


_BUG = """
import sys
import stages.cache.status
stages.cache.status.status_report = lambda m: __import__("numpy").zeros(2).reshape(3)  # a ValueError deep in numpy
sys.argv = ["pipeline", "status", "-m", {manifest!r}]
from pipeline.cli import main
main()
"""


def test_a_bug_keeps_its_traceback_and_debug_shows_every_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Only the project's typed errors (and OSError) are one line: a ValueError raised deep inside a library is
    a bug, not a usage error -- its traceback is kept and the exit is 1. PIPELINE_DEBUG=1 adds the traceback
    to every error's line, with the same exit code."""
    from pipeline.cli import main

    manifest = _tiny(tmp_path)
    bug = subprocess.run([sys.executable, "-c", _BUG.format(manifest=str(manifest))], capture_output=True, text=True)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "ValueError: cannot reshape" in bug.stderr
    assert "error:" not in bug.stderr
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setattr(sys, "argv", ["pipeline", "status", "-m", str(manifest), "--set",
                                      f"cache.path={tmp_path / 'a-file'}"])
    for debug in ("", "1"):
        monkeypatch.setenv("PIPELINE_DEBUG", debug)
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.rstrip().splitlines()[-1].startswith("error: cache.path"), err
        assert ("Traceback" in err) == bool(debug), err
