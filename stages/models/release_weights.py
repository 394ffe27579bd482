"""Reading released V-JEPA 2 / V-JEPA 2-AC checkpoint files, shared by the encoder and the predictor.

Why a file of its own: the released ``vitg.pt`` and ``vjepa2-ac-vitg.pt`` are ``torch.save``d dicts
holding several state dicts (``encoder``, ``target_encoder``, ``predictor``, ...) whose keys carry
``module.`` / ``backbone.`` prefixes from DDP wrapping. A silently half-loaded model would give
plausible but wrong features, so loading here is strict and every failure says which file and which
keys are at fault.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

STRIP_PREFIXES = ("module.", "backbone.")  # wrappers of the release's training code
_SHOW = 5  # how many offending keys an error message lists


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match the model."""


def _listing(keys: Iterable[str]) -> str:
    """First few keys, plus how many more, for error messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOW])
    more = len(keys) - _SHOW
    return f"{shown} (+{more} more)" if more > 0 else shown


def _torch_load(path: Path) -> Any:
    """torch.load on CPU; safe (weights_only) first, full unpickling only if that is refused.

    Zip-format files are memory-mapped so that a multi-GB file holding several models does not
    have to fit in RAM at once.
    """
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def strip_prefixes(key: str) -> str:
    """Remove any number of leading ``module.`` / ``backbone.`` prefixes."""
    while key.startswith(STRIP_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def read_state_dict(path: str | Path, key: str) -> dict[str, Tensor]:
    """The state dict under ``key`` (e.g. "target_encoder") in the file at ``path``, prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        blob = _torch_load(path)
    except Exception as err:  # corrupt or foreign files: report them as checkpoint problems
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(blob, Mapping):
        raise CheckpointError(f"checkpoint {path}: expected a dict at top level, got {type(blob).__name__}")
    if key not in blob:
        raise CheckpointError(
            f"checkpoint {path}: no entry {key!r}; available: {_listing(str(k) for k in blob)}"
        )
    entry = blob[key]
    if not isinstance(entry, Mapping):
        raise CheckpointError(
            f"checkpoint {path}: entry {key!r} is a {type(entry).__name__}, not a state dict"
        )
    return _clean(entry, f"{path}[{key!r}]")


def _clean(entry: Mapping[str, Any], where: str) -> dict[str, Tensor]:
    """Strip prefixes; refuse non-tensor values and keys that collide after stripping."""
    state: dict[str, Tensor] = {}
    for raw_key, value in entry.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"checkpoint {where}: value of {raw_key!r} is not a tensor")
        name = strip_prefixes(str(raw_key))
        if name in state:
            raise CheckpointError(
                f"checkpoint {where}: key {raw_key!r} collides with {name!r} after stripping"
            )
        state[name] = value
    return state


def load_strict(
    module: nn.Module, state: Mapping[str, Tensor], source: str, ignore: tuple[str, ...] = ()
) -> None:
    """Load ``state`` into ``module``; any missing/unexpected key or shape mismatch raises CheckpointError.

    ``ignore`` names checkpoint keys to drop first (e.g. "pos_embed", which RoPE models do not use).
    """
    state = {k: v for k, v in state.items() if k not in ignore}
    expected = module.state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched[:_SHOW])}")
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not match {type(module).__name__}: " + " | ".join(problems)
        )
    module.load_state_dict(state, strict=True)
