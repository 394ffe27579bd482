"""The store's index files: what a commit record and a failure record hold, and how they are checked.

A record is JSON written once and never changed. Readers meet records written by other processes,
other machines, other versions, and records cut short by a full disk: every record is parsed through
`parse_commit` / `parse_failure`, which either return a typed record or raise `RecordError` saying
what is wrong, so that the store can name the file in one warning line and go on without it.
"""

from __future__ import annotations

import calendar
import dataclasses
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

COMMIT_VERSION = 2  # the commit record layout; the store's format version


class RecordError(ValueError):
    """A record that does not parse or lacks fields; the message says what is wrong (not which file)."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def view_id_for(episode_id: str, camera: str, phase: int, stride: int, box: list[int]) -> str:
    """Content key of a view: identical draws give the same id and are stored once."""
    return hashlib.sha1(canonical_json([episode_id, camera, phase, stride, box]).encode()).hexdigest()[:20]


def episode_key(episode_id: str) -> str:
    """A file-name-safe key for an episode id (ids are relative paths)."""
    return hashlib.sha1(episode_id.encode()).hexdigest()[:20]


def new_attempt_id() -> str:
    """A fresh, unique name for one task attempt's arrays; it starts with its UTC time (gc's grace period)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:10]


def attempt_time(attempt: str) -> float | None:
    """When an attempt started, from its name; None for a name this code did not make."""
    try:
        return float(calendar.timegm(time.strptime(attempt.split("-", 1)[0], "%Y%m%dT%H%M%SZ")))
    except ValueError:
        return None


@dataclass
class ViewRecord:
    """One committed view: where its rows are, what it was made from, and the digests of its bytes."""

    view_id: str  # content hash of (episode_id, camera, phase, stride, box)
    episode_id: str  # episode folder relative to data.root
    episode_path: str  # the folder as it was read
    camera: str  # metadata key, e.g. left_mp4_path
    serial: str  # camera serial
    phase: int  # first raw frame of the grid
    stride: int  # raw frames between stored frames
    video_fps: float
    frame_hw: list[int]  # source video [H, W]
    box: list[int]  # crop [top, left, height, width] in source pixels
    source: dict[str, list[int]]  # file name -> [size, mtime_ns] of its inputs
    part: str = ""  # part id holding the rows
    attempt: str = ""  # the attempt (folder under parts/<part>/) whose arrays hold the rows
    start: int = 0  # first row in the attempt's arrays
    length: int = 0  # rows (frames)
    digests: dict[str, Any] = field(default_factory=dict)  # crc32c: features per row, states/actions/frame_index
    capture_fps: float | None = None  # the camera's rate from trajectory.h5's timestamps (None: not recorded)
    committed_at: float = 0.0  # from the commit record (not stored per view)
    commit: str = ""  # name of the commit record that lists it (not stored per view)

    @property
    def location(self) -> str:
        return f"parts/{self.part}/{self.attempt}"

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("committed_at", "commit")}


_VIEW_TYPES = {"view_id": str, "episode_id": str, "episode_path": str, "camera": str, "serial": str, "phase": int,
               "stride": int, "video_fps": (int, float), "frame_hw": list, "box": list, "source": dict, "part": str,
               "attempt": str, "start": int, "length": int, "digests": dict}
_OPTIONAL_VIEW_TYPES = {"capture_fps": (int, float, type(None))}  # absent in records of older versions
_KNOWN_VIEW_KEYS = _VIEW_TYPES.keys() | _OPTIONAL_VIEW_TYPES.keys()


@dataclass
class CommitRecord:
    """A part attempt's index: the views it commits. Written last; until it exists the attempt is not data."""

    name: str  # file name without .json: <part>.<attempt>[.r<time>] (unique per record)
    part: str
    attempt: str
    frames: int  # rows of the attempt's arrays
    committed_at: float
    views: list[ViewRecord]
    repaired_from: str | None = None  # the record this one replaced (verify --repair), if any

    def to_json(self, fingerprint: str) -> dict[str, Any]:
        out = {"format_version": COMMIT_VERSION, "fingerprint": fingerprint, "part": self.part,
               "attempt": self.attempt, "frames": self.frames, "committed_at": self.committed_at,
               "optional_view_keys": sorted(_OPTIONAL_VIEW_TYPES), "views": [v.to_json() for v in self.views]}
        if self.repaired_from:
            out["repaired_from"] = self.repaired_from
        return out


@dataclass(frozen=True)
class RecordInfo:
    """What a commit record says besides its views."""

    name: str
    part: str
    attempt: str
    frames: int
    committed_at: float
    repaired_from: str | None = None


def parse_commit(name: str, raw: Any, fingerprint: str) -> CommitRecord:
    """A commit record from its JSON, every field checked; RecordError says what is wrong."""
    info, views = check_commit(name, raw, fingerprint)
    return CommitRecord(info.name, info.part, info.attempt, info.frames, info.committed_at,
                        [ViewRecord(**v, committed_at=info.committed_at) for v in views], info.repaired_from)


def check_commit(name: str, raw: Any, fingerprint: str) -> tuple[RecordInfo, list[dict[str, Any]]]:
    """A commit record's own fields and its views as checked dicts of `ViewRecord`'s fields (a reader of many
    records builds columns from these without a record object per view); RecordError says what is wrong."""
    _require_dict(raw)
    version = raw.get("format_version")
    if version != COMMIT_VERSION:
        raise RecordError(f"format_version {version!r}, this code reads {COMMIT_VERSION}")
    if raw.get("fingerprint") != fingerprint:
        raise RecordError(f"fingerprint {raw.get('fingerprint')!r} is not this store's")
    for key, kind in (("part", str), ("attempt", str), ("frames", int), ("committed_at", (int, float)),
                      ("views", list)):
        _require_field(raw, key, kind)
    ignorable = _ignorable(raw)
    views = [_check_view(v, raw, i, ignorable) for i, v in enumerate(raw["views"])]
    return RecordInfo(name, raw["part"], raw["attempt"], raw["frames"], float(raw["committed_at"]),
                      raw.get("repaired_from")), views


def _check_view(v: Any, commit: dict[str, Any], i: int, ignorable: set[str]) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise RecordError(f"views[{i}] is a {type(v).__name__}, not an object")
    for key, kind in _VIEW_TYPES.items():
        if not isinstance(v.get(key), kind) or isinstance(v.get(key), bool):
            raise RecordError(f"views[{i}].{key} is missing or not a {getattr(kind, '__name__', 'number')}")
    for key, kind in _OPTIONAL_VIEW_TYPES.items():
        if key in v and (not isinstance(v[key], kind) or isinstance(v[key], bool)):
            raise RecordError(f"views[{i}].{key} is {v[key]!r}, not a number or null")
    unknown = v.keys() - _KNOWN_VIEW_KEYS
    if unknown - ignorable:
        raise RecordError(f"views[{i}] has unknown keys {sorted(unknown - ignorable)}")
    if unknown:
        v = {k: x for k, x in v.items() if k not in unknown}  # a newer writer's extras, declared safe to ignore
    if v["part"] != commit["part"] or v["attempt"] != commit["attempt"]:
        raise RecordError(f"views[{i}] names part/attempt {v['part']}/{v['attempt']}, not the record's")
    if v["start"] < 0 or v["length"] < 1 or v["start"] + v["length"] > commit["frames"]:
        raise RecordError(f"views[{i}] rows {v['start']}+{v['length']} outside the attempt's {commit['frames']}")
    if len(v["digests"].get("features", [])) != v["length"]:
        raise RecordError(f"views[{i}] has no features digest per row")
    return v


def _ignorable(commit: dict[str, Any]) -> set[str]:
    """View keys the writer declared that a reader which does not know them may ignore (`optional_view_keys`):
    a later version can add information to the records without making this one redo their views, while
    a key it did not declare -- one that may change what a view means -- still makes the record unreadable."""
    keys = commit.get("optional_view_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise RecordError(f"optional_view_keys is {keys!r}, not a list of names")
    return set(keys)


@dataclass
class FailureRecord:
    """An episode that failed, what it was read from and under which settings: it is retried when either
    changes (a fixed file, or another setting that caused the failure), never on a plain re-run."""

    episode_id: str
    path: str
    reason: str
    time: float
    source: dict[str, list[int]]  # file identity when it failed
    settings: dict[str, Any]  # the stage-one settings an episode's failure can depend on (not the fingerprint)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_failure(raw: Any) -> FailureRecord:
    _require_dict(raw)
    for key, kind in (("episode_id", str), ("path", str), ("reason", str), ("time", (int, float)),
                      ("source", dict), ("settings", dict)):
        _require_field(raw, key, kind)
    return FailureRecord(raw["episode_id"], raw["path"], raw["reason"], float(raw["time"]), raw["source"],
                         raw["settings"])


def _require_dict(raw: Any) -> None:
    if not isinstance(raw, dict):
        raise RecordError(f"holds a {type(raw).__name__}, not a JSON object")


def _require_field(raw: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> None:
    if key not in raw:
        raise RecordError(f"lacks the field {key!r}")
    if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
        raise RecordError(f"field {key!r} is {raw[key]!r}")
