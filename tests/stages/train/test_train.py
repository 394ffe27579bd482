"""Stage two end to end on a tiny real store: the loss falls, resume is exact, DDP ranks stay in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.manifest import Manifest, load_manifest
from pipeline.store.store import StoreError
from stages.cache.fingerprint import predictor_config
from stages.extract.driver import extract
from stages.models.predictor import build_predictor
from stages.train.loop import train
from stages.train.windows import split_of

PROFILE = {
    "data": {"root": "data", "episodes": "episodes.txt", "fps": 4, "frames_per_clip": 4},
    "views": {"per_episode": 2, "seed": 0},
    "crop": {"size": 32, "scale": [0.5, 1.0]},
    "encoder": {"checkpoint": None, "preset": None, "embed_dim": 64, "depth": 1, "num_heads": 1, "mlp_ratio": 4.0,
                "precision": "fp32", "batch_size": 16, "device": "cpu"},
    "cache": {"path": "cache", "chunk_frames": 2, "shard_frames": 8},
    "extract": {"episodes_per_part": 3, "scheduler": "inline"},
    "predictor": {"embed_dim": 64, "depth": 2, "num_heads": 1, "mlp_ratio": 2.0},
    "train": {"out": "run", "global_batch_size": 8, "warmup_steps": 5, "constant_steps": 40, "decay_steps": 5,
              "start_lr": 1e-4, "lr": 1e-3, "auto_steps": 2, "heldout_fraction": 0.4, "log_every": 1,
              "eval_every": 10, "eval_windows": 8, "eval_horizons": 2, "checkpoint_every": 10, "loader_threads": 2,
              "device": "cpu"},
}


def _salt(episodes: list[str]) -> str:
    """A split salt that puts at least one episode on each side (3 episodes only)."""
    for i in range(100):
        sides = {split_of(e, 0.4, str(i)) for e in episodes}
        if sides == {"train", "heldout"}:
            return str(i)
    raise AssertionError("no salt splits the episodes")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, synthetic_dataset: Path) -> Path:
    """A tiny store extracted from the synthetic dataset, and a manifest for training on it."""
    root = tmp_path_factory.mktemp("train")
    episodes = (synthetic_dataset / "episodes.txt").read_text().splitlines()
    profile = {**PROFILE, "data": {**PROFILE["data"], "root": str(synthetic_dataset)},
               "train": {**PROFILE["train"], "split_salt": _salt(episodes)}}
    (root / "manifest.yaml").write_text(yaml.safe_dump({"default_profile": "t", "profiles": {"t": profile}}))
    extract(load(root), show_progress=False, echo=lambda _: None)
    return root


def load(root: Path, *overrides: str) -> Manifest:
    return load_manifest(root / "manifest.yaml", None, list(overrides))


def losses(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["tf_loss"], r["rollout_loss"])
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_loss_falls_and_results_are_written(workdir: Path) -> None:
    run = workdir / "falls"
    s = train(load(workdir), run, show_progress=False, echo=lambda _: None)
    assert (s.start_step, s.end_step) == (0, 50) and s.ranks_in_sync
    assert s.train_episodes >= 1 and s.heldout_episodes >= 1
    rows = losses(run)
    first = sum(r[1] + r[2] for r in rows[:5]) / 5
    last = sum(r[1] + r[2] for r in rows[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    for name in ("config.json", "metrics.jsonl", "eval.json", "eval.jsonl", "loss.png", "eval.png", "summary.json",
                 "checkpoints/latest.pt", "checkpoints/step_0000050.pt"):
        assert (run / name).exists(), name
    result = json.loads((run / "eval.json").read_text())
    assert [h["horizon"] for h in result["horizons"]] == [1, 2] and result["windows"] > 0
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 10, 20, 30, 40, 50]  # the curve starts from the untrained model
    # the checkpoint's predictor uses the release's key names: it loads strictly as a released file would
    ckpt = run / "checkpoints" / "latest.pt"
    model = build_predictor(predictor_config(load(workdir)), str(ckpt), "predictor")
    assert set(model.state_dict()) == set(torch.load(ckpt, weights_only=False)["predictor"])


def test_gradient_clipping_and_activation_checkpointing(workdir: Path) -> None:
    run = workdir / "clipped"
    m = load(workdir, "train.grad_clip=0.5", "train.activation_checkpointing=true")
    s = train(m, run, steps=3, show_progress=False, echo=lambda _: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert s.end_step == 3 and all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in rows)
    plain = train(load(workdir), workdir / "plain", steps=1, show_progress=False, echo=lambda _: None)
    assert plain.first_loss == pytest.approx(rows[0]["loss"], rel=1e-5)  # same first step with or without them


def test_resume_continues_exactly(workdir: Path) -> None:
    """N steps, stop, resume, M more == N+M steps uninterrupted (losses bit for bit)."""
    m = load(workdir)
    whole, split = workdir / "whole", workdir / "split"
    train(m, whole, steps=14, show_progress=False, echo=lambda _: None)
    first = train(m, split, steps=10, show_progress=False, echo=lambda _: None)
    assert first.end_step == 10
    second = train(m, split, steps=14, show_progress=False, echo=lambda _: None)
    assert (second.start_step, second.end_step) == (10, 14)
    assert losses(split) == losses(whole)
    again = train(m, split, steps=14, show_progress=False, echo=lambda _: None)
    assert again.start_step == again.end_step == 14  # nothing left to do


def test_store_of_another_fingerprint_is_refused(workdir: Path) -> None:
    with pytest.raises(StoreError, match="extract"):
        train(load(workdir, "encoder.seed=5"), workdir / "refused", steps=1, show_progress=False, echo=lambda _: None)


def test_two_process_ddp_stays_in_sync(workdir: Path) -> None:
    """Two ranks over gloo, each accumulating two micro-batches per step (DDP's no_sync on the first)."""
    run = workdir / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "pipeline.cli", "train", "-m", str(workdir / "manifest.yaml"), "--out", str(run), "--steps", "4",
           "--set", "train.micro_batch_size=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] and summary["end_step"] == 4
    assert len(losses(run)) == 4  # only rank 0 writes


def test_parts_committed_later_are_used_after_a_restart(workdir: Path, synthetic_dataset: Path) -> None:
    lines = (synthetic_dataset / "episodes.txt").read_text().splitlines()
    (workdir / "two.txt").write_text("\n".join(str(synthetic_dataset / e) for e in lines[:2]))
    cache = f"cache.path={workdir}/growing"
    m_two = load(workdir, cache, f"data.episodes={workdir / 'two.txt'}", "train.heldout_fraction=0")
    extract(m_two, show_progress=False, echo=lambda _: None)
    run = workdir / "growing_run"
    first = train(m_two, run, steps=2, show_progress=False, echo=lambda _: None)
    assert first.train_episodes == 2
    m_all = load(workdir, cache, "train.heldout_fraction=0")
    extract(m_all, show_progress=False, echo=lambda _: None)
    second = train(m_all, run, steps=4, show_progress=False, echo=lambda _: None)
    assert (second.start_step, second.train_episodes) == (2, 3)


def test_kill_9_then_resume_matches_the_uninterrupted_run(workdir: Path) -> None:
    """kill -9 after a checkpoint (rows logged past it are redone), resume, compare with one clean run.

    Every run is a fresh `pipeline train` process, so all three compute under the same process state.
    """
    import signal
    import time

    def cli(run: Path) -> list[str]:
        return [sys.executable, "-m", "pipeline.cli", "train", "-m", str(workdir / "manifest.yaml"), "--out",
                str(run), "--steps", "30"]

    run = workdir / "killed"
    proc = subprocess.Popen(cli(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoints" / "latest.pt").exists() and len(losses(run)) >= 13:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run should be killed half-way"
    assert 13 <= len(losses(run)) < 30
    subprocess.run(cli(run), check=True, capture_output=True, timeout=240)
    assert json.loads((run / "summary.json").read_text())["start_step"] in (10, 20)
    whole = workdir / "whole30"
    subprocess.run(cli(whole), check=True, capture_output=True, timeout=240)
    assert losses(run) == losses(whole)


def test_training_machine_without_the_encoder_checkpoint(workdir: Path) -> None:
    """Extract with a checkpoint file, then train where that file is absent: the store is found by the
    rest of the fingerprint, and its recorded weights digest is used."""
    from stages.cache.fingerprint import vit_config
    from stages.cache.status import status_report
    from stages.models.vit import build_encoder

    ckpt = workdir / "encoder.pt"
    m = load(workdir, f"encoder.checkpoint={ckpt}", f"cache.path={workdir}/ckpt-cache")
    torch.save({"target_encoder": build_encoder(vit_config(m), None, seed=3).state_dict()}, ckpt)
    extract(m, show_progress=False, echo=lambda _: None)
    with_file = status_report(m)
    ckpt.unlink()
    s = train(m, workdir / "no-ckpt", steps=1, show_progress=False, echo=lambda _: None)
    assert s.end_step == 1
    assert status_report(m).fingerprint == with_file.fingerprint
    with pytest.raises(FileNotFoundError, match="is not on this machine"):
        status_report(load(workdir, f"encoder.checkpoint={ckpt}", f"cache.path={workdir}/empty-cache"))


def test_checkpoint_restores_every_state_it_saves(workdir: Path) -> None:
    """One dict of stateful things: every saved entry is restored, the window loader included (its batch
    number comes from the checkpoint, not from the step)."""
    import shutil

    m = load(workdir)
    run, doctored = workdir / "sym", workdir / "sym-doctored"
    train(m, run, steps=10, show_progress=False, echo=lambda _: None)
    shutil.copytree(run, doctored)
    latest = doctored / "checkpoints" / "latest.pt"
    ckpt = torch.load(latest, weights_only=False)
    assert set(ckpt) == {"format", "step", "config", "predictor_config", "data_fingerprint", "predictor",
                         "optimizer", "scaler", "loader", "rng"}
    assert ckpt["loader"]["batch_number"] == ckpt["step"] == 10 and len(ckpt["rng"]["ranks"]) == 1
    ckpt["loader"]["batch_number"] = 500  # as if the loader had been elsewhere in its stream
    torch.save(ckpt, latest)
    train(m, run, steps=11, show_progress=False, echo=lambda _: None)
    train(m, doctored, steps=11, show_progress=False, echo=lambda _: None)
    assert losses(run)[:10] == losses(doctored)[:10]
    assert losses(run)[10] != losses(doctored)[10]  # step 11 drew batch 500's windows


def test_gradient_accumulation_gives_the_same_steps(workdir: Path) -> None:
    """micro_batch_size 2 (4 forward/backward passes per step) trains like the whole batch of 8 at once."""
    whole = train(load(workdir), workdir / "acc-whole", steps=4, show_progress=False, echo=lambda _: None)
    micro = train(load(workdir, "train.micro_batch_size=3"), workdir / "acc-micro", steps=4, show_progress=False,
                  echo=lambda _: None)
    assert (whole.end_step, micro.end_step) == (4, 4)
    for a, b in zip(losses(workdir / "acc-whole"), losses(workdir / "acc-micro"), strict=True):
        assert a[0] == b[0] and a[1] == pytest.approx(b[1], rel=1e-4) and a[2] == pytest.approx(b[2], rel=1e-4)


def test_grad_norm_is_logged_without_clipping(workdir: Path) -> None:
    run = workdir / "norms"
    train(load(workdir), run, steps=2, show_progress=False, echo=lambda _: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in rows)


def test_the_loop_reads_losses_only_at_log_steps(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No per-step host sync: the project's code reads tensors on the host (item, float, bool, tolist) a
    fixed number of times per log row, however many steps lie between rows. (Reads inside torch, e.g. the
    CPU optimizer's step counter, are torch's: on CUDA the fused AdamW keeps them on the device.)"""
    import sys as _sys
    import threading

    import stages

    root = Path(stages.__file__).resolve().parent.parent
    project = (str(root / "stages"), str(root / "pipeline"))
    reads = {"n": 0}
    main = threading.main_thread()
    for name in ("item", "__float__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *a: object, _original=original, **k: object) -> object:
            caller = _sys._getframe(1).f_code.co_filename
            if threading.current_thread() is main and caller.startswith(project):
                reads["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def count(steps: int, log_every: int) -> int:
        reads["n"] = 0
        train(load(workdir, f"train.log_every={log_every}", "train.eval_every=0", "train.checkpoint_every=1000"),
              workdir / f"sync-{steps}-{log_every}", steps=steps, show_progress=False, echo=lambda _: None)
        return reads["n"]

    one, two, three = count(4, 4), count(8, 4), count(12, 4)
    assert two - one == three - two <= 2  # a read or two per log row, none per step
    assert count(8, 8) == one  # 8 steps cost no more reads than 4 when both log once


def test_online_training_sees_the_same_windows_and_losses_as_the_cache(workdir: Path) -> None:
    """--online decodes, crops and encodes in the step; on an fp32 config it logs the cached run's losses."""
    m = load(workdir, "cache.dtype=float32", f"cache.path={workdir}/fp32-cache", "train.eval_every=5")
    extract(m, show_progress=False, echo=lambda _: None)
    cached = train(m, workdir / "cached-run", steps=6, show_progress=False, echo=lambda _: None)
    online = train(m, workdir / "online-run", steps=6, show_progress=False, echo=lambda _: None, online=True)
    assert online.online and (cached.train_views, cached.heldout_episodes) == (online.train_views,
                                                                               online.heldout_episodes)
    for a, b in zip(losses(workdir / "cached-run"), losses(workdir / "online-run"), strict=True):
        assert a[0] == b[0] and a[1] == pytest.approx(b[1], rel=1e-4) and a[2] == pytest.approx(b[2], rel=1e-4)
    evals = [json.loads((workdir / run / "eval.json").read_text()) for run in ("cached-run", "online-run")]
    assert evals[0]["windows"] == evals[1]["windows"] > 0
    assert evals[0]["tf_loss"] == pytest.approx(evals[1]["tf_loss"], rel=1e-4)


def test_tensorboard_events_hold_the_logged_figures(workdir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = workdir / "tb"
    train(load(workdir, "train.tensorboard=true", "train.eval_every=2"), run, steps=4, show_progress=False,
          echo=lambda _: None)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/tf_loss", "train/rollout_loss", "train/lr", "train/grad_norm", "train/clips_per_s",
            "eval/tf_loss", "eval/rollout_loss", "eval/horizon_1/predictor_l1",
            "eval/horizon_1/copy_last_frame_l1"} <= tags
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert [e.step for e in events.Scalars("eval/tf_loss")] == [0, 2, 4]
