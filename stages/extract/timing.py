"""Video timing made visible: the frame rate each camera's videos report, the stride it gives, and whether
trajectory.h5's own per-frame timestamps agree.

Why: the stride `ceil(video_fps / fps)` is computed from the rate the MP4 reports (the release's rule,
kept by default). Users report DROID MP4s whose reported rate differs from the capture rate (vjepa2
issue #183: 60 fps reported, frames ~15 Hz), which silently makes a "4 fps" clip span four times the
intended time. Nothing here changes what is extracted: it reads the view records (which keep the
reported rate, the stride used and, when the trajectory file has timestamps, the capture rate) and
says what it finds, for `pipeline extract`'s summary and `pipeline status`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.manifest import DataSection
from pipeline.store import ViewTable
from stages.cache.sampling import manifest_views

DISAGREEMENT = 0.10  # relative difference between capture rate and the rate the stride used that is flagged


@dataclass
class CameraTiming:
    """One camera over the episodes whose views are committed: min / median / max of each figure."""

    camera: str
    episodes: int
    video_fps: list[float]  # as the videos report it (decord)
    stride: list[int]  # raw frames between stored frames
    capture_fps: list[float] | None = None  # from trajectory.h5 timestamps, where episodes have them
    with_timestamps: int = 0  # episodes whose trajectory.h5 has the camera's timestamps
    disagreeing: int = 0  # of those, episodes whose capture rate is off the rate the stride was computed from
    examples: list[str] = field(default_factory=list)  # a few of them, for the warning
    disagreeing_fps: float | None = None  # of those episodes: the median capture rate,
    disagreeing_rate: float | None = None  # the median rate their strides came from,
    disagreeing_stride: int | None = None  # and their median stride
    rate_used: list[float] = field(default_factory=list)  # the rate strides came from (reported or data.video_fps)

    def warning(self, fps: float) -> str | None:
        """One line when the timestamps disagree with the rate the stride was computed from, else None."""
        if not self.disagreeing or self.disagreeing_fps is None:
            return None
        capture, used, stride = self.disagreeing_fps, self.disagreeing_rate, self.disagreeing_stride
        return (f"{self.camera}: trajectory.h5 timestamps say {capture:.2f} Hz but the stride {stride} was computed "
                f"from {used:g} fps in {self.disagreeing} of {self.with_timestamps} episodes (e.g. "
                f"{', '.join(self.examples)}): a clip step spans {stride / capture:.2f} s, not {1 / fps:.2f} s. If "
                f"the videos' reported rate is wrong, set data.video_fps: {round(capture, 2):g} (vjepa2 issue #183).")


def manifest_timing(views: ViewTable, data: DataSection) -> tuple[list[CameraTiming], list[str]]:
    """Per camera of the manifest, over the views it trains on (its cameras and stride), the timing figures
    and the warnings they raise: what `pipeline extract`'s summary and `pipeline status` print."""
    timings = camera_timings(views, manifest_views(views, data), data.cameras, data.fps_override())
    return timings, timing_warnings(timings, data.fps)


def camera_timings(views: ViewTable, rows: np.ndarray, cameras: list[str], video_fps: float | None
                   ) -> list[CameraTiming]:
    """Per camera, over one view per episode (of `rows` of the table); `video_fps` is the manifest's override
    (None = reported). The views of one episode and camera share their video, so any one of them serves."""
    out = []
    for camera in cameras:
        if camera not in views.categories["camera"]:
            continue
        mine = rows[views.codes["camera"][rows] == views.categories["camera"].index(camera)]
        _, first = np.unique(views.codes["episode_id"][mine], return_index=True)
        if len(first):
            out.append(_timing(camera, views, mine[first], video_fps))
    return out


def _timing(camera: str, views: ViewTable, rows: np.ndarray, override: float | None) -> CameraTiming:
    """One camera's figures over `rows`, one view per episode."""
    fps, stride = views.numbers["video_fps"][rows], views.numbers["stride"][rows]  # [E]
    capture = views.numbers["capture_fps"][rows]  # [E], NaN where not recorded
    used = np.full(len(rows), override) if override else fps  # [E] the rates strides came from
    t = CameraTiming(camera, len(rows), _spread(fps.tolist()), _spread(stride.tolist()),
                     rate_used=_spread(used.tolist()))
    timed = np.flatnonzero(~np.isnan(capture) & (capture > 0))
    if len(timed):
        t.capture_fps = _spread(capture[timed].tolist())
        t.with_timestamps = len(timed)
        off = timed[np.abs(capture[timed] / used[timed] - 1) > DISAGREEMENT]
        t.disagreeing = len(off)
        t.examples = [views.value("episode_id", int(r)) for r in rows[off[:3]]]
        if len(off):
            t.disagreeing_fps = float(np.median(capture[off]))
            t.disagreeing_rate = float(np.median(used[off]))
            t.disagreeing_stride = int(np.median(stride[off]))
    return t


def _spread(values: list[Any]) -> list[Any]:
    """[min, median, max], in the values' own type (strides stay integers)."""
    ordered = sorted(values)
    return [ordered[0], ordered[len(ordered) // 2], ordered[-1]]


def format_timings(timings: list[CameraTiming], width: int = 11) -> list[str]:
    """Lines for a summary whose labels are `width` wide: fps and stride per camera (min / median / max over
    episodes)."""
    lines = []
    for t in timings:
        capture = (f", timestamps {_fmt(t.capture_fps)} Hz in {t.with_timestamps}" if t.capture_fps else
                   ", no timestamps in trajectory.h5")
        lines.append(f"{'timing':<{width}}{t.camera}: video {_fmt(t.video_fps)} fps, stride {_fmt(t.stride)} "
                     f"(min/median/max over {t.episodes} episodes){capture}")
    return lines


def timing_warnings(timings: list[CameraTiming], fps: float) -> list[str]:
    return [w for t in timings if (w := t.warning(fps))]


def timings_to_dicts(timings: list[CameraTiming]) -> list[dict[str, Any]]:
    return [asdict(t) for t in timings]


def _fmt(values: list[Any] | None) -> str:
    if not values:
        return "-"
    return "/".join(f"{x:.4g}" for x in values) if len(set(values)) > 1 else f"{values[0]:.4g}"
