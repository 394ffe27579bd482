"""Shared fixtures: one small synthetic DROID dataset per test session.

`synthetic_dataset` is written once and shared by all tests, which must not modify it; a test
that corrupts an episode copies it first with `copy_episode`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.store.store import FeatureStore
from stages.demo.synthetic import write_synthetic_dataset

SYNTHETIC_EPISODES = 3  # the third has MP4s one frame shorter than trajectory.h5 (short_video_every=3)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of 3 synthetic episodes (64 x 48 px, 5-7 s, seed 0) with `episodes.txt`; read-only."""
    root = tmp_path_factory.mktemp("synthetic_droid")
    write_synthetic_dataset(
        root, SYNTHETIC_EPISODES, seed=0, width=64, height=48, min_seconds=5.0, max_seconds=7.0, short_video_every=3
    )
    return root


@pytest.fixture
def synthetic_episodes(synthetic_dataset: Path) -> list[Path]:
    """The episode folders of `synthetic_dataset`, in `episodes.txt` order."""
    lines = (synthetic_dataset / "episodes.txt").read_text().splitlines()
    return [synthetic_dataset / line for line in lines]


@pytest.fixture
def copy_episode(tmp_path: Path, synthetic_episodes: list[Path]) -> Callable[[int], Path]:
    """copy_episode(i) -> a private copy of episode i under tmp_path, free to corrupt."""

    def copy(index: int = 0) -> Path:
        source = synthetic_episodes[index]
        target = tmp_path / f"copy{index}" / source.name
        shutil.copytree(source, target)
        return target

    return copy


# A tiny extraction profile of the real code: 32 px crops, a one-block 64-wide encoder, shards of 8 frames.
TINY = {
    "data": {"root": "data", "episodes": "episodes.txt", "fps": 4, "frames_per_clip": 4},
    "views": {"per_episode": 2, "seed": 0},
    "crop": {"size": 32, "scale": [0.5, 1.0], "ratio": [0.75, 1.35]},
    "encoder": {"checkpoint": None, "preset": None, "embed_dim": 64, "depth": 1, "num_heads": 1, "mlp_ratio": 4.0,
                "precision": "fp32", "batch_size": 8, "device": "cpu"},
    "cache": {"path": "cache", "chunk_frames": 2, "shard_frames": 8},
    "extract": {"episodes_per_part": 2, "scheduler": "inline", "decode_threads": 1},
}


def write_manifest(folder: Path, **changes: dict) -> Path:
    """A manifest with the tiny profile (plus section changes) in `folder`; data lives in folder/data."""
    profile = {k: {**v, **changes.get(k, {})} for k, v in TINY.items()}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump({"default_profile": "tiny", "profiles": {"tiny": profile}}))
    return path


@pytest.fixture
def workdir(tmp_path: Path, synthetic_dataset: Path) -> Path:
    """A private copy of the synthetic dataset under tmp_path/data, free to change."""
    shutil.copytree(synthetic_dataset, tmp_path / "data")
    write_manifest(tmp_path)
    return tmp_path




def assert_same_features(a: FeatureStore, b: FeatureStore, exact: bool = True) -> None:
    """Same views with the same rows; `exact=False` allows the float noise of other batch compositions."""
    va, vb = a.committed_views(), b.committed_views()
    assert va.keys() == vb.keys() and va
    for vid in va:
        fa = a.read_features(va[vid], 0, va[vid].length).float()
        fb = b.read_features(vb[vid], 0, vb[vid].length).float()
        torch.testing.assert_close(fa, fb, atol=0 if exact else 2e-2, rtol=0 if exact else 2e-2)


@pytest.fixture
def same_features() -> Callable[..., None]:
    """assert_same_features(store_a, store_b, exact=True): the two stores hold the same views, bit for bit."""
    return assert_same_features
