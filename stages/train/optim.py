"""The release's optimiser: AdamW with its two parameter groups and the warmup / constant / decay schedule.

The learning rate is a pure function of the optimizer step (docs/release.md, "Optimisation", `golden/schedule.json`), so
a resumed run, or `--steps N` that stops early, sees exactly the schedule of an uninterrupted run.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.manifest import TrainSection


def learning_rate(step: int, cfg: TrainSection) -> float:
    """lr used by optimizer step `step` (1-based): linear warmup, constant, linear decay to final_lr."""
    if step <= cfg.warmup_steps:
        return cfg.start_lr + (step / cfg.warmup_steps) * (cfg.lr - cfg.start_lr)
    decay_start = cfg.warmup_steps + cfg.constant_steps
    if step <= decay_start:
        return cfg.lr
    if step >= cfg.total_steps:
        return cfg.final_lr
    return cfg.lr - (step - decay_start) / cfg.decay_steps * (cfg.lr - cfg.final_lr)


def weight_decay(step: int, cfg: TrainSection) -> float:
    """Weight decay of step `step`: constant in the release (kept a function so the schedule lives here)."""
    return cfg.weight_decay


def param_groups(model: nn.Module, decay: float) -> list[dict]:
    """Decay on weights with ndim > 1 that are not biases; none on biases and 1-D parameters (norms)."""
    with_decay, without = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (without if name.endswith(".bias") or p.ndim == 1 else with_decay).append(p)
    return [{"params": with_decay, "weight_decay": decay, "apply_wd": True},
            {"params": without, "weight_decay": 0.0, "apply_wd": False}]


def build_optimizer(model: nn.Module, cfg: TrainSection, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the release's groups; `fused` (on CUDA) updates all parameters in one kernel per group."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=learning_rate(1, cfg), betas=cfg.betas,
                             eps=cfg.eps, fused=fused or None)


def set_schedule(optimizer: torch.optim.Optimizer, step: int, cfg: TrainSection) -> float:
    """Put step `step`'s lr and weight decay into every group; returns the lr."""
    lr, wd = learning_rate(step, cfg), weight_decay(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = wd
    return lr
