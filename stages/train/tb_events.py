"""TensorBoard event files of a run (`train.tensorboard: true`): the same figures as metrics.jsonl and
eval.jsonl, for users whose dashboards read TensorBoard.

Written by rank 0 only, under `<run>/tensorboard`. A resumed run purges the events past the step it
resumes from (the steps are redone), as it truncates metrics.jsonl, so curves never fold back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TRAIN_SCALARS = ("loss", "tf_loss", "rollout_loss", "lr", "grad_norm", "clips_per_s", "data_wait_share",
                 "step_seconds")


class TensorBoardLog:
    """A SummaryWriter when enabled, else nothing at all (tensorboard is not even imported)."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (a dependency)

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def train_row(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row: losses, lr, gradient norm (before clipping), throughput, data wait."""
        if self.writer is not None:
            for key in TRAIN_SCALARS:
                if row.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def evaluation(self, result: dict[str, Any]) -> None:
        """One eval.jsonl row: held-out losses, and per horizon the predictor's L1 (true, shuffled and zero
        actions, and the shuffled / true ratio) and the copy baseline's."""
        if self.writer is None or not result:
            return
        step = result["step"]
        self.writer.add_scalar("eval/tf_loss", result["tf_loss"], step)
        self.writer.add_scalar("eval/rollout_loss", result["rollout_loss"], step)
        for h in result["horizons"]:
            self.writer.add_scalar(f"eval/horizon_{h['horizon']}/predictor_l1", h["model_l1"], step)
            self.writer.add_scalar(f"eval/horizon_{h['horizon']}/copy_last_frame_l1", h["copy_l1"], step)
            for key, name in (("shuffled_l1", "shuffled_actions_l1"), ("zero_l1", "zero_actions_l1"),
                              ("action_ratio", "shuffled_over_true")):
                if h.get(key) is not None:
                    self.writer.add_scalar(f"eval/horizon_{h['horizon']}/{name}", h[key], step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
