"""Shared fixtures: one small synthetic DROID dataset per test session.

`synthetic_dataset` is written once and shared by all tests, which must not modify it; a test
that corrupts an episode copies it first with `copy_episode`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from stages.synthetic import write_synthetic_dataset

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
