"""`pipeline plan`: goal-conditioned planning with a trained predictor -- the model, the start and goal
features, the energy the CEM minimises (`stages/cem.py`), and the command's summary.

The energy of an action sequence is the release's (facebookresearch/vjepa2,
notebooks/utils/world_model_wrapper.py `WorldModel.infer_next_action` and `cem` in
notebooks/utils/mpc_utils.py): the predictor rolls out from the layer-normed start frame, one frame per
action, fed the whole history (frames so far, actions so far, and the states the actions lead to by
`compute_new_pose`, `stages/poses.py`); each predicted frame is layer-normed; the energy is the mean
L1 distance of the *last* predicted frame to the layer-normed goal frame (not a sum over the rollout).
It is one batched call over all samples per CEM iteration.

Start and goal come from a cached view (features as stored, the view's recorded states) or from image
files, encoded like extraction encodes (the centre crop the release's settings always give, the
manifest's resize and normalisation, the frozen encoder, rounded to `cache.dtype` as a cache holds them).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.distributed import local_device
from pipeline.errors import UsageError
from pipeline.manifest import Manifest, PlanSection
from pipeline.store import TORCH_DTYPES, find_view
from stages.cache.fingerprint import predictor_config, reader_spec, vit_config
from stages.extract.augment import crop_frames, fallback_crop
from stages.extract.encoder import LoadedEncoder, build_runtime
from stages.models.predictor import ACPredictor, PredictorConfig, layer_norm_features, rollout
from stages.train.checkpoints import resolve_checkpoint, run_changes
from stages.train.loop import autocast_for
from stages.train.windows import open_training_store
from stages.use.cem import cem
from stages.use.poses import rollout_states
from stages.use.predictor_file import check_architecture, predictor_from_file, read_predictor_file

log = logging.getLogger(__name__)


# -- the model -------------------------------------------------------------------------------------------


@dataclass
class LoadedPredictor:
    """A frozen predictor for planning and where it came from."""

    model: ACPredictor
    path: str
    step: int | None  # optimizer step of our checkpoints; None for a released file


def default_checkpoint(m: Manifest) -> Path:
    return Path(m.train.out) / "checkpoints" / "latest.pt"


def load_predictor(path: Path, m: Manifest, device: torch.device) -> LoadedPredictor:
    """Our run's checkpoint or a released vjepa2-ac-vitg.pt, read by the one rule every command uses
    (`stages/predictor_file.py`); a run trained on another encoder or crop than the manifest's is named in a
    warning, because the features it would plan on do not mean what it learnt."""
    if not path.exists():
        raise UsageError(f"--checkpoint {path}: no such file or run folder (train a predictor with `pipeline "
                         "train` first, or pass a released vjepa2-ac-vitg.pt)")
    resolved, loaded = resolve_checkpoint(path)
    pf = read_predictor_file(resolved, predictor_config(m), loaded)
    check_architecture(pf, predictor_config(m))  # stops when the manifest's features do not fit the predictor
    if pf.run_config is not None:
        changed = [c for c in run_changes(pf.run_config, m.to_dict()) if c.startswith(("encoder.", "crop."))]
        if changed:
            log.warning(f"{pf.path} was trained on other features than this manifest's ({'; '.join(changed)}): "
                        "its plans will not mean much")
    model = predictor_from_file(pf, device).requires_grad_(False)
    return LoadedPredictor(model, str(pf.path), pf.step)


# -- start and goal --------------------------------------------------------------------------------------


@dataclass
class Endpoints:
    """What a plan starts from and aims at."""

    start: Tensor  # [hw, D] encoder features of the start frame, as a cache holds them
    goal: Tensor  # [hw, D] the goal frame's
    state: Tensor  # [7] the robot's state at the start
    source: str  # for the summary
    recorded: Tensor | None = None  # [7] goal state - start state where the goal's state is known


def view_endpoints(m: Manifest, cfg: PredictorConfig, view_id: str, start: int, goal: int) -> Endpoints:
    """Frames `start` and `goal` of a committed view of the manifest's store (a unique prefix of its id will do)."""
    store = open_training_store(m.cache.path, reader_spec(m), cfg.tokens_per_frame, cfg.embed_dim)
    view = find_view(store.committed_views(), view_id)
    for flag, index in (("--start-frame", start), ("--goal-frame", goal)):
        if not 0 <= index < view.length:
            raise UsageError(f"{flag} {index}: view {view.view_id} has frames 0..{view.length - 1}")
    feats = [store.read_features(view, i, 1)[0].float() for i in (start, goal)]  # 2 x [hw, D]
    states = torch.from_numpy(np.asarray(store.read_rows(view, "states"), dtype=np.float32))  # [F, 7]
    return Endpoints(feats[0], feats[1], states[start], f"view {view.view_id} ({view.episode_id}, {view.camera}) "
                     f"frames {start} -> {goal}", states[goal] - states[start])


class FrameEncoder:
    """Pictures -> features as a cache holds them: the centre crop, the manifest's resize and normalisation,
    the frozen encoder, rounded to cache.dtype (the predictor was trained on rounded features)."""

    def __init__(self, m: Manifest, device: torch.device) -> None:
        self.runtime: LoadedEncoder = build_runtime(vit_config(m), m.encoder, device)
        self.crop, self.dtype, self.device = m.crop, TORCH_DTYPES[m.cache.dtype], device

    def __call__(self, images: list[np.ndarray]) -> Tensor:
        """uint8 pictures [H, W, 3] (any sizes) -> float32 features [N, hw, D] on the device."""
        crops = []
        for img in images:
            box = fallback_crop(img.shape[0], img.shape[1], self.crop.ratio)
            crops.append(torch.from_numpy(np.ascontiguousarray(crop_frames(img[None], box))))  # [1, h, w, 3]
        feats = self.runtime.encode_crops(crops, self.crop)  # [N, hw, D]
        return feats.to(self.dtype).float().to(self.device)  # [N, hw, D]


def read_image(path: Path) -> np.ndarray:
    """An image file -> uint8 RGB [H, W, 3]."""
    from PIL import Image  # matplotlib's dependency: always installed with it

    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))  # [H, W, 3], writable
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: cannot read the image ({err})") from None


def parse_state(text: str) -> Tensor:
    """--state "x y z roll pitch yaw gripper" -> [7]."""
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        values = []
    if len(values) != 7 or not all(math.isfinite(v) for v in values):
        raise UsageError(f"--state {text!r}: expected 7 finite numbers: x y z (m) roll pitch yaw (rad) gripper (0..1)")
    return torch.tensor(values)  # [7]


def image_endpoints(encoder: FrameEncoder, start: Path, goal: Path, state: str) -> Endpoints:
    """Two image files (start, goal) and the robot's state at the start."""
    s = parse_state(state)
    feats = encoder([read_image(start), read_image(goal)])  # [2, hw, D]
    return Endpoints(feats[0], feats[1], s, f"images {start} -> {goal}")


# -- the planner -----------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A planned action sequence and what the predictor expects of it."""

    actions: Tensor  # [H, 7] on the CPU; actions[0] is the one to execute
    energies: Tensor  # [H] L1 of each predicted frame of the plan to the goal (the last one is minimised)
    start_energy: float  # L1 of the start frame to the goal: doing nothing


class Planner:
    """The CEM over the predictor's rollouts, for one start/goal at a time (batched over the samples)."""

    def __init__(self, predictor: ACPredictor, settings: PlanSection, device: torch.device,
                 autocast: AbstractContextManager) -> None:
        self.predictor, self.settings, self.device, self.autocast = predictor, settings, device, autocast
        self.generator = torch.Generator(device=device).manual_seed(settings.seed)

    @torch.no_grad()
    def plan(self, start: Tensor, state: Tensor, goal: Tensor) -> Plan:
        """Plan from raw features start [hw, D] and state [7] towards raw goal features [hw, D]."""
        h0 = layer_norm_features(start.to(self.device))[None]  # [1, hw, D]
        target = layer_norm_features(goal.to(self.device))  # [hw, D]
        s0 = state.to(self.device, torch.float32)  # [7]

        def energy(actions: Tensor) -> Tensor:  # [S, H, 7] -> [S]
            return self.step_energies(h0, s0, target, actions)[:, -1]  # the last predicted frame only

        result = cem(energy, self.settings, self.device, self.generator)
        per_step = self.step_energies(h0, s0, target, result.actions[None])[0]  # [H]
        return Plan(result.actions.cpu(), per_step.cpu(), float(frame_energy(h0[0], target)))

    def step_energies(self, h0: Tensor, s0: Tensor, goal: Tensor, actions: Tensor) -> Tensor:
        """Mean L1 of each predicted frame to the goal: h0 [1, hw, D], actions [S, H, 7] -> [S, H]."""
        num, horizon = actions.shape[:2]
        states = rollout_states(s0, actions)  # [S, H, 7]
        with self.autocast:
            preds = rollout(self.predictor, h0.expand(num, -1, -1), actions, states, horizon,
                            cached=True)  # [S, H, hw, D]: later steps compute only the newest frame
        return frame_energy(preds, goal)  # [S, H]


def frame_energy(frames: Tensor, goal: Tensor) -> Tensor:
    """The release's planning energy: mean L1 of layer-normed frames [..., hw, D] to the layer-normed goal
    [hw, D] -> [...]."""
    return (frames.float() - goal).abs().mean(dim=(-2, -1))  # [...]


def build_planner(m: Manifest, checkpoint: Path | None) -> tuple[LoadedPredictor, Planner, torch.device]:
    """The predictor of `checkpoint` (default `<train.out>/checkpoints/latest.pt`) in a planner on plan.device."""
    device = local_device(m.plan.device, "plan.device")
    loaded = load_predictor(checkpoint or default_checkpoint(m), m, device)
    return loaded, Planner(loaded.model, m.plan, device, autocast_for(m.train.precision, device)), device


# -- the command -----------------------------------------------------------------------------------------


@dataclass
class PlanSummary:
    """What `pipeline plan` planned."""

    source: str
    checkpoint: str
    step: int | None
    device: str
    actions: list[list[float]]  # [H, 7]
    energies: list[float]  # [H] predicted L1 to the goal after each planned action
    start_energy: float  # L1 of the start frame to the goal
    recorded: list[float] | None  # [7] the recorded move from start to goal (view mode)
    settings: dict[str, Any]
    seconds: float

    def format(self) -> str:
        s = self.settings
        step = f", step {self.step}" if self.step is not None else ""
        lines = [f"plan      {self.source}",
                 f"model     {self.checkpoint}{step}; CEM {s['samples']} samples x {s['iterations']} iterations, "
                 f"top {s['topk']}, horizon {s['horizon']}, max norm {s['max_norm']} on {self.device} in "
                 f"{self.seconds:.2f} s",
                 f"energy    L1 to the goal (layer-normed features): {self.start_energy:.4f} at the start",
                 "step       dx       dy       dz     droll   dpitch     dyaw    dgrip   energy"]
        for k, (a, e) in enumerate(zip(self.actions, self.energies, strict=True)):
            lines.append(f"{k + 1:4d}  " + " ".join(f"{v:+8.4f}" for v in a) + f"  {e:7.4f}")
        if self.recorded is not None:
            lines.append("recorded" + "".join(f" {v:+8.4f}" for v in self.recorded) + "  (goal state - start state)")
        lines.append("execute the first action, observe, plan again (receding horizon)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_plan(m: Manifest, checkpoint: Path | None, view: str | None, start_frame: int | None,
             goal_frame: int | None, start_image: Path | None, goal_image: Path | None,
             state: str | None) -> PlanSummary:
    """Plan once from a cached view's frames or from two images (exactly one of the two ways)."""
    by_view = [v is not None for v in (view, start_frame, goal_frame)]
    by_image = [v is not None for v in (start_image, goal_image, state)]
    if not ((all(by_view) and not any(by_image)) or (all(by_image) and not any(by_view))):
        raise UsageError("give a start and a goal: --view ID --start-frame I --goal-frame J, or --start-image A "
                         "--goal-image B --state 'x y z roll pitch yaw gripper'")
    loaded, planner, device = build_planner(m, checkpoint)
    if view is not None:
        ends = view_endpoints(m, loaded.model.cfg, view, start_frame, goal_frame)
    else:
        ends = image_endpoints(FrameEncoder(m, device), start_image, goal_image, state)
    t0 = time.perf_counter()
    plan = planner.plan(ends.start, ends.state, ends.goal)
    recorded = ends.recorded.tolist() if ends.recorded is not None else None
    return PlanSummary(ends.source, loaded.path, loaded.step, str(device), plan.actions.tolist(),
                       plan.energies.tolist(), plan.start_energy, recorded, asdict(m.plan),
                       time.perf_counter() - t0)
