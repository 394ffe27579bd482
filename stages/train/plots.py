"""PNG plots of a run (loss curves, rollout error per horizon vs the copy baseline), and the fixed-size PNG
writer that `pipeline inspect` shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np


def plot_losses(metrics: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path) -> None:
    """Losses per step over a learning-rate panel: train loss (= teacher-forcing + rollout) and its two terms,
    the held-out ones at each evaluation, and the copy-last-frame baseline the teacher-forcing L1 must beat."""
    fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = [r["step"] for r in metrics]
    for key, style, label in (("loss", "-", "train loss (teacher-forcing + rollout)"),
                              ("tf_loss", "--", "train teacher-forcing L1"), ("rollout_loss", ":", "train rollout L1")):
        ax.plot(steps, [r[key] for r in metrics], style, color="C0", label=label)
    if evals:
        e_steps = [e["step"] for e in evals]
        ax.plot(e_steps, [e["tf_loss"] + e["rollout_loss"] for e in evals], "o-", color="C1",
                label="held-out loss (teacher-forcing + rollout)")
        ax.plot(e_steps, [e["tf_loss"] for e in evals], "o--", color="C1", label="held-out teacher-forcing L1")
        ax.plot(e_steps, [e["rollout_loss"] for e in evals], "o:", color="C1", label="held-out rollout L1")
        copy = evals[-1]["horizons"][0]["copy_l1"]  # what tf_loss must beat to be a prediction at all
        ax.axhline(copy, color="0.5", linestyle="--", linewidth=1, label="held-out copy-last-frame L1 (horizon 1)")
    ax.set(ylabel="L1 on layer-normed features", title="V-JEPA 2-AC predictor")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    lr_ax.plot(steps, [r.get("lr", float("nan")) for r in metrics], color="C2")
    lr_ax.set(xlabel="optimizer step", ylabel="learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_ax.grid(alpha=0.3)
    _save(fig, path)


def plot_horizons(result: dict[str, Any], path: Path, split: str = "held-out", title: str | None = None) -> None:
    """Rollout L1 at horizons 1..k against copying the first frame: below the baseline = real prediction; and
    with other windows' or zero actions: above the true actions' curve = the model uses its actions. Where the
    result has the spread over windows, the 10-90 percentile band is shaded around the first two curves."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    rows = result["horizons"]
    horizons = [h["horizon"] for h in rows]
    banded = bool(rows) and rows[0].get("model_l1_p10") is not None
    for key, style, label in (("model_l1", "o-", "predictor rollout"), ("copy_l1", "s--", "copy last frame")):
        line, = ax.plot(horizons, [h[key] for h in rows], style, label=label)
        if banded:
            ax.fill_between(horizons, [h[f"{key}_p10"] for h in rows], [h[f"{key}_p90"] for h in rows],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    if rows and "shuffled_l1" in rows[0]:  # what the actions change (results of older versions lack it)
        ax.plot(horizons, [h["shuffled_l1"] for h in rows], "v:", label="predictor, another window's actions")
        ax.plot(horizons, [h["zero_l1"] for h in rows], "x:", label="predictor, zero actions")
    ax.set(xlabel="horizon (frames)", ylabel=f"L1 on {split} episodes",
           title=title or f"{split} rollout, step {result['step']}")
    ax.set_xticks(horizons)
    ax.grid(alpha=0.3)
    ax.legend(title="shaded: 10-90% of windows" if banded else None, title_fontsize=8)
    _save(fig, path)


def plot_closed_loop(distances: dict[str, list[list[float]]], max_norm: float, path: Path) -> None:
    """Closed-loop planning: mean distance to the goal after each executed action, per policy, with the
    spread over start/goal pairs (`pipeline plan --closed-loop`)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, rows in distances.items():
        d = np.array(rows)  # [N, steps + 1]
        steps = np.arange(d.shape[1])
        line, = ax.plot(steps, d.mean(axis=0), "o-" if policy == "planner" else "--", label=policy)
        ax.fill_between(steps, np.percentile(d, 25, axis=0), np.percentile(d, 75, axis=0), color=line.get_color(),
                        alpha=0.12, linewidth=0)
    ax.set(xlabel="executed actions", ylabel="end-effector distance to goal (m)",
           title=f"closed loop, {len(next(iter(distances.values())))} pairs, max norm {max_norm} m/step")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def save_png(fig: plt.Figure, path: Path, dpi: int) -> None:
    """Write a figure as a PNG of exactly figsize x dpi pixels (no tight bounding box, so a caller can
    promise a size), through a temp file and a rename: a browser or a reader never sees half a file."""
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
