"""Write synthetic episodes in the real raw DROID layout: the built-in demo and test data.

The point is a dataset the whole pipeline runs on unchanged (`stages.extract.droid` cannot tell it from
real DROID), small enough for tests and with real dynamics for the predictor to learn: every
picture is rendered from the simulated 3-D scene at that time step.

    <out>/
      episodes.txt                               # one episode folder per line, relative to <out>
      <LAB>/success/<YYYY-MM-DD>/<Day_Mon_DD_HH:MM:SS_YYYY>/
        metadata_<LAB>+<collector>+<YYYY-MM-DD-HHh-MMm-SSs>.json   # the keys real DROID has
        trajectory.h5                            # float64 time series at 15 Hz, N rows:
          observation/robot_state/{cartesian_position [N,6], gripper_position [N], joint_positions [N,7]}
          observation/camera_extrinsics/<serial>_{left,right} [N,6]   (camera-to-base, xyz + Euler "xyz")
          observation/camera_type/<serial>, observation/controller_info/*, observation/timestamp/...
          action/{cartesian_position, gripper_position, cartesian_velocity, ...}
        recordings/MP4/<serial>.mp4              # wrist, ext1, ext2: H.264 yuv420p, 15 fps

Real DROID also has `recordings/MP4/<serial>-stereo.mp4` and `recordings/SVO/<serial>.svo`; the
pipeline never reads them, so they are not written (their metadata keys are, as in DROID).

The scene: a textured table, a coloured block and a parallel gripper (blue palm, dark fingers,
grey arm link) at the end-effector pose. The gripper follows a scripted random policy built from
smoothly interpolated waypoints: wandering, picking the block up (it is carried while the jaws are
closed around it) and pushing it (it is shoved when the closed gripper, or an open jaw, touches it
near the table). States are xyz in metres (x 0.3..0.7, y -0.3..0.3, z 0.02..0.4), extrinsic "xyz"
Euler angles (roll near pi, wrapped to (-pi, pi], small pitch, varying yaw) and gripper 0 (open)
.. 1 (closed). Two exterior cameras (robot's left = ext1 = `left_mp4_path`, right = ext2) view
the scene with pinhole projections from either side; the wrist camera rides on the gripper and
looks down past the fingers. Rendering is numpy only: the table is ray-cast per pixel, boxes are
painted as convex polygons (painter's algorithm). The joint positions are a smooth function of
the pose, not real inverse kinematics. The scene (`Scene`, `make_cameras`), the block's physics
(`step_block`) and the renderer (`render_step`) are public: `stages/use/sim.py` drives them as a small
simulator for closed-loop planning, in the scene of the episodes a model was trained on.

Episode i is drawn from `numpy.random.default_rng((seed, i))` alone, so the first episodes do not
depend on how many are written. The same seed writes byte-identical files: the RGB -> YUV
conversion is done here in numpy and x264 runs single-threaded without macroblock-tree rate
control, because swscale's conversion and x264's mb-tree assembly were measured to vary from run
to run on identical frames. The end-effector z range starts at 0.02 m (not 0.05) so that the
finger tips reach below the top of the 5 cm block when picking or pushing it.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import shutil
import string
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import h5py
import numpy as np
from scipy.spatial.transform import Rotation

from pipeline.errors import UsageError
from pipeline.progress import progress as progress_bar

FPS = 15  # DROID control and camera rate
LABS = ("AUTOLab", "CLVR", "GuptaLab", "ILIAD", "IPRL", "IRIS", "PennPAL", "RAD", "RAIL", "REAL", "RPL", "TRI")
TASKS = (
    "put the block on the other side of the table",
    "pick up the block and put it down",
    "push the block to the left",
    "move the cube forward",
    "lift the block",
)
XYZ_LO = np.array([0.3, -0.3, 0.02])  # workspace of the end effector, metres
XYZ_HI = np.array([0.7, 0.3, 0.4])
TABLE_LO = np.array([-0.1, -0.8])  # table top (x, y) extent; the block stays inside BLOCK_LO..HI
TABLE_HI = np.array([1.1, 0.8])
BLOCK_LO = np.array([0.25, -0.35])
BLOCK_HI = np.array([0.75, 0.35])
BLOCK_SIZE = 0.05  # cube edge, metres
PUSH_RADIUS = 0.06  # gripper-to-block centre distance at contact near the table
JAW_RADIUS = 0.03  # a block closer than this to an open gripper lies between the jaws
PALM_RGB = (30, 110, 230)
FINGER_RGB = (45, 45, 50)
ARM_RGB = (205, 205, 210)
BLOCK_RGBS = ((210, 40, 40), (40, 170, 60), (235, 195, 30), (225, 120, 20), (170, 50, 190))
LIGHT = np.array([0.3, 0.2, 1.0]) / np.linalg.norm([0.3, 0.2, 1.0])  # towards the light
WRIST_OFFSET = np.array([0.06, 0.0, -0.06])  # wrist camera position in the gripper frame
WRIST_TILT = np.deg2rad(22.0)  # wrist camera pitched towards the fingers
TEXTURE_SIZE = 256  # texels along one side of the table / floor tile
TEXTURE_METRES = 0.5  # the tile's side on the table
STEREO_BASELINE = {"wrist": 0.063, "ext1": 0.12, "ext2": 0.12}  # ZED mini / ZED 2, metres
SCENE_STREAM = 7_919  # seeds shared scenes apart from the per-episode streams
CAMERAS = ("wrist", "ext1", "ext2")  # ext1 is the robot's left (left_mp4_path), ext2 its right
WRIST_FOCAL = 0.45  # wrist camera focal length in units of image width


def write_synthetic_dataset(
    out: str | Path,
    episodes: int,
    seed: int = 0,
    width: int = 320,
    height: int = 180,
    min_seconds: float = 10.0,
    max_seconds: float = 20.0,
    short_video_every: int = 3,
    progress: bool = False,
    scenes: int = 0,
    explore: Exploration | None = None,
) -> list[Path]:
    """Write `episodes` DROID-format episodes under `out` plus `out/episodes.txt`; return the folders.

    Every `short_video_every`-th episode (1-based) gets MP4s one frame shorter than its
    trajectory.h5, the known DROID case (0 disables). `scenes` > 0 makes episode i share the scene
    (camera placement, table texture, block colour) of episode i % scenes, like many episodes recorded
    in one lab set-up; 0 gives every episode a scene of its own. `explore` mixes exploring moves into
    the scripted behaviours (none by default: the same seed then writes the same bytes as it always has).
    """
    explore = explore or Exploration()
    _check_args(episodes, width, height, min_seconds, max_seconds, short_video_every, scenes, explore)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folders: list[Path] = []
    used: set[str] = set()
    bar = progress_bar("synthetic episodes", "episode", episodes, progress)
    for i in range(episodes):
        plan = episode_plan(seed, i, scenes, min_seconds, max_seconds, used, explore)
        short = short_video_every > 0 and (i + 1) % short_video_every == 0
        folders.append(_write_episode(out, plan, width, height, short))
        bar.update(1)
    bar.close()
    lines = [str(f.relative_to(out)) for f in folders]
    (out / "episodes.txt").write_text("".join(f"{line}\n" for line in lines))
    return folders


def _check_args(
    episodes: int, width: int, height: int, min_s: float, max_s: float, short_every: int, scenes: int,
    explore: Exploration,
) -> None:
    """Named as the command line names them (`pipeline synth`, `demo` and `bench` take --episodes)."""
    if episodes < 1:
        raise UsageError(f"--episodes {episodes}: must be >= 1")
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise UsageError(f"--width/--height {width}x{height}: must be even and >= 16 (H.264 yuv420p)")
    if not 1.0 <= min_s <= max_s:
        raise UsageError(f"--min-seconds/--max-seconds {min_s:g}, {max_s:g}: need 1 <= min <= max")
    if scenes < 0:
        raise UsageError(f"--scenes {scenes}: must be >= 0")
    if short_every < 0:
        raise UsageError(f"short_video_every {short_every}: must be >= 0")
    if not 0.0 <= explore.share <= 1.0 or explore.step <= 0:
        raise UsageError(f"--explore {explore.share:g} (step {explore.step:g} m): need a share in [0, 1], a step > 0")


# ----------------------------------------------------------------------------- the episode plan


@dataclass(frozen=True)
class Motion:
    """The simulated episode, N steps at 15 Hz."""

    xyz: np.ndarray  # [N, 3] end-effector position, metres
    euler: np.ndarray  # [N, 3] extrinsic "xyz" Euler, radians, roll wrapped to (-pi, pi]
    grip: np.ndarray  # [N] 0 open .. 1 closed
    block_xyz: np.ndarray  # [N, 3] block centre
    block_yaw: np.ndarray  # [N]


@dataclass(frozen=True)
class Scene:
    """What stays fixed while an episode is filmed: exterior cameras, table texture and block colour."""

    ext_poses: dict[str, tuple[np.ndarray, np.ndarray]]  # "ext1"/"ext2" -> (rot [3,3], pos [3])
    ext_focal: dict[str, float]  # focal length in units of image width
    block_rgb: tuple[int, int, int]
    ground: np.ndarray  # [1 + 2 T², 3] uint8 palette of wall, table and floor, see _ground_palette


def draw_scene(rng: np.random.Generator) -> Scene:
    """A scene from `rng`, in the order the episodes have always drawn it (so a seed writes the same files)."""
    ext_poses = {"ext1": _ext_pose(rng, +1.0), "ext2": _ext_pose(rng, -1.0)}
    ext_focal = {"ext1": float(rng.uniform(0.5, 0.56)), "ext2": float(rng.uniform(0.54, 0.58))}
    block_rgb = BLOCK_RGBS[int(rng.integers(len(BLOCK_RGBS)))]
    return Scene(ext_poses, ext_focal, block_rgb, _ground_palette(rng))


@dataclass(frozen=True)
class EpisodePlan:
    """One synthetic episode before it is written: names, the simulated motion and the scene."""

    lab: str
    when: dt.datetime
    uuid: str
    folder: Path  # relative to out: <LAB>/success/<date>/<Day_Mon_DD_HH:MM:SS_YYYY>
    serials: dict[str, str]  # "wrist"/"ext1"/"ext2" -> serial
    task: str
    motion: Motion
    scene: Scene


def episode_plan(seed: int, index: int, scenes: int = 0, min_seconds: float = 10.0, max_seconds: float = 20.0,
                 used: set[str] | None = None, explore: Exploration | None = None) -> EpisodePlan:
    """Episode `index` of `write_synthetic_dataset(..., seed, scenes=scenes)`, drawn from its seeds alone.

    Also what the simulator (`stages/use/sim.py`) replays: an index past the written ones is a scripted
    episode no model was trained on, filmed in the same scene when `scenes` > 0.
    """
    rng = np.random.default_rng((seed, index))
    # a scene (cameras, table, block colour) of its own, or one of `scenes` shared ones, as in a lab
    scene = rng if scenes == 0 else np.random.default_rng((seed, SCENE_STREAM, index % scenes))
    return _plan_episode(rng, scene, set() if used is None else used, min_seconds, max_seconds, explore)


def _plan_episode(
    rng: np.random.Generator, scene: np.random.Generator, used: set[str], min_s: float, max_s: float,
    explore: Exploration | None,
) -> EpisodePlan:
    lab = str(rng.choice(LABS))
    when = dt.datetime(2023, 3, 1, 8) + dt.timedelta(
        days=int(rng.integers(0, 240)), seconds=int(rng.integers(0, 11 * 3600))
    )
    folder = _episode_folder(lab, when)
    while str(folder) in used:  # same lab and second: move on a second, as a real run would
        when += dt.timedelta(seconds=1)
        folder = _episode_folder(lab, when)
    used.add(str(folder))
    collector = "".join(rng.choice(list(string.ascii_lowercase + string.digits), 8))
    serials: list[str] = []
    while len(serials) < 3:  # ZED serials are 8-digit numbers
        serial = str(int(rng.integers(13_000_000, 39_000_000)))
        serials += [serial] if serial not in serials else []
    num_rows = round(rng.uniform(min_s, max_s) * FPS)
    return EpisodePlan(
        lab=lab,
        when=when,
        uuid=f"{lab}+{collector}+{when:%Y-%m-%d-%Hh-%Mm-%Ss}",
        folder=folder,
        serials=dict(zip(("wrist", "ext1", "ext2"), serials, strict=True)),
        task=str(rng.choice(TASKS)),
        motion=_simulate(rng, num_rows, explore),
        scene=draw_scene(scene),  # after the motion: with scenes=0 it comes from the same stream
    )


def _episode_folder(lab: str, when: dt.datetime) -> Path:
    # DROID names an episode folder by time.asctime() with "_" for " ": Fri_Jul__7_09:42:23_2023
    return Path(lab) / "success" / f"{when:%Y-%m-%d}" / when.ctime().replace(" ", "_")


def _ext_pose(rng: np.random.Generator, side: float) -> tuple[np.ndarray, np.ndarray]:
    """An exterior camera on the robot's left (side +1, +y) or right (-1), looking at the table."""
    pos = np.array([0.3, 0.65 * side, 0.65]) + rng.normal(0.0, 0.015, 3)
    target = np.array([0.5, 0.0, 0.15]) + rng.normal(0.0, 0.015, 3)
    return _look_at(pos, target), pos


def _look_at(pos: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-base rotation, OpenCV axes (x right, y down, z forward)."""
    z = (target - pos) / np.linalg.norm(target - pos)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)


# ----------------------------------------------------------------------------- simulation


def _simulate(rng: np.random.Generator, n: int, explore: Exploration | None = None) -> Motion:
    """Scripted random policy + block physics, one step at a time (N is a few hundred)."""
    pose = np.array([*rng.uniform([0.4, -0.15, 0.2], [0.6, 0.15, 0.35]), 0.0, 0.0, rng.uniform(-1, 1), 0.0])
    block = np.array([*rng.uniform([0.35, -0.2], [0.65, 0.2]), BLOCK_SIZE / 2, rng.uniform(-np.pi, np.pi)])
    poses, blocks, grasped = [pose], [block.copy()], False
    while len(poses) < n:
        for target, steps in _plan_segments(rng, poses[-1], blocks[-1], explore):
            start = poses[-1]
            for k in range(1, steps + 1):
                ease = 0.5 - 0.5 * np.cos(np.pi * k / steps)
                pose = start + ease * (target - start)
                block, grasped = step_block(blocks[-1], poses[-1], pose, grasped)
                poses.append(pose)
                blocks.append(block)
    p, b = np.array(poses[:n]), np.array(blocks[:n])
    roll = np.angle(np.exp(1j * (np.pi + p[:, 3])))  # wrapped to (-pi, pi], as real DROID stores it
    return Motion(
        xyz=p[:, :3],
        euler=np.stack([roll, p[:, 4], p[:, 5]], axis=1),
        grip=p[:, 6],
        block_xyz=b[:, :3],
        block_yaw=b[:, 3],
    )


def _plan_segments(rng: np.random.Generator, pose: np.ndarray, block: np.ndarray, explore: Exploration | None = None
                   ) -> list[tuple[np.ndarray, int]]:
    """Waypoints [x, y, z, roll offset, pitch, yaw, grip] with step counts for one behaviour."""
    if explore is not None and explore.share > 0 and rng.uniform() < explore.share:  # no draw when off
        return _explore_segments(rng, pose, explore)
    yaw = float(np.clip(pose[5] + rng.uniform(-1.2, 1.2), -2.2, 2.2))
    tilt = np.clip(rng.normal(0.0, [0.12, 0.08]), -0.3, 0.3)

    def way(xy: np.ndarray, z: float, grip: float, seconds: float) -> tuple[np.ndarray, int]:
        xy = np.clip(xy, XYZ_LO[:2], XYZ_HI[:2])
        return np.array([*xy, z, *tilt, yaw, grip]), max(2, round(seconds * FPS))

    kind = rng.choice(["wander", "pick", "push"], p=[0.4, 0.3, 0.3])
    bxy = block[:2]
    if kind == "wander":
        grip = float(rng.choice([0.0, 0.0, 1.0, rng.uniform()]))
        return [way(rng.uniform(XYZ_LO[:2], XYZ_HI[:2]), rng.uniform(0.1, XYZ_HI[2]), grip, rng.uniform(1, 2.5))]
    if kind == "pick":
        drop = rng.uniform(XYZ_LO[:2], XYZ_HI[:2])
        lift = rng.uniform(0.12, 0.3)
        return [
            way(bxy, 0.15, 0.0, rng.uniform(1.0, 1.8)),
            way(bxy, 0.02, 0.0, 0.8),
            way(bxy, 0.02, 1.0, 0.6),
            way(drop, lift, 1.0, rng.uniform(1.2, 2.0)),
            way(drop, 0.03, 1.0, 0.8),
            way(drop, 0.03, 0.0, 0.5),
            way(drop, 0.15, 0.0, 0.7),
        ]
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction)
    return [
        way(bxy - 0.13 * direction, 0.12, 1.0, rng.uniform(1.0, 1.8)),
        way(bxy - 0.13 * direction, 0.02, 1.0, 0.7),
        way(bxy + 0.1 * direction, 0.02, 1.0, rng.uniform(1.2, 2.0)),
        way(bxy + 0.1 * direction, 0.15, 1.0, 0.7),
    ]


@dataclass(frozen=True)
class Exploration:
    """Exploring moves mixed into the scripted behaviours, so that a world model sees every direction and size
    of move a planner will ask it about: DROID is teleoperated play, with moves of every kind; scripted
    reaches and pushes alone move along few directions, at speeds set by their easing.

    An exploring behaviour is a run of `moves` short moves (drawn in [min, max]), each a per-axis xyz delta
    uniform in [-step, step] metres over `steps` control steps (4 at 15 Hz = one stored frame at 4 fps: the
    planner's rate), orientation held, the gripper now and then opened or closed."""

    share: float = 0.0  # chance that a behaviour is exploring (0: never; no random draw is spent on it)
    step: float = 0.05  # m per move and axis at most (the planner's plan.max_norm)
    steps: int = 4  # control steps per move
    moves: tuple[int, int] = (6, 16)  # moves per exploring behaviour


def _explore_segments(rng: np.random.Generator, pose: np.ndarray, explore: Exploration
                      ) -> list[tuple[np.ndarray, int]]:
    """A run of short moves in random directions from `pose`, inside the workspace."""
    target, out = pose.copy(), []
    for _ in range(int(rng.integers(explore.moves[0], explore.moves[1] + 1))):
        target = target.copy()
        target[:3] = np.clip(target[:3] + rng.uniform(-explore.step, explore.step, 3), XYZ_LO, XYZ_HI)
        if rng.uniform() < 0.1:
            target[6] = 1.0 - round(float(target[6]))  # open a closed gripper, close an open one
        out.append((target, explore.steps))
    return out


def step_block(block: np.ndarray, prev: np.ndarray, pose: np.ndarray, grasped: bool) -> tuple[np.ndarray, bool]:
    """Block [x, y, z, yaw] after the gripper moved from `prev` to `pose`: carried, pushed or at rest."""
    block = block.copy()
    closed, was_closed = pose[6] >= 0.5, prev[6] >= 0.5
    gxy, low = pose[:2], pose[2] < BLOCK_SIZE
    offset = block[:2] - gxy
    dist = float(np.linalg.norm(offset))
    if grasped and closed:
        block[:2], block[2] = gxy, max(BLOCK_SIZE / 2, pose[2] + 0.02)
        block[3] += pose[5] - prev[5]
        return block, True
    block[2] = BLOCK_SIZE / 2  # released (or never held): it rests on the table
    if low and closed and not was_closed and dist < JAW_RADIUS:
        return block, True
    between_jaws = not closed and dist < JAW_RADIUS
    if low and dist < PUSH_RADIUS and not between_jaws:
        direction = offset / dist if dist > 1e-9 else np.array([1.0, 0.0])
        block[:2] = np.clip(gxy + PUSH_RADIUS * direction, BLOCK_LO, BLOCK_HI)
    return block, False


# ----------------------------------------------------------------------------- geometry


def _rotate(vectors: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """rot @ v for vectors [..., 3] and rotations [3, 3] or [..., 3, 3], elementwise.

    Written out instead of `@` as a precaution: BLAS kernels may round differently depending on
    memory alignment, and a one-ulp change can flip a texel between runs of the same seed.
    """
    return sum(vectors[..., j : j + 1] * rot[..., :, j] for j in range(3))


_CORNER_SIGNS = np.array(list(itertools.product((-1.0, 1.0), repeat=3)))  # [8, 3], index 4a+2b+c


def _face_table() -> tuple[np.ndarray, np.ndarray]:
    """Corner indices [6, 4] (cyclic) and outward normals [6, 3] of a box's faces."""
    faces, normals = [], []
    for axis in range(3):
        b, c = [a for a in range(3) if a != axis]
        for sign in (-1.0, 1.0):
            cycle = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
            idx = []
            for sb, sc in cycle:
                s = np.zeros(3)
                s[axis], s[b], s[c] = sign, sb, sc
                idx.append(int(np.flatnonzero((s == _CORNER_SIGNS).all(axis=1))[0]))
            faces.append(idx)
            normals.append(np.eye(3)[axis] * sign)
    return np.array(faces), np.array(normals)


_FACES, _NORMALS = _face_table()


@dataclass(frozen=True)
class _Box:
    center: np.ndarray  # [3] world
    rot: np.ndarray  # [3, 3] box-to-world
    half: np.ndarray  # [3] half extents along the box axes
    rgb: tuple[int, int, int]


def _gripper_boxes(xyz: np.ndarray, rot: np.ndarray, grip: float, arm: bool) -> list[_Box]:
    """Fingers (and palm and arm link) in the gripper frame: z points from the palm to the tips."""

    def box(local: tuple[float, float, float], half: tuple[float, float, float], rgb: tuple[int, int, int]) -> _Box:
        return _Box(xyz + _rotate(np.array(local), rot), rot, np.array(half), rgb)

    gap = 0.009 + 0.036 * (1.0 - grip)  # half distance between the finger centres
    boxes = [
        box((0.0, -gap, -0.025), (0.01, 0.006, 0.025), FINGER_RGB),
        box((0.0, gap, -0.025), (0.01, 0.006, 0.025), FINGER_RGB),
    ]
    if arm:
        boxes += [
            box((0.0, 0.0, -0.07), (0.025, 0.055, 0.02), PALM_RGB),
            box((0.0, 0.0, -0.22), (0.03, 0.03, 0.13), ARM_RGB),
        ]
    return boxes


def block_box(center: np.ndarray, yaw: float, rgb: tuple[int, int, int]) -> _Box:
    rot = Rotation.from_euler("z", yaw).as_matrix()
    return _Box(center, rot, np.full(3, BLOCK_SIZE / 2), rgb)


# ----------------------------------------------------------------------------- rendering


class Camera:
    """A pinhole camera (OpenCV axes) of a fixed image size; draws the scene for one pose."""

    def __init__(self, width: int, height: int, focal: float, ground: np.ndarray) -> None:
        self.width, self.height = width, height
        self.f = focal * width  # pixels
        self.ray_x = ((np.arange(width) + 0.5 - width / 2) / self.f).astype(np.float32)[None, :]  # [1, W]
        self.ray_y = ((np.arange(height) + 0.5 - height / 2) / self.f).astype(np.float32)[:, None]  # [H, 1]
        self.ground = ground  # [1 + 2 T², 3] uint8, see _ground_palette
        self._background_key: tuple[bytes, bytes] | None = None
        self._background: np.ndarray | None = None

    def background(self, rot: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Table / floor / wall seen from the pose, ray-cast per pixel; cached for a static camera."""
        key = (rot.tobytes(), pos.tobytes())
        if key != self._background_key:
            # world direction of the ray through each pixel: rot @ (x, y, 1), one [H, W] per axis
            r = rot.astype(np.float32)
            dirs = [self.ray_x * r[k, 0] + (self.ray_y * r[k, 1] + r[k, 2]) for k in range(3)]
            self._background, self._background_key = _ray_cast(*dirs, pos, self.ground), key
        assert self._background is not None
        return self._background.copy()

    def project(self, points: np.ndarray, rot: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points [K, 3] -> pixel coordinates [K, 2] and depth [K]."""
        cam = _rotate(points - pos, rot.T)  # [K, 3] camera frame
        depth = cam[:, 2]
        safe = np.where(depth > 1e-6, depth, 1e-6)
        uv = cam[:, :2] / safe[:, None] * self.f + np.array([self.width / 2, self.height / 2])
        return uv, depth

    def render(self, rot: np.ndarray, pos: np.ndarray, boxes: list[_Box], shadow: np.ndarray) -> np.ndarray:
        img = self.background(rot, pos)  # [H, W, 3] uint8
        uv, depth = self.project(shadow, rot, pos)
        if (depth > 0.01).all():
            _fill_convex(img, uv, factor=0.55)
        for box in sorted(boxes, key=lambda b: -float(((b.center - pos) * rot[:, 2]).sum())):
            self._draw_box(img, box, rot, pos)
        return img

    def _draw_box(self, img: np.ndarray, box: _Box, rot: np.ndarray, pos: np.ndarray) -> None:
        corners = box.center + _rotate(_CORNER_SIGNS * box.half, box.rot)  # [8, 3]
        uv, depth = self.project(corners, rot, pos)
        normals = _rotate(_NORMALS, box.rot)  # [6, 3] world
        centers = corners[_FACES].mean(axis=1)  # [6, 3]
        facing = ((centers - pos) * normals).sum(axis=1) < 0
        for face in np.flatnonzero(facing):
            if (depth[_FACES[face]] > 0.01).all():
                shade = 0.5 + 0.5 * max(0.0, float((normals[face] * LIGHT).sum()))
                _fill_convex(img, uv[_FACES[face]], rgb=np.array(box.rgb) * shade)


def _ray_cast(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray, pos: np.ndarray, ground: np.ndarray) -> np.ndarray:
    """Colour [H, W, 3] of the ground plane z = 0 (table or floor) along the rays, else the wall."""
    hits = dz < -1e-6
    t = np.float32(-pos[2]) / np.minimum(dz, np.float32(-1e-6))  # [H, W]; meaningless where not hits
    x = np.float32(pos[0]) + t * dx
    y = np.float32(pos[1]) + t * dy
    size = TEXTURE_SIZE
    texel = (np.floor(x * (size / TEXTURE_METRES)).astype(np.int64) % size) * size
    texel += np.floor(y * (size / TEXTURE_METRES)).astype(np.int64) % size
    on_table = (x > TABLE_LO[0]) & (x < TABLE_HI[0]) & (y > TABLE_LO[1]) & (y < TABLE_HI[1])
    return ground[np.where(hits, 1 + texel + np.where(on_table, 0, size * size), 0)]


def _fill_convex(img: np.ndarray, pts: np.ndarray, rgb: np.ndarray | None = None, factor: float | None = None) -> None:
    """Paint a convex polygon [K, 2] (pixel coordinates) with a colour, or darken it by `factor`."""
    h, w = img.shape[:2]
    x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + 1, [w, h])
    nxt = np.concatenate([pts[1:], pts[:1]])  # [K, 2] the other end of each edge
    area2 = float((pts[:, 0] * nxt[:, 1] - nxt[:, 0] * pts[:, 1]).sum())  # shoelace, signed
    if x0 >= x1 or y0 >= y1 or abs(area2) < 1e-9:
        return
    px = np.arange(x0, x1) + 0.5  # [w']
    py = (np.arange(y0, y1) + 0.5)[:, None]  # [h', 1]
    inside = np.ones((y1 - y0, x1 - x0), dtype=bool)
    for a, b in zip(pts, nxt, strict=True):
        inside &= np.sign(area2) * ((b[0] - a[0]) * (py - a[1]) - (b[1] - a[1]) * (px - a[0])) >= 0
    region = img[y0:y1, x0:x1]
    if rgb is not None:
        region[inside] = np.clip(rgb, 0, 255).astype(np.uint8)
    else:
        region[inside] = (region[inside] * factor).astype(np.uint8)


def _ground_palette(rng: np.random.Generator) -> np.ndarray:
    """Colours [1 + 2 T², 3] uint8: the wall, then a T x T table tile, then a T x T floor tile.

    The table tile is wood-like (smooth noise, grain stripes) with dark grid lines every 10 cm, so
    camera motion over the table is easy to see; one tile covers TEXTURE_METRES square.
    """
    size = TEXTURE_SIZE
    coarse = rng.normal(0.0, 1.0, (size // 16, size // 16))
    smooth = np.kron(coarse, np.ones((16, 16)))
    smooth = (smooth + np.roll(smooth, 8, 0) + np.roll(smooth, 8, 1) + np.roll(smooth, (8, 8), (0, 1))) / 4
    grain = np.sin(np.arange(size)[None, :] * 2 * np.pi / 9 + 2.0 * smooth)
    base = rng.uniform([140, 100, 60], [185, 140, 95])
    value = 1.0 + 0.08 * smooth + 0.06 * grain + rng.normal(0.0, 0.02, (size, size))
    metres = (np.arange(size) + 0.5) * TEXTURE_METRES / size
    line = np.abs((metres + 0.05) % 0.1 - 0.05) < 0.003
    value *= np.where(line[:, None] | line[None, :], 0.7, 1.0)
    table = base * value[..., None]
    floor = 0.45 * table.mean(axis=-1, keepdims=True) + np.array([40.0, 40.0, 48.0])
    wall = np.array([[196.0, 200.0, 210.0]])
    colours = np.concatenate([wall, table.reshape(-1, 3), floor.reshape(-1, 3)])
    return np.clip(colours, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- per-frame views


def gripper_rotations(euler: np.ndarray) -> np.ndarray:
    """Extrinsic "xyz" Euler angles [N, 3] -> gripper-to-base rotations [N, 3, 3]."""
    return Rotation.from_euler("xyz", euler).as_matrix()  # [N, 3, 3]


def _wrist_poses(xyz: np.ndarray, grot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wrist camera rotation [N, 3, 3] and position [N, 3], camera-to-base, for gripper poses [N, 3], [N, 3, 3]."""
    mount = Rotation.from_euler("y", -WRIST_TILT).as_matrix()
    cam_rot = np.stack([_rotate(mount[:, k], grot) for k in range(3)], axis=-1)  # grot @ mount
    return cam_rot, xyz + _rotate(WRIST_OFFSET, grot)


def camera_poses(scene: Scene, xyz: np.ndarray, grot: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-camera rotation [N, 3, 3] and position [N, 3] of the left eye, camera-to-base, for N gripper poses."""
    n = len(xyz)
    poses = {"wrist": _wrist_poses(xyz, grot)}
    for name, (rot, pos) in scene.ext_poses.items():
        poses[name] = (np.broadcast_to(rot, (n, 3, 3)).copy(), np.broadcast_to(pos, (n, 3)).copy())
    return poses


def _camera_poses(plan: EpisodePlan) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return camera_poses(plan.scene, plan.motion.xyz, gripper_rotations(plan.motion.euler))


def make_cameras(scene: Scene, width: int, height: int, names: tuple[str, ...] = CAMERAS) -> dict[str, Camera]:
    """The scene's cameras of the given names ("wrist", "ext1", "ext2") at one image size."""
    focal = {"wrist": WRIST_FOCAL, **scene.ext_focal}
    return {name: Camera(width, height, focal[name], scene.ground) for name in names}


def _shadow(xyz: np.ndarray) -> np.ndarray:
    """A 12-gon under the gripper on the table; larger when the gripper is higher."""
    angles = np.linspace(0.0, 2 * np.pi, 12, endpoint=False)
    radius = 0.03 + 0.12 * xyz[2]
    return np.stack([xyz[0] + radius * np.cos(angles), xyz[1] + radius * np.sin(angles), np.full(12, 0.001)], axis=1)


def render_step(cams: dict[str, Camera], poses: dict[str, tuple[np.ndarray, np.ndarray]], xyz: np.ndarray,
                grot: np.ndarray, grip: float, block: _Box) -> dict[str, np.ndarray]:
    """Each camera's image [H, W, 3] uint8 of one moment: camera poses (rot [3, 3], pos [3]) by name, the
    gripper at xyz [3] / grot [3, 3] with opening `grip`, and the block (the episodes' and the simulator's)."""
    shadow = _shadow(xyz)
    images = {}
    for name, cam in cams.items():
        boxes = [*_gripper_boxes(xyz, grot, grip, arm=name != "wrist"), block]
        images[name] = cam.render(*poses[name], boxes, shadow)
    return images


def _frames(plan: EpisodePlan, cams: dict[str, Camera], count: int) -> Iterator[dict[str, np.ndarray]]:
    """The three camera images of each of the first `count` steps."""
    m = plan.motion
    grot = gripper_rotations(m.euler)
    poses = camera_poses(plan.scene, m.xyz, grot)
    for t in range(count):
        block = block_box(m.block_xyz[t], float(m.block_yaw[t]), plan.scene.block_rgb)
        at_t = {name: (rot[t], pos[t]) for name, (rot, pos) in poses.items()}
        yield render_step(cams, at_t, m.xyz[t], grot[t], float(m.grip[t]), block)


# ----------------------------------------------------------------------------- writing


def _write_episode(out: Path, plan: EpisodePlan, width: int, height: int, short: bool) -> Path:
    """Write one episode into a temporary folder, then move it into place."""
    final = out / plan.folder
    tmp = final.with_name(f".{final.name}.partial")  # hidden: globs like "*/success/*/*" skip it
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "recordings" / "MP4").mkdir(parents=True)
    poses = _camera_poses(plan)
    _write_metadata(tmp, plan, poses)
    _write_h5(tmp / "trajectory.h5", plan, poses)
    cams = make_cameras(plan.scene, width, height)
    count = len(plan.motion.xyz) - (1 if short else 0)
    _write_videos(
        {k: tmp / "recordings" / "MP4" / f"{s}.mp4" for k, s in plan.serials.items()},
        _frames(plan, cams, count),
        width,
        height,
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _write_videos(paths: dict[str, Path], frames: Iterator[dict[str, np.ndarray]], width: int, height: int) -> None:
    """Encode the frames of each camera as H.264 (libx264, yuv420p, 15 fps, deterministic)."""
    containers = {k: av.open(str(p), mode="w") for k, p in paths.items()}
    try:
        streams = {k: _add_stream(c, width, height) for k, c in containers.items()}
        for t, images in enumerate(frames):
            for k, img in images.items():
                frame = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(img), format="yuv420p")
                frame.pts, frame.time_base = t, Fraction(1, FPS)
                containers[k].mux(streams[k].encode(frame))
        for k, stream in streams.items():
            containers[k].mux(stream.encode(None))
    finally:
        for c in containers.values():
            c.close()


def _rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> planar YUV 4:2:0 [H * 3 / 2, W], BT.601 limited range (the default).

    Done here rather than by PyAV/swscale, whose SIMD conversion was measured to give different
    bytes from run to run for the same picture.
    """
    h, w = rgb.shape[:2]
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = (65.481 / 255) * r + (128.553 / 255) * g + (24.966 / 255) * b + 16.5  # +0.5: round on truncation
    quarter = (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]) * 0.25  # [H/2, W/2, 3]
    r, g, b = quarter[..., 0], quarter[..., 1], quarter[..., 2]
    cb = (-37.797 / 255) * r - (74.203 / 255) * g + (112.0 / 255) * b + 128.5
    cr = (112.0 / 255) * r - (93.786 / 255) * g - (18.214 / 255) * b + 128.5
    planes = np.concatenate([y.reshape(-1), cb.reshape(-1), cr.reshape(-1)])  # all within [16, 241)
    return planes.astype(np.uint8).reshape(h * 3 // 2, w)


def _add_stream(container: Any, width: int, height: int) -> Any:
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    # One thread, and no macroblock-tree rate control: its x264 assembly was measured to give different
    # bytes from run to run for the same frames. With both off the same seed writes the same files.
    stream.options = {"crf": "20", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
    return stream


def _pose6(rot: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """[N, 3, 3], [N, 3] -> [N, 6] xyz + extrinsic "xyz" Euler (DROID's camera_extrinsics format)."""
    return np.concatenate([pos, Rotation.from_matrix(rot).as_euler("xyz")], axis=1)


def _eyes(name: str, rot: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right eye poses [N, 6]; the right eye sits one baseline along the camera's x."""
    right = pos + rot[:, :, 0] * STEREO_BASELINE[name]
    return _pose6(rot, pos), _pose6(rot, right)


def _write_metadata(folder: Path, plan: EpisodePlan, poses: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    rel = plan.folder.as_posix()
    meta: dict[str, Any] = {
        "uuid": plan.uuid,
        "lab": plan.lab,
        "user": "Synthetic Operator",
        "user_id": plan.uuid.split("+")[1],
        "date": f"{plan.when:%Y-%m-%d}",
        "timestamp": f"{plan.when:%Y-%m-%d-%Hh-%Mm-%Ss}",
        "hdf5_path": f"{rel}/trajectory.h5",
        "building": f"{plan.lab} synthetic building",
        "scene_id": int(plan.uuid.encode().hex()[:6], 16) % 10_000,
        "success": True,
        "robot_serial": "synthetic-panda",
        "r2d2_version": "1.3",
        "current_task": plan.task,
        "trajectory_length": len(plan.motion.xyz),
    }
    for name, serial in plan.serials.items():
        meta[f"{name}_cam_serial"] = serial
    for name in plan.serials:
        rot, pos = poses[name]
        meta[f"{name}_cam_extrinsics"] = [float(v) for v in _pose6(rot[:1], pos[:1])[0]]
    for name, serial in plan.serials.items():
        meta[f"{name}_svo_path"] = f"{rel}/recordings/SVO/{serial}.svo"
        meta[f"{name}_mp4_path"] = f"{rel}/recordings/MP4/{serial}.mp4"
    meta["left_mp4_path"], meta["right_mp4_path"] = meta["ext1_mp4_path"], meta["ext2_mp4_path"]
    (folder / f"metadata_{plan.uuid}.json").write_text(json.dumps(meta, indent=2))


def _write_h5(path: Path, plan: EpisodePlan, poses: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    m = plan.motion
    n = len(m.xyz)
    cartesian = np.concatenate([m.xyz, m.euler], axis=1)  # [N, 6]
    with h5py.File(path, "w") as f:
        f.attrs.update(
            {
                "building": f"{plan.lab} synthetic building",
                "current_task": plan.task,
                "success": True,
                "failure": False,
                "user": "Synthetic Operator",
                "robot_serial_number": "synthetic-panda",
                "time": plan.when.ctime().replace(" ", "_"),
                "version_number": 1.3,
                "scene_id": 0,
            }
        )
        state = f.create_group("observation/robot_state")
        state["cartesian_position"] = cartesian
        state["gripper_position"] = m.grip.astype(np.float64)
        state["joint_positions"] = _joint_positions(m)
        state["joint_velocities"] = np.gradient(state["joint_positions"][()], axis=0) * FPS
        for name, serial in plan.serials.items():
            left, right = _eyes(name, *poses[name])
            f[f"observation/camera_extrinsics/{serial}_left"] = left
            f[f"observation/camera_extrinsics/{serial}_right"] = right
            f[f"observation/camera_type/{serial}"] = np.full(n, 0 if name == "wrist" else 1, dtype=np.int64)
        for key in ("controller_on", "movement_enabled", "success", "failure"):
            f[f"observation/controller_info/{key}"] = np.full(n, key in ("controller_on", "movement_enabled"))
        _write_timestamps(f, plan, n)
        _write_actions(f, cartesian, m.grip, state["joint_positions"][()])


def _joint_positions(m: Motion) -> np.ndarray:
    """A smooth, plausible-looking [N, 7] function of the pose (not inverse kinematics)."""
    x, y, z = m.xyz.T
    reach = np.hypot(x, y)
    return np.stack(
        [
            np.arctan2(y, x),
            1.2 * reach - 0.5 - 0.8 * z,
            np.zeros_like(x) + 0.05 * m.euler[:, 1],
            -2.6 + 1.5 * reach + 0.8 * z,
            0.05 * m.euler[:, 1],
            1.9 + 0.6 * z - 0.3 * reach,
            m.euler[:, 2] - np.arctan2(y, x) + np.pi / 4,
        ],
        axis=1,
    )


def _write_timestamps(f: h5py.File, plan: EpisodePlan, n: int) -> None:
    t0 = int(plan.when.replace(tzinfo=dt.UTC).timestamp() * 1000)
    step_ms = t0 + np.round(np.arange(n) * 1000 / FPS).astype(np.int64)  # [N]
    ts = f.create_group("observation/timestamp")
    ts["skip_action"] = np.zeros(n, dtype=bool)
    for serial in plan.serials.values():
        ts[f"cameras/{serial}_estimated_capture"] = step_ms - 30
        ts[f"cameras/{serial}_frame_received"] = step_ms - 10
        ts[f"cameras/{serial}_read_start"] = step_ms - 8
        ts[f"cameras/{serial}_read_end"] = step_ms - 2
    for i, key in enumerate(("control_start", "policy_start", "sleep_start", "step_start", "step_end")):
        ts[f"control/{key}"] = step_ms + i * 5
    ts["robot_state/read_start"] = step_ms - 5
    ts["robot_state/read_end"] = step_ms - 4
    ts["robot_state/robot_timestamp_seconds"] = (step_ms - 4) // 1000
    ts["robot_state/robot_timestamp_nanos"] = ((step_ms - 4) % 1000) * 1_000_000


def _write_actions(f: h5py.File, cartesian: np.ndarray, grip: np.ndarray, joints: np.ndarray) -> None:
    """The commanded next pose of each step (the last step repeats), like DROID's action/ group."""
    nxt = np.concatenate([cartesian[1:], cartesian[-1:]])  # [N, 6]
    nxt_grip = np.concatenate([grip[1:], grip[-1:]])
    nxt_joints = np.concatenate([joints[1:], joints[-1:]])
    velocity = nxt - cartesian
    velocity[:, 3:] = np.angle(np.exp(1j * velocity[:, 3:]))  # wrap Euler differences
    a = f.create_group("action")
    a["cartesian_position"] = nxt
    a["target_cartesian_position"] = nxt
    a["cartesian_velocity"] = velocity * FPS
    a["gripper_position"] = nxt_grip
    a["target_gripper_position"] = nxt_grip
    a["gripper_velocity"] = (nxt_grip - grip) * FPS
    a["joint_position"] = nxt_joints
    a["joint_velocity"] = (nxt_joints - joints) * FPS
