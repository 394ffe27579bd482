"""The video decoder gives exactly the frames the cached features were checked against: decord2 (imported as
`decord`) against what decord 0.6.0 decoded from the same files (tests/fixtures/decode, made by make.py there
while decord 0.6.0 was the dependency), with the release's sampling: every 4th frame, one `get_batch`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from stages.extract.droid import decode_frames, probe_video

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "decode"
GOLDEN = json.loads((FIXTURES / "decord-0.6.0.json").read_text())


@pytest.mark.parametrize("name", sorted(GOLDEN["videos"]))
@pytest.mark.parametrize("threads", [-1, 0, 1, 2])  # -1: the release's setting; the rest: extract.decode_threads
def test_frames_equal_the_golden_decode(name: str, threads: int) -> None:
    from decord import VideoReader, cpu

    want = GOLDEN["videos"][name]
    reader = VideoReader(str(FIXTURES / name), num_threads=threads, ctx=cpu(0))
    reader.seek(0)
    frames = reader.get_batch(list(range(0, len(reader), 4))).asnumpy()
    assert len(reader) == want["frames"] and list(frames.shape) == want["shape"]
    assert hashlib.sha256(frames.tobytes()).hexdigest() == want["sha256"]


def test_the_projects_decoding_path_gives_the_golden_frames(tmp_path: Path) -> None:
    """Through `decode_frames` (what extraction and online training call), with a frame map as a LeRobot
    episode has: rows to frames of the file."""
    from dataclasses import replace

    from stages.extract.droid import Episode

    name = "h264_320x180.mp4"
    frames_in_file, fps, hw = probe_video(tmp_path, FIXTURES / name)
    episode = Episode(tmp_path, {}, "cam", "cam", FIXTURES / name, fps, frames_in_file, frames_in_file,
                      np.zeros((frames_in_file, 7)), hw)
    every4 = decode_frames(episode, np.arange(0, frames_in_file, 4), num_threads=2)
    assert hashlib.sha256(every4.tobytes()).hexdigest() == GOLDEN["videos"][name]["sha256"]
    shifted = replace(episode, states=np.zeros((8, 7)), frame_map=np.arange(0, frames_in_file, 4))
    assert np.array_equal(decode_frames(shifted, np.arange(8)), every4)  # row i is frame 4i of the file
