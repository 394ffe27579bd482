"""Crop draws and frame preprocessing (docs/release.md, "One training sample").

A view of an episode is one temporal phase plus one random-resize-crop box shared by all its frames.
The draws come from a seed derived from (manifest seed, episode id, view number), so a re-run, another
worker or another machine draws exactly the same views -- which is what makes the cache incremental.
With the released settings (scale 1.777, ratio 0.75..1.35) no draw fits a 16:9 frame and every view
gets the same centre fallback crop; the view key is computed from the draw's content, so identical
draws collapse to one stored view. `draw_views` is the one function that decides which views of an
episode exist: planning (from the store alone) and extraction (from the opened episode) both call it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.manifest import CropSection, ViewsSection
from pipeline.store import view_id_for

MAX_TRIES = 10  # Inception-style crop: attempts before the fallback


@dataclass(frozen=True)
class CropBox:
    """A crop in source-pixel coordinates: rows top..top+height, columns left..left+width."""

    top: int
    left: int
    height: int
    width: int

    def as_list(self) -> list[int]:
        return [self.top, self.left, self.height, self.width]


@dataclass(frozen=True)
class ViewDraw:
    """What is drawn for one view: the phase of the frame grid and the crop box."""

    phase: int
    box: CropBox


def view_seed(seed: int, episode_id: str, view: int) -> int:
    """A 64-bit seed from (seed, episode, view): stable across processes and Python versions (no hash())."""
    digest = hashlib.sha256(f"{seed}\x00{episode_id}\x00{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def draw_crop(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> CropBox:
    """Inception-style random-resize-crop box (torchvision's RandomResizedCrop.get_params rule)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(MAX_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return CropBox(top, left, h, w)
    return fallback_crop(height, width, ratio)


def fallback_crop(height: int, width: int, ratio: tuple[float, float]) -> CropBox:
    """Centre crop with the aspect clamped to the ratio range (the whole frame if it is inside)."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def draw_view(
    seed: int,
    episode_id: str,
    view: int,
    frame_hw: tuple[int, int],
    stride: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    random_phase: bool,
) -> ViewDraw:
    """The phase and crop box of view `view` of an episode, reproducibly. `random_phase` draws the phase
    first (phase 0 otherwise); `views.phase: all` draws as `random` does, so its crop boxes are those of
    `random` and a store made with `random` is a subset of the one `all` asks for."""
    rng = np.random.default_rng(view_seed(seed, episode_id, view))
    phase = int(rng.integers(0, stride)) if random_phase else 0
    return ViewDraw(phase, draw_crop(rng, frame_hw[0], frame_hw[1], scale, ratio))


@dataclass(frozen=True)
class DrawnView:
    """A distinct view of an episode: its content key and its draw."""

    view_id: str
    draw: ViewDraw


def draw_views(views: ViewsSection, crop: CropSection, camera: str, episode_id: str, frame_hw: tuple[int, int],
               stride: int) -> list[DrawnView]:
    """The distinct views the manifest asks for of one episode and camera, in draw order.

    View k is drawn from (views.seed, episode, k); identical draws (always, under the released crop
    settings) give the same view id and are listed once. With `views.phase: all` each crop draw is
    stored at every phase 0..stride-1 of the frame grid, so the windows of the views cover every raw
    start frame the release can draw.
    """
    out: dict[str, DrawnView] = {}
    for k in range(views.per_episode):
        d = draw_view(views.seed, episode_id, k, frame_hw, stride, crop.scale, crop.ratio,
                      views.phase != "first")
        phases = range(stride) if views.phase == "all" else (d.phase,)
        for phase in phases:
            vid = view_id_for(episode_id, camera, phase, stride, d.box.as_list())
            out.setdefault(vid, DrawnView(vid, ViewDraw(phase, d.box)))
    return list(out.values())


def crop_frames(frames: np.ndarray, box: CropBox) -> np.ndarray:
    """Cut the box out of decoded frames [F, H, W, 3] uint8 (a view, no copy)."""
    return frames[:, box.top : box.top + box.height, box.left : box.left + box.width]  # [F, h, w, 3]


def preprocess(
    frames: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Cropped uint8 frames [F, h, w, 3] -> normalised float32 [F, 3, size, size].

    Resize first, on 0..255 floats, then normalise with mean/std x 255: the release's order of
    operations, so the pixels match it to float rounding. Bilinear, align_corners False, no antialias.
    """
    x = frames.permute(0, 3, 1, 2).float()  # [F, 3, h, w]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) * 255.0  # [1, 3, 1, 1]
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) * 255.0  # [1, 3, 1, 1]
    return (x - m) / s  # [F, 3, size, size]
