"""The encoder at run time, as stage one's workers use it: a loaded model per worker process, on its
device and precision, and the crops -> features call. (What the encoder *is* -- architecture and
weights identity, the cache key -- lives in `stages/fingerprint.py`; stage two never imports this.)

A dask worker runs many parts; loading ViT-g (1 B parameters) for each would dominate, so the loaded
encoder is kept per process, keyed by what defines it.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pipeline.manifest import CropSection, EncoderSection, ExtractSection, Manifest
from stages.cache.fingerprint import vit_config
from stages.extract.augment import preprocess
from stages.models.vit import VisionTransformer, ViTConfig, build_encoder, encode_frames

_LOADED: dict[str, LoadedEncoder] = {}  # per process: key -> loaded encoder


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
    def encode_crops(self, crops: list[torch.Tensor], crop: CropSection) -> torch.Tensor:
        """Cropped uint8 frames (groups may differ in crop size) -> features [B, tokens, D] on the CPU."""
        pixels = torch.cat([preprocess(c.to(self.device, non_blocking=True), crop.size, crop.mean, crop.std)
                            for c in crops])  # [B, 3, S, S]
        feats = self.encode_pixels(pixels)  # [B, tokens, D]
        return feats.cpu() if self.device.type != "cpu" else feats

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised frames [B, 3, S, S] on the device -> float32 features [B, tokens, D] on the device."""
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else nullcontext())
        with autocast:
            return encode_frames(self.model, pixels).float()  # [B, tokens, D]


def build_runtime(arch: ViTConfig, encoder: EncoderSection, device: torch.device) -> LoadedEncoder:
    """The encoder of architecture `arch` with `encoder`'s weights on `device` (for `train --online`: the
    training rank's own device)."""
    model = build_encoder(arch, encoder.checkpoint, encoder.checkpoint_key, encoder.seed)
    return LoadedEncoder(model.to(device), device, encoder.precision)


def load_encoder(m: Manifest, key: str) -> LoadedEncoder:
    """The process's encoder for fingerprint `key` (the manifest's), loaded on first use."""
    if key not in _LOADED:
        _set_threads(m.extract)
        _LOADED.clear()  # one encoder per process: a new fingerprint replaces the old one
        _LOADED[key] = build_runtime(vit_config(m), m.encoder, pick_device(m.encoder.device))
    return _LOADED[key]


def release_encoders() -> None:
    """Drop the process's loaded encoder (ViT-g holds ~4 GiB of GPU memory while it is kept)."""
    _LOADED.clear()


def _set_threads(extract: ExtractSection) -> None:
    """dask workers start with OMP_NUM_THREADS=1; on a CPU encoder give each worker its share of cores."""
    if extract.threads > 0:
        torch.set_num_threads(extract.threads)
    elif os.environ.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // extract.workers))
