"""`pipeline demo`: the manifest's synthetic episodes are written once (its size, length and exploring share),
then extracted and trained on; a second run writes and extracts nothing."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import yaml
from conftest import TINY

from pipeline.manifest import load_manifest
from stages.demo.run import run_demo
from stages.extract.droid import open_episode

TRAIN = {"out": "run", "global_batch_size": 2, "warmup_steps": 1, "constant_steps": 1, "decay_steps": 1,
         "heldout_fraction": 0.0, "eval_every": 0, "log_every": 1, "loader_threads": 1, "device": "cpu"}


def test_the_demo_writes_the_manifests_synthetic_episodes_then_extracts_and_trains(tmp_path: Path) -> None:
    synthetic = {"episodes": 2, "seed": 3, "width": 64, "height": 48, "min_seconds": 4.0, "max_seconds": 4.0,
                 "explore": 1.0}
    profile = {**TINY, "data": {**TINY["data"], "cameras": ["left_mp4_path"]}, "synthetic": synthetic, "train": TRAIN,
               "predictor": {"embed_dim": 32, "depth": 1, "num_heads": 1, "mlp_ratio": 2.0}}
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"default_profile": "t", "profiles": {"t": profile}}))
    m = load_manifest(path)
    s = run_demo(m, echo=lambda _: None)
    assert not s.failed and s.train.end_step == 3 and s.extract.views_done > 0
    folders = [tmp_path / "data" / line for line in (tmp_path / "data" / "episodes.txt").read_text().splitlines()]
    episode = open_episode(folders[0], "left_mp4_path")
    with av.open(str(episode.video_path)) as video:
        assert (video.streams.video[0].width, video.streams.video[0].height) == (64, 48)
    assert len(folders) == 2 and len(episode.states) == 60  # 4 s at 15 Hz
    moves = np.diff(episode.states[::4, :3], axis=0)  # exploring: every stored frame a move of up to 5 cm
    assert (np.abs(moves).max(axis=1) > 0.005).mean() > 0.8 and np.abs(moves).max() <= 0.05 + 1e-6
    again = run_demo(load_manifest(path), echo=lambda _: None)
    assert again.extract.views_done == 0 and again.train.end_step == again.train.start_step
