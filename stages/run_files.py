"""The run folder of stage two: resolved config, metrics log, checkpoints -- all resumable.

    <run>/
      config.json            the resolved manifest profile (also inside every checkpoint)
      metrics.jsonl          one row per log interval: step, losses, lr, clips/s, data-wait share
      eval.jsonl             one row per evaluation: held-out losses, model vs copy-last-frame per horizon
      eval.json              the latest evaluation
      loss.png, eval.png     loss curves (train + held-out) and rollout L1 per horizon vs the copy baseline
      checkpoints/latest.pt  written at every eval and at the end (atomically)
      checkpoints/step_NNNNNNN.pt  kept every train.checkpoint_every steps

A checkpoint holds the predictor (the release's key names, so the release code loads it), optimizer,
grad scaler, step, RNG states, the window sampler's position and the resolved config.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = "vjepa2ac-pipeline-train/1"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write-then-rename: a kill during the write never leaves a truncated `latest.pt`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint of this pipeline (format {ckpt.get('format')!r})")
    return ckpt


def latest_checkpoint(run_dir: Path) -> Path | None:
    path = run_dir / "checkpoints" / "latest.pt"
    return path if path.exists() else None


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from (they will be logged again)."""
    rows = [r for r in read_jsonl(path) if r["step"] <= after_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
