"""Held-out evaluation: the training losses, rollout error per horizon against copying the last frame, and
how much the predictor uses its actions.

The copy baseline is what a predictor that ignores actions would get in a slowly changing scene; a
world model is only useful where it beats it. Rollouts start from the first frame's features and use
the ground-truth actions (and states, as in training); every later frame is the model's own.

A world model exists to tell the futures of different actions apart, and a low L1 does not show that it
does: in a slow scene a model can score well by predicting the typical motion whatever the action. So the
same rollouts run twice more with other actions -- those of another window of the evaluation (shuffled),
and none (zero) -- while everything else, the recorded states included, stays as it was (the states a
frame is predicted from never hold that frame's action: s_t is recorded before a_t). The ratio shuffled /
true L1 is 1.0 for a model that ignores its actions; how far above 1.0 says how much they move its
predictions, most cleanly at horizon 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch

from stages.models.predictor import ACPredictor, ac_loss, layer_norm_features, rollout
from stages.train.loader import Batch, WindowSource, load_windows
from stages.train.windows import BadViews, Window

EVAL_BATCH = 16  # windows per evaluation forward

QUANTILES = (0.1, 0.5, 0.9)  # the spread over windows: one bad window and a typical one read differently


def evaluate_windows(model: ACPredictor, source: WindowSource, windows: list[Window], device: torch.device,
                     bad: BadViews, frames_per_clip: int, auto_steps: int, eval_horizons: int,
                     autocast: AbstractContextManager, step: int | None,
                     featurize: Callable[[Batch], Batch] = lambda batch: batch) -> dict[str, Any]:
    """`evaluate` on fixed windows read from `source` EVAL_BATCH at a time (damaged views as `bad` says;
    `featurize` turns an online batch's pixels into features): the one path of training's evaluation and
    `pipeline eval`, so a checkpoint evaluated later gives the numbers its run logged."""
    chunks = (load_windows(source, windows[i : i + EVAL_BATCH], device, bad)
              for i in range(0, len(windows), EVAL_BATCH))
    batches = (featurize(b) for b in chunks if b is not None)
    horizons = min(eval_horizons, frames_per_clip - 1)  # a T-frame window holds T - 1 future frames
    return evaluate(model, batches, auto_steps, horizons, autocast, step)


@torch.no_grad()
def evaluate(model: ACPredictor, batches: Iterable[Batch], auto_steps: int, horizons: int,
             autocast: AbstractContextManager, step: int | None) -> dict[str, Any]:
    """Mean losses and per-horizon L1 of the model with true, shuffled and zero actions and of the copy baseline,
    with their spread over windows (a mean alone hides whether the model is a little better everywhere or much
    better on a few windows)."""
    was_training = model.training
    model.eval()
    n, tf_sum, roll_sum = 0, 0.0, 0.0
    per_window: dict[str, list[torch.Tensor]] = {key: [] for key in ("model", "shuffled", "zero", "copy")}
    previous: torch.Tensor | None = None  # the last window's actions of the previous batch [1, T-1, 7]
    for batch in batches:
        feats = batch.features.float()  # [B, T, hw, D]
        b = feats.shape[0]
        h = layer_norm_features(feats)  # [B, T, hw, D]
        target = h[:, 1 : horizons + 1]  # [B, k, hw, D]
        with autocast:
            tf, roll = ac_loss(model, feats, batch.actions, batch.states, auto_steps)
            for key, actions in (("model", batch.actions), ("shuffled", other_windows(batch.actions, previous)),
                                 ("zero", torch.zeros_like(batch.actions))):
                preds = rollout(model, h[:, 0], actions, batch.states, horizons, cached=True).float()  # [B, k, hw, D]
                per_window[key].append((preds - target).abs().mean(dim=(2, 3)).double().cpu())  # [B, k]
        per_window["copy"].append((h[:, :1] - target).abs().mean(dim=(2, 3)).double().cpu())  # [B, k]
        previous = batch.actions[-1:]
        tf_sum, roll_sum, n = tf_sum + float(tf) * b, roll_sum + float(roll) * b, n + b
    model.train(was_training)
    empty = torch.zeros(0, horizons, dtype=torch.float64)  # [0, k]
    l1 = {key: torch.cat([empty, *rows]) for key, rows in per_window.items()}  # [N, k] each
    return {"step": step, "windows": n, "tf_loss": tf_sum / max(n, 1), "rollout_loss": roll_sum / max(n, 1),
            "horizons": [_horizon_row(k, {key: v[:, k] for key, v in l1.items()}) for k in range(horizons)]}


def other_windows(actions: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """Each window's actions [B, T-1, 7] replaced by another window's: the batch's shifted by one, the first
    taking the previous batch's last (a batch of one window needs one before it; the first then keeps its own,
    counted as unchanged)."""
    if previous is None:
        return actions.roll(1, dims=0)  # [B, T-1, 7]
    return torch.cat((previous, actions))[:-1]  # [B, T-1, 7]


def _horizon_row(k: int, l1: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Horizon k+1 from per-window L1 [N] of the model (true, shuffled, zero actions) and the copy: means, the
    spread of model and copy, the share of windows the model beats the copy on, and the action ratio."""
    model, copy = l1["model"], l1["copy"]
    row: dict[str, Any] = {"horizon": k + 1, "model_l1": _mean(model), "copy_l1": _mean(copy)}
    row.update(_spread("model_l1", model))
    row.update(_spread("copy_l1", copy))
    row["model_better"] = _mean((model < copy).double())  # mean of [N] 0/1
    row["shuffled_l1"], row["zero_l1"] = _mean(l1["shuffled"]), _mean(l1["zero"])
    row["action_ratio"] = row["shuffled_l1"] / row["model_l1"] if row["model_l1"] > 0 else None
    return row


def _mean(values: torch.Tensor) -> float:
    return float(values.sum() / max(len(values), 1))


def _spread(name: str, values: torch.Tensor) -> dict[str, float | None]:
    """std over windows (population: defined for one window) and the QUANTILES; None without windows."""
    keys = [f"{name}_std", *(f"{name}_p{round(100 * q)}" for q in QUANTILES)]
    if not len(values):
        return dict.fromkeys(keys, None)
    quantiles = torch.quantile(values, torch.tensor(QUANTILES, dtype=values.dtype))  # [3]
    return dict(zip(keys, [float(values.std(correction=0)), *map(float, quantiles)], strict=True))


def format_eval(result: dict[str, Any]) -> str:
    """The evaluation as a small table."""
    lines = [f"held-out evaluation at step {result['step']} ({result['windows']} windows): "
             f"teacher-forcing L1 {result['tf_loss']:.4f}, rollout L1 {result['rollout_loss']:.4f}",
             "horizon   predictor L1   copy-last-frame L1   ratio   shuffled actions   zero actions   shuffled/true"]
    for h in result["horizons"]:
        lines.append(f"{h['horizon']:7d}   {h['model_l1']:12.4f}   {h['copy_l1']:18.4f}   "
                     f"{h['model_l1'] / max(h['copy_l1'], 1e-12):5.3f}   {h['shuffled_l1']:16.4f}   "
                     f"{h['zero_l1']:12.4f}   {format_ratio(h['action_ratio']):>13s}")
    return "\n".join(lines)


def format_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}"
