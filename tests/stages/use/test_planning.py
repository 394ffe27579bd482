"""Planning with the trained world model: the release's CEM and energy, the simulator, the closed-loop benchmark
and `pipeline plan` end to end on a tiny trained predictor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_manifest
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.manifest import Manifest, PlanSection, load_manifest
from pipeline.store.store import FeatureStore
from stages.cache.fingerprint import reader_spec
from stages.demo.synthetic import episode_plan
from stages.extract.driver import extract
from stages.extract.droid import decode_frames, open_episode
from stages.models.predictor import PredictorConfig, build_predictor
from stages.train.loop import train
from stages.use.cem import cem
from stages.use.closed_loop import POLICIES, bootstrap_rows, interval, run_closed_loop
from stages.use.plan import Planner
from stages.use.poses import next_states
from stages.use.sim import SceneSim, state_at

runner = CliRunner()
TRAIN = ["predictor.embed_dim=32", "predictor.depth=1", "predictor.num_heads=1", "train.global_batch_size=4",
         "train.warmup_steps=1", "train.constant_steps=2", "train.decay_steps=1", "train.heldout_fraction=0",
         "train.eval_every=0", "train.checkpoint_minutes=0", "train.loader_threads=1", "train.device=cpu"]
SMALL_CEM = ["plan.samples=16", "plan.topk=4", "plan.iterations=2", "plan.device=cpu"]
TOY = PlanSection(samples=400, iterations=10, topk=10, horizon=2)


def test_the_defaults_are_the_release_ones() -> None:
    """notebooks/utils/world_model_wrapper.py (mpc_args) and mpc_utils.py `cem` (gripper momenta, clip, round)."""
    s = PlanSection()
    assert (s.samples, s.iterations, s.topk, s.horizon) == (400, 10, 10, 2)
    assert (s.momentum_mean, s.momentum_std, s.momentum_mean_gripper, s.momentum_std_gripper) == (0.15,) * 4
    assert (s.max_norm, s.gripper_clip, s.gripper_round) == (0.05, 0.75, 0.25)


# -- the optimiser on a toy energy ----------------------------------------------------------------------


def _quadratic(target: torch.Tensor, calls: list[torch.Tensor]):
    def energy(actions: torch.Tensor) -> torch.Tensor:  # [S, H, 7] -> [S]
        calls.append(actions)
        return ((actions - target) ** 2).sum(dim=(1, 2))

    return energy


def test_cem_finds_the_optimum_of_a_quadratic_inside_the_box() -> None:
    target = torch.tensor([[0.02, -0.01, 0.03, 0, 0, 0, 0.5], [-0.03, 0.04, 0.0, 0, 0, 0, 0.1]])  # [H, 7]
    calls: list[torch.Tensor] = []
    result = cem(_quadratic(target, calls), TOY, torch.device("cpu"), torch.Generator().manual_seed(0))
    plan = result.actions  # [H, 7]
    torch.testing.assert_close(plan[:, :3], target[:, :3], atol=2e-3, rtol=0)
    assert plan[:, 3:6].abs().max() == 0  # rotation deltas are fixed to zero
    assert abs(plan[0, 6] - 0.5) < 0.05 and plan[1, 6] == 0  # gripper deltas below 0.25 are rounded to 0
    assert len(calls) == TOY.iterations and all(c.shape == (400, 2, 7) for c in calls)  # batched: one call each
    assert result.elite_energy[-1] < result.elite_energy[0]


def test_cem_keeps_samples_in_the_release_bounds() -> None:
    target = torch.tensor([[0.3, -0.3, 0.0, 0, 0, 0, 2.0]] * 2)  # out of reach
    calls: list[torch.Tensor] = []
    plan = cem(_quadratic(target, calls), TOY, torch.device("cpu"), torch.Generator().manual_seed(0)).actions
    samples = torch.stack(calls)  # [iterations, S, H, 7]
    assert samples[..., :3].abs().max() <= 0.05 and samples[..., 6].abs().max() <= 0.75  # per-axis box
    assert samples[..., 3:6].abs().max() == 0
    torch.testing.assert_close(plan[:, :2], torch.tensor([[0.05, -0.05]] * 2), atol=1e-3, rtol=0)


def test_next_states_is_the_release_compute_new_pose() -> None:
    rng = np.random.default_rng(0)
    states = np.concatenate([rng.uniform(-1, 1, (32, 3)), rng.uniform(-1.2, 1.2, (32, 3)), rng.uniform(0, 1, (32, 1))],
                            axis=1)
    actions = rng.normal(0, 0.3, (32, 7))
    rot = Rotation.from_euler("xyz", actions[:, 3:6]) * Rotation.from_euler("xyz", states[:, 3:6])  # delta @ R
    want_rot = rot.as_matrix()
    want = np.concatenate([states[:, :3] + actions[:, :3], Rotation.from_matrix(want_rot).as_euler("xyz"),
                           np.clip(states[:, 6:] + actions[:, 6:], 0, 1)], axis=1)
    np.testing.assert_allclose(next_states(torch.from_numpy(states), torch.from_numpy(actions)).numpy(), want,
                               atol=1e-9)


def test_the_energy_is_the_release_one() -> None:
    """The release's step_predictor loop (whole history in, last frame out, layer norm, states by
    compute_new_pose), scored by L1 of the last predicted frame to the goal."""
    cfg = PredictorConfig(img_size=32, embed_dim=16, predictor_embed_dim=32, depth=1, num_heads=1)
    model = build_predictor(cfg, seed=1).eval()
    start, goal, state = torch.randn(4, 16), torch.randn(4, 16), torch.tensor([0.5, 0.0, 0.2, 3.1, 0.1, -0.4, 0.3])
    actions = torch.randn(5, 3, 7) * 0.05  # [S, H, 7]
    planner = Planner(model, PlanSection(horizon=3), torch.device("cpu"), torch.autocast("cpu", enabled=False))
    h0 = F.layer_norm(start, (16,))[None]
    with torch.no_grad():
        got = planner.step_energies(h0, state, F.layer_norm(goal, (16,)), actions)[:, -1]  # [S]
        frames, poses = h0.expand(5, -1, -1), state.expand(5, 1, 7)
        for h in range(3):
            nxt = F.layer_norm(model(frames, actions[:, : h + 1], poses)[:, -4:], (16,))  # [S, hw, D]
            frames = torch.cat((frames, nxt), dim=1)
            poses = torch.cat((poses, next_states(poses[:, -1:], actions[:, h : h + 1])), dim=1)
        want = (frames[:, -4:] - F.layer_norm(goal, (16,))).abs().mean(dim=(1, 2))
    torch.testing.assert_close(got, want)


def test_the_cached_rollout_plans_what_recomputing_the_history_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner keeps keys and values of the frames it predicted instead of recomputing them; the
    release's CEM on the same seed picks the same actions as with the whole history recomputed."""
    import stages.use.plan as plan_module

    cfg = PredictorConfig(img_size=32, embed_dim=16, predictor_embed_dim=32, depth=2, num_heads=2)
    model = build_predictor(cfg, seed=4).eval()
    g = torch.Generator().manual_seed(0)
    start, goal, state = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g), torch.rand(7, generator=g)
    settings = PlanSection(samples=64, topk=8, iterations=4, horizon=3)

    def plan() -> torch.Tensor:
        planner = Planner(model, settings, torch.device("cpu"), torch.autocast("cpu", enabled=False))
        return planner.plan(start, state, goal).actions

    cached = plan()
    whole = plan_module.rollout
    monkeypatch.setattr(plan_module, "rollout", lambda *args, cached=False: whole(*args))
    assert torch.equal(plan(), cached)


# -- the simulator ----------------------------------------------------------------------------------------


def test_the_simulator_renders_what_the_episodes_recorded(synthetic_episodes: list[Path]) -> None:
    """The conftest data: seed 0, scenes 0, 5-7 s, 64 x 48; the simulator replays episode 1 from its seeds."""
    ep = open_episode(synthetic_episodes[1], "wrist_mp4_path")
    motion = episode_plan(0, 1, scenes=0, min_seconds=5.0, max_seconds=7.0).motion
    np.testing.assert_array_equal(motion.xyz[: ep.num_usable], ep.states[:, :3])
    frames = decode_frames(ep, np.array([10, 40])).astype(int)  # [2, H, W, 3]
    plan = episode_plan(0, 1, scenes=0, min_seconds=5.0, max_seconds=7.0)
    sim = SceneSim(plan.scene, "wrist", 64, 48, 4, state_at(motion, 10))
    near = np.abs(sim.render().astype(int) - frames[0]).mean()
    far = np.abs(sim.render().astype(int) - frames[1]).mean()
    assert near < 8 and far > 2 * near, (near, far)


def test_a_grasped_block_is_carried() -> None:
    plan = episode_plan(0, 7)
    start = state_at(plan.motion, 0)
    pose = np.array([0.5, 0.0, 0.03, np.pi, 0.0, 0.0, 1.0])
    sim = SceneSim(plan.scene, "wrist", 32, 32, 4, type(start)(pose, np.array([0.5, 0.0, 0.025, 0.0]), True))
    sim.move_to(pose + np.array([0.05, 0.02, 0.1, 0, 0, 0, 0]))
    np.testing.assert_allclose(sim.state.block[:2], [0.55, 0.02])
    assert sim.state.grasped and sim.state.block[2] > 0.1


# -- end to end on a tiny trained predictor -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synthetic_dataset: Path) -> Path:
    """The tiny profile extracted and a predictor trained 4 steps into run/."""
    root = tmp_path_factory.mktemp("planning")
    shutil.copytree(synthetic_dataset, root / "data")
    write_manifest(root)
    extract(_load(root), show_progress=False, echo=lambda _: None)
    train(_load(root), root / "run", show_progress=False, echo=lambda _: None)
    return root


def _load(root: Path, *overrides: str) -> Manifest:
    return load_manifest(root / "manifest.yaml", None, [*TRAIN, f"train.out={root / 'run'}", *overrides])


def _sets(root: Path) -> list[str]:
    return [x for o in [*TRAIN, f"train.out={root / 'run'}", *SMALL_CEM] for x in ("--set", o)]


def _a_view(root: Path) -> tuple[str, int]:
    m = _load(root)
    view = next(iter(FeatureStore(m.cache.path, reader_spec(m)).committed_views().values()))
    return view.view_id, view.length


def test_closed_loop_benchmark_end_to_end(trained: Path) -> None:
    m = _load(trained, *SMALL_CEM, "plan.steps=2", "synthetic.width=64", "synthetic.height=48", "synthetic.scenes=0")
    report = run_closed_loop(m, None, 2, trained / "bench", echo=lambda _: None)
    saved = json.loads((trained / "bench" / "closed_loop.json").read_text())
    assert (trained / "bench" / "closed_loop.png").stat().st_size > 1000
    for policy in POLICIES:
        rows = saved["distances"][policy]
        assert len(rows) == 2 and all(len(r) == 3 for r in rows)  # before and after each of 2 actions
        assert saved["summary"][policy]["final_m"] >= 0
    zero, oracle = np.array(saved["distances"]["zero"]), np.array(saved["distances"]["oracle"])
    assert (zero[:, 0] >= 0.05).all() and (zero == zero[:, :1]).all()  # goals are >= 5 cm away; no motion
    assert (oracle[:, -1] < oracle[:, 0]).all()  # the straight line gets closer
    for policy in POLICIES:
        r = saved["summary"][policy]
        assert r["final_m_ci95"][0] <= r["final_m"] <= r["final_m_ci95"][1]
        assert r["closer_fraction_ci95"][0] <= r["closer_fraction"] <= r["closer_fraction_ci95"][1]
    text = report.format()
    assert all(p in text for p in POLICIES) and "closed_loop.json" in text and "95% CI" in text
    assert "2 pairs give wide intervals" in text
    ranks = np.array(saved["model_rank"])  # one per lookahead step: 2 pairs x 2 actions
    assert ranks.shape == (4,) and (np.isnan(ranks) | (np.abs(ranks) <= 1)).all() and "rank correlation" in text


def test_bootstrap_intervals_match_the_normal_approximation_of_a_share() -> None:
    """Half of 30 pairs ended nearer: the 95% interval of the share is about 0.5 +- 1.96 sqrt(0.25 / 30)."""
    closer = np.r_[np.zeros(15), np.ones(15)]  # [30]
    lo, hi = interval(closer[bootstrap_rows(30, seed=0)].mean(axis=1))
    assert lo < 0.5 < hi and (hi - lo) == pytest.approx(2 * 1.96 * np.sqrt(0.25 / 30), abs=0.04)
    assert interval(np.full(100, 0.3)) == [0.3, 0.3]


def test_plan_from_a_cached_view(trained: Path) -> None:
    view_id, length = _a_view(trained)
    args = ["plan", "-m", str(trained / "manifest.yaml"), *_sets(trained), "--view", view_id[:10],
            "--start-frame", "0", "--goal-frame", str(length - 1)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "energy" in result.output and "recorded" in result.output and "   1  " in result.output
    result = runner.invoke(app, [*args, "--json"])
    out = json.loads(result.output)
    assert len(out["actions"]) == 2 and all(len(a) == 7 for a in out["actions"]) and len(out["energies"]) == 2
    assert all(abs(v) <= 0.05 for a in out["actions"] for v in a[:3]) and out["settings"]["samples"] == 16


def test_plan_from_image_files(trained: Path) -> None:
    plan = episode_plan(0, 0, scenes=0, min_seconds=5.0, max_seconds=7.0)
    sim = SceneSim(plan.scene, "ext1", 64, 48, 4, state_at(plan.motion, 0))
    from PIL import Image

    Image.fromarray(sim.render()).save(trained / "a.png")
    sim.move_to(sim.state.pose + np.array([0.05, 0.0, 0.0, 0, 0, 0, 0]))
    Image.fromarray(sim.render()).save(trained / "b.png")
    state = " ".join(str(v) for v in state_at(plan.motion, 0).pose)
    result = runner.invoke(app, ["plan", "-m", str(trained / "manifest.yaml"), *_sets(trained), "--start-image",
                                 str(trained / "a.png"), "--goal-image", str(trained / "b.png"), "--state", state])
    assert result.exit_code == 0, result.output
    assert "images" in result.output and "recorded" not in result.output


@pytest.mark.parametrize(("extra", "says"), [
    (["--checkpoint", "nowhere.pt", "--view", "x", "--start-frame", "0", "--goal-frame", "1"], "nowhere.pt"),
    (["--view", "no-such-view", "--start-frame", "0", "--goal-frame", "1"], "no-such-view"),
    (["--view", "{view}", "--start-frame", "0", "--goal-frame", "9999"], "--goal-frame 9999"),
    (["--view", "{view}", "--start-frame", "-1", "--goal-frame", "1"], "--start-frame -1"),
    (["--view", "{view}", "--start-frame", "0"], "give a start and a goal"),
    (["--start-image", "a.png", "--goal-image", "b.png", "--state", "1 2 3"], "--state"),
    (["--start-image", "a.png", "--goal-image", "b.png", "--state", "0 0 nan 0 0 0 1"], "7 finite numbers"),
    (["--start-image", "a.png", "--goal-image", "b.png", "--state", "0 0 0 0 0 inf 1"], "7 finite numbers"),
    (["--closed-loop", "0"], "--closed-loop 0"),
    (["--closed-loop", "2", "--view", "{view}"], "--closed-loop draws its own"),
])
def test_bad_inputs_give_one_line_and_exit_2(trained: Path, extra: list[str], says: str) -> None:
    view_id, _ = _a_view(trained)
    args = ["plan", "-m", str(trained / "manifest.yaml"), *_sets(trained),
            *[a.replace("{view}", view_id) for a in extra]]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_released_format_file_plans_like_our_checkpoint(trained: Path) -> None:
    """The release's vjepa2-ac-vitg.pt layout: a top-level "predictor" with `module.` prefixes, no config."""
    ours = torch.load(trained / "run" / "checkpoints" / "latest.pt", weights_only=False)
    torch.save({"predictor": {f"module.{k}": v for k, v in ours["predictor"].items()}}, trained / "release.pt")
    view_id, _ = _a_view(trained)
    outputs = []
    for ckpt in (trained / "run" / "checkpoints" / "latest.pt", trained / "release.pt"):
        result = runner.invoke(app, ["plan", "-m", str(trained / "manifest.yaml"), *_sets(trained), "--checkpoint",
                                     str(ckpt), "--view", view_id, "--start-frame", "0", "--goal-frame", "2", "--json"])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(result.output))
    assert outputs[0]["actions"] == outputs[1]["actions"] and outputs[1]["step"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cem_iterations_never_wait_for_the_host() -> None:
    cfg = PredictorConfig(img_size=32, embed_dim=16, predictor_embed_dim=32, depth=1, num_heads=1)
    device = torch.device("cuda")
    model = build_predictor(cfg, seed=1).to(device).eval()
    settings = PlanSection(samples=64, topk=4, iterations=3)
    planner = Planner(model, settings, device, torch.autocast("cuda", enabled=False))
    start, goal, state = torch.randn(4, 16, device=device), torch.randn(4, 16, device=device), torch.zeros(7)
    planner.plan(start, state, goal)  # warm-up: masks and layouts are built once
    h0, target = F.layer_norm(start, (16,))[None], F.layer_norm(goal, (16,))
    s0 = state.to(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = cem(lambda a: planner.step_energies(h0, s0, target, a)[:, -1], planner.settings, device,
                     planner.generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.actions.shape == (2, 7)
