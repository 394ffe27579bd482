"""Read one raw DROID episode: metadata, end-effector states, and camera frames.

Stage one (feature extraction) needs, per episode and camera, the video frames and the robot's
end-effector state at the same time steps, and from the states the actions between them
(docs/release.md, "Data" and "One training sample"). This module reads exactly that from a raw DROID episode folder:

    <episode>/                            e.g. AUTOLab/success/2023-07-07/Fri_Jul__7_09:42:23_2023/
      metadata_<uuid>.json                # exactly one; maps camera keys to MP4 paths
      trajectory.h5                       # 15 Hz time series; we read two datasets:
        observation/robot_state/cartesian_position   float [N, 6]  xyz (m) + extrinsic "xyz" Euler (rad)
        observation/robot_state/gripper_position     float [N]     0 = open .. 1 = closed
      recordings/MP4/<serial>.mp4         # left eye of each ZED camera, H.264 (decoded with decord)
      recordings/MP4/<serial>-stereo.mp4  # not read
      recordings/SVO/<serial>.svo         # not read

The camera is chosen by a metadata key (`left_mp4_path` by default, as V-JEPA 2-AC does); its
value is a path ending in `recordings/MP4/<serial>.mp4` relative to some lab folder, so only the
part after `recordings/MP4/` is used. An MP4 may hold one frame fewer than trajectory.h5 has rows
(a known DROID artefact); frames and states are indexed by the same index, and only indices valid
for both are used. Every problem with an episode raises `EpisodeError` naming the folder, the file
and what is wrong. Nothing here knows whether the data is real or synthetic.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from scipy.spatial.transform import Rotation

from pipeline.errors import UsageError

MP4_DIR = Path("recordings") / "MP4"
H5_NAME = "trajectory.h5"
METADATA_GLOB = "metadata_*.json"
CARTESIAN_KEY = "observation/robot_state/cartesian_position"
GRIPPER_KEY = "observation/robot_state/gripper_position"
TIMESTAMP_GROUP = "observation/timestamp/cameras"  # <serial>_estimated_capture: ms per row (not always there)
MAX_ABS_POSITION = 100.0  # m: an end effector farther than this from the robot base is a broken recording
MAX_ABS_ANGLE = 4 * math.pi  # rad: Euler angles are within +-pi; allow unwrapped ones, refuse garbage
MAX_ABS_GRIPPER = 1.5  # gripper_position lives in [0, 1]; refuse what is far outside
_DECORD_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


class EpisodeError(Exception):
    """A problem with one episode; `str(e)` is "<episode path>: <reason>"."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type[EpisodeError], tuple[str, str]]:
        # Keeps the two-argument constructor working across processes (dask pickles errors).
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True, eq=False)
class Episode:
    """What `open_episode` learned about one episode and camera, without decoding frames."""

    path: Path  # the episode folder
    metadata: dict[str, Any]  # the parsed metadata_<uuid>.json
    camera_key: str  # metadata key that named the camera, e.g. "left_mp4_path"
    serial: str  # camera serial, the MP4 file name without extension
    video_path: Path  # <episode>/recordings/MP4/<serial>.mp4
    video_fps: float  # average fps reported by decord
    num_video_frames: int  # frames in the MP4
    num_rows: int  # rows in trajectory.h5
    states: np.ndarray  # [N, 7] float64: cartesian_position (6) ++ gripper_position (1)
    frame_hw: tuple[int, int]  # (height, width) of the frames, from the stream header
    capture_fps: float | None = None  # the camera's rate from trajectory.h5's per-frame timestamps, if it has them
    frame_map: np.ndarray | None = None  # [N] the video frame of each row, where it is not the row itself (a
    # LeRobot episode: many episodes share a file, and rows find their frames by timestamp)

    @property
    def num_usable(self) -> int:
        """Indices valid for both frames and states: min(video frames, h5 rows)."""
        return int(self.states.shape[0])

    def source_files(self) -> list[Path]:
        """The files this episode's data comes from (to detect changed episodes)."""
        return source_files(self.path, self.camera_key)


def source_files(folder: Path, camera_key: str) -> list[Path]:
    """metadata json(s), trajectory.h5 and the camera's MP4 of an episode folder, as far as they can be
    named; never raises (planning stats these for a broken episode too, to notice when it is fixed)."""
    files = [*sorted(folder.glob(METADATA_GLOB)), folder / H5_NAME]
    try:
        metadata_path, metadata = _read_metadata(folder)
        files.append(folder / MP4_DIR / _video_name(folder, metadata_path, metadata, camera_key))
    except EpisodeError:
        pass
    return files


Source = dict[str, list[int]]  # file name (relative to the episode folder) -> [size, mtime_ns]


def source_identity(folder: Path, *camera_keys: str) -> Source:
    """Size and mtime of the files an episode's views are made from; never raises (missing = absent).

    Recorded with every committed view (its own camera's files) and failure (all cameras' files), so a
    changed or fixed episode is noticed by planning without opening a video."""
    out: Source = {}
    for f in dict.fromkeys(f for key in camera_keys for f in source_files(folder, key)):
        try:
            st = f.stat()
            out[f.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
        except OSError:
            continue
    return out


def episode_id_for(folder: Path, root: Path) -> str:
    """An episode's id: its folder relative to data.root (stable when the data set moves)."""
    try:
        return folder.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return folder.resolve().as_posix()


# ----------------------------------------------------------------------------- episode lists


def list_episodes(spec: str, root: str | Path) -> list[Path]:
    """Episode folders named by `spec`: a list file (one folder per line) or a glob under `root`.

    A list file is the released code's format: one folder per line, relative lines resolved against
    `root`; a UTF-8 byte-order mark, blank lines and `#` comments are skipped, and of several
    whitespace-separated columns the first is the path (lists made by other tools carry lengths or
    tasks). A glob gives the folders it matches, and the folders of the trajectory.h5 or metadata
    files it matches (e.g. "**/trajectory.h5"); hidden names are not matched. The result is sorted, and
    one folder named twice (another spelling, a symlink) is listed once, under its first name.
    """
    root = Path(root)
    spec_path = Path(spec) if Path(spec).is_absolute() else root / spec
    if spec_path.is_file():
        folders = _read_list_file(spec_path, root)
        if not folders:
            raise UsageError(f"episode list {spec_path} names no episodes")
    else:
        folders = _glob_folders(spec, root)
        if not folders:
            raise UsageError(
                f"episode spec {spec!r}: no such list file ({spec_path}) and, read as a glob "
                f"pattern under {root}, it matches nothing"
            )
    first: dict[str, Path] = {}
    for folder in folders:
        first.setdefault(os.path.realpath(folder), folder)
    return sorted(first.values())


def _read_list_file(path: Path, root: Path) -> list[Path]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines())
    return [_normalise(root / line.split()[0]) for line in lines if line and not line.startswith("#")]


def _glob_folders(pattern: str, root: Path) -> list[Path]:
    """Matched folders, plus the folders of matched trajectory.h5 / metadata files; other files are skipped."""
    full = pattern if os.path.isabs(pattern) else os.path.join(glob.escape(str(root)), pattern)
    folders = []
    for match in map(Path, glob.glob(full, recursive=True)):
        if match.is_dir():
            folders.append(_normalise(match))
        elif match.name == H5_NAME or fnmatch.fnmatch(match.name, METADATA_GLOB):
            folders.append(_normalise(match.parent))
    return folders


def _normalise(path: Path) -> Path:
    return Path(os.path.normpath(path))


# ----------------------------------------------------------------------------- opening


def open_episode(path: str | Path, camera_key: str = "left_mp4_path") -> Episode:
    """Read metadata and states of one episode and check its camera video, without decoding."""
    folder = Path(path)
    if not folder.is_dir():
        raise EpisodeError(folder, "episode folder does not exist")
    metadata_path, metadata = _read_metadata(folder)
    video_name = _video_name(folder, metadata_path, metadata, camera_key)
    cartesian, gripper = _read_states(folder)
    video_path = folder / MP4_DIR / video_name
    num_frames, fps, frame_hw = probe_video(folder, video_path)
    num_rows = cartesian.shape[0]
    if num_frames not in (num_rows, num_rows - 1):
        raise EpisodeError(
            folder,
            f"{MP4_DIR / video_name} has {num_frames} frames but {H5_NAME} has {num_rows} rows "
            f"(expected equal, or one frame fewer)",
        )
    n = min(num_frames, num_rows)
    states = np.concatenate([cartesian[:n], gripper[:n, None]], axis=1)  # [N, 7]
    states.setflags(write=False)
    serial = video_name.split(".")[0]
    return Episode(
        path=folder,
        metadata=metadata,
        camera_key=camera_key,
        serial=serial,
        video_path=video_path,
        video_fps=fps,
        num_video_frames=num_frames,
        num_rows=num_rows,
        states=states,
        frame_hw=frame_hw,
        capture_fps=capture_fps(folder, serial),
    )


def capture_fps(folder: Path, serial: str) -> float | None:
    """The camera's capture rate from trajectory.h5's `observation/timestamp/cameras/<serial>_estimated_capture`
    (milliseconds per row, as DROID records them): 1000 / the median step. None when the file has no such
    timestamps or they do not increase: the check is a help, never a reason to fail an episode."""
    try:
        with h5py.File(folder / H5_NAME, "r") as f:
            node = f.get(f"{TIMESTAMP_GROUP}/{serial}_estimated_capture")
            stamps = np.asarray(node[()], dtype=np.float64) if isinstance(node, h5py.Dataset) else None
    except (OSError, TypeError, ValueError):
        return None
    if stamps is None or stamps.ndim != 1 or len(stamps) < 3:
        return None
    step = float(np.median(np.diff(stamps)))  # ms
    return 1000.0 / step if np.isfinite(step) and step > 0 else None


def _read_metadata(folder: Path) -> tuple[Path, dict[str, Any]]:
    found = sorted(folder.glob(METADATA_GLOB))
    if not found:
        raise EpisodeError(folder, f"no {METADATA_GLOB} file in the episode folder")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise EpisodeError(folder, f"several metadata files ({names}); expected exactly one")
    try:
        metadata = json.loads(found[0].read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EpisodeError(folder, f"{found[0].name} is not readable JSON: {e}") from e
    if not isinstance(metadata, dict):
        raise EpisodeError(folder, f"{found[0].name} holds a {type(metadata).__name__}, not a JSON object")
    return found[0], metadata


def _video_name(folder: Path, metadata_path: Path, metadata: dict[str, Any], key: str) -> str:
    value = metadata.get(key)
    if not isinstance(value, str) or not value.strip():
        have = sorted(k for k in metadata if k.endswith("_mp4_path"))
        raise EpisodeError(
            folder, f"{metadata_path.name} has no usable camera key {key!r} (value {value!r}; mp4 keys: {have})"
        )
    name = value.split(str(MP4_DIR) + "/")[-1]
    if not name.endswith(".mp4") or "/" in name:
        raise EpisodeError(folder, f"{metadata_path.name}[{key!r}] = {value!r} does not name an MP4 file")
    return name


def _read_states(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    h5_path = folder / H5_NAME
    if not h5_path.is_file():
        raise EpisodeError(folder, f"{H5_NAME} is missing")
    try:
        with h5py.File(h5_path, "r") as f:
            cartesian = _read_dataset(folder, f, CARTESIAN_KEY)
            gripper = _read_dataset(folder, f, GRIPPER_KEY)
    except OSError as e:
        raise EpisodeError(folder, f"{H5_NAME} cannot be read as HDF5: {e}") from e
    if gripper.ndim == 2 and gripper.shape[1] == 1:
        gripper = gripper[:, 0]
    if cartesian.ndim != 2 or cartesian.shape[1] != 6:
        raise EpisodeError(folder, f"{H5_NAME}: {CARTESIAN_KEY} has shape {cartesian.shape}, expected [N, 6]")
    if gripper.ndim != 1:
        raise EpisodeError(folder, f"{H5_NAME}: {GRIPPER_KEY} has shape {gripper.shape}, expected [N]")
    if len(cartesian) != len(gripper) or len(cartesian) == 0:
        raise EpisodeError(
            folder,
            f"{H5_NAME}: {CARTESIAN_KEY} has {len(cartesian)} rows and {GRIPPER_KEY} {len(gripper)} "
            f"(expected the same, non-zero number)",
        )
    _check_finite(folder, H5_NAME, CARTESIAN_KEY, cartesian)
    _check_finite(folder, H5_NAME, GRIPPER_KEY, gripper)
    _check_ranges(folder, H5_NAME, CARTESIAN_KEY, cartesian[:, :3], cartesian[:, 3:], GRIPPER_KEY, gripper)
    return cartesian, gripper


def check_states(folder: Path, states: np.ndarray, where: str) -> None:
    """States [N, 7] (xyz, Euler angles, gripper) read from `where` must be finite and physically plausible:
    a unit mix-up or a corrupt recording fails the episode, naming where it was read."""
    _check_finite(folder, where, "states", states)
    _check_ranges(folder, where, "position", states[:, :3], states[:, 3:6], "gripper", states[:, 6])


def _check_ranges(folder: Path, where: str, pose: str, xyz: np.ndarray, euler: np.ndarray, grip: str,
                  gripper: np.ndarray) -> None:
    _check_range(folder, where, pose + " xyz", xyz, MAX_ABS_POSITION, "m")
    _check_range(folder, where, pose + " Euler angles", euler, MAX_ABS_ANGLE, "rad")
    _check_range(folder, where, grip, gripper, MAX_ABS_GRIPPER, "(0 open .. 1 closed)")


def _read_dataset(folder: Path, f: h5py.File, key: str) -> np.ndarray:
    node = f.get(key)
    if not isinstance(node, h5py.Dataset):
        raise EpisodeError(folder, f"{H5_NAME} has no dataset {key}")
    if node.dtype.kind != "f":
        raise EpisodeError(folder, f"{H5_NAME}: {key} has dtype {node.dtype}, expected floating point "
                                   "(integer or other data here means the file was not written by DROID's recorder)")
    try:
        return np.asarray(node[()], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise EpisodeError(folder, f"{H5_NAME}: {key} is not numeric ({node.dtype}): {e}") from e


def _check_finite(folder: Path, where: str, key: str, values: np.ndarray) -> None:
    bad_rows = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad_rows.any():
        first = int(np.argmax(bad_rows))
        raise EpisodeError(
            folder,
            f"{where}: {key} has non-finite values (NaN/inf) in {int(bad_rows.sum())} rows, "
            f"first at row {first}: {values[first]}",
        )


def _check_range(folder: Path, where: str, what: str, values: np.ndarray, bound: float, unit: str) -> None:
    """Values a robot cannot have (a unit mix-up, a corrupt recording) fail the episode, naming the dataset."""
    beyond = np.abs(values) > bound
    if beyond.any():
        row = int(np.argmax(beyond.reshape(len(values), -1).any(axis=1)))
        raise EpisodeError(folder, f"{where}: {what} beyond the plausible bound {bound:g} {unit} in "
                                   f"{int(beyond.reshape(len(values), -1).any(axis=1).sum())} rows, first at row {row}")


def probe_video(folder: Path, video_path: Path) -> tuple[int, float, tuple[int, int]]:
    """Frame count and fps from decord, frame size from the stream header (PyAV); decodes nothing."""
    reader = _open_reader(folder, video_path, num_threads=1)
    num_frames, fps = len(reader), float(reader.get_avg_fps())
    if num_frames <= 0 or not math.isfinite(fps) or fps <= 0:
        raise EpisodeError(folder, f"{_rel(folder, video_path)} is not a usable video ({num_frames} frames, {fps} fps)")
    return num_frames, fps, _frame_hw(folder, video_path)


def _frame_hw(folder: Path, video_path: Path) -> tuple[int, int]:
    # decord has no size getter short of decoding a frame, and decoding even frame 0 makes its
    # read-ahead thread trip over corruption anywhere later in a small file.
    import av  # imported here: only needed to read the header

    try:
        with av.open(str(video_path)) as container:
            codec = container.streams.video[0].codec_context
            height, width = int(codec.height), int(codec.width)
    except Exception as e:
        raise EpisodeError(folder, f"cannot read the video header of {_rel(folder, video_path)}: {_short(e)}") from e
    if height <= 0 or width <= 0:
        raise EpisodeError(folder, f"{_rel(folder, video_path)} has frame size {width}x{height}")
    return height, width


def _open_reader(folder: Path, video_path: Path, num_threads: int) -> Any:
    from decord import VideoReader, cpu  # imported here: decord is only needed to read videos

    if not video_path.is_file():
        raise EpisodeError(folder, f"camera video {_rel(folder, video_path)} is missing")
    try:
        return VideoReader(str(video_path), ctx=cpu(0), num_threads=num_threads)
    except Exception as e:  # decord raises its own DECORDError and RuntimeErrors
        raise EpisodeError(folder, f"decord cannot open {_rel(folder, video_path)}: {_short(e)}") from e


def _rel(folder: Path, path: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _short(e: Exception) -> str:
    """The first line of a decord error, without its "[hh:mm:ss] file.cc:123: " prefixes."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    first = _DECORD_PREFIX.sub("", lines[0]).strip() if lines else ""
    return first or type(e).__name__


# ----------------------------------------------------------------------------- actions


def actions_from_states(states: np.ndarray) -> np.ndarray:
    """Actions between consecutive states, [F, 7] -> [F-1, 7] float64 (docs/release.md, "One training sample").

    xyz difference; rotation R_{t+1} @ R_t^T (extrinsic "xyz" Euler in and out); gripper difference.
    """
    states = np.asarray(states, dtype=np.float64)
    if states.ndim != 2 or states.shape[1] != 7 or states.shape[0] < 1:
        raise ValueError(f"states must be [F >= 1, 7], got {states.shape}")
    if states.shape[0] == 1:
        return np.zeros((0, 7))
    rot = Rotation.from_euler("xyz", states[:, 3:6]).as_matrix()  # [F, 3, 3]
    rel = rot[1:] @ np.swapaxes(rot[:-1], 1, 2)  # [F-1, 3, 3]
    d_euler = Rotation.from_matrix(rel).as_euler("xyz")  # [F-1, 3]
    d_xyz = np.diff(states[:, :3], axis=0)  # [F-1, 3]
    d_grip = np.diff(states[:, 6:7], axis=0)  # [F-1, 1]
    return np.concatenate([d_xyz, d_euler, d_grip], axis=1)


# ----------------------------------------------------------------------------- decoding


def decode_frames(episode: Episode, indices: np.ndarray, num_threads: int = 0) -> np.ndarray:
    """Frames at raw `indices` as uint8 RGB [F, H, W, 3] (one decord VideoReader)."""
    indices = _check_indices(episode, indices)
    if len(indices) == 0:
        return np.zeros((0, *episode.frame_hw, 3), dtype=np.uint8)
    reader = _open_reader(episode.path, episode.video_path, num_threads)
    return _get_batch(episode, reader, indices)


def iter_frames(episode: Episode, indices: np.ndarray, batch: int, num_threads: int = 0) -> Iterator[np.ndarray]:
    """Frames at raw `indices` in consecutive batches of up to `batch`, one VideoReader for all."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    indices = _check_indices(episode, indices)
    reader = _open_reader(episode.path, episode.video_path, num_threads)
    for start in range(0, len(indices), batch):
        yield _get_batch(episode, reader, indices[start : start + batch])


def _check_indices(episode: Episode, indices: np.ndarray) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= episode.num_usable):
        raise ValueError(
            f"{episode.path}: frame indices must lie in [0, {episode.num_usable}), got {indices.min()}..{indices.max()}"
        )
    return indices


def _get_batch(episode: Episode, reader: Any, indices: np.ndarray) -> np.ndarray:
    frames_at = indices if episode.frame_map is None else episode.frame_map[indices]  # rows -> frames of the file
    try:
        batch = reader.get_batch(frames_at.tolist())
        frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
    except Exception as e:
        raise EpisodeError(
            episode.path, f"decord failed to decode {_rel(episode.path, episode.video_path)}: {_short(e)}"
        ) from e
    expected = (len(indices), *episode.frame_hw, 3)
    if frames.dtype != np.uint8 or frames.shape != expected:
        raise EpisodeError(
            episode.path,
            f"decoding {_rel(episode.path, episode.video_path)} gave {frames.dtype} {frames.shape}, "
            f"expected uint8 {list(expected)}",
        )
    return frames  # [F, H, W, 3]
