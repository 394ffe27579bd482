"""The run folder of stage two: resolved config, metrics log, checkpoints -- all resumable.

    <run>/
      config.json            the resolved manifest profile (also inside every checkpoint)
      metrics.jsonl          one row per log interval: step, losses, lr, clips/s, data-wait share
      eval.jsonl             one row per evaluation: held-out losses, model vs copy-last-frame per horizon
      eval.json              the latest evaluation
      loss.png, eval.png     loss curves (train + held-out) and rollout L1 per horizon vs the copy baseline
      checkpoints/latest.pt  written at every eval and at the end (atomically)
      checkpoints/step_NNNNNNN.pt  kept every train.checkpoint_every steps

A checkpoint is one dict of the run's stateful things -- predictor (the release's key names, so the
release code loads it), optimizer, grad scaler, window loader, RNG of every rank -- saved and restored
by the same two functions (torchtitan's checkpoint states), plus the step and the resolved config:
nothing is saved that is not restored.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.distributed import DistInfo

CHECKPOINT_FORMAT = "vjepa2ac-pipeline-train/2"  # 2: one dict of stateful things (loader, RankRNG)


class Stateful(Protocol):
    """Anything a checkpoint holds: torch modules and optimizers, GradScaler, WindowLoader, RankRNG."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class RankRNG:
    """The random generators (torch, CUDA, numpy, python) of every rank, as one stateful thing.

    `state_dict` gathers all ranks' states (a collective: every rank calls it); `load_state_dict` gives
    each rank its own entry back (the last one if the job now has more ranks than it was saved with).
    """

    def __init__(self, info: DistInfo) -> None:
        self.info = info

    def state_dict(self) -> dict[str, Any]:
        mine = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            mine["cuda"] = torch.cuda.get_rng_state_all()
        ranks: list[Any] = [mine]
        if self.info.enabled:
            ranks = [None] * self.info.world_size
            torch.distributed.all_gather_object(ranks, mine)
        return {"ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = state["ranks"][min(self.info.rank, len(state["ranks"]) - 1)]
        torch.set_rng_state(mine["torch"])
        np.random.set_state(mine["numpy"])
        random.setstate(mine["python"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda"])


def checkpoint_payload(states: dict[str, Stateful], step: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint of `states` at `step` (call it on every rank: RankRNG gathers); `extra` is for
    readers only (the resolved config, the predictor's architecture) and is never loaded back."""
    return {"format": CHECKPOINT_FORMAT, "step": step, **extra,
            **{name: obj.state_dict() for name, obj in states.items()}}


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write-then-rename: a kill during the write never leaves a truncated `latest.pt`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint of this pipeline (format {ckpt.get('format')!r})")
    return ckpt


def restore(ckpt: dict[str, Any], states: dict[str, Stateful]) -> int:
    """Load every stateful thing from the checkpoint (the same names `checkpoint_payload` saved); returns
    the step it was taken after."""
    for name, obj in states.items():
        obj.load_state_dict(ckpt[name])
    return int(ckpt["step"])


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
