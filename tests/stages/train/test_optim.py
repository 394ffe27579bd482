"""Optimiser and schedule against the release: golden/schedule.json, parameter groups."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.manifest import TrainSection
from stages.train.optim import build_optimizer, learning_rate, param_groups, set_schedule, weight_decay

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "schedule.json"


def test_schedule_reproduces_the_release() -> None:
    golden = json.loads(GOLDEN.read_text())
    c = golden["config"]
    cfg = TrainSection(warmup_steps=c["warmup_steps"], constant_steps=c["constant_steps"],
                       decay_steps=c["anneal_steps"], start_lr=c["start_lr"], lr=c["ref_lr"], final_lr=c["final_lr"],
                       weight_decay=c["weight_decay"])
    assert cfg.total_steps == c["total_steps"]
    for step, lr in golden["lr"].items():
        assert learning_rate(int(step), cfg) == pytest.approx(lr, rel=1e-9, abs=1e-12), step
    for step, wd in golden["weight_decay"].items():
        assert weight_decay(int(step), cfg) == wd


def test_defaults_are_the_paper() -> None:
    cfg = TrainSection()
    assert (cfg.warmup_steps, cfg.constant_steps, cfg.decay_steps, cfg.global_batch_size) == (4500, 85500, 4500, 256)
    assert learning_rate(94_500, cfg) == 0.0 and learning_rate(10**6, cfg) == 0.0


def test_parameter_groups_and_adamw() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    groups = param_groups(model, 0.04)
    assert [len(g["params"]) for g in groups] == [2, 4]  # two weight matrices; two biases + norm weight/bias
    assert all(p.ndim == 2 for p in groups[0]["params"]) and groups[1]["weight_decay"] == 0.0
    cfg = TrainSection()
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    lr = set_schedule(opt, 4500, cfg)
    assert lr == pytest.approx(4.25e-4)
    assert [g["lr"] for g in opt.param_groups] == [lr, lr]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.04, 0.0]
