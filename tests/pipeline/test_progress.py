"""Progress without a terminal: plain lines, not a bar redrawn with carriage returns."""

from __future__ import annotations

import pytest

from pipeline.progress import PlainProgress, progress


def test_without_a_terminal_progress_is_plain_lines_at_most_every_interval(capsys: pytest.CaptureFixture) -> None:
    bar = progress("extract", "frame", show=True, interval=3600)  # stderr is captured here: not a terminal
    assert isinstance(bar, PlainProgress)
    bar.set_postfix(parts="1/2", failed=0)
    for _ in range(5):
        bar.update(32)
    assert capsys.readouterr().err == ""  # within the interval: no line yet
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("extract: 160 frames, ") and "\r" not in lines[0]
    assert lines[0].endswith("(parts=1/2, failed=0)")


def test_every_update_past_the_interval_writes_a_line_with_the_total(capsys: pytest.CaptureFixture) -> None:
    bar = progress("verify", "view", total=3, show=True, interval=0)
    for _ in range(3):
        bar.update(1)
    assert [line.split(",")[0] for line in capsys.readouterr().err.splitlines()] == [
        "verify: 1/3 views", "verify: 2/3 views", "verify: 3/3 views"]


def test_nothing_is_written_when_not_shown_or_nothing_was_done(capsys: pytest.CaptureFixture) -> None:
    quiet = progress("extract", "frame", show=False)
    quiet.update(10)
    quiet.close()
    progress("extract", "frame", show=True).close()  # no work: no line
    assert capsys.readouterr().err == ""
