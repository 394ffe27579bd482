"""The cross-entropy method (CEM) over action sequences, exactly as the released V-JEPA 2-AC plans.

Model-agnostic: it takes an energy function over a batch of action sequences (lower is better); the
planner (`stages/planning.py`) passes the world model's one. The update rule is the release's `cem`
(facebookresearch/vjepa2, notebooks/utils/mpc_utils.py), with the defaults its `WorldModel` passes
(notebooks/utils/world_model_wrapper.py, `mpc_args`; here `PlanSection`):

- the search space of one step is (dx, dy, dz, dgripper); rotation deltas are fixed to 0, so a sampled
  action is [dx, dy, dz, 0, 0, 0, dgripper];
- per horizon step: mean 0, std `max_norm` for xyz and 1 for the gripper at the start;
- each iteration draws `samples` sequences from N(mean, std), clips xyz to [-max_norm, max_norm] per axis
  (a box, not a ball) and the gripper to [-gripper_clip, gripper_clip], and scores them;
- the `topk` lowest-energy sequences (the elites, as clipped) give a mean and an unbiased std per step and
  dimension, and the distribution moves with momentum: new = (1 - m) * elites + m * old, with m =
  momentum_mean / momentum_std for xyz and the gripper's own pair (0.15 each in the release);
- the plan is the final mean (not the best sample), with gripper deltas smaller than `gripper_round`
  in size set to 0; the caller executes its first action (receding horizon).

The release draws step h's samples inside its rollout loop, one step at a time; a step's prediction never
depends on later actions, so drawing the whole sequence first is the same distribution. Everything is
batched over the samples and stays on the device: one energy call per iteration, no per-sample loop,
and nothing is read on the host until the caller reads the plan (on CUDA the iterations queue up).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.manifest import PlanSection

EnergyFn = Callable[[Tensor], Tensor]  # actions [S, H, 7] -> energy [S] (lower is better)


@dataclass(frozen=True)
class CEMResult:
    """A planned action sequence and how the search went (device tensors: read them when needed)."""

    actions: Tensor  # [H, 7] the final mean, gripper deltas rounded as the release does
    elite_energy: Tensor  # [iterations] mean energy of each iteration's elites


def to_actions(search: Tensor) -> Tensor:
    """Search-space points [..., 4] (dx, dy, dz, dgripper) -> actions [..., 7] with zero rotation deltas."""
    zeros = search.new_zeros((*search.shape[:-1], 3))  # [..., 3]
    return torch.cat((search[..., :3], zeros, search[..., 3:]), dim=-1)  # [..., 7]


def cem(energy: EnergyFn, s: PlanSection, device: torch.device, generator: torch.Generator) -> CEMResult:
    """Minimise `energy` over action sequences of `s.horizon` steps; `generator` lives on `device`."""
    mean = torch.zeros(s.horizon, 4, device=device)  # [H, 4]
    std = _per_dim(s.max_norm, 1.0, device).repeat(s.horizon, 1)  # [H, 4]
    hi = _per_dim(s.max_norm, s.gripper_clip, device)  # [4]
    keep_mean = _per_dim(s.momentum_mean, s.momentum_mean_gripper, device)  # [4]
    keep_std = _per_dim(s.momentum_std, s.momentum_std_gripper, device)  # [4]
    elite_energy = []
    for _ in range(s.iterations):
        noise = torch.randn((s.samples, s.horizon, 4), generator=generator, device=device)  # [S, H, 4]
        search = torch.minimum(torch.maximum(noise * std + mean, -hi), hi)  # [S, H, 4]
        scores = energy(to_actions(search))  # [S]
        best = scores.topk(s.topk, largest=False)  # values, indices [K]
        elites = search[best.indices]  # [K, H, 4]
        mean = (1.0 - keep_mean) * elites.mean(dim=0) + keep_mean * mean  # [H, 4]
        std = (1.0 - keep_std) * elites.std(dim=0) + keep_std * std  # [H, 4]
        elite_energy.append(best.values.mean())
    grip = mean[:, 3:]  # [H, 1]
    plan = torch.cat((mean[:, :3], torch.where(grip.abs() < s.gripper_round, 0.0, grip)), dim=-1)  # [H, 4]
    return CEMResult(to_actions(plan), torch.stack(elite_energy))


def _per_dim(xyz: float, gripper: float, device: torch.device) -> Tensor:
    """One value for the three translation dims and one for the gripper: [4], made on the device (a copy from
    the host would make a CUDA stream wait)."""
    return torch.cat((torch.full((3,), xyz, device=device), torch.full((1,), gripper, device=device)))  # [4]
