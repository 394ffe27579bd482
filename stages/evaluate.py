"""Held-out evaluation: the training losses, and rollout error per horizon against copying the last frame.

The copy baseline is what a predictor that ignores actions would get in a slowly changing scene; a
world model is only useful where it beats it. Rollouts start from the first frame's features and use
the ground-truth actions (and states, as in training); every later frame is the model's own.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch

from stages.models.predictor import ACPredictor, ac_loss, layer_norm_features, rollout
from stages.windows import Batch


@torch.no_grad()
def evaluate(model: ACPredictor, batches: Iterable[Batch], auto_steps: int, horizons: int,
             autocast: AbstractContextManager, step: int) -> dict[str, Any]:
    """Mean held-out losses and per-horizon L1 of the model and of the copy baseline."""
    was_training = model.training
    model.eval()
    n, tf_sum, roll_sum = 0, 0.0, 0.0
    model_sum, copy_sum = torch.zeros(horizons, dtype=torch.float64), torch.zeros(horizons, dtype=torch.float64)
    for batch in batches:
        feats = batch.features.float()  # [B, T, hw, D]
        b = feats.shape[0]
        with autocast:
            tf, roll = ac_loss(model, feats, batch.actions, batch.states, auto_steps)
            h = layer_norm_features(feats)  # [B, T, hw, D]
            preds = rollout(model, h[:, 0], batch.actions, batch.states, horizons).float()  # [B, k, hw, D]
        target = h[:, 1 : horizons + 1]  # [B, k, hw, D]
        model_sum += (preds - target).abs().mean(dim=(2, 3)).sum(0).double().cpu()  # [k]
        copy_sum += (h[:, :1] - target).abs().mean(dim=(2, 3)).sum(0).double().cpu()  # [k]
        tf_sum, roll_sum, n = tf_sum + float(tf) * b, roll_sum + float(roll) * b, n + b
    model.train(was_training)
    return {"step": step, "windows": n, "tf_loss": tf_sum / max(n, 1), "rollout_loss": roll_sum / max(n, 1),
            "horizons": [{"horizon": k + 1, "model_l1": float(model_sum[k] / max(n, 1)),
                          "copy_l1": float(copy_sum[k] / max(n, 1))} for k in range(horizons)]}


def format_eval(result: dict[str, Any]) -> str:
    """The evaluation as a small table."""
    lines = [f"held-out evaluation at step {result['step']} ({result['windows']} windows): "
             f"teacher-forcing L1 {result['tf_loss']:.4f}, rollout L1 {result['rollout_loss']:.4f}",
             "horizon   predictor L1   copy-last-frame L1   ratio"]
    for h in result["horizons"]:
        lines.append(f"{h['horizon']:7d}   {h['model_l1']:12.4f}   {h['copy_l1']:18.4f}   "
                     f"{h['model_l1'] / max(h['copy_l1'], 1e-12):5.3f}")
    return "\n".join(lines)
