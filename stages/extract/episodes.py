"""Which episodes a manifest names, and how one is opened, in the manifest's format (`data.format`): DROID raw
episode folders (`droid.py`) or a LeRobot dataset (`lerobot.py`). The rest of the pipeline sees an `Episode`
either way -- states [N, 7] and a video whose frames the rows index -- and an episode's name (a path) and id."""

from __future__ import annotations

from pathlib import Path

from pipeline.manifest import DataSection
from stages.extract import droid, lerobot
from stages.extract.droid import Episode, EpisodeError, Source


def list_episodes(data: DataSection) -> list[Path]:
    """The episodes `data.episodes` names: DROID folders, or `<root>/episode_<index>` of a LeRobot dataset."""
    if data.format == "lerobot":
        return lerobot.list_episodes(data)
    return droid.list_episodes(data.episodes, Path(data.root))


def open_episode(data: DataSection, path: Path, camera: str) -> Episode:
    """One episode's states and the video of `camera`, without decoding (EpisodeError names what is wrong)."""
    if data.format == "lerobot":
        return lerobot.open_episode(path, camera, data.lerobot)
    if not path.is_dir():
        raise EpisodeError(path, "episode folder does not exist")
    return droid.open_episode(path, camera)


def source_identity(data: DataSection, path: Path, *cameras: str) -> Source:
    """Size and mtime of the files an episode's views of `cameras` are made from (never raises)."""
    if data.format == "lerobot":
        return lerobot.source_identity(path, data.lerobot, *cameras)
    return droid.source_identity(path, *cameras)
