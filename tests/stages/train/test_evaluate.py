"""The held-out evaluation's action-conditioning figures: a predictor that cannot see its actions scores a
shuffled / true ratio of exactly 1.0 and the same L1 with zero actions; one that can does not."""

from __future__ import annotations

import contextlib

import pytest
import torch

from stages.models.predictor import PredictorConfig, build_predictor
from stages.train.evaluate import evaluate, format_eval, other_windows
from stages.train.loader import Batch

CFG = PredictorConfig(img_size=32, patch_size=16, embed_dim=24, predictor_embed_dim=32, depth=2, num_heads=2)
T = 4


def batches(sizes: tuple[int, ...], seed: int = 0) -> list[Batch]:
    """Windows of random features, with actions and the states they lead to (small steps, as a robot's)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        feats = torch.randn(b, T, CFG.tokens_per_frame, CFG.embed_dim, generator=g)  # [B, T, hw, D]
        actions = 0.05 * torch.randn(b, T - 1, 7, generator=g)  # [B, T-1, 7]
        states = torch.cat((torch.rand(b, 1, 7, generator=g), actions), dim=1).cumsum(dim=1)  # [B, T, 7]
        out.append(Batch(feats, actions, states, -1))
    return out


def run(model: torch.nn.Module, sizes: tuple[int, ...] = (3, 2)) -> dict:
    return evaluate(model, batches(sizes), auto_steps=2, horizons=T - 1, autocast=contextlib.nullcontext(), step=0)


def test_a_predictor_blind_to_its_actions_scores_a_ratio_of_one() -> None:
    model = build_predictor(CFG, seed=0)
    with torch.no_grad():
        model.action_encoder.weight.zero_()
        model.action_encoder.bias.zero_()
    for h in run(model)["horizons"]:
        assert h["action_ratio"] == pytest.approx(1.0, abs=1e-12)
        assert h["zero_l1"] == pytest.approx(h["model_l1"], abs=1e-12)


def test_a_predictor_that_sees_its_actions_does_not() -> None:
    result = run(build_predictor(CFG, seed=0))  # random init: the actions move the output a little
    for h in result["horizons"]:
        assert abs(h["action_ratio"] - 1.0) > 1e-7 and abs(h["zero_l1"] - h["model_l1"]) > 1e-7
    assert "shuffled/true" in format_eval(result)


def test_other_windows_takes_another_windows_actions_across_batches() -> None:
    first, second = batches((3, 1))
    shuffled = other_windows(first.actions, None)
    assert torch.equal(shuffled[0], first.actions[2]) and torch.equal(shuffled[1:], first.actions[:2])
    carried = other_windows(second.actions, first.actions[-1:])  # a batch of one takes the previous batch's last
    assert torch.equal(carried, first.actions[-1:])
