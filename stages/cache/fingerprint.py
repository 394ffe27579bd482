"""The cache key: everything that decides which store a manifest maps to (docs/store.md).

One home for the rule, because two copies of it would drift apart and mix caches: the encoder
architecture the manifest asks for, the identity of its weights, the fingerprint spec built from them,
the spec a reader (train, status, verify) uses to find its store -- and the predictor architecture,
which is derived from the encoder's grid and width. Nothing here loads a model: stage two imports
this module, never the encoder runtime.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pipeline.manifest import Manifest
from pipeline.store import FORMAT_VERSION, store_specs
from stages.models.predictor import PredictorConfig
from stages.models.vit import VIT_PRESETS, ViTConfig, build_encoder, weights_digest

_IDENTITY: dict[tuple, str] = {}  # per process: checkpoint file (path, size, mtime) or random init -> sha256


def vit_config(m: Manifest) -> ViTConfig:
    """The encoder architecture the manifest asks for; img_size is the crop size."""
    e = m.encoder
    if e.preset is not None:
        base = VIT_PRESETS[e.preset]
        return ViTConfig(**{**base.to_dict(), "img_size": m.crop.size})
    return ViTConfig(img_size=m.crop.size, embed_dim=e.embed_dim, depth=e.depth, num_heads=e.num_heads,
                     mlp_ratio=e.mlp_ratio)


def predictor_config(m: Manifest) -> PredictorConfig:
    """The predictor's architecture: the manifest's predictor section on the encoder's grid and width."""
    enc = vit_config(m)
    p = m.predictor
    return PredictorConfig(img_size=m.crop.size, patch_size=enc.patch_size, embed_dim=enc.embed_dim,
                           predictor_embed_dim=p.embed_dim, depth=p.depth, num_heads=p.num_heads,
                           mlp_ratio=p.mlp_ratio)


def weights_identity(m: Manifest) -> str:
    """What identifies the encoder's weights: the checkpoint file's sha256 and entry, or the digest of the
    seeded random weights (cheap for the small demo configs; built once per process)."""
    e = m.encoder
    if e.checkpoint is None:
        key = ("random", tuple(sorted(vit_config(m).to_dict().items())), e.seed)
        if key not in _IDENTITY:
            _IDENTITY[key] = weights_digest(build_encoder(vit_config(m), None, seed=e.seed))
        return f"random:{_IDENTITY[key]}"
    path = Path(e.checkpoint)
    st = path.stat() if path.exists() else None
    key = (str(path.resolve()), st.st_size if st else -1, st.st_mtime_ns if st else -1)
    if key not in _IDENTITY:
        if st is None:
            raise FileNotFoundError(f"encoder.checkpoint {path} does not exist")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        _IDENTITY[key] = h.hexdigest()
    return f"sha256:{_IDENTITY[key]}[{e.checkpoint_key}]"


def fingerprint_spec(m: Manifest, weights: str | None = None) -> dict[str, Any]:
    """Everything that determines the bytes of a stored feature (docs/store.md)."""
    return {
        "format_version": FORMAT_VERSION,
        "encoder": {"arch": vit_config(m).to_dict(), "weights": weights or weights_identity(m),
                    "precision": m.encoder.precision, "per_frame": "each frame repeated into one tubelet"},
        "crop": {"size": m.crop.size, "scale": list(m.crop.scale), "ratio": list(m.crop.ratio),
                 "resize": "bilinear, align_corners=False, antialias=False"},
        "normalise": {"mean": list(m.crop.mean), "std": list(m.crop.std), "scale": "0..255 x 255"},
        "sampling": {"fps": m.data.fps, "stride": "ceil(video_fps / fps)"},
        "features": {"dtype": m.cache.dtype, "layer_norm": False},
    }


def reader_spec(m: Manifest) -> dict[str, Any]:
    """The fingerprint for reading the store (train, status). A training machine may hold the cache but
    not the encoder checkpoint: then the store is found by everything else in the fingerprint, whose
    recorded weights digest must come from the same checkpoint entry; more than one candidate is an error.
    """
    ckpt = m.encoder.checkpoint
    if ckpt is None or Path(ckpt).exists():
        return fingerprint_spec(m)
    want = _without_weights(fingerprint_spec(m, weights="?"))
    entry = f"[{m.encoder.checkpoint_key}]"
    specs = [attrs.get("fingerprint", {}).get("spec") for attrs in store_specs(m.cache.path).values()]
    found = [spec for spec in specs if isinstance(spec, dict) and isinstance(spec.get("encoder"), dict)
             and _without_weights(spec) == want and str(spec["encoder"].get("weights")).endswith(entry)]
    if len(found) != 1:
        raise FileNotFoundError(
            f"encoder.checkpoint {ckpt} is not on this machine, and {len(found)} feature stores under "
            f"{m.cache.path} match the rest of the manifest (need exactly one to know its weights digest)")
    return found[0]


def _without_weights(spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "encoder": {k: v for k, v in spec["encoder"].items() if k != "weights"}}
