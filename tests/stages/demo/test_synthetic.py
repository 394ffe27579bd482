"""stages.demo.synthetic: the real DROID layout and names (docs/release.md, "Data"), determinism, and pictures
that really follow the simulated state."""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from stages.demo.synthetic import Exploration, episode_plan, write_synthetic_dataset
from stages.extract.droid import actions_from_states, decode_frames, list_episodes, open_episode

METADATA_KEYS = {
    "uuid", "lab", "building", "date", "success", "current_task", "trajectory_length",
    "wrist_cam_serial", "ext1_cam_serial", "ext2_cam_serial",
    "wrist_mp4_path", "ext1_mp4_path", "ext2_mp4_path", "left_mp4_path", "right_mp4_path",
    "wrist_svo_path", "ext1_svo_path", "ext2_svo_path",
    "wrist_cam_extrinsics", "ext1_cam_extrinsics", "ext2_cam_extrinsics",
}  # fmt: skip
FOLDER = re.compile(r"^[A-Za-z]+/success/\d{4}-\d\d-\d\d/[A-Z][a-z]{2}_[A-Z][a-z]{2}_[_\d]\d_\d\d:\d\d:\d\d_\d{4}$")
CAMERAS = ("wrist", "ext1", "ext2")


def _metadata(folder: Path) -> dict:
    (path,) = folder.glob("metadata_*.json")
    meta = json.loads(path.read_text())
    assert path.name == f"metadata_{meta['uuid']}.json"
    return meta


def _h5_states(folder: Path) -> np.ndarray:
    with h5py.File(folder / "trajectory.h5", "r") as f:
        robot = f["observation/robot_state"]
        return np.concatenate([robot["cartesian_position"][()], robot["gripper_position"][()][:, None]], axis=1)


# ----------------------------------------------------------------------------- layout and names


def test_layout_and_episode_list(synthetic_dataset: Path, synthetic_episodes: list[Path]) -> None:
    lines = (synthetic_dataset / "episodes.txt").read_text().splitlines()
    assert len(lines) == 3 and len(set(lines)) == 3
    for line, folder in zip(lines, synthetic_episodes, strict=True):
        assert FOLDER.match(line), line
        assert folder.is_dir() and (folder / "trajectory.h5").is_file()
        names = {p.name for p in (folder / "recordings" / "MP4").iterdir()}
        meta = _metadata(folder)
        assert names == {f"{meta[f'{cam}_cam_serial']}.mp4" for cam in CAMERAS}
    assert not list(synthetic_dataset.rglob("*.partial"))  # written to a temporary folder, then moved


def test_metadata_keys_and_values(synthetic_episodes: list[Path]) -> None:
    for folder in synthetic_episodes:
        meta = _metadata(folder)
        assert set(meta) >= METADATA_KEYS
        rel = "/".join(folder.parts[-4:])
        assert rel.startswith(meta["lab"] + "/success/" + meta["date"] + "/")
        assert meta["uuid"].startswith(meta["lab"] + "+")
        assert meta["success"] is True and meta["trajectory_length"] == len(_h5_states(folder))
        serials = [meta[f"{cam}_cam_serial"] for cam in CAMERAS]
        assert len(set(serials)) == 3 and all(s.isdigit() and len(s) == 8 for s in serials)
        for cam in CAMERAS:
            serial = meta[f"{cam}_cam_serial"]
            assert meta[f"{cam}_mp4_path"] == f"{rel}/recordings/MP4/{serial}.mp4"
            assert meta[f"{cam}_svo_path"] == f"{rel}/recordings/SVO/{serial}.svo"
            assert len(meta[f"{cam}_cam_extrinsics"]) == 6
        assert meta["left_mp4_path"] == meta["ext1_mp4_path"]
        assert meta["right_mp4_path"] == meta["ext2_mp4_path"]


def test_trajectory_h5_contents(synthetic_episodes: list[Path]) -> None:
    for folder in synthetic_episodes:
        meta = _metadata(folder)
        with h5py.File(folder / "trajectory.h5", "r") as f:
            n = f["observation/robot_state/cartesian_position"].shape[0]
            expected = {
                "observation/robot_state/cartesian_position": (n, 6),
                "observation/robot_state/gripper_position": (n,),
                "observation/robot_state/joint_positions": (n, 7),
                "action/cartesian_position": (n, 6),
                "action/gripper_position": (n,),
            }
            for cam in CAMERAS:
                for eye in ("left", "right"):
                    expected[f"observation/camera_extrinsics/{meta[f'{cam}_cam_serial']}_{eye}"] = (n, 6)
            for key, shape in expected.items():
                assert f[key].shape == shape and f[key].dtype == np.float64, key
            assert "observation/timestamp/robot_state/robot_timestamp_seconds" in f
            assert f"observation/timestamp/cameras/{meta['ext1_cam_serial']}_frame_received" in f
            ext1 = f[f"observation/camera_extrinsics/{meta['ext1_cam_serial']}_left"][0]
            np.testing.assert_allclose(ext1, meta["ext1_cam_extrinsics"])


def test_state_ranges_and_smoothness(synthetic_episodes: list[Path]) -> None:
    states = [_h5_states(folder) for folder in synthetic_episodes]
    for s in states:
        xyz, roll, pitch, grip = s[:, :3], s[:, 3], s[:, 4], s[:, 6]
        assert (xyz >= [0.3, -0.3, 0.0]).all() and (xyz <= [0.7, 0.3, 0.4]).all()
        assert (np.abs(np.angle(np.exp(1j * (roll - np.pi)))) < 0.5).all()  # roll near pi
        assert (np.abs(pitch) < 0.5).all() and (grip >= 0).all() and (grip <= 1).all()
        actions = actions_from_states(s)
        assert np.abs(actions[:, :3]).max() < 0.05 and np.abs(actions[:, 3:6]).max() < 0.3  # smooth
    everything = np.concatenate(states)
    assert everything[:, 6].min() < 0.05 and everything[:, 6].max() > 0.95  # opens and closes
    assert np.ptp(everything[:, 5]) > 0.5  # yaw varies


def test_videos_h264_15fps_and_short_every_third(synthetic_episodes: list[Path]) -> None:
    for i, folder in enumerate(synthetic_episodes):
        rows = len(_h5_states(folder))
        for mp4 in (folder / "recordings" / "MP4").glob("*.mp4"):
            with av.open(str(mp4)) as container:
                stream = container.streams.video[0]
                assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
                assert (stream.codec_context.width, stream.codec_context.height) == (64, 48)
                assert stream.average_rate == 15
                count = sum(1 for _ in container.decode(video=0))
            assert count == rows - (1 if i == 2 else 0)


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_synthetic_dataset(tmp_path, 1, width=65, height=48)
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path, 1, min_seconds=5, max_seconds=2)


# ----------------------------------------------------------------------------- determinism


def _digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files(tmp_path: Path) -> None:
    kwargs = {"width": 32, "height": 32, "min_seconds": 2.0, "max_seconds": 3.0, "short_video_every": 2}
    a = write_synthetic_dataset(tmp_path / "a", 2, seed=5, **kwargs)
    b = write_synthetic_dataset(tmp_path / "b", 2, seed=5, **kwargs)
    c = write_synthetic_dataset(tmp_path / "c", 2, seed=6, **kwargs)
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(_h5_states(x), _h5_states(y))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # MP4 bytes too
    assert not np.array_equal(_h5_states(a[0]), _h5_states(c[0]))


def test_exploring_off_draws_nothing_and_on_covers_every_direction() -> None:
    """Without exploring (the default) an episode is the one its seed always gave; with it, moves between
    stored frames (every 4th control step) go in every direction of the planner's box, up to its size."""
    fields = ("xyz", "euler", "grip", "block_xyz", "block_yaw")
    for i in range(3):
        a, b = episode_plan(0, i, 1).motion, episode_plan(0, i, 1, explore=Exploration(share=0.0)).motion
        assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields)
    moves = np.concatenate([np.diff(episode_plan(0, i, 1, explore=Exploration(share=1.0)).motion.xyz[::4], axis=0)
                            for i in range(4)])  # [N, 3] per stored frame
    assert np.abs(moves).max() <= 0.05 + 1e-9 and (np.abs(moves).max(axis=0) > 0.04).all()
    octants = {tuple(np.sign(m)) for m in moves if (np.abs(m) > 0.005).all()}
    assert len(octants) == 8  # every combination of directions


# ----------------------------------------------------------------------------- pictures follow the state


@pytest.fixture(scope="module")
def sharper_episode(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 160 x 96 episode: enough pixels to locate the gripper reliably."""
    root = tmp_path_factory.mktemp("synthetic_sharp")
    (folder,) = write_synthetic_dataset(root, 1, seed=0, width=160, height=96, min_seconds=4.0, max_seconds=4.0)
    return folder


@pytest.mark.parametrize("camera_key", ["left_mp4_path", "right_mp4_path"])
def test_gripper_image_position_follows_state(sharper_episode: Path, camera_key: str) -> None:
    """The blue palm's centroid moves as the palm's 3-D position projects through the camera's
    extrinsics from trajectory.h5 (OpenCV axes, camera-to-base): static or random frames fail."""
    episode = open_episode(sharper_episode, camera_key)
    frames = decode_frames(episode, np.arange(episode.num_usable)).astype(np.int32)  # [F, H, W, 3]
    r, g, b = frames[..., 0], frames[..., 1], frames[..., 2]
    palm = (b - r > 90) & (b - g > 40)  # [F, H, W]
    count = palm.sum(axis=(1, 2))
    assert (count > 0).mean() > 0.9
    ys, xs = np.indices(palm.shape[1:])
    seen = count > 0
    u = (palm * xs).sum(axis=(1, 2))[seen] / count[seen]
    v = (palm * ys).sum(axis=(1, 2))[seen] / count[seen]
    with h5py.File(sharper_episode / "trajectory.h5", "r") as f:
        extrinsics = f[f"observation/camera_extrinsics/{episode.serial}_left"][: episode.num_usable]
    s = episode.states
    palm_xyz = s[:, :3] + Rotation.from_euler("xyz", s[:, 3:6]).apply([0.0, 0.0, -0.07])  # above the tips
    cam = Rotation.from_euler("xyz", extrinsics[:, 3:]).inv().apply(palm_xyz - extrinsics[:, :3])
    assert (cam[:, 2] > 0).all()
    assert np.ptp(u) > 10 and np.ptp(v) > 10  # the gripper moves across the picture
    assert np.corrcoef(u, (cam[:, 0] / cam[:, 2])[seen])[0, 1] > 0.95
    assert np.corrcoef(v, (cam[:, 1] / cam[:, 2])[seen])[0, 1] > 0.95


def test_wrist_view_changes_with_motion(sharper_episode: Path) -> None:
    """The wrist camera's picture changes more between frames where the gripper moves more."""
    episode = open_episode(sharper_episode, "wrist_mp4_path")
    frames = decode_frames(episode, np.arange(episode.num_usable)).astype(np.float32)
    change = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))  # [F-1]
    a = actions_from_states(episode.states)  # [F-1, 7]
    motion = np.linalg.norm(a[:, :3], axis=1) + 0.1 * np.linalg.norm(a[:, 3:6], axis=1) + 0.05 * np.abs(a[:, 6])
    slow, fast = np.quantile(motion, [0.25, 0.75])
    assert change[motion >= fast].mean() > 1.5 * change[motion <= slow].mean()
    assert np.corrcoef(change, motion)[0, 1] > 0.5


def test_dataset_lists_like_droid(synthetic_dataset: Path, synthetic_episodes: list[Path]) -> None:
    assert list_episodes("episodes.txt", synthetic_dataset) == sorted(synthetic_episodes)


@pytest.mark.parametrize("scenes", [0, 1])
def test_shared_scenes(tmp_path: Path, scenes: int) -> None:
    """scenes=1: every episode is filmed by the same cameras over the same table; 0: each its own."""
    folders = write_synthetic_dataset(tmp_path, 2, seed=3, width=64, height=48, min_seconds=2, max_seconds=2,
                                      scenes=scenes)
    extrinsics, first_frames = [], []
    for folder in folders:
        ep = open_episode(folder, "left_mp4_path")
        with h5py.File(folder / "trajectory.h5") as f:
            extrinsics.append(f[f"observation/camera_extrinsics/{ep.serial}_left"][0])
        first_frames.append(decode_frames(ep, np.array([0])).astype(int))
    same_camera = np.allclose(extrinsics[0], extrinsics[1])
    assert same_camera == (scenes == 1)
    assert (np.abs(first_frames[0] - first_frames[1]).mean() < 30) or scenes == 0
