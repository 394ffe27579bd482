"""The encoder as stage one uses it: config from the manifest, identity for the fingerprint, a loaded
model per worker process, and the crop -> features call.

A dask worker runs many parts; loading ViT-g (1 B parameters) for each would dominate, so the loaded
encoder is kept per process, keyed by what defines it.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.manifest import CropConfig, Manifest
from pipeline.store import FORMAT_VERSION, store_specs
from stages.augment import preprocess
from stages.vit import VIT_PRESETS, VisionTransformer, ViTConfig, build_encoder, encode_frames, weights_digest

_LOADED: dict[str, LoadedEncoder] = {}  # per process: key -> loaded encoder
_IDENTITY: dict[tuple, str] = {}  # per process: checkpoint file (path, size, mtime) or random init -> sha256


def vit_config(m: Manifest) -> ViTConfig:
    """The encoder architecture the manifest asks for; img_size is the crop size."""
    e = m.encoder
    if e.preset is not None:
        base = VIT_PRESETS[e.preset]
        return ViTConfig(**{**base.to_dict(), "img_size": m.crop.size})
    return ViTConfig(img_size=m.crop.size, embed_dim=e.embed_dim, depth=e.depth, num_heads=e.num_heads,
                     mlp_ratio=e.mlp_ratio)


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
    """Everything that determines the bytes of a stored feature (DESIGN section 2)."""
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
    found = [spec for spec in store_specs(m.cache.path).values()
             if _without_weights(spec) == want and str(spec["encoder"]["weights"]).endswith(entry)]
    if len(found) != 1:
        raise FileNotFoundError(
            f"encoder.checkpoint {ckpt} is not on this machine, and {len(found)} feature stores under "
            f"{m.cache.path} match the rest of the manifest (need exactly one to know its weights digest)")
    return found[0]


def _without_weights(spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "encoder": {k: v for k, v in spec["encoder"].items() if k != "weights"}}


def pick_device(requested: str) -> torch.device:
    """auto -> this worker's GPU if there is one (workers of a local cluster take GPUs round-robin)."""
    if requested != "auto":
        return torch.device(requested)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else 0
    except (ImportError, ValueError):
        index = 0
    return torch.device(f"cuda:{index % torch.cuda.device_count()}")


@dataclass
class LoadedEncoder:
    """A frozen encoder on its device with the precision it runs at."""

    model: VisionTransformer
    device: torch.device
    precision: str

    @property
    def tokens(self) -> int:
        return self.model.cfg.tokens_per_frame

    @property
    def dim(self) -> int:
        return self.model.cfg.embed_dim

    @torch.inference_mode()
    def encode_crops(self, crops: list[torch.Tensor], crop: CropConfig) -> torch.Tensor:
        """Cropped uint8 frames (groups may differ in crop size) -> features [B, tokens, D] on the CPU."""
        pixels = torch.cat([preprocess(c.to(self.device, non_blocking=True), crop.size, crop.mean, crop.std)
                            for c in crops])  # [B, 3, S, S]
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else nullcontext())
        with autocast:
            feats = encode_frames(self.model, pixels)  # [B, tokens, D]
        return feats.float().cpu() if self.device.type != "cpu" else feats.float()


def load_encoder(m: Manifest, key: str) -> LoadedEncoder:
    """The process's encoder for fingerprint `key`, loaded on first use."""
    if key not in _LOADED:
        _set_threads(m)
        device = pick_device(m.encoder.device)
        model = build_encoder(vit_config(m), m.encoder.checkpoint, m.encoder.checkpoint_key, m.encoder.seed)
        _LOADED.clear()  # one encoder per process: a new fingerprint replaces the old one
        _LOADED[key] = LoadedEncoder(model.to(device), device, m.encoder.precision)
    return _LOADED[key]


def _set_threads(m: Manifest) -> None:
    """dask workers start with OMP_NUM_THREADS=1; on a CPU encoder give each worker its share of cores."""
    if m.extract.threads > 0:
        torch.set_num_threads(m.extract.threads)
    elif os.environ.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // m.extract.workers))
