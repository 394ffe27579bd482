"""Our training checkpoints: what one holds, the order and durability of writes, which one a run resumes
from, and the refusal to resume a different run.

A checkpoint is one dict of the run's stateful things -- predictor (the release's key names, so the
release code loads it), optimizer, grad scaler, window loader, RNG of every rank -- saved and restored
by the same two functions (torchtitan's checkpoint states), plus the step, the resolved config and the
fingerprint of the data: nothing is saved that is not restored.

Files survive what a cluster does to a job:
- every write goes to a temp file that is fsynced, renamed into place, and its folder fsynced; temp files
  of killed writes are removed when a run starts;
- a kept `step_N.pt` is written before `latest.pt` points at the same step, so a kill between the two
  loses nothing: resume takes the newest intact checkpoint, whichever file it is;
- a damaged or truncated checkpoint is named in a warning and the next newest intact one is used;
- `train.keep_checkpoints` bounds the kept ones.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.distributed import DistInfo
from pipeline.errors import UsageError
from pipeline.store import fsync_dir, replace_durably

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "vjepa2ac-pipeline-train/2"  # 2: one dict of stateful things (loader, RankRNG)
KEPT = re.compile(r"step_(\d+)\.pt$")
# Settings that may change between a run and its resume: they do not change the model being trained.
RESUMABLE_CHANGES = (
    "profile", "train.out", "train.log_every", "train.tensorboard", "train.eval_every", "train.eval_windows",
    "train.eval_horizons", "train.checkpoint_every", "train.checkpoint_minutes", "train.keep_checkpoints",
    "train.loader_threads", "train.prefetch_batches", "train.threads", "train.warning_signal", "train.device",
    "train.constant_steps",  # the total steps: raise it to train longer
    "data.root", "data.episodes", "cache.path", "encoder.checkpoint", "predictor.checkpoint",  # where, not what
    "extract.", "encoder.batch_size", "encoder.device",  # stage one's scheduling
    "plan.",  # planning with a trained model (`pipeline plan`) does not change what is trained
)


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
        if self.info.device.type == "cuda":  # this rank's GPU only: the _all form touches every visible GPU
            mine["cuda"] = torch.cuda.get_rng_state(self.info.device)
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
        if "cuda" in mine and self.info.device.type == "cuda":
            if isinstance(mine["cuda"], list):  # checkpoints before this version: every GPU's state
                torch.cuda.set_rng_state(mine["cuda"][self.info.device.index or 0], self.info.device)
            else:
                torch.cuda.set_rng_state(mine["cuda"], self.info.device)


def checkpoint_payload(states: dict[str, Stateful], step: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint of `states` at `step` (call it on every rank: RankRNG gathers); `extra` is for
    readers and for the resume check (config, predictor architecture, data fingerprint), never loaded back
    into a stateful thing."""
    return {"format": CHECKPOINT_FORMAT, "step": step, **extra,
            **{name: obj.state_dict() for name, obj in states.items()}}


def restore(ckpt: dict[str, Any], states: dict[str, Stateful]) -> int:
    """Load every stateful thing from the checkpoint (the same names `checkpoint_payload` saved); returns
    the step it was taken after."""
    for name, obj in states.items():
        obj.load_state_dict(ckpt[name])
    return int(ckpt["step"])


# -- files ---------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """temp file + fsync + rename + fsync of the folder: a kill or a power cut never leaves a torn file."""
    replace_durably(path, lambda f: torch.save(payload, f), path.with_name(f"{path.name}.tmp{os.getpid()}"))


def write_checkpoints(folder: Path, payload: dict[str, Any], step: int, keep: bool, keep_last: int) -> None:
    """latest.pt, and first (when `keep`) the kept step_N.pt that latest.pt then shares (a hard link)."""
    latest = folder / "latest.pt"
    if not keep:
        save_checkpoint(latest, payload)
        return
    kept = folder / f"step_{step:07d}.pt"
    save_checkpoint(kept, payload)
    tmp = folder / f"latest.pt.tmp{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.link(kept, tmp)  # no second write of a multi-GB file
        os.replace(tmp, latest)
        fsync_dir(folder)
    except OSError:  # a filesystem without hard links
        tmp.unlink(missing_ok=True)
        save_checkpoint(latest, payload)
    prune_kept(folder, keep_last)


def prune_kept(folder: Path, keep_last: int) -> list[Path]:
    """Remove the oldest kept checkpoints beyond the newest `keep_last` (0: keep all)."""
    kept = sorted(kept_checkpoints(folder))
    doomed = [p for _, p in kept[:-keep_last]] if keep_last else []
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def kept_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    return [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := KEPT.search(p.name))]


def has_checkpoint(folder: Path) -> bool:
    return (folder / "latest.pt").exists() or bool(kept_checkpoints(folder))


def remove_temp_files(folder: Path) -> list[Path]:
    """Temp files of saves that were killed (they can be GBs each); called when a run starts."""
    doomed = list(folder.glob("*.tmp*")) if folder.is_dir() else []
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def load_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"not a checkpoint of this pipeline (format {found!r})")
    return ckpt


def resume_checkpoint(folder: Path, warn: Callable[[str], None]) -> tuple[dict[str, Any], Path] | None:
    """The newest intact checkpoint of a run (latest.pt, or a kept one that is newer or intact where
    latest.pt is not), or None for a new run. Damaged files are named in a warning and passed over."""
    candidates = sorted(kept_checkpoints(folder), reverse=True)
    latest = folder / "latest.pt"
    found, damaged = None, []
    if latest.exists():
        found = _try_load(latest, damaged)
    for step, path in candidates:
        if found is not None and step <= found[0]["step"]:
            break
        got = _try_load(path, damaged)
        if got is not None:
            found = got
            break
    for path, err in damaged:
        warn(f"checkpoint {path} is damaged ({err}); "
             + (f"using {found[1]} (step {found[0]['step']}) instead" if found else "no intact checkpoint is left"))
    if found is None and damaged:
        raise UsageError(f"no intact checkpoint in {folder}: " + "; ".join(f"{p}: {e}" for p, e in damaged)
                         + ". Start a new run in another folder (--out), or remove the damaged files")
    return found


def _try_load(path: Path, damaged: list[tuple[Path, str]]) -> tuple[dict[str, Any], Path] | None:
    try:
        return load_checkpoint(path), path
    except Exception as err:  # truncated zip, unpickling errors, foreign files: all "damaged"
        damaged.append((path, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]))
        return None


def resolve_checkpoint(target: Path, which: str = "latest") -> tuple[Path, dict[str, Any] | None]:
    """The checkpoint file a command names: a .pt path as it is, or in a run folder (or its checkpoints/
    folder) its newest intact checkpoint (latest.pt, or the kept one resume would fall back to, named in a
    warning), a kept `step_N` or a path; a missing one is a UsageError listing what is there. Returns the
    path and, where choosing it meant loading it (a run's newest intact one), the loaded dict, so that the
    caller does not read the file a second time."""
    if target.is_file():
        if which != "latest":
            raise UsageError(f"--checkpoint {which}: {target} is a file; --checkpoint picks one in a run folder")
        return target, None
    if not target.is_dir():
        raise UsageError(f"{target}: no such checkpoint file or run folder")
    folder = target / "checkpoints" if (target / "checkpoints").is_dir() else target
    if which == "latest" and has_checkpoint(folder):  # a run's newest intact one, as resume picks it
        found = resume_checkpoint(folder, warn=log.warning)
        if found is not None:
            return found[1], found[0]
    if which == "latest":
        path = folder / "latest.pt"
    elif m := re.fullmatch(r"step_?(\d+)(\.pt)?", which):
        path = folder / f"step_{int(m.group(1)):07d}.pt"
    else:
        path = Path(which)
    if not path.is_file():
        there = [p.name for _, p in sorted(kept_checkpoints(folder))]
        there += ["latest.pt"] if (folder / "latest.pt").exists() else []
        raise UsageError(f"no checkpoint {path} (in {folder}: {', '.join(there) or 'none'})")
    return path, None


# -- is it the same run? ----------------------------------------------------------------------------


def run_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting that differs between a run's checkpoint and this command and
    would change the model being trained (RESUMABLE_CHANGES may differ)."""
    old, new = _flatten(_upgrade(saved)), _flatten(now)
    out = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES):
            continue
        if key in old and key in new and _same(old[key], new[key]):
            continue
        out.append(f"{key}: {old.get(key, '(not set)')!r} -> {new.get(key, '(not set)')!r}")
    return out


def _upgrade(config: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an older version, in today's keys with the values that reproduce what it did:
    `data.camera: X` is cameras [X]; before data.video_fps the reported rate was used (auto); before
    train.window_range every window that fits was drawn (full). A resume is then refused only where the
    run would really change, naming a setting the user can pass (`--set train.window_range=full`)."""
    data, cfg = config.get("data"), config.get("train")
    if not isinstance(data, dict) or not isinstance(cfg, dict):
        return config
    if "cameras" not in data and isinstance(data.get("camera"), str):
        data = {**data, "cameras": [data["camera"]], "camera": None}
    data = {"video_fps": "auto", **data}
    cfg = {"window_range": "full", **cfg}
    return {**config, "data": data, "train": cfg}


def _same(a: Any, b: Any) -> bool:
    return list(a) == list(b) if isinstance(a, list | tuple) and isinstance(b, list | tuple) else a == b


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
