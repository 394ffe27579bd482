"""Which frames and views a manifest asks for: the stride rule, the frame grid of a view, and the committed
views a run trains on. One home for rules that extraction, planning, training and the reports share (two
copies of a rule drift apart and mix clip durations).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.manifest import DataSection
from pipeline.store import ViewTable


def frame_stride(video_fps: float, fps: float) -> int:
    """Raw frames between samples: ceil(video_fps / fps), robust to float fuzz (15/5 -> 3)."""
    if not (video_fps > 0 and fps > 0):
        raise ValueError(f"video_fps and fps must be positive, got {video_fps} and {fps}")
    ratio = video_fps / fps
    nearest = round(ratio)
    if abs(ratio - nearest) < 1e-6 * max(1.0, ratio):
        return max(1, int(nearest))
    return max(1, math.ceil(ratio))


def data_stride(data: DataSection, reported_fps: float) -> int:
    """The stride a manifest's data section asks for on a video reporting `reported_fps` (data.video_fps,
    when set, replaces the reported rate): the one rule extraction, planning and training share."""
    return frame_stride(data.video_rate(reported_fps), data.fps)


def frame_grid(num_usable: int, stride: int, phase: int) -> np.ndarray:
    """Raw indices phase, phase + stride, ... below num_usable, as int64 [F]."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if not 0 <= phase < stride:
        raise ValueError(f"phase must be in [0, {stride}), got {phase}")
    return np.arange(phase, max(num_usable, 0), stride, dtype=np.int64)


def manifest_views(views: ViewTable, data: DataSection) -> np.ndarray:
    """[k] rows of the committed views a manifest trains on: of its cameras, on the frame grid its rates give.

    A store keeps every view it was ever asked for. Views of another stride (made under another
    data.fps or data.video_fps) stay in it for the runs that want them, but would mix clip durations
    into this run's windows, so they are left out here."""
    cameras = [i for i, c in enumerate(views.categories["camera"]) if c in data.cameras]
    fps = views.numbers["video_fps"]
    rates, inverse = np.unique(fps, return_inverse=True)
    strides = np.array([data_stride(data, float(r)) for r in rates], np.int64)[inverse.reshape(-1)]  # [n]
    keep = np.isin(views.codes["camera"], cameras) & (views.numbers["stride"] == strides)
    return np.flatnonzero(keep)
