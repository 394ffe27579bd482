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
    return state_dict_entry(read_checkpoint(path), key, Path(path))


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """The top-level dict of a checkpoint file (released or ours); a missing, unreadable or non-dict file is a
    CheckpointError naming it, never a traceback from deep inside torch."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        blob = _torch_load(path)
    except Exception as err:  # corrupt or foreign files: report them as checkpoint problems
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(err).__name__}: {detail})") from err
    if not isinstance(blob, Mapping):
        raise CheckpointError(f"checkpoint {path}: expected a dict at top level, got {type(blob).__name__}")
    return blob


def state_dict_entry(blob: Mapping[str, Any], key: str, path: Path) -> dict[str, Tensor]:
    """The state dict under ``key`` of a file's top-level dict, prefixes stripped and values checked."""
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


# -- writing files in the release's format -------------------------------------------------------------

RELEASE_PREFIX = "module."  # the release saves the state dicts of DDP-wrapped modules
RELEASE_EPOCH = 0  # the release counts epochs of `ipe` steps; our runs count steps (see `release_file`)
_PLAIN = (str, int, float, bool, type(None))


def release_file(encoder: Mapping[str, Tensor], predictor: Mapping[str, Tensor],
                 extras: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level dict of a file in the format of the released ``vjepa2-ac-vitg.pt``.

    Why these keys (facebookresearch/vjepa2): the release's trainer (``app/vjepa_droid/train.py``,
    ``save_checkpoint``) writes ``encoder``, ``predictor``, ``opt``, ``scaler``, ``target_encoder`` (the same
    frozen encoder as ``encoder``), ``epoch``, ``loss``, ``batch_size``, ``world_size``, ``lr``, each model the
    state dict of a DDP-wrapped module, so every key starts with ``module.``. What reads such a file:

    - the hub (``src/hub/backbones.py``, ``vjepa2_ac_vit_giant``, which the energy-landscape planning notebook
      uses): ``["encoder"]`` loaded with strict=False and ``["predictor"]`` with strict=True, after deleting
      ``module.`` and ``backbone.`` wherever they occur in a key (``str.replace``);
    - the trainer's ``load_pretrained`` (``app/vjepa_droid/utils.py``, a ``meta.pretrain_checkpoint``):
      ``["epoch"]``, ``["target_encoder"]`` and, with ``load_predictor``, ``["predictor"]``, stripping only
      ``backbone.`` and loading with strict=False into DDP-wrapped modules -- keys without ``module.`` would
      load nothing there, silently.

    So this writes ``encoder`` and ``target_encoder`` (one dict: torch.save stores its tensors once),
    ``predictor`` and ``epoch``, all keys prefixed ``module.``. ``epoch`` is RELEASE_EPOCH: the release only
    logs it when loading weights, and a step count is not an epoch count. ``opt`` and ``scaler`` are left out:
    our optimizer's state is not the release's, so the trainer's resume (``load_checkpoint``) refuses the file
    with a KeyError instead of continuing from a wrong state. ``extras`` (the pipeline's ``predictor_config``
    and provenance) become further top-level keys: no loader above indexes them, so they cannot break one;
    they must be plain data so that ``torch.load(weights_only=True)`` still reads the file.
    """
    reserved = {"encoder", "target_encoder", "predictor", "epoch"} & set(extras)
    if reserved:
        raise ValueError(f"extras may not replace the release's keys {sorted(reserved)}")
    for name, value in extras.items():
        _check_plain(value, name)
    enc = _prefixed(encoder, "encoder")
    return {"encoder": enc, "target_encoder": enc, "predictor": _prefixed(predictor, "predictor"),
            "epoch": RELEASE_EPOCH, **extras}


def _prefixed(state: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """``module.`` + each key; a key that holds a wrapper's name would be mangled by the hub's str.replace."""
    bad = [k for k in state if any(p in k for p in STRIP_PREFIXES)]
    if bad:
        raise ValueError(f"{what} keys hold a wrapper prefix the release's loaders delete: {_listing(bad)}")
    return {RELEASE_PREFIX + k: v.detach().cpu() for k, v in state.items()}


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything torch.load(weights_only=True) would not read back (objects, numpy arrays)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise ValueError(f"extra {where} is a {type(value).__name__}: only plain data keeps the file weights-only")
