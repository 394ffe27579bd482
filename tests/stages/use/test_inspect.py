"""`pipeline inspect` on the tiny store: a PNG of the documented size per view, view id prefixes, the page,
a deterministic feature PCA, and pictures of views whose raw episode is gone or changed."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_manifest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import UsageError
from pipeline.manifest import Manifest, load_manifest
from pipeline.store.records import ViewRecord
from pipeline.store.store import FeatureStore, find_view
from stages.cache.fingerprint import reader_spec
from stages.extract.driver import extract
from stages.use.inspect_cache import FIGURE_PX, feature_pca, inspect_cache, pick_views, shown_rows

runner = CliRunner()


def load(folder: Path) -> Manifest:
    return load_manifest(folder / "manifest.yaml", None, [])


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory, synthetic_dataset: Path) -> Path:
    """A folder with the tiny manifest, its data and its extracted store (6 views); read-only."""
    folder = tmp_path_factory.mktemp("inspect")
    shutil.copytree(synthetic_dataset, folder / "data")
    write_manifest(folder)
    assert extract(load(folder), show_progress=False, echo=lambda _: None).views_done == 6
    return folder


def committed(folder: Path) -> tuple[FeatureStore, dict[str, ViewRecord]]:
    m = load(folder)
    store = FeatureStore(m.cache.path, reader_spec(m)).check()
    return store, store.committed_views()


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_png_of_a_random_view_has_the_documented_size(cached: Path, tmp_path: Path) -> None:
    s = inspect_cache(load(cached), out=tmp_path / "one.png", seed=3)
    assert [p.png for p in s.pictures] == [str(tmp_path / "one.png")] and s.seed == 3
    assert png_size(tmp_path / "one.png") == FIGURE_PX == (1600, 1000)
    assert s.pictures[0].problem == "" and s.pictures[0].facts["raw frames"] == "ok"
    _, views = committed(cached)
    assert [v.view_id for v in pick_views(views, 1, 3)] == [s.pictures[0].view_id]  # the seed decides the draw


def test_a_view_id_prefix_names_the_view_and_the_default_out_is_here(
        cached: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, views = committed(cached)
    vid = sorted(views)[0]
    prefix = next(vid[:n] for n in range(1, len(vid)) if sum(v.startswith(vid[:n]) for v in views) == 1)
    monkeypatch.chdir(tmp_path)
    s = inspect_cache(load(cached), view=prefix)
    assert s.pictures[0].view_id == vid and s.seed is None
    assert png_size(tmp_path / f"inspect_{vid}.png") == FIGURE_PX


def test_unknown_or_ambiguous_view_ids() -> None:
    views = {"abc123": ViewRecord.__new__(ViewRecord), "abd456": ViewRecord.__new__(ViewRecord)}
    assert find_view(views, "abc") is views["abc123"]
    with pytest.raises(UsageError, match="ambiguous: 2 views"):
        find_view(views, "ab")
    with pytest.raises(UsageError, match="no committed view"):
        find_view(views, "")


def test_unknown_view_through_the_cli_is_one_line_and_exit_2(cached: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", "-m", str(cached / "manifest.yaml"), "--view", "nosuchview",
                                 "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: --view 'nosuchview'")
    assert not (tmp_path / "x.png").exists()
    result = runner.invoke(app, ["inspect", "-m", str(cached / "manifest.yaml"), "--out", str(tmp_path / "x.jpg")])
    assert result.exit_code == 2 and "ending in .png" in result.stderr
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["inspect", "-m", str(cached / "manifest.yaml"), "--out", str(tmp_path / "file/x.png")])
    assert result.exit_code == 2 and result.stderr.startswith("error: cannot write")
    assert "Traceback" not in result.output


def test_html_page_links_one_png_per_view(cached: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", "-m", str(cached / "manifest.yaml"), "--html", str(tmp_path / "page"),
                                 "--views", "2", "--seed", "1"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "page" / "index.html").read_text()
    pngs = sorted(p.name for p in (tmp_path / "page").glob("*.png"))
    assert len(pngs) == 2 and "(drawn with --seed 1)" in result.stdout
    for name in pngs:
        assert f'src="{name}"' in page and png_size(tmp_path / "page" / name) == FIGURE_PX
        assert name[len("inspect_"):-len(".png")] in page  # the view id in the facts table
    assert page.count("<tr>") == 3 and "crop box [top, left, h, w]" in page


def test_feature_pca_is_deterministic_and_on_the_token_grid(cached: Path) -> None:
    store, views = committed(cached)
    view = views[sorted(views)[0]]
    rows = shown_rows(view.length)
    first = feature_pca(store, view, rows, (2, 2))  # tiny profile: 32 px crops, 16 px patches
    assert first.shape == (len(rows), 2, 2, 3) and len(rows) == 6
    assert first.min() >= 0 and first.max() <= 1 and first.std() > 0.05
    np.testing.assert_array_equal(first, feature_pca(FeatureStore(store.cache_path, store.spec), view, rows, (2, 2)))


@pytest.mark.parametrize("change", ["removed", "changed"])
def test_raw_episode_gone_or_changed_still_gives_the_picture_and_one_warning(
        cached: Path, tmp_path: Path, change: str, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copytree(cached, tmp_path / "w")
    _, views = committed(tmp_path / "w")
    view = views[sorted(views)[0]]
    episode = tmp_path / "w" / "data" / view.episode_id
    if change == "removed":
        shutil.rmtree(episode)
    else:
        os.utime(episode / "trajectory.h5", ns=(1, 1))
    with caplog.at_level(logging.WARNING):
        s = inspect_cache(load(tmp_path / "w"), view=view.view_id, out=tmp_path / "v.png")
    assert png_size(tmp_path / "v.png") == FIGURE_PX
    want = "raw frames unavailable: episode" if change == "removed" else "raw frames stale: trajectory.h5"
    assert s.pictures[0].problem.startswith(want) and s.pictures[0].facts["raw frames"].startswith(want)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and view.view_id in warnings[0] and want in warnings[0]
    assert want in s.format()


def test_help() -> None:
    result = runner.invoke(app, ["inspect", "--help"])
    assert result.exit_code == 0 and "--html" in result.output and "--view" in result.output
