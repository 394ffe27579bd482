"""PNG plots of a run: loss curves (train and held-out) and rollout error per horizon vs the copy baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt


def plot_losses(metrics: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path) -> None:
    """Train teacher-forcing / rollout / total L1 per step, held-out ones at each evaluation."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = [r["step"] for r in metrics]
    for key, style in (("loss", "-"), ("tf_loss", "--"), ("rollout_loss", ":")):
        ax.plot(steps, [r[key] for r in metrics], style, color="C0", label=f"train {key}")
    if evals:
        e_steps = [e["step"] for e in evals]
        ax.plot(e_steps, [e["tf_loss"] + e["rollout_loss"] for e in evals], "o-", color="C1", label="held-out loss")
        ax.plot(e_steps, [e["tf_loss"] for e in evals], "o--", color="C1", label="held-out tf_loss")
        ax.plot(e_steps, [e["rollout_loss"] for e in evals], "o:", color="C1", label="held-out rollout_loss")
        copy = evals[-1]["horizons"][0]["copy_l1"]  # what tf_loss must beat to be a prediction at all
        ax.axhline(copy, color="0.5", linestyle="--", linewidth=1, label="held-out copy-last-frame L1 (h=1)")
    ax.set(xlabel="optimizer step", ylabel="L1 on layer-normed features", title="V-JEPA 2-AC predictor")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_horizons(result: dict[str, Any], path: Path) -> None:
    """Rollout L1 at horizons 1..k against copying the first frame: below the baseline = real prediction."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    horizons = [h["horizon"] for h in result["horizons"]]
    ax.plot(horizons, [h["model_l1"] for h in result["horizons"]], "o-", label="predictor rollout")
    ax.plot(horizons, [h["copy_l1"] for h in result["horizons"]], "s--", label="copy last frame")
    ax.set(xlabel="horizon (frames)", ylabel="L1 on held-out episodes",
           title=f"held-out rollout, step {result['step']}")
    ax.set_xticks(horizons)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
