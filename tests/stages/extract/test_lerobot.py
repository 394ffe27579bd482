"""LeRobot datasets as a source for stage one, tested against data LeRobot itself wrote.

tests/fixtures/lerobot holds the first two episodes of the suite's synthetic data set (`conftest.py`) written
by the `lerobot` package's own writer (tests/fixtures/lerobot/make.py): format v3.0 with AV1 (LeRobot's
default) and with H.264 (lerobot 0.4.4), and format v2.1 with AV1 (lerobot 0.3.3). The same episodes in
DROID raw layout give the same states and actions, and features equal within what re-encoding the video
changes; views, re-runs, failures, verify and training work on them as on DROID raw.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.manifest import LeRobotSection, Manifest, load_manifest
from pipeline.store import FeatureStore
from stages.cache.fingerprint import fingerprint_spec
from stages.cache.verify import verify
from stages.extract.driver import extract
from stages.extract.droid import EpisodeError, decode_frames, open_episode
from stages.extract.episodes import list_episodes
from stages.extract.lerobot import open_episode as open_lerobot
from stages.extract.lerobot import read_meta
from stages.train.loop import train
from stages.use.evaluate_checkpoint import evaluate_checkpoint
from stages.use.plan import run_plan
from tests.conftest import TINY

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "lerobot"
STATE_V21 = {"position": "observation.state[0:3]", "orientation": "observation.state[3:6]",
             "gripper": "observation.state[6]"}  # lerobot 0.3 wrote one state vector (make.py)
DATASETS = {"v30_av1": {}, "v30_h264": {}, "v21_av1": STATE_V21}
CAMERA = "observation.images.exterior_1_left"
RELEASED_CROP = {"size": 32, "scale": [1.777, 1.777], "ratio": [0.75, 1.35]}  # one box: the whole 64x48 frame
TRAIN = {"global_batch_size": 2, "warmup_steps": 1, "constant_steps": 2, "decay_steps": 1, "heldout_fraction": 0.0,
         "eval_every": 0, "log_every": 1, "loader_threads": 1, "device": "cpu"}


def manifest(folder: Path, data: dict, **sections: dict) -> Manifest:
    profile = {**TINY, "data": {**TINY["data"], **data}, "views": {"per_episode": 1, "seed": 0, "phase": "first"},
               "crop": RELEASED_CROP, "predictor": {"embed_dim": 32, "depth": 1, "num_heads": 1}, "train": TRAIN,
               **sections}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump({"default_profile": "t", "profiles": {"t": profile}}))
    return load_manifest(path)


def lerobot(folder: Path, name: str, **data: object) -> Manifest:
    return manifest(folder, {"root": str(FIXTURES / name), "episodes": "all", "format": "lerobot",
                             "cameras": [CAMERA], "lerobot": DATASETS[name], **data})


def droid(folder: Path, synthetic_dataset: Path) -> Manifest:
    (folder / "two.txt").write_text("\n".join((synthetic_dataset / "episodes.txt").read_text().splitlines()[:2]))
    return manifest(folder, {"root": str(synthetic_dataset), "episodes": str(folder / "two.txt")})


def quiet(m: Manifest):
    return extract(m, show_progress=False, echo=lambda _: None)


def _rows(m: Manifest) -> dict[int, tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """Episode number (LeRobot's index; the line of the DROID list file) -> (states, actions, features) of its
    one view (the DROID listing itself is sorted)."""
    store = FeatureStore(m.cache.path, fingerprint_spec(m))
    order = ([p.name for p in list_episodes(m.data)] if m.data.format == "lerobot"
             else Path(m.data.episodes).read_text().splitlines())
    views = sorted(store.committed_views().values(), key=lambda v: order.index(v.episode_id))
    return {k: (store.read_rows(v, "states"), store.read_rows(v, "actions"), store.read_features(v, 0, v.length))
            for k, v in enumerate(views)}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_a_lerobot_copy_gives_the_states_actions_and_features_of_the_droid_episodes(
        tmp_path: Path, synthetic_dataset: Path, name: str) -> None:
    (tmp_path / "l").mkdir(), (tmp_path / "d").mkdir()
    got, want = lerobot(tmp_path / "l", name), droid(tmp_path / "d", synthetic_dataset)
    assert quiet(got).views_done == 2 and quiet(want).views_done == 2
    rows, truth = _rows(got), _rows(want)
    for k, ((s, a, f), (s0, a0, f0)) in enumerate(zip(rows.values(), truth.values(), strict=True)):
        np.testing.assert_allclose(s, s0, rtol=0, atol=1e-6)  # LeRobot keeps float32 states
        np.testing.assert_allclose(a, a0, rtol=0, atol=1e-5)
        assert f.shape == f0.shape
        other = truth[1 - k][2]  # the other episode's features: what a wrong frame mapping would come near
        n = min(len(f), len(other))
        same, wrong = (f - f0).float().abs().mean(), (f[:n] - other[:n]).float().abs().mean()  # [F, tokens, D]
        assert same < 0.5 * wrong, f"{name}: re-encoding moved the features {same:.3f}, another episode {wrong:.3f}"


def test_rows_find_their_frames_by_timestamp_in_a_shared_file(synthetic_episodes: list[Path]) -> None:
    """In format v3.0 episode 1 begins at frame 97 of each camera's file: its rows decode to its own pictures --
    closer to the DROID original's (up to re-encoding) than those a frame or a stride off, and far closer than
    the first episode's, which a mapping that ignored where the episode begins would give."""
    meta = read_meta(str(FIXTURES / "v30_h264"))
    ep = open_lerobot(meta.root / "episode_000001", CAMERA, meta_spec("v30_h264"))
    assert ep.frame_map[0] == 97 and np.array_equal(np.diff(ep.frame_map), np.ones(len(ep.frame_map) - 1))
    original = open_episode(synthetic_episodes[1], "left_mp4_path")
    rows = np.arange(8, ep.num_usable - 8, 4)
    truth = decode_frames(original, rows).astype(float)  # [F, H, W, 3]

    def error(shift: int, frame_map: np.ndarray = ep.frame_map) -> float:
        frames = decode_frames(dataclasses.replace(ep, frame_map=frame_map), rows + shift)
        return float(np.abs(frames.astype(float) - truth).mean())

    errors = {shift: error(shift) for shift in (-4, -1, 0, 1, 4)}
    assert min(errors, key=errors.__getitem__) == 0, errors
    assert error(0, ep.frame_map - ep.frame_map[0]) > 2 * errors[0]


def meta_spec(name: str) -> LeRobotSection:
    return LeRobotSection(**DATASETS[name])


def test_episodes_by_index_or_task_and_every_command_after(tmp_path: Path) -> None:
    m = lerobot(tmp_path, "v30_av1", episodes="1")
    assert [p.name for p in list_episodes(m.data)] == ["episode_000001"]
    only = lerobot(tmp_path, "v30_av1", lerobot={"task": "episode pennpal"})  # the second episode's lab, any case
    assert [p.name for p in list_episodes(only.data)] == ["episode_000001"]
    m = lerobot(tmp_path, "v30_av1")
    assert quiet(m).views_done == 2 and quiet(m).views_done == 0  # a re-run does nothing
    assert verify(m, show_progress=False).sound
    s = train(m, tmp_path / "run", steps=2, show_progress=False, echo=lambda _: None)
    assert s.end_step == 2 and np.isfinite(s.last_loss)
    report = evaluate_checkpoint(m, tmp_path / "run", split="all", write=False)
    assert report.result["windows"] > 0 and np.isfinite(report.result["rollout_loss"])
    view = next(iter(FeatureStore(m.cache.path, fingerprint_spec(m)).committed_views()))
    plan = run_plan(m, tmp_path / "run", view, 0, 3, None, None, None)
    assert len(plan.actions) == m.plan.horizon and np.isfinite(plan.actions).all()
    remapped = lerobot(tmp_path, "v30_av1", lerobot={"gripper": "observation.state.cartesian_position[0]"})
    assert quiet(remapped).views_done == 2  # other features make other states: the views are stale, redone


def test_a_missing_camera_or_pose_fails_each_episode_named_and_the_run_goes_on(tmp_path: Path) -> None:
    m = lerobot(tmp_path, "v30_h264", cameras=["observation.images.top"])
    s = quiet(m)
    assert len(s.failed) == 2 and all("no camera 'observation.images.top'" in f["reason"] for f in s.failed)
    m = lerobot(tmp_path, "v30_h264", lerobot={"gripper": "observation.state.gripper_state[0]"})
    s = quiet(m)
    assert len(s.failed) == 2 and "no feature 'observation.state.gripper_state'" in s.failed[0]["reason"]
    m = lerobot(tmp_path, "v30_h264", lerobot={"position": "observation.state.cartesian_position[0:2]"})
    assert "gives 2 values a row" in quiet(m).failed[0]["reason"]


def test_a_state_that_is_not_an_end_effector_pose_is_refused_not_learned(tmp_path: Path) -> None:
    """A feature whose axes are named as joints, or which is itself named as joints (the DROID port names its
    joint positions' axes x .. yaw), where a cartesian pose is asked for, fails the episode with what to do."""
    import pyarrow.parquet as pq

    root = tmp_path / "joints"
    shutil.copytree(FIXTURES / "v21_av1", root)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["observation.state"]["names"] = [f"joint_{i}" for i in range(6)] + ["gripper"]
    (root / "meta/info.json").write_text(json.dumps(info))
    spec = LeRobotSection(**STATE_V21)
    with pytest.raises(EpisodeError, match="not an end-effector pose"):
        open_lerobot(root / "episode_000000", CAMERA, spec)
    name = "observation.state.joint_position"
    info["features"][name] = {**info["features"].pop("observation.state"),
                              "names": ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]}
    (root / "meta/info.json").write_text(json.dumps(info))
    for path in (root / "data").glob("*/*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.rename_columns([name if c == "observation.state" else c for c in table.column_names]),
                       path)
    read_meta.cache_clear()
    joints = {k: v.replace("observation.state", name) for k, v in STATE_V21.items()}
    with pytest.raises(EpisodeError, match=r"joint_position:x.*not an end-effector pose"):
        open_lerobot(root / "episode_000000", CAMERA, LeRobotSection(**joints))


def test_a_quaternion_orientation_becomes_the_releases_euler_angles(tmp_path: Path) -> None:
    """Orientation as a quaternion (x, y, z, w) gives the same states as the Euler angles it was made from."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from scipy.spatial.transform import Rotation

    root = tmp_path / "quat"
    shutil.copytree(FIXTURES / "v21_av1", root)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["observation.state"].update(shape=[8], names=["x", "y", "z", "qx", "qy", "qz", "qw",
                                                                   "gripper"])
    (root / "meta/info.json").write_text(json.dumps(info))
    for path in sorted((root / "data").glob("*/*.parquet")):
        table = pq.read_table(path)
        state = np.asarray(table.column("observation.state").to_pylist())  # [N, 7]
        quat = Rotation.from_euler("xyz", state[:, 3:6]).as_quat()  # [N, 4] x, y, z, w
        rows = np.concatenate([state[:, :3], quat, state[:, 6:]], axis=1).astype(np.float32)  # [N, 8]
        column = pa.array(rows.tolist(), type=pa.list_(pa.float32(), 8))
        pq.write_table(table.set_column(table.schema.get_field_index("observation.state"), "observation.state",
                                        column), path)
    spec = {"position": "observation.state[0:3]", "orientation": "observation.state[3:7]",
            "orientation_format": "quaternion_xyzw", "gripper": "observation.state[7]"}
    m = manifest(tmp_path, {"root": str(root), "episodes": "all", "format": "lerobot", "cameras": [CAMERA],
                            "lerobot": spec})
    euler = open_lerobot(FIXTURES / "v21_av1" / "episode_000000", CAMERA, meta_spec("v21_av1"))
    quat = open_lerobot(root / "episode_000000", CAMERA, m.data.lerobot)
    np.testing.assert_allclose(quat.states[:, [0, 1, 2, 6]], euler.states[:, [0, 1, 2, 6]], atol=1e-6)
    turn = np.angle(np.exp(1j * (quat.states[:, 3:6] - euler.states[:, 3:6])))  # [N, 3] wrapped to (-pi, pi]
    np.testing.assert_allclose(turn, 0, atol=1e-5)  # a roll of pi may come back as -pi, as DROID's own logs do


def test_a_folder_that_is_no_lerobot_dataset_is_a_usage_error(tmp_path: Path) -> None:
    from pipeline.errors import UsageError

    m = manifest(tmp_path, {"root": str(tmp_path), "episodes": "all", "format": "lerobot", "cameras": [CAMERA]})
    with pytest.raises(UsageError, match=r"not a LeRobot dataset: it has no meta/info\.json"):
        list_episodes(m.data)
    with pytest.raises(UsageError, match=r"index\(es\) not in"):
        list_episodes(lerobot(tmp_path, "v30_av1", episodes="7").data)
