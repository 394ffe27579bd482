"""`pipeline plan --closed-loop N`: receding-horizon planning in the built-in synthetic scene, against baselines.

A world model is only as good as the plans it makes when its actions change what it sees next. This
benchmark closes the loop in the simulator of the scene the demo data was written in (`stages/use/sim.py`):
N start/goal pairs come from held-out scripted episodes (the goal is where the episode is
`plan.goal_seconds` later); from each start the planner runs `plan.steps` rounds of plan -> execute the
first action -> render -> encode (the manifest's encoder and crop) -> plan again, and the final distance
of the end effector to the goal position is the score. The same pairs are run with baselines, all under
the planner's per-axis bound `plan.max_norm`:

- zero: no action (the distance at the start);
- random: uniform xyz deltas in the bound;
- oracle: the straight line to the goal position, shortened so that no axis exceeds the bound (the
  gripper moves towards the goal's as far as `plan.gripper_clip` allows);
- lookahead: a perfect one-step world model -- of the 27 moves {-max_norm, 0, +max_norm}^3 the one whose
  *real* next picture (rendered and encoded) has the lowest energy. It looks at pictures, so it tells
  how far the energy itself (the encoder's features) leads towards the goal, apart from the predictor.

A planner that beats random and approaches the lookahead has learnt how actions move the picture; the
oracle bounds what any policy can do in `plan.steps` moves. The numbers are what the model achieves, not
a pass mark. Each policy's mean final distance and share of pairs ended nearer come with 95% percentile
bootstrap intervals over the pairs: ten pairs cannot tell a planner from chance, thirty begin to. The
lookahead also scores the model itself -- how well the energies it predicts for the 27 moves rank them
against the true ones -- which says whether a failing planner lacks a model or a search.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from pipeline.errors import UsageError
from pipeline.manifest import Manifest, PlanSection
from stages.cache.sampling import frame_stride
from stages.demo.synthetic import FPS
from stages.models.predictor import layer_norm_features
from stages.train.plots import plot_closed_loop
from stages.use.plan import FrameEncoder, Planner, build_planner, frame_energy
from stages.use.poses import next_states
from stages.use.sim import SceneSim, SimState, Task, camera_name, draw_tasks

POLICIES = ("planner", "zero", "random", "oracle", "lookahead")
MIN_PAIRS = 30  # fewer start/goal pairs cannot tell a planner from chance: the report says so
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class ClosedLoopReport:
    """Distances to the goal over time of the planner and the baselines on the same start/goal pairs."""

    checkpoint: str
    step: int | None
    camera: str
    settings: dict[str, Any]
    distances: dict[str, list[list[float]]] = field(default_factory=dict)  # policy -> [task][0..steps] metres
    tasks: list[dict[str, Any]] = field(default_factory=list)  # episode, steps and poses of each pair
    model_rank: list[float] = field(default_factory=list)  # per lookahead step: predicted vs true energy rank corr.
    plan_seconds: float = 0.0  # mean time of one plan (encode + CEM)
    seconds: float = 0.0
    out: str = ""

    def summary(self, policy: str) -> dict[str, Any]:
        """Mean and median final distance and the share of pairs ended nearer than they started, the mean and
        the share with 95% bootstrap intervals over the pairs (the same resamples for every policy)."""
        d = np.array(self.distances[policy])  # [N, steps + 1]
        final, closer = d[:, -1], (d[:, -1] < d[:, 0]).astype(float)  # [N] each
        draws = bootstrap_rows(len(final), self.settings["seed"])  # [B, N]
        return {"start_m": float(d[:, 0].mean()), "final_m": float(final.mean()),
                "final_m_ci95": interval(final[draws].mean(axis=1)), "median_final_m": float(np.median(final)),
                "closer_fraction": float(closer.mean()), "closer_fraction_ci95": interval(closer[draws].mean(axis=1))}

    def format(self) -> str:
        s = self.settings
        step = f", step {self.step}" if self.step is not None else ""
        lines = [f"closed loop: {len(self.tasks)} start/goal pairs from held-out scripted episodes (seed {s['seed']}), "
                 f"goal {s['goal_seconds']} s ahead, {s['steps']} actions each ({self.camera} camera); model "
                 f"{self.checkpoint}{step}; CEM {s['samples']} x {s['iterations']}, top {s['topk']}, horizon "
                 f"{s['horizon']}, max norm {s['max_norm']} m",
                 "policy     start (m)   final (m) [95% CI]        median final (m)   ended nearer [95% CI]"]
        for policy in POLICIES:
            r = self.summary(policy)
            (lo, hi), (clo, chi) = r["final_m_ci95"], r["closer_fraction_ci95"]
            lines.append(f"{policy:9s}  {r['start_m']:9.3f}   {r['final_m']:9.3f} [{lo:.3f}, {hi:.3f}]   "
                         f"{r['median_final_m']:16.3f}   {100 * r['closer_fraction']:5.0f}% [{100 * clo:.0f}, "
                         f"{100 * chi:.0f}]%")
        if len(self.tasks) < MIN_PAIRS:
            lines.append(f"note: {len(self.tasks)} pairs give wide intervals; {MIN_PAIRS} or more tell a planner "
                         "from chance")
        if self.model_rank:
            lines.append(f"model: predicted vs true energies of the 27 one-step moves, rank correlation "
                         f"{np.nanmean(self.model_rank):+.2f} (mean over {len(self.model_rank)} states; 1 = ranks "
                         "moves as the pictures do)")
        lines.append(f"{self.plan_seconds:.2f} s per plan, {self.seconds:.1f} s in all; results {self.out} "
                     "(closed_loop.json, closed_loop.png)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": {p: self.summary(p) for p in POLICIES}}


Policy = Callable[[SceneSim, Task], np.ndarray]  # the simulator now, the task -> action [7]


def bootstrap_rows(n: int, seed: int, resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """Indices [resamples, n] of pairs drawn with replacement: the percentile bootstrap over start/goal pairs,
    seeded so that a report is reproducible and every policy is resampled alike."""
    return np.random.default_rng((seed, 2)).integers(0, n, size=(resamples, n))


def interval(values: np.ndarray) -> list[float]:
    """The central 95% of bootstrap statistics [B]."""
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def baselines(s: PlanSection, rng: np.random.Generator) -> dict[str, Policy]:
    """The policies that never look at a picture."""

    def zero(sim: SceneSim, task: Task) -> np.ndarray:
        return np.zeros(7)

    def random(sim: SceneSim, task: Task) -> np.ndarray:
        return np.concatenate([rng.uniform(-s.max_norm, s.max_norm, 3), np.zeros(4)])

    def oracle(sim: SceneSim, task: Task) -> np.ndarray:
        gap = task.goal.pose - sim.state.pose  # [7]
        xyz = gap[:3] * min(1.0, s.max_norm / max(float(np.abs(gap[:3]).max()), 1e-12))
        return np.concatenate([xyz, np.zeros(3), np.clip(gap[6:], -s.gripper_clip, s.gripper_clip)])

    return {"zero": zero, "random": random, "oracle": oracle}


def planner_policy(planner: Planner, encoder: FrameEncoder, goal: torch.Tensor, spent: list[float]) -> Policy:
    """Encode what the camera sees now, plan towards the goal features [hw, D], return the first action."""

    def act(sim: SceneSim, task: Task) -> np.ndarray:
        t0 = time.perf_counter()
        now = encoder([sim.render()])[0]  # [hw, D]
        plan = planner.plan(now, torch.from_numpy(sim.state.pose).float(), goal)
        spent.append(time.perf_counter() - t0)
        return plan.actions[0].double().numpy()  # [7]

    return act


def lookahead_policy(encoder: FrameEncoder, goal: torch.Tensor, s: PlanSection, planner: Planner,
                     ranks: list[float]) -> Policy:
    """The move of {-max_norm, 0, max_norm}^3 whose rendered next picture is closest to the goal features [hw, D].

    On the way it scores the model: the energies the predictor predicts for the same 27 moves against the
    true ones, as a rank correlation appended to `ranks` (1: it orders the moves as the pictures do; 0: no
    better than guessing -- a planner searching such a model exploits its errors)."""
    moves = torch.tensor(list(itertools.product((-s.max_norm, 0.0, s.max_norm), repeat=3)), dtype=torch.float64)
    actions = torch.cat((moves, torch.zeros(len(moves), 4, dtype=torch.float64)), dim=1)  # [27, 7]
    target = layer_norm_features(goal)  # [hw, D]

    def act(sim: SceneSim, task: Task) -> np.ndarray:
        poses = next_states(torch.from_numpy(sim.state.pose).expand(len(actions), 7), actions)  # [27, 7]
        feats = encoder([sim.try_move(pose) for pose in poses.numpy()])  # [27, hw, D]
        true = frame_energy(layer_norm_features(feats), target)  # [27]
        now = layer_norm_features(encoder([sim.render()]))  # [1, hw, D]
        state = torch.from_numpy(sim.state.pose).float()  # [7]
        with torch.no_grad():
            predicted = planner.step_energies(now.to(planner.device), state.to(planner.device), target.to(
                planner.device), actions[:, None].float().to(planner.device))[:, 0].cpu()  # [27]
        ranks.append(float(spearmanr(predicted.numpy(), true.numpy()).statistic))
        return actions[int(true.argmin())].numpy()  # [7]

    return act


def run_episode(policy: Policy, sim: SceneSim, task: Task, steps: int) -> list[float]:
    """Distances (m) of the end effector to the goal position before and after each of `steps` actions."""
    out = [goal_distance(sim.state, task.goal)]
    for _ in range(steps):
        action = torch.from_numpy(policy(sim, task))  # [7]
        sim.move_to(next_states(torch.from_numpy(sim.state.pose), action).numpy())
        out.append(goal_distance(sim.state, task.goal))
    return out


def goal_distance(state: SimState, goal: SimState) -> float:
    """End-effector distance to the goal position (m); math.dist, not a BLAS dot whose rounding depends on
    memory alignment (an unmoved arm must score exactly its start distance)."""
    return math.dist(state.pose[:3], goal.pose[:3])


def run_closed_loop(m: Manifest, checkpoint: Path | None, count: int, out: Path | None,
                    echo: Callable[[str], None] = print) -> ClosedLoopReport:
    """The benchmark on `count` start/goal pairs; writes closed_loop.json and closed_loop.png into `out`."""
    if count < 1:
        raise UsageError(f"--closed-loop {count}: must be >= 1 (start/goal pairs)")
    t_start = time.perf_counter()
    s = m.plan
    camera = camera_name(m.data.cameras[0])
    loaded, planner, device = build_planner(m, checkpoint)
    encoder = FrameEncoder(m, device)
    out = out or Path(m.train.out) / "closed_loop"
    out.mkdir(parents=True, exist_ok=True)
    scene = m.synthetic
    substeps = frame_stride(FPS, m.data.fps)  # control steps at 15 Hz per stored frame, as the data was sampled

    make_sim = functools.partial(SceneSim, camera=camera, width=scene.width, height=scene.height, substeps=substeps)
    tasks = draw_tasks(count, scene.seed, scene.scenes, s.goal_seconds, s.goal_orientation == "start",
                       np.random.default_rng(s.seed))
    report = ClosedLoopReport(loaded.path, loaded.step, camera, asdict(s), {p: [] for p in POLICIES})
    others, spent = baselines(s, np.random.default_rng((s.seed, 1))), []
    for i, task in enumerate(tasks):
        goal = encoder([make_sim(task.scene, state=task.goal).render()])[0]  # [hw, D]
        policies = {"planner": planner_policy(planner, encoder, goal, spent),
                    "lookahead": lookahead_policy(encoder, goal, s, planner, report.model_rank), **others}
        for name in POLICIES:
            report.distances[name].append(run_episode(policies[name], make_sim(task.scene, state=task.start), task,
                                                      s.steps))
        report.tasks.append({"episode": task.episode, "start_step": task.start_step, "goal_step": task.goal_step,
                             "start_pose": task.start.pose.tolist(), "goal_pose": task.goal.pose.tolist()})
        finals = ", ".join(f"{name} {report.distances[name][-1][-1]:.3f}" for name in POLICIES if name != "zero")
        echo(f"pair {i + 1}/{count}: distance {report.distances['zero'][-1][0]:.3f} m -> {finals}")
    report.plan_seconds = float(np.mean(spent)) if spent else 0.0
    report.seconds, report.out = time.perf_counter() - t_start, str(out)
    (out / "closed_loop.json").write_text(json.dumps(report.to_dict(), indent=1))
    plot_closed_loop(report.distances, s.max_norm, out / "closed_loop.png")
    return report
