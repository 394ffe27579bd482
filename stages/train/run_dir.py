"""The run folder of stage two: resolved config, metrics log, checkpoints -- all resumable.

    <run>/
      config.json            the resolved manifest profile (also inside every checkpoint)
      metrics.jsonl          one row per log interval: step, losses, lr, clips/s, data-wait share
      eval.jsonl             one row per evaluation: held-out losses; per horizon model vs copy-last-frame, and
                             with shuffled and zero actions (shuffled / true: 1.0 = actions ignored)
      eval.json              the latest evaluation
      loss.png, eval.png     loss curves (train + held-out) and rollout L1 per horizon vs the copy baseline
      checkpoints/latest.pt  written at every eval, every train.checkpoint_minutes, at a stop and at the end
      checkpoints/step_NNNNNNN.pt  kept every train.checkpoint_every steps (the newest train.keep_checkpoints)

What a checkpoint holds and how checkpoint files are written and chosen is `stages/checkpoints.py`;
this module owns the run folder's other files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from (they will be logged again)."""
    if not path.exists():
        return
    rows = [r for r in read_jsonl(path) if r["step"] <= after_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
