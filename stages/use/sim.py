"""A small simulator of the built-in synthetic scene, for closed-loop planning.

Why: a plan is only tested when the world answers the executed action with a new picture. The synthetic
episodes (`stages/synthetic.py`) already render every frame from a simulated 3-D state; this module
drives the same scene, renderer and block physics one commanded pose at a time, so a model trained on
`pipeline demo`'s episodes sees pictures of the very scene it was trained on. The arm is pose-controlled
(as DROID's Cartesian controller): `move_to` drives the end effector to a target pose over the control
steps of one stored frame (the stride at 15 Hz), and the block is pushed or carried at every control
step exactly as in the scripted episodes. Scripted episodes with indices past the written ones
(`HELDOUT_INDEX`) give start and goal states no model was trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from pipeline.errors import UsageError
from stages.demo.synthetic import (
    FPS,
    XYZ_HI,
    XYZ_LO,
    Motion,
    Scene,
    block_box,
    camera_poses,
    episode_plan,
    gripper_rotations,
    make_cameras,
    render_step,
    step_block,
)

HELDOUT_INDEX = 1_000_000  # benchmark episode k is scripted episode HELDOUT_INDEX + k of the data's seed
MIN_GOAL_DISTANCE = 0.05  # m: a start/goal pair closer than this is drawn again (up to MAX_DRAWS times)
MAX_DRAWS = 50
CAMERA_NAMES = {"wrist_mp4_path": "wrist", "left_mp4_path": "ext1", "right_mp4_path": "ext2",
                "ext1_mp4_path": "ext1", "ext2_mp4_path": "ext2"}  # metadata key -> synthetic camera


def camera_name(key: str) -> str:
    """The synthetic camera a metadata key (data.cameras) films with."""
    if key not in CAMERA_NAMES:
        raise UsageError(f"camera {key!r}: the synthetic scene has {', '.join(CAMERA_NAMES)}")
    return CAMERA_NAMES[key]


@dataclass(frozen=True)
class SimState:
    """The world at one moment: the robot's state (what DROID records) and the block."""

    pose: np.ndarray  # [7] xyz (m), extrinsic "xyz" Euler (rad), gripper 0 open .. 1 closed
    block: np.ndarray  # [4] block centre xyz (m) and yaw (rad)
    grasped: bool = False  # the block is carried between the closed jaws


def state_at(motion: Motion, t: int) -> SimState:
    """Step t of a scripted episode. A carried block sits exactly under the closed gripper (step_block puts
    it there), which is how `grasped` is told from the recorded arrays."""
    pose = np.concatenate([motion.xyz[t], motion.euler[t], motion.grip[t : t + 1]])  # [7]
    block = np.concatenate([motion.block_xyz[t], motion.block_yaw[t : t + 1]])  # [4]
    carried = motion.grip[t] >= 0.5 and np.allclose(block[:2], pose[:2])
    return SimState(pose, block, bool(carried))


class SceneSim:
    """One camera's view of a scene with a pose-controlled gripper and the block."""

    def __init__(self, scene: Scene, camera: str, width: int, height: int, substeps: int, state: SimState) -> None:
        self.scene, self.camera, self.substeps = scene, camera, substeps
        self.cams = make_cameras(scene, width, height, (camera,))
        self.state = state

    def move_to(self, target: np.ndarray) -> None:
        """Drive the end effector to pose `target` [7] (clipped to the episodes' workspace and gripper range)
        in `substeps` control steps, moving the block at each step as the scripted episodes do."""
        start = self.state.pose
        # the scripted episodes may sit an ulp outside the workspace: a move never pulls them back by itself
        lo, hi = np.minimum(XYZ_LO, start[:3]), np.maximum(XYZ_HI, start[:3])
        target = np.concatenate([np.clip(target[:3], lo, hi), target[3:6], np.clip(target[6:], 0.0, 1.0)])
        delta = target - start  # [7]
        delta[3:6] = np.angle(np.exp(1j * delta[3:6]))  # the short way round for the angles
        prev, block, grasped = start, self.state.block, self.state.grasped
        for k in range(1, self.substeps + 1):
            pose = start + delta * (k / self.substeps)  # [7]; step_block reads xyz, yaw (5) and gripper (6)
            block, grasped = step_block(block, prev, pose, grasped)
            prev = pose
        self.state = SimState(target, block, grasped)

    def try_move(self, target: np.ndarray) -> np.ndarray:
        """The picture after `move_to(target)`, leaving the simulator as it was (a lookahead)."""
        before = self.state
        try:
            self.move_to(target)
            return self.render()
        finally:
            self.state = before

    def render(self) -> np.ndarray:
        """The camera's picture [H, W, 3] uint8 of the current state."""
        pose = self.state.pose
        grot = gripper_rotations(pose[None, 3:6])  # [1, 3, 3]
        rot, pos = camera_poses(self.scene, pose[None, :3], grot)[self.camera]
        block = block_box(self.state.block[:3], float(self.state.block[3]), self.scene.block_rgb)
        return render_step(self.cams, {self.camera: (rot[0], pos[0])}, pose[:3], grot[0], float(pose[6]), block)[
            self.camera]


@dataclass(frozen=True)
class Task:
    """A start and a goal state from one held-out scripted episode, and the scene it is filmed in."""

    episode: int  # index of the scripted episode (>= HELDOUT_INDEX)
    start_step: int  # 15 Hz control step of the start in that episode
    goal_step: int
    start: SimState
    goal: SimState
    scene: Scene


def draw_tasks(count: int, seed: int, scenes: int, goal_seconds: float, keep_orientation: bool,
               rng: np.random.Generator) -> list[Task]:
    """`count` start/goal pairs, one per held-out scripted episode of the data's (seed, scenes): the goal
    is the state the episode reaches `goal_seconds` after a random start (with the start's orientation when
    `keep_orientation`), drawn again while the end effector moves less than MIN_GOAL_DISTANCE."""
    gap = round(goal_seconds * FPS)
    tasks = []
    for k in range(count):
        plan = episode_plan(seed, HELDOUT_INDEX + k, scenes, min_seconds=max(10.0, goal_seconds + 2.0),
                            max_seconds=max(20.0, goal_seconds + 2.0))
        xyz = plan.motion.xyz
        for _ in range(MAX_DRAWS):
            t0 = int(rng.integers(0, len(xyz) - gap))
            if math.dist(xyz[t0 + gap], xyz[t0]) >= MIN_GOAL_DISTANCE:
                break
        start, goal = state_at(plan.motion, t0), state_at(plan.motion, t0 + gap)
        if keep_orientation:
            goal = replace(goal, pose=np.concatenate([goal.pose[:3], start.pose[3:6], goal.pose[6:]]))
        tasks.append(Task(HELDOUT_INDEX + k, t0, t0 + gap, start, goal, plan.scene))
    return tasks
