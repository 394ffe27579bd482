"""One episode of a LeRobot dataset (format v3.0, or v2.1 / v2.0): the end-effector states and the frames of a
camera, read from the dataset's own files -- Parquet tables and MP4 videos -- without the `lerobot` package.

    <root>/                                       a dataset folder, or a Hub cache snapshot of one
      meta/info.json                              codebase_version, fps, features, data_path / video_path
      meta/episodes/chunk-000/file-000.parquet    v3.0: a row per episode: its length, tasks, where its rows
                                                  are and, per camera, its video file and from_timestamp
      meta/episodes.jsonl                         v2.x: episode_index, tasks, length, a line per episode
      data/chunk-000/file-000.parquet             v3.0: the rows of many episodes (episode_index, timestamp,
                                                  the features); v2.x: data/chunk-000/episode_000000.parquet
      videos/<camera>/chunk-000/file-000.mp4      v3.0: many episodes one after another (AV1 by default);
                                                  v2.x: videos/chunk-000/<camera>/episode_000000.mp4

The video frame of a row comes from the dataset's timestamps, not from the row number: the row's
`timestamp` (seconds since its episode began) plus, in v3.0, the episode's `from_timestamp` in that file,
times the file's frame rate, rounded. States come from the features the manifest names (`data.lerobot`):
the end-effector position, its orientation (extrinsic-xyz Euler angles, the release's convention, or a
quaternion turned into them) and the gripper, each a feature with an optional slice. A feature that is
missing or of another width, or whose names say it is something else (joint positions where a cartesian
pose is asked for), fails the episode naming it: a model trained on it would be silently wrong.

An episode is named `<root>/episode_<index>` (no such folder exists): its id is `episode_<index>`.
"""

from __future__ import annotations

import functools
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from pipeline.errors import UsageError
from pipeline.manifest import DataSection, LeRobotSection
from pipeline.store import canonical_json
from stages.extract.droid import Episode, EpisodeError, Source, check_states, probe_video

MAPPING = "manifest data.lerobot"  # the name under which a view's source records the state mapping
EPISODE_NAME = re.compile(r"^episode_(\d+)$")
_SPEC = re.compile(r"^(?P<feature>[^\[\]]+?)(?:\[(?P<a>-?\d+)?(?P<colon>:)?(?P<b>-?\d+)?\])?$")
_NOT_A_POSE = ("joint", "motor", "velocity", "torque", "effort")  # names of features that are no end-effector pose


@dataclass(frozen=True)
class Meta:
    """What a dataset's meta files say, read once per process and root."""

    root: Path
    version: str  # "v3.0" or "v2.1" / "v2.0"
    info: dict[str, Any]
    episodes: dict[int, dict[str, Any]]  # episode_index -> its row (v3.0) or line (v2.x)

    @property
    def fps(self) -> float:
        return float(self.info["fps"])

    @property
    def v3(self) -> bool:
        return self.version.startswith("v3")

    def cameras(self) -> list[str]:
        return sorted(k for k, f in self.info.get("features", {}).items() if f.get("dtype") == "video")


@functools.lru_cache(maxsize=8)
def read_meta(root: str) -> Meta:
    """The meta files of the dataset at `root` (a UsageError where it is not one this reader knows)."""
    path = Path(root)
    info_path = path / "meta" / "info.json"
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        raise UsageError(f"data.root {root} is not a LeRobot dataset: it has no meta/info.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{info_path} is not readable JSON: {err}") from None
    version = str(info.get("codebase_version", ""))
    if not version.startswith(("v3", "v2")) or not isinstance(info.get("features"), dict) or "fps" not in info:
        raise UsageError(f"{info_path}: codebase_version {version!r} with features and fps is what this reader "
                         "knows (v3.0, v2.1); convert the dataset with lerobot, or report the format")
    episodes = _episodes_v3(path) if version.startswith("v3") else _episodes_v2(path)
    return Meta(path, version, info, episodes)


def _episodes_v3(root: Path) -> dict[int, dict[str, Any]]:
    import pyarrow.parquet as pq

    files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
    if not files:
        raise UsageError(f"{root}/meta/episodes holds no Parquet files: not a finished v3.0 dataset")
    out: dict[int, dict[str, Any]] = {}
    for f in files:
        table = pq.read_table(f, columns=[c for c in pq.read_schema(f).names if not c.startswith("stats/")])
        for row in table.to_pylist():
            out[int(row["episode_index"])] = row
    return out


def _episodes_v2(root: Path) -> dict[int, dict[str, Any]]:
    path = root / "meta" / "episodes.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise UsageError(f"{root} is a v2 LeRobot dataset without meta/episodes.jsonl") from None
    return {int(r["episode_index"]): r for r in rows}


# -- which episodes -------------------------------------------------------------------------------------


def list_episodes(data: DataSection) -> list[Path]:
    """The episodes `data.episodes` names -- `all`, indices and ranges (`0-99,120`), or a text file of
    indices -- whose task holds `data.lerobot.task` (where set), as `<root>/episode_<index>` names."""
    meta = read_meta(str(Path(data.root)))
    wanted = _indices(data.episodes, Path(data.root), meta)
    task = (data.lerobot.task or "").lower()
    keep = [i for i in wanted if not task or any(task in str(t).lower() for t in _tasks(meta.episodes[i]))]
    if not keep:
        raise UsageError(f"data.episodes {data.episodes!r} with data.lerobot.task {data.lerobot.task!r} names no "
                         f"episode of {data.root} ({len(meta.episodes)} episodes)")
    return [meta.root / f"episode_{i:06d}" for i in keep]


def _indices(spec: str, root: Path, meta: Meta) -> list[int]:
    if spec.strip() in ("all", "*"):
        return sorted(meta.episodes)
    file = Path(spec) if Path(spec).is_absolute() else root / spec
    text = file.read_text() if file.is_file() else spec
    out: list[int] = []
    for part in re.split(r"[,\s]+", text.strip()):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UsageError(f"data.episodes {spec!r}: {part!r} is not an episode index or a range a-b (or use all)")
        lo, hi = int(m[1]), int(m[2] or m[1])
        out += range(lo, hi + 1)
    missing = [i for i in out if i not in meta.episodes]
    if missing:
        raise UsageError(f"data.episodes {spec!r}: {len(missing)} index(es) not in {root} (e.g. {missing[:3]}); "
                         f"it holds {len(meta.episodes)} episodes")
    return list(dict.fromkeys(out))


def _tasks(row: dict[str, Any]) -> list[str]:
    tasks = row.get("tasks") or []
    return [tasks] if isinstance(tasks, str) else list(tasks)


def episode_index(folder: Path) -> int:
    m = EPISODE_NAME.match(folder.name)
    if not m:
        raise EpisodeError(folder, "not a LeRobot episode name (episode_<index>)")
    return int(m[1])


# -- files ----------------------------------------------------------------------------------------------


def data_file(meta: Meta, index: int) -> Path:
    """The Parquet file holding an episode's rows."""
    info, ep = meta.info, meta.episodes[index]
    if meta.v3:
        rel = info["data_path"].format(chunk_index=ep["data/chunk_index"], file_index=ep["data/file_index"])
    else:
        rel = info["data_path"].format(episode_chunk=index // int(info.get("chunks_size", 1000)), episode_index=index)
    return meta.root / rel


def video_file(meta: Meta, index: int, camera: str) -> tuple[Path, float]:
    """An episode's video of `camera`, and where in it the episode begins (seconds)."""
    info, ep = meta.info, meta.episodes[index]
    if meta.v3:
        rel = info["video_path"].format(video_key=camera, chunk_index=ep[f"videos/{camera}/chunk_index"],
                                        file_index=ep[f"videos/{camera}/file_index"])
        return meta.root / rel, float(ep[f"videos/{camera}/from_timestamp"])
    rel = info["video_path"].format(episode_chunk=index // int(info.get("chunks_size", 1000)), video_key=camera,
                                    episode_index=index)
    return meta.root / rel, 0.0


def source_identity(folder: Path, spec: LeRobotSection, *cameras: str) -> Source:
    """Size and mtime of the files an episode's views are made from (relative to the dataset's root), and the
    features the states are read from (`data.lerobot`: another mapping makes other states, so the views made
    under this one are stale); never raises (missing = absent)."""
    mapping = canonical_json([spec.position, spec.orientation, spec.orientation_format, spec.gripper])
    out: Source = {MAPPING: [zlib.crc32(mapping.encode()), len(mapping)]}
    try:
        meta, index = read_meta(str(folder.parent)), episode_index(folder)
        files = [meta.root / "meta" / "info.json", data_file(meta, index)]
        files += [video_file(meta, index, c)[0] for c in cameras if c in meta.cameras()]
    except (UsageError, EpisodeError, KeyError):
        return out
    for f in files:
        try:
            st = f.stat()
            out[f.relative_to(meta.root).as_posix()] = [st.st_size, st.st_mtime_ns]
        except OSError:
            continue
    return out


# -- one episode ----------------------------------------------------------------------------------------


def open_episode(folder: Path, camera: str, spec: LeRobotSection) -> Episode:
    """An episode's states [N, 7] and the video of `camera`, without decoding frames; EpisodeError names what
    is wrong."""
    try:
        meta = read_meta(str(folder.parent))
    except UsageError as err:
        raise EpisodeError(folder, str(err)) from None
    index = episode_index(folder)
    if index not in meta.episodes:
        raise EpisodeError(folder, f"no episode {index} in the dataset's meta files")
    if camera not in meta.cameras():
        raise EpisodeError(folder, f"the dataset has no camera {camera!r} (its video features: {meta.cameras()})")
    states, stamps = _states(meta, index, spec, folder)
    video, start = video_file(meta, index, camera)
    num_frames, file_fps, frame_hw = probe_video(folder, video)
    frames = np.rint((start + stamps) * file_fps).astype(np.int64)  # [N] the row's frame in the file
    off = np.abs(frames / file_fps - (start + stamps))
    inside = frames < num_frames
    if not inside[: max(1, len(frames) - 1)].all() or (off > 0.5 / file_fps).any() or (np.diff(frames) <= 0).any():
        raise EpisodeError(folder, f"the timestamps of its rows do not land on the frames of {video.name} "
                                   f"({num_frames} frames at {file_fps:g} fps, the episode from {start:g} s)")
    n = int(inside.sum())  # a video one frame short of the rows, as DROID's are, drops the last row
    frames.setflags(write=False)
    return Episode(path=folder, metadata={"episode_index": index, "tasks": _tasks(meta.episodes[index])},
                   camera_key=camera, serial=camera, video_path=video, video_fps=meta.fps,
                   num_video_frames=num_frames, num_rows=len(states), states=states[:n], frame_hw=frame_hw,
                   capture_fps=_rate(stamps), frame_map=frames[:n])


def _rate(stamps: np.ndarray) -> float | None:
    step = float(np.median(np.diff(stamps))) if len(stamps) > 2 else 0.0
    return 1.0 / step if step > 0 else None


def _states(meta: Meta, index: int, spec: LeRobotSection, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """states [N, 7] float64 (xyz, extrinsic-xyz Euler, gripper) and timestamps [N] of an episode's rows."""
    import pyarrow.parquet as pq

    parts = {"position": (spec.position, 3), "orientation": (spec.orientation, 4 if spec.orientation_format !=
                                                              "euler_xyz" else 3), "gripper": (spec.gripper, 1)}
    parsed = {k: (*_parse(s, k), width) for k, (s, width) in parts.items()}
    columns = sorted({f for f, _, _ in parsed.values()} | {"episode_index", "timestamp"})
    path = data_file(meta, index)
    for feature, _, _ in parsed.values():
        if feature not in meta.info["features"]:
            raise EpisodeError(folder, f"the dataset has no feature {feature!r} (data.lerobot; its features: "
                                       f"{sorted(meta.info['features'])[:12]})")
    try:
        table = pq.read_table(path, columns=columns, filters=[("episode_index", "=", index)])
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise EpisodeError(folder, f"{path.relative_to(meta.root)} cannot be read: {err}") from None
    if table.num_rows < 2:
        raise EpisodeError(folder, f"{path.relative_to(meta.root)} holds {table.num_rows} row(s) of the episode")
    values = {}
    for key, (feature, sl, width) in parsed.items():
        column = np.asarray(table.column(feature).to_pylist(), dtype=np.float64)  # [N] or [N, k]
        column = column.reshape(len(column), -1)
        chosen = column[:, sl]  # [N, width]
        if chosen.shape[1] != width:
            raise EpisodeError(folder, f"data.lerobot.{key} {parts[key][0]!r} gives {chosen.shape[1]} values a row "
                                       f"(the feature has {column.shape[1]}), {width} are needed")
        _check_names(meta, feature, sl, key, folder)
        values[key] = chosen
    euler = values["orientation"]
    if spec.orientation_format != "euler_xyz":
        quat = euler if spec.orientation_format == "quaternion_xyzw" else euler[:, [1, 2, 3, 0]]
        euler = Rotation.from_quat(quat).as_euler("xyz")  # [N, 3] extrinsic xyz, as the release's states
    states = np.concatenate([values["position"], euler, values["gripper"]], axis=1)  # [N, 7]
    check_states(folder, states, f"{path.relative_to(meta.root)} (data.lerobot features)")
    stamps = np.asarray(table.column("timestamp").to_pylist(), dtype=np.float64)  # [N]
    order = np.argsort(stamps, kind="stable")
    return states[order], stamps[order]


def _parse(spec: str, key: str) -> tuple[str, slice]:
    """'feature[a:b]' / 'feature[i]' / 'feature' -> (feature, slice)."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise UsageError(f"data.lerobot.{key} {spec!r}: expected a feature name with an optional [i] or [a:b]")
    a, b = (int(m["a"]) if m["a"] else None), (int(m["b"]) if m["b"] else None)
    if m["colon"] or (a is None and b is None):
        return m["feature"], slice(a, b)
    return m["feature"], slice(a, a + 1 if a != -1 else None)


def _check_names(meta: Meta, feature: str, sl: slice, key: str, folder: Path) -> None:
    """Refuse a feature whose names, or whose own name, say it is not an end-effector pose or gripper (joints,
    velocities): the DROID port names its joint positions' axes x, y, z, roll, pitch, yaw."""
    names = meta.info["features"][feature].get("names")
    if isinstance(names, dict):
        names = next(iter(names.values()), None)
    width = int(np.prod(meta.info["features"][feature].get("shape") or [1]))
    chosen = [str(n).lower() for n in (names if isinstance(names, list) else [""] * width)[sl]]
    chosen = [f"{feature.lower()}:{n}" for n in chosen]
    bad = [n for n in chosen if any(word in n for word in _NOT_A_POSE)]
    if bad and (key != "gripper" or not any("gripper" in n for n in chosen)):
        raise EpisodeError(folder, f"data.lerobot.{key} names {chosen}: not an end-effector "
                                   f"{'pose' if key != 'gripper' else 'gripper state'} (V-JEPA 2-AC's states are "
                                   "cartesian xyz, Euler angles and the gripper; name the features that hold them)")
