"""The end-effector state after an action, in torch and batched: the release's `compute_new_pose`.

Why a file of its own: two places need the same rule and must not drift apart -- the planner, which
imagines the states a sampled action sequence leads to (they are the predictor's state tokens), and the
closed-loop benchmark, which turns an action into the pose the simulated arm is commanded to. The rule
(notebooks/utils/mpc_utils.py of facebookresearch/vjepa2, `compute_new_pose`) is the inverse of how
actions are made from states (docs/release.md, "One training sample", `stages.extract.droid.actions_from_states`):

    xyz' = xyz + a_xyz;   R' = R(a_rot) @ R(euler);   gripper' = clip(gripper + a_gripper, 0, 1)

with extrinsic "xyz" Euler angles (scipy's `Rotation.from_euler("xyz", ...)`). The release loops over
samples with scipy on the host; here it is a few tensor ops, so a CUDA planner never waits for the host.
"""

from __future__ import annotations

import torch
from torch import Tensor


def euler_to_matrix(euler: Tensor) -> Tensor:
    """Extrinsic "xyz" Euler angles [..., 3] -> rotation matrices [..., 3, 3] (R = Rz(c) Ry(b) Rx(a))."""
    c, s = euler.cos(), euler.sin()  # [..., 3] each
    ca, cb, cc = c.unbind(-1)
    sa, sb, sc = s.unbind(-1)
    rows = [
        cc * cb, cc * sb * sa - sc * ca, cc * sb * ca + sc * sa,
        sc * cb, sc * sb * sa + cc * ca, sc * sb * ca - cc * sa,
        -sb, cb * sa, cb * ca,
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))  # [..., 3, 3]


def matrix_to_euler(rot: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] -> extrinsic "xyz" Euler angles [..., 3], middle angle in [-pi/2, pi/2]
    (scipy's convention away from gimbal lock, which end-effector states of a table-top arm never reach)."""
    b = torch.asin((-rot[..., 2, 0]).clamp(-1.0, 1.0))  # [...]
    a = torch.atan2(rot[..., 2, 1], rot[..., 2, 2])  # [...]
    c = torch.atan2(rot[..., 1, 0], rot[..., 0, 0])  # [...]
    return torch.stack((a, b, c), dim=-1)  # [..., 3]


def next_states(states: Tensor, actions: Tensor) -> Tensor:
    """States [..., 7] (xyz, Euler, gripper) after actions [..., 7] (xyz, rotation, gripper deltas)."""
    xyz = states[..., :3] + actions[..., :3]  # [..., 3]
    rot = euler_to_matrix(actions[..., 3:6]) @ euler_to_matrix(states[..., 3:6])  # [..., 3, 3]
    grip = (states[..., 6:] + actions[..., 6:]).clamp(0.0, 1.0)  # [..., 1]
    return torch.cat((xyz, matrix_to_euler(rot), grip), dim=-1)  # [..., 7]


def rollout_states(state: Tensor, actions: Tensor) -> Tensor:
    """The states each action of a sequence starts from: [s_0, s_1, ..., s_{H-1}] for a start state [7] or
    [S, 7] and actions [S, H, 7] -> [S, H, 7], as the release feeds its predictor (s_{k+1} from s_k, a_k)."""
    current = state.expand(actions.shape[0], 7)  # [S, 7]
    out = [current]
    for k in range(actions.shape[1] - 1):
        current = next_states(current, actions[:, k])  # [S, 7]
        out.append(current)
    return torch.stack(out, dim=1)  # [S, H, 7]
