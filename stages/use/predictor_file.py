"""A predictor read from any checkpoint file: ours (`pipeline train`) or in the release's format.

Why one home: evaluation, export and planning all take "a checkpoint" from a user, and which architecture
its weights have, whether the manifest's features fit it, and what is wrong with a bad file must be decided
the same way for all of them. The two formats:

- ours (`stages/checkpoints.py`): the predictor under "predictor", its architecture under "predictor_config",
  the run's resolved manifest under "config" and its features' fingerprint under "data_fingerprint";
- the release's (`vjepa2-ac-vitg.pt`, or what `pipeline export` wrote): "predictor" with `module.` prefixes,
  the architecture from "predictor_config" where `pipeline export` wrote one, else (the released file has
  none) from the manifest's predictor section.

The features decide what a predictor can run on: its input width and tokens per frame must be those of the
manifest's encoder and crop, or the command stops naming both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.models.predictor import ACPredictor, PredictorConfig
from stages.models.release_weights import CheckpointError, load_strict, read_checkpoint, state_dict_entry
from stages.train.checkpoints import CHECKPOINT_FORMAT


@dataclass
class PredictorFile:
    """A predictor's weights read from a checkpoint file, and what the file says about them."""

    path: Path
    kind: str  # "run" (a checkpoint of `pipeline train`) or "release" (the released file's format)
    state: dict[str, torch.Tensor]  # the release's key names, prefixes stripped
    config: PredictorConfig
    config_from: str  # "checkpoint" (its predictor_config) or "manifest" (its predictor section)
    step: int | None  # optimizer step of a run's checkpoint (or of the run an export came from)
    run_config: dict[str, Any] | None  # the resolved manifest a run saved (ours only)
    data_fingerprint: str | None  # the features a run trained on (ours only)


def read_predictor_file(path: Path, manifests: PredictorConfig, blob: Mapping[str, Any] | None = None
                        ) -> PredictorFile:
    """Read the predictor of a checkpoint of either format (`blob`: the file's dict, when it is loaded
    already; a released-format file's architecture is `manifests`, the manifest's predictor); anything else
    is a CheckpointError naming it."""
    blob = read_checkpoint(path) if blob is None else blob
    ours = blob.get("format") == CHECKPOINT_FORMAT
    if not ours and "predictor" not in blob:
        entries = ", ".join(sorted(map(str, blob))[:8]) or "none"
        raise CheckpointError(f"checkpoint {path}: neither a checkpoint of `pipeline train` (format "
                              f"{blob.get('format')!r}) nor in the release's format (no 'predictor' entry; "
                              f"entries: {entries})")
    saved = blob.get("predictor_config")
    step = blob.get("step")
    return PredictorFile(path, "run" if ours else "release", state_dict_entry(blob, "predictor", path),
                         manifests if saved is None else _saved_config(saved, path),
                         "manifest" if saved is None else "checkpoint", step if isinstance(step, int) else None,
                         blob.get("config") if ours else None, blob.get("data_fingerprint") if ours else None)


def _saved_config(saved: Any, path: Path) -> PredictorConfig:
    try:
        return PredictorConfig(**saved)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: predictor_config is not a predictor architecture ({err})") from None


def check_architecture(pf: PredictorFile, want: PredictorConfig) -> list[str]:
    """Stop if the predictor cannot take the manifest's features (`want`: the manifest's predictor, whose input
    shape comes from its encoder and crop.size); return a note where the checkpoint's architecture differs."""
    have = pf.config
    if (have.tokens_per_frame, have.embed_dim) != (want.tokens_per_frame, want.embed_dim):
        raise CheckpointError(
            f"checkpoint {pf.path}: its predictor takes {have.tokens_per_frame} tokens x {have.embed_dim} features "
            f"per frame (predictor_config img_size {have.img_size}, embed_dim {have.embed_dim}), but this manifest's "
            f"encoder and crop.size give {want.tokens_per_frame} x {want.embed_dim}: use the manifest (and profile) "
            "whose features it was trained on")
    diffs = [f"{f.name} {getattr(have, f.name)} (manifest {getattr(want, f.name)})"
             for f in dataclasses.fields(PredictorConfig) if getattr(have, f.name) != getattr(want, f.name)]
    return [f"architecture from the checkpoint's predictor_config, not the manifest's: {', '.join(diffs)}"] if diffs \
        else []


def predictor_from_file(pf: PredictorFile, device: torch.device) -> ACPredictor:
    """The predictor of `pf` on `device`, loaded strictly (a missing, extra or misshapen key names the file)."""
    with torch.device("meta"):
        model = ACPredictor(pf.config)
    model.to_empty(device="cpu")
    try:
        load_strict(model, pf.state, source=f"{pf.path}['predictor']")
    except CheckpointError as err:
        hint = " (a released-format file's architecture is the manifest's predictor section)" \
            if pf.config_from == "manifest" else ""
        raise CheckpointError(f"{err}{hint}") from None
    return model.to(device).eval()
